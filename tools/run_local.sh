#!/usr/bin/env bash
# `make run`: serve the bundled model. Starts Mosquitto on 127.0.0.1:1883 when nothing listens
# there, and stops it when edged exits (Ctrl-C stops both cleanly).
set -uo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/edged.yaml}
broker_pid=""
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  conf=$(mktemp /tmp/edged-mosquitto.XXXXXX.conf)
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n' > "$conf"
  "$mosq" -c "$conf" &
  broker_pid=$!
  trap 'kill $broker_pid 2>/dev/null; wait $broker_pid 2>/dev/null; rm -f "$conf"' EXIT
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
  echo "started mosquitto on 127.0.0.1:1883 (pid $broker_pid)" >&2
fi
echo "serving; try: .venv/bin/edged send -c $config edged/models/digits_sample.png" >&2
.venv/bin/edged run -c "$config"
