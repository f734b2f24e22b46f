#!/usr/bin/env bash
# Footprint of a gateway build (BENCHMARKS.md, "Footprint"):
#   1. idle RSS 10 s after start with the shipped config (config/gateway.toml and the
#      shipped rules), and disk bytes written per second while idle;
#   2. disk bytes written per reading (/proc/PID/io write_bytes) and database file
#      growth, with upstream down (buffering) and with upstream up (Mosquitto);
#   3. RSS with DEVICES devices (default 1000) at TOTAL_RATE readings/s (default 10000)
#      for DURATION (default 30s), upstream up, sampled every second.
#
#   ops/footprint.sh [GATEWAY_BINARY] [DEVICE_SIM_BINARY]
#
# Defaults: target/release/gateway, target/release/device-sim. The database goes to a
# temp dir under target/ (a real disk: tmpfs would show no writes). Every wait is
# bounded; all processes are stopped at exit. Run it niced on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."

GW=${1:-target/release/gateway}
SIM=${2:-target/release/device-sim}
N=${N:-20000}                 # readings per disk-write measurement
DEVICES=${DEVICES:-1000}
TOTAL_RATE=${TOTAL_RATE:-10000}
DURATION=${DURATION:-30s}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
for b in "$GW" "$SIM" "$MOSQUITTO"; do [ -x "$b" ] || { echo "missing $b" >&2; exit 2; }; done
[ "$(ulimit -n)" -ge $((DEVICES + 200)) ] || ulimit -n $((DEVICES + 200))

mkdir -p target
WORK=$(mktemp -d "$PWD/target/footprint.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port seconds
  local deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "port $1 not listening after $2 s" >&2; return 1; }
    sleep 0.1
  done
}
kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
mb() { awk -v v="$1" 'BEGIN {printf "%.1f", v / 1024}'; }
wbytes() { awk '$1 == "write_bytes:" {print $2}' "/proc/$1/io"; }
rollup() { awk '$1 ~ /^(Rss|Anonymous|Pss_File|Pss_Anon):$/ {printf "%s %.1f MB  ", $1, $2/1024}' "/proc/$1/smaps_rollup"; }

GW_PID=
GW_PORT=
start_gateway() { # name upstream_url
  local dir=$WORK/$1
  mkdir -p "$dir"
  GW_PORT=$(free_port)
  # The shipped config with only the listen address, database path and upstream
  # changed (and the HTTP port, when this build has one).
  export GATEWAY__BROKER__LISTEN=127.0.0.1:$GW_PORT
  export GATEWAY__STORAGE__PATH=$dir/gateway.redb
  export GATEWAY__UPSTREAM__URL=$2
  export GATEWAY__UPSTREAM__CLIENT_ID=footprint-$1
  if GATEWAY__HTTP__LISTEN=127.0.0.1:0 "$GW" --config config/gateway.toml check-config >/dev/null 2>&1; then
    export GATEWAY__HTTP__LISTEN=127.0.0.1:$(free_port)
  fi
  "$GW" --config config/gateway.toml run >"$dir/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  wait_port "$GW_PORT" 30
}
stop_gateway() {
  kill -TERM "$GW_PID"
  wait "$GW_PID" 2>/dev/null || true
}

UP_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' "$UP_PORT" >"$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT" 10
DOWN_PORT=$(free_port)      # nothing listens here: upstream down

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "gateway binary: $GW, $(stat -c %s "$GW") bytes"

echo "== 1. idle, shipped config, upstream up"
start_gateway idle "mqtt://127.0.0.1:$UP_PORT"
sleep 10
w0=$(wbytes "$GW_PID")
echo "idle RSS after 10 s: $(mb "$(kb "$GW_PID" VmRSS)") MB (peak $(mb "$(kb "$GW_PID" VmHWM)") MB), threads $(kb "$GW_PID" Threads)"
echo "  smaps_rollup: $(rollup "$GW_PID")"
python3 ops/smaps-top.py "$GW_PID" 8 | sed 's/^/  /'
sleep 10
echo "idle disk writes: $(( ($(wbytes "$GW_PID") - w0) / 10 )) bytes/s (over 10 s)"
echo "idle RSS after 20 s: $(mb "$(kb "$GW_PID" VmRSS)") MB"
stop_gateway

per_reading() { # name upstream_url
  start_gateway "$1" "$2"
  sleep 2
  local db=$WORK/$1/gateway.redb
  local w0 s0 w1 s1
  w0=$(wbytes "$GW_PID"); s0=$(stat -c %s "$db")
  "$SIM" --broker "127.0.0.1:$GW_PORT" --devices 10 --total-rate 5000 --count "$N" --qos 1 \
    --progress 0s >"$WORK/$1/sim.log" 2>&1
  sleep 5   # group commits, forwarding and acknowledgement deletes settle
  w1=$(wbytes "$GW_PID"); s1=$(stat -c %s "$db")
  echo "$1: $N readings (JSON, ~$(grep -o 'bytes[^,]*' "$WORK/$1/sim.log" | head -1 || true)): write_bytes +$((w1 - w0)) = $(( (w1 - w0) / N )) bytes/reading; redb file $s0 -> $s1 bytes (+$(( (s1 - s0) / N )) bytes/reading)"
  tail -n 3 "$WORK/$1/sim.log" | sed 's/^/  sim: /'
  stop_gateway
}
echo "== 2. disk bytes written per reading ($N readings, 10 devices, 5000/s, QoS 1)"
per_reading down "mqtt://127.0.0.1:$DOWN_PORT"
per_reading up "mqtt://127.0.0.1:$UP_PORT"

echo "== 3. RSS with $DEVICES devices at $TOTAL_RATE readings/s for $DURATION, upstream up"
start_gateway load "mqtt://127.0.0.1:$UP_PORT"
sleep 2
"$SIM" --broker "127.0.0.1:$GW_PORT" --devices "$DEVICES" --total-rate "$TOTAL_RATE" \
  --duration "$DURATION" --qos 1 --progress 0s >"$WORK/load/sim.log" 2>&1 &
SIM_PID=$!
PIDS+=("$SIM_PID")
peak=0; samples=0; cpu0=$(awk '{print $14 + $15}' "/proc/$GW_PID/stat")
while kill -0 "$SIM_PID" 2>/dev/null && [ $samples -lt 600 ]; do
  r=$(kb "$GW_PID" VmRSS); [ "$r" -gt "$peak" ] && peak=$r
  samples=$((samples + 1)); sleep 1
done
wait "$SIM_PID" || true
cpu1=$(awk '{print $14 + $15}' "/proc/$GW_PID/stat")
echo "RSS under load: peak $(mb "$peak") MB (1 s samples), at the end $(mb "$(kb "$GW_PID" VmRSS)") MB; gateway CPU $(( (cpu1 - cpu0) / $(getconf CLK_TCK) )) s in $samples s"
tail -n 4 "$WORK/load/sim.log" | sed 's/^/  sim: /'
stop_gateway
echo "counters at stop: $(grep -o 'ingested=[0-9]*\|decoded=[0-9]*\|unrouted=[0-9]*\|blocked_ms=[0-9]*' "$WORK/load/gateway.log" | tr '\n' ' ')"
