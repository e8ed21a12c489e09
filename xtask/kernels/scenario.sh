#!/bin/sh
# The kernel matrix's check, run as root on the kernel under test (in its VM, or on the host in
# a network namespace of its own): the agent against nginx and busybox's wget on loopback.
# (busybox's httpd would be lighter, but it answers from a forked child on an inherited socket,
# which the probes do not follow.) Every result line starts with "KM " for xtask to read. Needs
# tracer, bpftool, nginx, busybox on PATH and the web root in $WWW (default /www).
WWW="${WWW:-/www}"
PORT=8080
REQUESTS=10
# Waits for the agent logging to $1 (pid $2) to be ready, up to $3 tenths of a second; a
# timeout is logged as an error.
wait_ready() {
  i=0
  while ! grep -q 'tracer: ready' "$1"; do
    kill -0 "$2" 2>/dev/null || return
    i=$((i + 1))
    [ "$i" -gt "$3" ] && echo "error: not ready after $(($3 / 10)) s" >> "$1" && return
    sleep 0.1
  done
}
# $REQUESTS requests for a page, then one for a missing page.
requests() {
  n=0
  while [ "$n" -lt "$REQUESTS" ]; do
    busybox wget -q -O /dev/null "http://127.0.0.1:$PORT/index.html"
    n=$((n + 1))
  done
  busybox wget -q -O /dev/null "http://127.0.0.1:$PORT/missing.html" 2>/dev/null
}
echo "KM kernel $(uname -r)"
tracer doctor --stdout | sed 's/^/KM doctor /'
echo 1 > /proc/sys/kernel/bpf_stats_enabled
mkdir -p /tmp/km-nginx
cat > /tmp/km-nginx/nginx.conf <<CONF
daemon off; master_process on; worker_processes 1; pid /tmp/km-nginx/pid;
error_log /tmp/km-nginx/error.log error;
events { worker_connections 64; }
http { access_log off; client_body_temp_path /tmp/km-nginx/b; proxy_temp_path /tmp/km-nginx/p;
  fastcgi_temp_path /tmp/km-nginx/f; uwsgi_temp_path /tmp/km-nginx/u; scgi_temp_path /tmp/km-nginx/s;
  server { listen 127.0.0.1:$PORT; root $WWW; } }
CONF
nginx -p /tmp/km-nginx -c /tmp/km-nginx/nginx.conf &
HTTPD=$!
AGENT_OUT=/tmp/km-spans AGENT_ERR=/tmp/km-agent-err
tracer agent --stdout --port "$PORT" --metrics-addr off --priority normal \
  > "$AGENT_OUT" 2> "$AGENT_ERR" &
AGENT=$!
i=0
while ! busybox nc -z 127.0.0.1 "$PORT" 2>/dev/null && [ "$i" -lt 100 ]; do
  i=$((i + 1))
  sleep 0.1
done
wait_ready "$AGENT_ERR" "$AGENT" 300
if grep -q 'tracer: ready' "$AGENT_ERR"; then
  echo "KM probes loaded"
  requests
  echo "KM requests $((REQUESTS + 1))"
  # Let the agent pair the last exchange before reading the programs' statistics.
  sleep 1
  echo "KM bpftool $(bpftool prog show --json)"
  kill -INT "$AGENT"
  wait "$AGENT"
  echo "KM agent-exit $?"
  # --metrics-only: the same requests framed and counted in the kernel, read from /metrics.
  tracer agent --metrics-only --stdout --port "$PORT" --metrics-addr 127.0.0.1:9464 \
    --priority normal > /dev/null 2> /tmp/km-red-err &
  RED=$!
  # The verifier walks more with the framing in; an emulated guest takes its time.
  wait_ready /tmp/km-red-err "$RED" 1200
  if grep -q 'tracer: ready' /tmp/km-red-err; then
    requests
    # The agent reads the kernel's counts once a second.
    sleep 2
    busybox wget -q -O /tmp/km-red-metrics http://127.0.0.1:9464/metrics 2>&1 | sed 's/^/KM red-log error: /'
    grep -E '^(http_server_request_duration_seconds_count|tracer_exchanges_total)' /tmp/km-red-metrics | sed 's/^/KM red /'
    kill -INT "$RED"
    wait "$RED"
  else
    kill -INT "$RED" 2>/dev/null
    sed 's/^/KM red-log /' /tmp/km-red-err
  fi
else
  echo "KM probes refused"
fi
echo 0 > /proc/sys/kernel/bpf_stats_enabled
kill "$HTTPD" 2>/dev/null
sed 's/^/KM agent-log /' "$AGENT_ERR"
sed 's/^/KM span /' "$AGENT_OUT"
