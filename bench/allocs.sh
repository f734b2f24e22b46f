#!/usr/bin/env bash
# Allocation calls per reading, by call site: the gateway under heaptrack (Debian's
# `heaptrack` package) with a plain Mosquitto upstream, DEVICES x RATE readings from
# device-sim for DURATION, then the calls grouped by the innermost frame of the gateway,
# rumqttd, rumqttc, redb, flume or tokio and divided by the readings published.
#
#   bench/allocs.sh
#   GATEWAY=target/profiling/gateway SIM=target/profiling/device-sim bench/allocs.sh
#
# With LIVE=N the gateway is instead killed N seconds after the devices left (SIGKILL,
# so that nothing is freed on the way out) and the sites list the memory still allocated
# then, in KB: what a burst leaves behind (`LIVE=55`: just before bench/run.sh's sample
# 60 s after). heaptrack counts allocated bytes, not resident pages: room a vector was
# given but never wrote to is counted here and not in the RSS.
#
# DEVICES (1000), RATE (10), DURATION (15s), TOP (25 sites). The gateway runs with the
# shipped rules and glibc's per-thread malloc caches off (as `gateway run` turns them
# off itself; set here so that it starts once, under heaptrack). Files in $OUT (default
# target/bench-allocs): heaptrack.zst, flamegraph.txt (one stack and count per line),
# sites.txt, gateway.log, device-sim.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-1000}
RATE=${RATE:-10}
DURATION=${DURATION:-15s}
TOP=${TOP:-25}
LIVE=${LIVE:-}
[ -z "$LIVE" ] || [[ "$LIVE" =~ ^[0-9]+$ ]] || { echo "allocs: LIVE must be seconds, not '$LIVE'" >&2; exit 1; }
OUT=${OUT:-target/bench-allocs}
. bench/lib.sh
setup_profiled allocs heaptrack heaptrack heaptrack_print python3
stop_started_at_exit

start_upstream allocs
rm -f "$OUT/heaptrack.zst"
if ! start_gateway_under 30 "$OUT/gateway.log" heaptrack -o "$OUT/heaptrack"; then
  pkill -TERM -f "^$GATEWAY run" || true
  echo "allocs: the gateway did not start; see $OUT/gateway.log" >&2
  exit 1
fi
HT_PID=$WRAPPER_PID
# heaptrack runs the gateway as its child: stopped at exit too, should a step fail.
GW_PID=$(pgrep -f "^$GATEWAY run" | head -n 1)
PIDS+=("$GW_PID")

"$SIM" --broker "127.0.0.1:$GW_PORT" --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" \
  --qos 1 --progress 0s >"$OUT/device-sim.txt" 2>&1
readings=$(grep -o 'published [0-9]*' "$OUT/device-sim.txt" | tail -n 1 | grep -o '[0-9]*')

# Stop the gateway, then wait for heaptrack to write its file (bounded).
if [ -n "$LIVE" ]; then
  sleep "$LIVE"
  kill -KILL "$GW_PID" 2>/dev/null || true
else
  kill -TERM "$GW_PID" 2>/dev/null || true
fi
for _ in $(seq 1 300); do kill -0 "$HT_PID" 2>/dev/null || break; sleep 0.1; done
wait "$HT_PID" 2>/dev/null || true

heaptrack_print -f "$OUT/heaptrack.zst" -F "$OUT/flamegraph.txt" \
  --flamegraph-cost-type "$([ -n "$LIVE" ] && echo leaked || echo allocations)" >/dev/null
python3 - "$OUT/flamegraph.txt" "$readings" "$TOP" "$LIVE" >"$OUT/sites.txt" <<'EOF'
import collections, re, sys
path, readings, top, live = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
total, sites = 0, collections.Counter()
ours = re.compile(r"gateway|rumqttd|rumqttc|redb|flume|tokio")
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    total += int(n)
    site = next((f for f in reversed(stack.split(";")) if ours.search(f) and "alloc::" not in f), "?")
    site = re.sub(r"::h[0-9a-f]{16}", "", site)
    for mangled, plain in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$u7b$", "{"),
                           ("$u7d$", "}"), ("$C$", ","), ("$RF$", "&"), ("$LP$", "("),
                           ("$RP$", ")"), ("..", "::"), ("_<", "<"), ("::_{", "::{")):
        site = site.replace(mangled, plain)
    sites[site[:120]] += int(n)
if live:
    print(f"{total / 1000:.0f} KB allocated {live} s after the devices left ({readings} readings)")
    for site, n in sites.most_common(top):
        print(f"{n / 1000:7.0f}  {site}")
else:
    print(f"{total} allocation calls for {readings} readings: {total / readings:.1f} per reading")
    for site, n in sites.most_common(top):
        print(f"{n / readings:7.2f}  {site}")
EOF
cat "$OUT/sites.txt"
