# Shared by the bench scripts: process clean-up and port waits for the scripts that start
# processes themselves (run.sh, allocs.sh), and, for those that watch a run of
# bench/run.sh while it runs (sourced from the repository's root, with OUT set),
# start_run and did_not_start.

# The processes a script started, stopped (and waited for) at its exit by
# stop_started_at_exit, which also removes WORK.
PIDS=()
stop_started_at_exit() {
  trap stop_started EXIT
}
stop_started() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}

# wait_port PORT SECONDS PID: waits until something listens on 127.0.0.1:PORT; fails
# after SECONDS, or as soon as PID has exited.
wait_port() {
  local deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    kill -0 "$3" 2>/dev/null || return 1
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

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
