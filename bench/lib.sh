# Shared by the bench scripts: process clean-up and port waits for the scripts that start
# processes themselves (run.sh, allocs.sh, instructions.sh), the set-up, a plain upstream
# and the gateway under a profiler for allocs.sh and instructions.sh, and, for those that
# watch a run of bench/run.sh while it runs (sourced from the repository's root, with OUT
# set), start_run and did_not_start.

# setup_profiled NAME PACKAGE TOOL...: the set-up of allocs.sh and instructions.sh (the
# gateway under a profiler). GATEWAY and SIM (default the release builds) made absolute,
# MOSQUITTO found, each TOOL on PATH (else a hint to install PACKAGE), OUT created and
# made absolute, a new WORK; stops the script, NAME in the error, when something lacks.
setup_profiled() {
  local name=$1 package=$2 tool
  shift 2
  GATEWAY=$(realpath "${GATEWAY:-target/release/gateway}")
  SIM=$(realpath "${SIM:-target/release/device-sim}")
  MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$name: $tool not found (apt-get install $package python3)" >&2; exit 1; }
  done
  [ -x "$GATEWAY" ] && [ -x "$SIM" ] || { echo "$name: build the gateway and device-sim first" >&2; exit 1; }
  mkdir -p "$OUT"
  OUT=$(realpath "$OUT")
  WORK=$(mktemp -d)
}

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

# free_port: a loopback port nothing listens on now (the kernel's pick).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_upstream SCRIPT: a plain Mosquitto ($MOSQUITTO; anonymous, no persistence) on a
# free loopback port, UP_PORT, its files in WORK, stopped at exit; SCRIPT names the
# caller in the error when it does not start.
start_upstream() {
  UP_PORT=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' \
    "$UP_PORT" >"$WORK/upstream.conf"
  "$MOSQUITTO" -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$UP_PORT" 10 "$pid" || { echo "$1: upstream mosquitto did not start" >&2; exit 1; }
}

# start_gateway_under SECONDS LOG COMMAND...: runs `COMMAND... $GATEWAY run` (a profiler
# around the gateway) in the background, output to LOG, with the shipped rules (copied
# into WORK), its broker on a free loopback port (GW_PORT), its store in WORK, upstream
# UP_PORT, and glibc's per-thread malloc caches off (as `gateway run` turns them off
# itself by starting again; set here so that it starts once, under COMMAND). WRAPPER_PID
# is COMMAND's pid, stopped at exit. Fails when the broker does not listen within
# SECONDS.
start_gateway_under() {
  local seconds=$1 log=$2
  shift 2
  GW_PORT=$(free_port)
  mkdir -p "$WORK/rules"
  cp -r rules/. "$WORK/rules/"
  GLIBC_TUNABLES=glibc.malloc.tcache_count=0 \
  GATEWAY__BROKER__LISTEN=127.0.0.1:$GW_PORT \
  GATEWAY__BROKER__LISTEN_V5= \
  GATEWAY__HTTP__LISTEN=127.0.0.1:$(free_port) \
  GATEWAY__STORAGE__PATH=$WORK/gw.redb \
  GATEWAY__UPSTREAM__URL=mqtt://127.0.0.1:$UP_PORT \
  GATEWAY__UPSTREAM__TOPIC_PREFIX=bench \
  GATEWAY__RULES__DIR=$WORK/rules \
    "$@" "$GATEWAY" run >"$log" 2>&1 &
  WRAPPER_PID=$!
  PIDS+=("$WRAPPER_PID")
  wait_port "$GW_PORT" "$seconds" "$WRAPPER_PID"
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
