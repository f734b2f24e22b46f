#!/usr/bin/env bash
# Instructions the gateway executes per reading, counted by valgrind's callgrind: a
# steadier measure than time (runs of two builds alternating within minutes agree within
# about 2%), for changes too small for the CPU figures of bench/run.sh and
# bench/threads.sh, which drift by several points between runs. The machine's speed still
# moves it a little, through how many readings a commit holds: the same build counted ~10%
# fewer an hour later, so compare builds alternating in one sitting. It counts work, not
# time: a cache miss, a lock handed between cores or a system call's cost in the kernel
# are not in it.
#
#   bench/instructions.sh
#   GATEWAY=target/profiling/gateway SIM=target/profiling/device-sim bench/instructions.sh
#
# The gateway runs under callgrind (Debian's `valgrind` package) with the shipped rules
# and a plain Mosquitto upstream; instrumentation is switched on once it listens, the
# counts are zeroed, device-sim publishes DEVICES x RATE readings for DURATION, and the
# counts are dumped. Under valgrind the gateway runs some 50 times slower, so the load is
# small (default 100 devices x 2/s for 20 s): at this rate a commit holds one or two
# readings and the per-commit work weighs more than at 1000 x 10/s. Compare builds at the
# same settings. `memcpy` and `memset` are shown apart: valgrind counts their `rep` forms
# (used for copies of more than about 2 KiB) once per byte.
#
# DEVICES (100), RATE (2), DURATION (20s), TOP (25 functions, by their own instructions).
# Files in $OUT (default target/bench-instructions): callgrind.out, functions.txt,
# gateway.log, device-sim.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-100}
RATE=${RATE:-2}
DURATION=${DURATION:-20s}
TOP=${TOP:-25}
OUT=${OUT:-target/bench-instructions}
. bench/lib.sh
setup_profiled instructions valgrind valgrind callgrind_control callgrind_annotate python3
stop_started_at_exit

start_upstream instructions
rm -f "$OUT/callgrind.out"
if ! start_gateway_under 60 "$OUT/gateway.log" \
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out"; then
  echo "instructions: the gateway did not start under valgrind; see $OUT/gateway.log" >&2
  exit 1
fi
VG_PID=$WRAPPER_PID

callgrind_control --instr=on "$VG_PID" >/dev/null 2>&1
sleep 1
callgrind_control --zero "$VG_PID" >/dev/null 2>&1
"$SIM" --broker "127.0.0.1:$GW_PORT" --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" \
  --qos 1 --progress 0s >"$OUT/device-sim.txt" 2>&1
sleep 1
callgrind_control --dump "$VG_PID" >/dev/null 2>&1
readings=$(grep -o 'published [0-9]*' "$OUT/device-sim.txt" | tail -n 1 | grep -o '[0-9]*')

# Stop the gateway (valgrind exits with it), bounded.
kill -TERM "$VG_PID" 2>/dev/null || true
for _ in $(seq 1 300); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.1; done

# The dump is the one file callgrind wrote besides its final one (`callgrind.out.N`).
dump=$(ls -t "$OUT"/callgrind.out.* 2>/dev/null | tail -n 1)
[ -n "$dump" ] || { echo "instructions: callgrind wrote no dump; see $OUT/gateway.log" >&2; exit 1; }
mv "$dump" "$OUT/callgrind.dump"
rm -f "$OUT"/callgrind.out*
callgrind_annotate --threshold=100 "$OUT/callgrind.dump" >"$WORK/annotated.txt" 2>/dev/null
python3 - "$WORK/annotated.txt" "$readings" "$TOP" >"$OUT/functions.txt" <<'EOF'
import re, sys
path, readings, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
total, rep, rows = 0, 0, []
for line in open(path):
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)", line)
    if not m:
        continue
    n, name = int(m.group(1).replace(",", "")), m.group(2)
    if "PROGRAM TOTALS" in name:
        total = n
        continue
    name = re.sub(r"^\S*?:", "", name.split(" [")[0]) if ":" in name else name
    if re.search(r"__(memcpy|memmove|memset)_", name):
        rep += n
    rows.append((n, name))
print(f"{total / readings:,.0f} instructions per reading ({readings} readings); "
      f"{(total - rep) / readings:,.0f} without memcpy/memset")
for n, name in rows[:top]:
    print(f"{n / readings:10,.0f}  {name[:110]}")
EOF
cat "$OUT/functions.txt"
