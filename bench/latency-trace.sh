#!/usr/bin/env bash
# Per-reading latency through one edge, over time: what makes the tail.
#
# Runs bench/run.sh (side A unless SIDES says otherwise; every other setting of
# bench/run.sh applies), subscribes to the upstream broker beside device-sim for TRACE
# seconds from the 5 s progress line on, and prints the latency percentiles of what it
# saw and the 100 ms windows that held the most late readings (over LATE_MS). Late
# readings spread evenly mean queueing; a few windows, at a steady period, mean
# something that stalls the pipeline that often.
#
#   bench/latency-trace.sh
#   TRACE=20 LATE_MS=5 GATEWAY=target/profiling/gateway bench/latency-trace.sh
#
# Latency is the arrival time (mosquitto_sub's %U) minus the payload's `ts`: JSON
# payloads only (FORMAT=json, the default), one reading per upstream message (BATCH=1).
# Files in $OUT (default target/bench-trace): run.log, trace.txt (arrival, payload),
# windows.txt (second into the trace, late readings, slowest ms, per 100 ms window).
set -euo pipefail
cd "$(dirname "$0")/.."

TRACE=${TRACE:-10}
LATE_MS=${LATE_MS:-7}
OUT=${OUT:-target/bench-trace}
export SIDES=${SIDES:-A} SETTLE=${SETTLE:-0} OUT

command -v mosquitto_sub >/dev/null || {
  echo "latency-trace: mosquitto_sub not found (apt-get install mosquitto-clients)" >&2
  exit 2
}
mkdir -p "$OUT"
. bench/lib.sh
start_run 5s || did_not_start latency-trace
port=$(grep -o 'Upstream Mosquitto on 127.0.0.1:[0-9]*' "$OUT/run.log" | head -n 1 | sed 's/.*://')
[ -n "$port" ] || did_not_start latency-trace
timeout "$TRACE" mosquitto_sub -p "$port" -t 'bench/devices/#' -q 0 -F '%U %p' >"$OUT/trace.txt" || true
wait "$BENCH_PID" || true
grep -E 'latency ms|edge \(' "$OUT/run.log" || true

# One line per reading: seconds into the trace, latency in ms.
awk 'match($0, /"ts":[0-9]+/) {
       ts = substr($0, RSTART + 5, RLENGTH - 5)
       if (n++ == 0) t0 = $1
       printf "%.4f %.1f\n", $1 - t0, $1 * 1000 - ts
     }' "$OUT/trace.txt" >"$OUT/latency.txt"
n=$(wc -l <"$OUT/latency.txt")
if [ "$n" -eq 0 ]; then
  echo "latency-trace: no reading with a JSON \"ts\" arrived upstream" >&2
  exit 1
fi
sort -n -k2 "$OUT/latency.txt" | awk -v n="$n" '
  NR == int(n * 0.50) + 1 { p50 = $2 }
  NR == int(n * 0.90) + 1 { p90 = $2 }
  NR == int(n * 0.99) + 1 { p99 = $2 }
  { max = $2 }
  END { printf "traced %d readings: latency ms p50 %s p90 %s p99 %s max %s\n", n, p50, p90, p99, max }'
awk -v late="$LATE_MS" '
  { w = int($1 * 10); if ($2 > late) slow[w]++; if ($2 > worst[w]) worst[w] = $2; if (w > last) last = w }
  END { for (w = 0; w <= last; w++) printf "%.1f %d %.1f\n", w / 10, slow[w] + 0, worst[w] + 0 }
' "$OUT/latency.txt" >"$OUT/windows.txt"
awk -v late="$LATE_MS" '$2 > 0 { k += $2; b++ } END {
  printf "late (over %s ms): %d readings, in %d of %d windows of 100 ms\n", late, k, b, NR }' "$OUT/windows.txt"
echo "the windows with the most (second into the trace, late readings, slowest ms):"
sort -k2,2nr "$OUT/windows.txt" | awk '$2 > 0' | head -n 10 | sed 's/^/  /'
