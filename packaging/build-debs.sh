#!/usr/bin/env bash
# Builds the Debian packages tracer-agent and tracer-collector from built binaries, with
# dpkg-deb alone (no packaging tool to install). `cargo xtask package` runs it on the release
# build; the packaging test runs it on the test build.
# Usage: packaging/build-debs.sh BIN_DIR OUT_DIR
set -euo pipefail
BIN_DIR="$(cd "$1" && pwd)"
OUT_DIR="$2"
HERE="$(cd "$(dirname "$0")" && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$HERE/../Cargo.toml" | head -1)"
LICENSE="$(sed -n 's/^license = "\(.*\)"/\1/p' "$HERE/../Cargo.toml" | head -1)"
[ -n "$VERSION" ] || { echo "build-debs: no version in Cargo.toml's [workspace.package]" >&2; exit 1; }
for bin in tracer tracer-collector; do
  [ -x "$BIN_DIR/$bin" ] || { echo "build-debs: $BIN_DIR/$bin is missing: build it first (cargo build --release)" >&2; exit 1; }
done
mkdir -p "$OUT_DIR"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT

# $1 package, $2 binary, $3 config, $4 unit, $5 one-line description, $6 long description
package() {
  local name="$1" bin="$2" config="$3" unit="$4" short="$5" long="$6"
  local root="$STAGE/$name"
  install -D -m 0755 "$BIN_DIR/$bin" "$root/usr/bin/$bin"
  # Debug information is for developers, not for a host's disk (a test build's binaries are
  # ~120 MB with it).
  strip --strip-debug "$root/usr/bin/$bin"
  install -D -m 0640 "$HERE/$config" "$root/etc/tracer/$config"
  install -D -m 0644 "$HERE/$unit" "$root/lib/systemd/system/$unit"
  install -d "$root/usr/share/doc/$name"
  printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: tracer\n\nFiles: *\nCopyright: the tracer developers\nLicense: %s\n' \
    "$LICENSE" > "$root/usr/share/doc/$name/copyright"
  install -d "$root/DEBIAN"
  for script in postinst prerm postrm; do
    install -m 0755 "$HERE/$name.$script" "$root/DEBIAN/$script"
  done
  echo "/etc/tracer/$config" > "$root/DEBIAN/conffiles"
  local size
  size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
  cat > "$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION
Architecture: amd64
Maintainer: tracer developers <tracer@localhost>
Depends: libc6 (>= 2.34), libgcc-s1, passwd
Section: net
Priority: optional
Installed-Size: $size
Description: $short
$long
CONTROL
  dpkg-deb --root-owner-group -Zgzip --build "$root" "$OUT_DIR/${name}_${VERSION}_amd64.deb" >/dev/null
  echo "$OUT_DIR/${name}_${VERSION}_amd64.deb"
}

package tracer-agent tracer agent.toml tracer-agent.service \
  "eBPF distributed tracing agent: every request on this host, no code changes" \
  " Follows every TCP connection on the host from the kernel (syscall tracepoints), recognises
 HTTP/1.x requests and responses, links them into traces and exports OpenTelemetry spans
 (OTLP) to a collector. Runs as the tracer-agent user with only the capabilities it uses.
 Also installs the tracer command line (tracer doctor, tracer traces, tracer trace)."
package tracer-collector tracer-collector collector.toml tracer-collector.service \
  "tracer collector: OTLP ingest, embedded trace store, query API and web UI" \
  " Receives OTLP from tracer agents and OpenTelemetry SDKs, stores spans in an embedded
 database under /var/lib/tracer-collector, stitches traces across hosts and serves a
 Jaeger-compatible query API and a web UI."
