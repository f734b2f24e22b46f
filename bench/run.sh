#!/usr/bin/env bash
# Side-by-side benchmark on one machine, in one run:
#   upstream: a Mosquitto broker (persistence off) that both sides forward to;
#   A: the gateway, its upstream set to that broker (topic prefix `bench`);
#   B: a Mosquitto edge broker with persistence on, bridging QoS 1 to upstream,
#      topics remapped devices/# -> bench/devices/#.
# Both sides get the same device-sim load; device-sim subscribes to
# bench/devices/# upstream and reports delivery, latency, CPU and RSS.
# Prints a Markdown table with the ratio A/B; with ROUNDS > 1 the sides run that many
# times in alternating order, and a last table gives the edge's CPU per round. See
# bench/README.md.
set -euo pipefail

DEVICES=${DEVICES:-1000}       # simulated devices (connections)
RATE=${RATE:-10}               # readings/s per device, or "max"
DURATION=${DURATION:-30s}      # publishing time per side
QOS=${QOS:-1}
FORMAT=${FORMAT:-json}         # json | cbor | senml-json | senml-cbor
BATCH=${BATCH:-1}              # gateway: readings per upstream message
SIDES=${SIDES:-"A B"}          # which sides to run
SETTLE=${SETTLE:-60}           # seconds the edge is watched after the devices left (0: not)
EDGE_CPUS=${EDGE_CPUS:-}       # pin each side's edge to these CPUs (taskset -c), e.g. 0
ROUNDS=${ROUNDS:-1}            # run the sides this many times, alternating their order
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RULES=${RULES:-$ROOT/rules}    # the gateway's rule files (a directory; "none": no rules)
OUT=${OUT:-$ROOT/target/bench}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

[ -x "$MOSQUITTO" ] || die "mosquitto not found (apt-get install mosquitto, or set MOSQUITTO=/path)"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a whole number of at least 1, not '$ROUNDS'"
# The default may be absent (a checkout without rules): then the gateway runs without.
[ "$RULES" = none ] || [ -d "$RULES" ] || [ "$RULES" = "$ROOT/rules" ] ||
  die "RULES must be a directory of rule files or none, not '$RULES'"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((DEVICES + 200)) ] ||
  die "open-file limit $(ulimit -n) is too low for $DEVICES connections (raise ulimit -n)"

SIM=${SIM:-$ROOT/target/release/device-sim}   # override to use another build
if [ "$SIM" = "$ROOT/target/release/device-sim" ]; then
  say "Building device-sim (release)"
  (cd "$ROOT" && cargo build --release -q -p device-sim) || die "device-sim does not build"
fi
GATEWAY=${GATEWAY:-$ROOT/target/release/gateway}   # override to test another build
A_STATUS=""
if [[ " $SIDES " == *" A "* && "$GATEWAY" == "$ROOT/target/release/gateway" ]]; then
  say "Building the gateway (release)"
  if ! (cd "$ROOT" && cargo build --release -q -p gateway); then
    A_STATUS="the gateway does not build (cargo build --release -p gateway)"
  fi
fi

mkdir -p "$OUT"
PIN=()        # the edge under test
PIN_REST=()   # device-sim and the upstream broker: the other CPUs
if [ -n "$EDGE_CPUS" ]; then
  command -v taskset >/dev/null || die "EDGE_CPUS needs taskset (util-linux)"
  PIN=(taskset -c "$EDGE_CPUS")
  REST_CPUS=$(seq 0 $(($(nproc) - 1)) | grep -vxF -f <(tr , '\n' <<<"$EDGE_CPUS") | paste -sd, || true)
  [ -n "$REST_CPUS" ] && PIN_REST=(taskset -c "$REST_CPUS")
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edge-bench.XXXXXX")
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
stop_started_at_exit

# metric NAME: the sum of the gateway's /metrics samples of NAME (over its labels) so far;
# empty without curl or when the gateway does not answer.
metric() {
  command -v curl >/dev/null || return 0
  curl -s -m 2 "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null |
    awk -v name="$1" '/^gateway_/ { up = 1 } { n = $1; sub(/\{.*/, "", n) }
      n == name { s += $2 } END { if (up) printf "%d", s }'
}
# commits: the gateway's store commits so far.
commits() { metric gateway_store_commit_seconds_count; }
# events: the events the gateway's rules emitted so far (firing and resolved).
events() { metric gateway_events_total; }
# write_bytes PID: bytes the process caused to be written to storage so far.
write_bytes() { awk '$1 == "write_bytes:" {print $2}' "/proc/$1/io"; }
rss_kb() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }
mb() { awk -v v="$1" 'BEGIN {printf "%.1f", v / 1024}'; }

