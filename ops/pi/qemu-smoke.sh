#!/usr/bin/env bash
# Smoke test of a cross-built gateway: runs it under qemu user emulation with its
# embedded broker on a free loopback port and a host Mosquitto as upstream on another,
# publishes one reading to it with mosquitto_pub and waits (bounded) for that reading to
# arrive upstream with mosquitto_sub. Exit 0 when it arrived, non-zero otherwise.
#
#   ops/pi/qemu-smoke.sh [aarch64|armv7] [BINARY]
#
# BINARY defaults to what ops/pi/build.sh builds (target/<triple>/release/gateway).
# Installs qemu-user-static and mosquitto-clients (and mosquitto) when missing.
# TIMEOUT (seconds, default 60) bounds each wait; qemu makes startup slow.
set -euo pipefail
cd "$(dirname "$0")/../.."

arch=${1:-aarch64}
case "$arch" in
  aarch64) triple=aarch64-unknown-linux-gnu; qemu=qemu-aarch64-static; sysroot=/usr/aarch64-linux-gnu; loader=/lib/ld-linux-aarch64.so.1 ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; qemu=qemu-arm-static; sysroot=/usr/arm-linux-gnueabihf; loader=/lib/ld-linux-armhf.so.3 ;;
  *) echo "usage: $0 [aarch64|armv7] [BINARY]" >&2; exit 2 ;;
esac
bin=${2:-target/$triple/${PROFILE:-release}/gateway}
timeout_s=${TIMEOUT:-60}
[ -x "$bin" ] || { echo "no binary at $bin: run ops/pi/build.sh $arch first" >&2; exit 2; }

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
need=()
command -v "$qemu" >/dev/null || need+=(qemu-user-static)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then
  echo "--- installing ${need[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need[@]}" >/dev/null
fi
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
tmp=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Upstream: a host Mosquitto on a free loopback port.
up_port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$up_port" >"$tmp/mosquitto.conf"
"$mosquitto_bin" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)

# The gateway under qemu, configured by a temp file.
gw_port=$(free_port)
mkdir -p "$tmp/rules"
cat >"$tmp/gateway.toml" <<TOML
[gateway]
id = "pi-smoke"
[broker]
listen = "127.0.0.1:$gw_port"
max_connections = 16
[storage]
path = "$tmp/data/gateway.redb"
[rules]
dir = "$tmp/rules"
[upstream]
url = "mqtt://127.0.0.1:$up_port"
backoff_min = "100ms"
backoff_max = "1s"
TOML
# The target's C library: the multiarch libc6:arm64 (or :armhf) that build.sh's
# libstd-rust-web-dev pulls in, when present. Do not mix it with the cross sysroot
# (-L): libc6-arm64-cross is an older 2.36 build, and its ld.so with the multiarch
# libc.so hangs in the first pthread_create.
if [ -e "$loader" ]; then qemu_args=(); else qemu_args=(-L "$sysroot"); fi
run_gw() { "$qemu" "${qemu_args[@]}" "$bin" --config "$tmp/gateway.toml" "$@"; }
# Gateways with an HTTP server would take 127.0.0.1:8080 by default: give it a free
# port when this build knows the key.
printf '[http]\nlisten = "127.0.0.1:%s"\n' "$(free_port)" >>"$tmp/gateway.toml"
if ! run_gw check-config >/dev/null 2>&1; then
  head -n -2 "$tmp/gateway.toml" >"$tmp/g" && mv "$tmp/g" "$tmp/gateway.toml"
fi
echo "--- $("$qemu" --version | head -1); $(file -b "$bin" | cut -d, -f1-2)"
run_gw --version
run_gw check-config
started=$(date +%s.%N)
# Not through run_gw: a backgrounded function is a subshell, and killing it would
# leave qemu running.
"$qemu" "${qemu_args[@]}" "$bin" --config "$tmp/gateway.toml" run >"$tmp/gateway.log" 2>&1 &
pids+=($!)

# Subscribe upstream first, then publish once the embedded broker accepts connections.
topic=gateways/pi-smoke/devices/pi-1/telemetry
mosquitto_sub -h 127.0.0.1 -p "$up_port" -t "$topic" -C 1 -W "$timeout_s" -v >"$tmp/received" 2>&1 &
sub=$!
pids+=($sub)
payload="{\"temperature\":21.5,\"nonce\":$RANDOM$RANDOM}"
deadline=$((SECONDS + timeout_s))
until mosquitto_pub -h 127.0.0.1 -p "$gw_port" -q 1 -i pi-1 -t devices/pi-1/telemetry -m "$payload" 2>/dev/null; do
  if [ $SECONDS -ge $deadline ]; then
    echo "FAIL: the gateway did not accept a connection within ${timeout_s}s" >&2
    cat "$tmp/gateway.log" >&2
    exit 1
  fi
  sleep 0.5
done
published=$(date +%s.%N)
echo "published $payload after $(awk "BEGIN{printf \"%.1f\", $published - $started}") s (gateway start under qemu)"

if wait "$sub" && grep -q "$payload" "$tmp/received"; then
  echo "received upstream after $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $published}") s: $(cat "$tmp/received")"
  echo "PASS: $bin ($arch under $qemu) forwarded a reading"
else
  echo "FAIL: the reading did not arrive upstream within ${timeout_s}s" >&2
  echo "--- upstream subscriber:" >&2; cat "$tmp/received" >&2
  echo "--- gateway log:" >&2; cat "$tmp/gateway.log" >&2
  exit 1
fi
