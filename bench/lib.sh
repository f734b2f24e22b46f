# Shared by the bench scripts that watch a run of bench/run.sh while it runs; sourced
# from the repository's root, with OUT set.

# Starts bench/run.sh in the background (its output in $OUT/run.log, its pid in
# BENCH_PID) and waits, at most 120 s, for device-sim's progress line at second $1
# ("5s", "10s"). Fails when the run ended or did not get that far.
start_run() {
  bash bench/run.sh >"$OUT/run.log" 2>&1 &
  BENCH_PID=$!
  local _
  for _ in $(seq 1 120); do
    grep -q "\"$1\"" "$OUT/run.log" 2>/dev/null && return 0
    kill -0 "$BENCH_PID" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}

# Waits for the run to end, then stops the calling script with a pointer to its log.
did_not_start() {
  wait "$BENCH_PID" || true
  echo "$1: the benchmark did not get going; see $OUT/run.log" >&2
  exit 1
}