# settle SIDE PID: the edge once the devices have left (device-sim has ended): its RSS at
# once and SETTLE s later (sampled every second), and its CPU over that time. Prints a
# line and writes "rss_at_once_kb rss_after_kb cpu_percent" to $OUT/SIDE-settle.
settle() {
  [ "$SETTLE" -gt 0 ] || return 0
  say "Side $1: the edge for $SETTLE s after the devices left"
  local r0 r c0 c1 t0 t1 lowest
  r0=$(rss_kb "$2"); lowest=$r0; c0=$(cpu_ticks "$2"); t0=$(date +%s%N)
  for _ in $(seq "$SETTLE"); do
    sleep 1
    r=$(rss_kb "$2"); [ "$r" -lt "$lowest" ] && lowest=$r
  done
  c1=$(cpu_ticks "$2"); t1=$(date +%s%N)
  local cpu
  cpu=$(awk -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v ns=$((t1 - t0)) \
    'BEGIN {printf "%.1f", 100 * c / hz / (ns / 1e9)}')
  echo "edge RSS after the devices left: $(mb "$r0") MB at once, $(mb "$r") MB after $SETTLE s" \
    "(lowest $(mb "$lowest") MB); edge CPU over those $SETTLE s: $cpu% of one core" | tee "$OUT/$1-settle.txt"
  echo "$r0 $r $cpu" > "$OUT/$1-settle"
}

# settle_rows: the settle figures of both sides as rows of the comparison table.
settle_rows() {
  [ "$SETTLE" -gt 0 ] || return 0
  local a b
  a=$(cat "$OUT/A-settle" 2>/dev/null || echo "- - -")
  b=$(cat "$OUT/B-settle" 2>/dev/null || echo "- - -")
  awk -v a="$a" -v b="$b" -v s="$SETTLE" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    row("edge RSS MB (devices just left)", x[1], y[1], 1024)
    row("edge RSS MB (" s " s after the devices left)", x[2], y[2], 1024)
    row("edge CPU % (those " s " s)", x[3], y[3], 1)
  }
  function cell(v, d) { return v == "-" ? "-" : sprintf("%.1f", v / d) }
  function row(name, va, vb, d,   r) {
    r = (va == "-" || vb == "-" || vb + 0 == 0) ? "-" : sprintf("%.2f", va / vb)
    printf "| %s | %s | %s | %s |\n", name, cell(va, d), cell(vb, d), r
  }'
}

