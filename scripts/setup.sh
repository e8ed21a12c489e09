#!/usr/bin/env bash
# One idempotent set-up step for a fresh Debian 12 machine: everything the build,
# the agent and the tests need that the machine does not ship with.
# Safe to run again: each step checks first and says what it does.
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root (it installs apt packages and loads eBPF programs later)." >&2
  echo "       re-run with: sudo $0" >&2
  exit 1
fi

# --- apt packages -------------------------------------------------------------
# llvm-22-dev + libpolly: bpf-linker links against the same LLVM major as nightly rustc.
# nginx, curl, wrk: real peers for the integration tests and the benchmark.
# iproute2: network namespaces, veth and a bridge make the hosts of the topology test.
# python3-venv: the OpenTelemetry SDK tests run in a venv.
# chromium: the UI test drives Debian's browser headless (no browser downloads work here).
# redis-server (with redis-cli), postgresql (with psql), mariadb-server and mariadb-client,
# dnsmasq-base and bind9-dnsutils (dig): the protocols' integration tests.
# bpftool: the benchmark reads the probes' run-time statistics with it.
# qemu-system-x86, busybox-static: `cargo xtask kernels` (and its pass in the tests) boots other
# kernels in QEMU on a busybox initramfs.
APT_PKGS=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev pkg-config
          nginx-light curl wrk python3-venv sqlite3 chromium openssl bpftool
          iproute2 qemu-system-x86 busybox-static redis-server postgresql
          mariadb-server mariadb-client dnsmasq-base bind9-dnsutils)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The nginx and redis packages start services we do not want; tests start their own.
  systemctl disable --now nginx redis-server postgresql mariadb >/dev/null 2>&1 || true
  pkill -x nginx >/dev/null 2>&1 || true
  pkill -x redis-server >/dev/null 2>&1 || true
else
  say "apt packages: all present"
fi

# --- Rust toolchains ------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly toolchain (the eBPF crate needs -Z build-std)"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to nightly (needed to build core for bpfel-unknown-none)"
  rustup component add rust-src --toolchain nightly
else
  say "nightly rust-src: present"
fi

# --- bpf-linker -------------------------------------------------------------------
BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "building bpf-linker $BPF_LINKER_VERSION against Debian's LLVM 22 (takes a few minutes, once)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features llvm-22
else
  say "bpf-linker $BPF_LINKER_VERSION: present"
fi

# --- cargo-fuzz (cargo xtask fuzz, and the short pass of cargo xtask test) -----------
if ! command -v cargo-fuzz >/dev/null; then
  say "installing cargo-fuzz"
  cargo install --quiet --locked cargo-fuzz
else
  say "cargo-fuzz: present"
fi

# --- Python OpenTelemetry SDK (a real OTLP client for the collector tests) -------
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
if ! "$VENV/bin/python" -c 'import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
  say "installing the OpenTelemetry Python SDK and OTLP exporters into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check opentelemetry-sdk opentelemetry-exporter-otlp
else
  say "OpenTelemetry Python SDK: present"
fi
# aiohttp: the asyncio service of the topology test and `cargo xtask traces`.
if ! "$VENV/bin/python" -c 'import aiohttp' 2>/dev/null; then
  say "installing aiohttp into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check aiohttp
else
  say "aiohttp: present"
fi

# redis-py: a Redis client (pipelines, transactions, RESP3) for the Redis protocol's test.
if ! "$VENV/bin/python" -c 'import redis' 2>/dev/null; then
  say "installing redis-py into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'redis==8.2.0'
else
  say "redis-py: present"
fi

# psycopg: a PostgreSQL client using the extended protocol, for the PostgreSQL protocol's test.
if ! "$VENV/bin/python" -c 'import psycopg' 2>/dev/null; then
  say "installing psycopg into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'psycopg[binary]==3.3.9'
else
  say "psycopg: present"
fi

# mysql-connector-python: a MySQL client with server-side prepared statements, for the MySQL
# protocol's test.
if ! "$VENV/bin/python" -c 'import mysql.connector' 2>/dev/null; then
  say "installing mysql-connector-python into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'mysql-connector-python==26.10.0'
else
  say "mysql-connector-python: present"
fi

# grpcio: a real gRPC server and client (h2c) for the HTTP/2 protocol's test.
if ! "$VENV/bin/python" -c 'import grpc' 2>/dev/null; then
  say "installing grpcio into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'grpcio==1.76.0'
else
  say "grpcio: present"
fi

# hypercorn: an HTTP/2 server that also takes h2c by Upgrade, for the HTTP/2 protocol's test.
if ! "$VENV/bin/python" -c 'import hypercorn, requests' 2>/dev/null; then
  say "installing hypercorn and requests into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'hypercorn==0.18.0' 'requests==2.34.2'
else
  say "hypercorn: present"
fi

# rotel: a real OTLP relay (not written here) that the collector's fan-out test forwards through.
if ! "$VENV/bin/python" -c 'import rotel' 2>/dev/null; then
  say "installing rotel (an OTLP relay) into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'rotel==0.0.1a15'
else
  say "rotel: present"
fi

# --- playwright-core for the UI test (drives /usr/bin/chromium) ------------------
UI_TESTS="$ROOT/tracer-collector/ui/tests"
if ! command -v npm >/dev/null; then
  echo "setup: npm (Node.js) is missing; install Node.js 20 (e.g. apt-get install nodejs npm) and re-run" >&2
  exit 1
fi
if [ -f "$UI_TESTS/package.json" ] && [ ! -d "$UI_TESTS/node_modules/playwright-core" ]; then
  say "installing playwright-core for the UI test"
  (cd "$UI_TESTS" && npm ci --no-audit --no-fund --silent)
fi

# --- tracefs ------------------------------------------------------------------------
if [ ! -e /sys/kernel/tracing/events ]; then
  say "mounting tracefs at /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing || say "could not mount tracefs; the agent will say why"
fi

say "done"
