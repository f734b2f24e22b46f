#!/usr/bin/env bash
# Per-thread CPU and context switches of the gateway under load: which thread takes the
# time, and how often each one sleeps and wakes (on a small machine a wake-up per reading
# costs more than the work it hands over).
#
# Runs bench/run.sh (side A unless SIDES says otherwise; every other setting of
# bench/run.sh applies) and reads /proc/PID/task/*/schedstat (time on a CPU, in ns) and
# /proc/PID/task/*/status (voluntary + involuntary context switches) of the gateway
# SAMPLE seconds apart, from device-sim's 10 s progress line on. Threads of the same name
# are summed (the count is shown). Where the kernel has no schedstat, the user + system
# ticks of /proc/PID/task/*/stat are read instead (charged by the timer tick: a thread
# that wakes often for a short while is measured less exactly).
#
#   bench/threads.sh
#   SAMPLE=10 GATEWAY=target/profiling/gateway SIM=target/profiling/device-sim bench/threads.sh
#
# Files in $OUT (default target/bench-threads): run.log, before.txt, after.txt,
# threads.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

SAMPLE=${SAMPLE:-10}
OUT=${OUT:-target/bench-threads}
GATEWAY=$(realpath "${GATEWAY:-target/release/gateway}")
export SIDES=${SIDES:-A} SETTLE=${SETTLE:-0} OUT GATEWAY

mkdir -p "$OUT"
. bench/lib.sh
start_run 10s || did_not_start threads
pid=$(pgrep -f "^$GATEWAY run" | head -n 1 || true)
[ -n "$pid" ] || did_not_start threads
# CPU time in units of 1/hz s: ns from schedstat, or clock ticks from stat.
if [ -r "/proc/$pid/schedstat" ]; then hz=1000000000; else hz=$(getconf CLK_TCK); fi

# One line per thread name: name, CPU time (1/hz s), context switches, threads.
snapshot() {
  local t name ticks switches
  for t in /proc/"$pid"/task/*; do
    name=$(cat "$t/comm" 2>/dev/null) || continue
    if [ "$hz" = 1000000000 ]; then
      ticks=$(awk '{print $1}' "$t/schedstat" 2>/dev/null) || continue
    else
      ticks=$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
    fi
    switches=$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$t/status" 2>/dev/null) || continue
    echo "$name $ticks $switches"
  done | awk '{c[$1] += $2; s[$1] += $3; n[$1]++} END {for (k in c) print k, c[k], s[k], n[k]}' | sort
}
snapshot >"$OUT/before.txt"
sleep "$SAMPLE"
snapshot >"$OUT/after.txt"
wait "$BENCH_PID" || true
grep -E 'latency ms|edge \(' "$OUT/run.log" || true

join "$OUT/before.txt" "$OUT/after.txt" | awk -v s="$SAMPLE" -v hz="$hz" '{
  printf "%-18s x%-3d %6.1f%% cpu %8.0f switches/s\n", $1, $4, ($5 - $2) * 100 / hz / s, ($6 - $3) / s
}' | sort -k3 -rn | tee "$OUT/threads.txt"
awk '{ c += $3; w += $5 } END { printf "%-23s %6.1f%% cpu %8.0f switches/s\n", "all threads", c, w }' "$OUT/threads.txt"