stop() { # pid
  kill -TERM "$1" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# free_ports N: N distinct loopback ports nothing listens on, picked at random in
# 20000-29999, below Linux's ephemeral range (32768-60999), so an outgoing connection
# does not take one meanwhile.
free_ports() {
  local picked=() port
  while [ ${#picked[@]} -lt "$1" ]; do
    port=$((20000 + RANDOM % 10000))
    [[ " ${picked[*]} " == *" $port "* ]] && continue
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue
    picked+=("$port")
  done
  echo "${picked[@]}"
}

read -r UP_PORT A_PORT B_PORT HTTP_PORT < <(free_ports 4)
ME=$(id -un)

say "Upstream Mosquitto on 127.0.0.1:$UP_PORT"
cat > "$WORK/upstream.conf" <<EOF
user $ME
listener $UP_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_inflight_messages 0
EOF
"${PIN_REST[@]}" "$MOSQUITTO" -c "$WORK/upstream.conf" > "$WORK/upstream.log" 2>&1 &
UP_PID=$!; PIDS+=("$UP_PID")
wait_port "$UP_PORT" 5 "$UP_PID" || { cat "$WORK/upstream.log" >&2; die "upstream mosquitto did not start"; }

# Where side A's readings arrive upstream: one message per reading, or the gateway's
# batches (`{prefix}/batch`, each element naming its device topic) with BATCH > 1.
A_FILTER='bench/devices/#'
[ "$BATCH" -gt 1 ] && A_FILTER='bench/batch'
LOAD=(--devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --qos "$QOS" --format "$FORMAT"
      --upstream "127.0.0.1:$UP_PORT" --progress 5s)

# probe LABEL PORT FILTER: 20 readings from 2 devices must reach upstream within 10 s.
probe() {
  "$SIM" --broker "127.0.0.1:$2" --id-prefix "probe-$1-" --devices 2 --count 20 --rate 20 \
    --upstream "127.0.0.1:$UP_PORT" --upstream-topic "$3" \
    --settle 5s --max-wait 10s --min-delivered 20 --progress 0s > "$WORK/probe-$1.txt" 2>&1
}

# measure SIDE LABEL PORT EDGE_PID FILTER
measure() {
  say "Side $1 ($2): $DEVICES devices x $RATE/s, QoS $QOS, $FORMAT, $DURATION"
  "${PIN_REST[@]}" "$SIM" --broker "127.0.0.1:$3" "${LOAD[@]}" --upstream-topic "$5" --label "$2" \
    --watch "edge=$4" --watch "upstream=$UP_PID" --json "$OUT/$1.json" | tee "$OUT/$1.txt"
}

# side_a: starts the gateway (a new database each time), probes it, measures it, watches
# it after the devices left, stops it; sets A_STATUS when it fails.
side_a() {
  say "Side A: gateway on 127.0.0.1:$A_PORT"
  rm -rf "$WORK/gw"
  mkdir -p "$WORK/gw/rules"
  [ "$RULES" != none ] && [ -d "$RULES" ] && cp -r "$RULES/." "$WORK/gw/rules/" 2>/dev/null || true
  GATEWAY__BROKER__LISTEN=127.0.0.1:$A_PORT \
  GATEWAY__BROKER__LISTEN_V5= \
  GATEWAY__HTTP__LISTEN=127.0.0.1:$HTTP_PORT \
  GATEWAY__STORAGE__PATH=$WORK/gw/gw.redb \
  GATEWAY__UPSTREAM__URL=mqtt://127.0.0.1:$UP_PORT \
  GATEWAY__UPSTREAM__TOPIC_PREFIX=bench \
  GATEWAY__UPSTREAM__BATCH_MAX_MESSAGES=$BATCH \
  GATEWAY__RULES__DIR=$WORK/gw/rules \
  GATEWAY__LOG__LEVEL=${GATEWAY_LOG:-info} \
    "${PIN[@]}" "$GATEWAY" run > "$WORK/gateway.log" 2>&1 &
  GW_PID=$!; PIDS+=("$GW_PID")
  if ! wait_port "$A_PORT" 15 "$GW_PID"; then
    if kill -0 "$GW_PID" 2>/dev/null; then
      A_STATUS="the gateway did not listen on 127.0.0.1:$A_PORT within 15 s"
    else
      wait "$GW_PID" && code=0 || code=$?
      A_STATUS="the gateway exited (status $code) without listening on 127.0.0.1:$A_PORT"
    fi
    A_STATUS="$A_STATUS; its log ends: $(tail -n 5 "$WORK/gateway.log" | tr '\n' ' ')"
  elif ! probe A "$A_PORT" "$A_FILTER"; then
    A_STATUS="the gateway accepted readings but forwarded none/too few to upstream bench/devices/# within 10 s (is upstream forwarding implemented, with GATEWAY__UPSTREAM__TOPIC_PREFIX=bench?). Probe: $(grep -m1 'upstream \[' "$WORK/probe-A.txt" || tail -n 2 "$WORK/probe-A.txt")"
  else
    w0=$(write_bytes "$GW_PID")
    c0=$(commits); e0=$(events); t0=$(date +%s%N)
    measure A gateway "$A_PORT" "$GW_PID" "$A_FILTER"
    w1=$(write_bytes "$GW_PID")
    c1=$(commits); e1=$(events); t1=$(date +%s%N)
    acked=$(grep -o '"acked": *[0-9]*' "$OUT/A.json" | head -n 1 | grep -o '[0-9]*$')
    {
      echo "gateway disk writes (/proc/PID/io write_bytes, over the measured run): $((w1 - w0)) bytes," \
        "$(( (w1 - w0) / (acked > 0 ? acked : 1) )) bytes per acked reading ($acked)"
      if [ -n "$c0" ] && [ -n "$c1" ] && [ "$c1" -gt "$c0" ]; then
        echo "gateway store commits (gateway_store_commit_seconds_count, same span): $((c1 - c0))," \
          "$(( (c1 - c0) * 1000000000 / (t1 - t0) ))/s, $(( (w1 - w0) / (c1 - c0) )) bytes per commit"
      fi
      if [ -n "$e0" ] && [ -n "$e1" ]; then
        echo "gateway events emitted (gateway_events_total, same span): $((e1 - e0))" \
          "(rule events, each stored and forwarded too; the steady scenario is meant to raise none)"
      fi
    } | tee "$OUT/A-disk.txt"
    settle A "$GW_PID"
  fi
  stop "$GW_PID"
  [ -z "$A_STATUS" ] || printf '\nSIDE A FAILED: %s\n' "$A_STATUS" >&2
}

# side_b: the same for the Mosquitto edge and its bridge (a new persistence directory
# each time).
side_b() {
  say "Side B: Mosquitto edge on 127.0.0.1:$B_PORT, bridge QoS 1 to upstream, persistence on"
  rm -rf "$WORK/edge"
  mkdir -p "$WORK/edge"
  cat > "$WORK/edge.conf" <<EOF
user $ME
listener $B_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $WORK/edge/
max_queued_messages 1000000
max_inflight_messages 0
connection upstream
address 127.0.0.1:$UP_PORT
bridge_protocol_version mqttv311
cleansession false
remote_clientid edge-bridge
topic # out 1 devices/ bench/devices/
EOF
  "${PIN[@]}" "$MOSQUITTO" -c "$WORK/edge.conf" > "$WORK/edge.log" 2>&1 &
  EDGE_PID=$!; PIDS+=("$EDGE_PID")
  wait_port "$B_PORT" 5 "$EDGE_PID" || { cat "$WORK/edge.log" >&2; die "edge mosquitto did not start"; }
  probe B "$B_PORT" 'bench/devices/#' || { cat "$WORK/probe-B.txt" "$WORK/edge.log" >&2; die "the Mosquitto bridge did not deliver the probe upstream"; }
  measure B mosquitto-bridge "$B_PORT" "$EDGE_PID" 'bench/devices/#'
  settle B "$EDGE_PID"
  stop "$EDGE_PID"
}

# report_round ROUND: the sides measured in this round side by side (with their settle
# rows), appended to $OUT/table.md; with ROUNDS > 1 each side's report is kept as
# $OUT/{A,B}.rROUND.json.
report_round() {
  say "Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
  local title=""
  [ "$ROUNDS" -gt 1 ] && title="Round $1 of $ROUNDS (sides in the order $2)"
  if [ -f "$OUT/A.json" ] && [ -f "$OUT/B.json" ]; then
    { [ -z "$title" ] || printf '%s\n\n' "$title"
      "$SIM" compare "$OUT/A.json" "$OUT/B.json"; settle_rows; } | tee -a "$OUT/table.md"
  elif [ -f "$OUT/B.json" ]; then
    echo "Side A not measured: ${A_STATUS:-not requested}."
    { [ -z "$title" ] || printf '%s\n\n' "$title"
      "$SIM" compare - "$OUT/B.json"; settle_rows; } | tee -a "$OUT/table.md"
  elif [ -f "$OUT/A.json" ]; then
    echo "Side B not measured (SIDES=$SIDES); side A's report is above and in $OUT/A.txt."
  fi
  if [ "$ROUNDS" -gt 1 ]; then
    local side
    for side in A B; do
      [ ! -f "$OUT/$side.json" ] || cp "$OUT/$side.json" "$OUT/$side.r$1.json"
    done
  fi
}

rm -f "$OUT"/[AB].json "$OUT"/[AB].r*.json "$OUT/A-disk.txt" "$OUT"/[AB]-settle "$OUT"/[AB]-settle.txt \
  "$OUT/table.md" "$OUT/rounds.md"
for round in $(seq "$ROUNDS"); do
  # A B in odd rounds, B A in even ones: a machine that speeds up or slows down during
  # the run favours neither side over a pair of rounds.
  order="A B"
  [ $((round % 2)) -eq 1 ] || order="B A"
  [ "$ROUNDS" -eq 1 ] || say "Round $round of $ROUNDS: sides $order"
  rm -f "$OUT"/[AB].json "$OUT/A-disk.txt" "$OUT"/[AB]-settle "$OUT"/[AB]-settle.txt
  for side in $order; do
    if [ "$side" = A ] && [[ " $SIDES " == *" A "* ]] && [ -z "$A_STATUS" ]; then
      side_a
    elif [ "$side" = B ] && [[ " $SIDES " == *" B "* ]]; then
      side_b
    fi
  done
  report_round "$round" "$order"
done

pairs=()
for round in $(seq "$ROUNDS"); do
  if [ -f "$OUT/A.r$round.json" ] && [ -f "$OUT/B.r$round.json" ]; then
    pairs+=("$OUT/A.r$round.json" "$OUT/B.r$round.json")
  fi
done
if [ ${#pairs[@]} -gt 2 ]; then
  say "Edge CPU per round ($((${#pairs[@]} / 2)) rounds, sides alternating)"
  { printf '\nEdge CPU per round\n\n'; "$SIM" rounds "${pairs[@]}"; } | tee "$OUT/rounds.md" |
    tee -a "$OUT/table.md"
fi

if [ -n "$A_STATUS" ]; then
  [ -f "$OUT/B.json" ] || printf 'bench: side A failed (%s) and side B was not requested\n' "$A_STATUS" >&2
  exit 3
fi
[ -f "$OUT/A.json" ] || [ -f "$OUT/B.json" ] || die "nothing was measured"
