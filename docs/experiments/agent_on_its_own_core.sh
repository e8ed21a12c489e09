#!/bin/bash
# What the probes cost nginx and wrk at saturation when the agent has a core of its own
# (docs/PERFORMANCE.md, "What the 0.85 goal leaves for tracing at nginx's saturation"): nginx
# (one worker) and wrk (one thread, 50 connections) pinned to CPU 0, the agent to CPU 1;
# untraced and traced runs alternated, each pinned the same way, the ratio printed a round.
#
# Usage, as root from the repository after `cargo build --release`:
#   docs/experiments/agent_on_its_own_core.sh ROUNDS SECONDS [AGENT ARGUMENTS...]
# e.g. `... 3 6 --sample 0 --endpoint http://127.0.0.1:9/v1/traces` (every message recorded
# and parsed, nothing exported), `--port 1 ...` (every connection ignored), `--exe nginx ...`.
set -euo pipefail
ROUNDS=${1:?rounds}
SECS=${2:?seconds}
shift 2
BIN=${BIN:-target/release/tracer}
D=$(mktemp -d)
PORT=18111
cat > "$D/nginx.conf" <<CONF
daemon off; master_process on; worker_processes 1; pid $D/nginx.pid; error_log $D/error.log error;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $D/b; proxy_temp_path $D/p;
fastcgi_temp_path $D/f; uwsgi_temp_path $D/u; scgi_temp_path $D/s;
server { listen 127.0.0.1:$PORT; location = /ok { return 200 "ok\n"; } } }
CONF
taskset -c 0 /usr/sbin/nginx -c "$D/nginx.conf" -p "$D" &
NGINX=$!
trap 'kill $NGINX 2>/dev/null; rm -rf "$D"' EXIT
sleep 1
load() {
    taskset -c 0 wrk -t1 -c50 "-d${SECS}s" "http://127.0.0.1:$PORT/ok" | awk '/Requests\/sec/{print $2}'
}
load > /dev/null
for round in $(seq "$ROUNDS"); do
    untraced=$(load)
    taskset -c 1 "$BIN" agent --metrics-addr off "$@" > /dev/null 2> "$D/agent.log" &
    agent=$!
    for _ in $(seq 80); do
        grep -q "tracer: ready" "$D/agent.log" && break
        sleep 0.2
    done
    traced=$(load)
    kill -INT $agent
    wait $agent || true
    drops=$(grep -o "ringbuf_drops=[0-9]*" "$D/agent.log" || echo "ringbuf_drops=?")
    awk -v r="$round" -v u="$untraced" -v t="$traced" -v d="$drops" \
        'BEGIN { printf "round %d: untraced %.0f req/s, traced %.0f, ratio %.3f (%s)\n", r, u, t, t / u, d }'
done
