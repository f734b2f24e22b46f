#!/usr/bin/env bash
# Backlog drain: how fast the gateway forwards readings it stored while upstream was down.
#
#   cargo build --release -p gateway -p device-sim
#   bench/drain.sh                      # COUNT=300000 DEVICES=100 by default
#   GATEWAY=target/profiling/gateway SIM=target/profiling/device-sim bench/drain.sh
#
# The gateway starts with its upstream port closed; device-sim publishes COUNT readings
# (QoS 1, as fast as they are acknowledged, so every one is committed); then Mosquitto
# starts on the upstream port. Printed: the rows forwarded per second from the first
# forwarded row until the readings lane of the outbox is empty (so the forwarder's
# reconnect backoff is not counted), and the gateway's peak RSS over fill and drain.
# Needs /usr/sbin/mosquitto (or mosquitto on PATH) and curl.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEWAY=${GATEWAY:-$ROOT/target/release/gateway}
SIM=${SIM:-$ROOT/target/release/device-sim}
COUNT=${COUNT:-300000}
DEVICES=${DEVICES:-100}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
GATEWAY=$(realpath "$GATEWAY"); SIM=$(realpath "$SIM")

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 10000))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}
UP=$(free_port); BROKER=$(free_port); HTTP=$(free_port)
WORK=$(mktemp -d)
GW=""; MQ=""
cleanup() {
  [ -n "$GW" ] && kill "$GW" 2>/dev/null && wait "$GW" 2>/dev/null
  [ -n "$MQ" ] && kill "$MQ" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

cd "$WORK"
GATEWAY__BROKER__LISTEN=127.0.0.1:$BROKER GATEWAY__BROKER__LISTEN_V5= \
  GATEWAY__HTTP__LISTEN=127.0.0.1:$HTTP GATEWAY__STORAGE__PATH=$WORK/gw.redb \
  GATEWAY__UPSTREAM__URL=mqtt://127.0.0.1:$UP GATEWAY__UPSTREAM__TOPIC_PREFIX=bench \
  GATEWAY__LOG__LEVEL=warn "$GATEWAY" run > "$WORK/gateway.log" 2>&1 &
GW=$!
depth() {
  curl -s "http://127.0.0.1:$HTTP/metrics" |
    awk '/^gateway_outbox_messages\{lane="readings"\}/ {print int($2)}'
}
for _ in $(seq 1 100); do [ -n "$(depth)" ] && break; sleep 0.1; done
[ -n "$(depth)" ] || { echo "the gateway did not start: $(tail -n 3 "$WORK/gateway.log")"; exit 1; }

"$SIM" --broker "127.0.0.1:$BROKER" --devices "$DEVICES" --count "$COUNT" --rate max --qos 1 \
  > "$WORK/sim.log" 2>&1 || { echo "device-sim failed: $(tail -n 3 "$WORK/sim.log")"; exit 1; }
stored=$(depth)
echo "stored: $stored readings (device-sim: $(grep -m1 -oE 'published [0-9]+' "$WORK/sim.log"))"

"$MOSQUITTO" -p "$UP" > "$WORK/mosquitto.log" 2>&1 &
MQ=$!
for _ in $(seq 1 600); do [ "$(depth)" -lt "$stored" ] && break; sleep 0.05; done
start=$(date +%s.%N); from=$(depth)
for _ in $(seq 1 1200); do [ "$(depth)" -eq 0 ] && break; sleep 0.1; done
end=$(date +%s.%N); left=$(depth)
[ "$left" -eq 0 ] || { echo "not drained within 120 s: $left left"; exit 1; }
awk -v n="$from" -v s="$start" -v e="$end" \
  'BEGIN { printf "drained %d rows in %.2f s: %.0f rows/s\n", n, e - s, n / (e - s) }'
echo "gateway peak RSS: $(awk '/VmHWM/ {printf "%.1f MB", $2 / 1024}' "/proc/$GW/status")"
