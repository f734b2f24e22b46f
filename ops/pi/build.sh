#!/usr/bin/env bash
# Cross-builds the gateway for a Raspberry Pi with Debian's packaged Rust toolchain.
#
#   ops/pi/build.sh [aarch64|armv7]      (default aarch64; 64-bit Raspberry Pi OS is aarch64)
#
# Why Debian's rustc: rustup can only cross-compile with a downloaded std for the
# target; Debian ships the target std as an ordinary multiarch package
# (libstd-rust-web-dev:arm64 / :armhf) that matches its rustc-web (/usr/bin/rustc).
# Installs what is missing (as root, or with sudo): the foreign architecture, rustc-web,
# the target std, the cross C compiler (for the C code in ring).
# Prints the binary's path and size. Profile: PROFILE (default release).
set -euo pipefail
cd "$(dirname "$0")/../.."

arch=${1:-aarch64}
profile=${PROFILE:-release}
case "$arch" in
  aarch64) triple=aarch64-unknown-linux-gnu; debarch=arm64; gnu=aarch64-linux-gnu ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; debarch=armhf; gnu=arm-linux-gnueabihf ;;
  *) echo "usage: $0 [aarch64|armv7]" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
apt_install() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
[ -x /usr/bin/rustc ] || need+=(rustc-web)
[ -d "/usr/lib/rustlib/$triple/lib" ] || need+=("libstd-rust-web-dev:$debarch")
command -v "$gnu-gcc" >/dev/null || need+=("gcc-$gnu" "libc6-dev-$debarch-cross")
if [ ${#need[@]} -gt 0 ]; then
  echo "--- installing ${need[*]}"
  if ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
    $SUDO dpkg --add-architecture "$debarch"
  fi
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt_install "${need[@]}"
fi

# Debian's rustc must match its std exactly; the host cargo (rustup's or Debian's)
# only drives it. Build scripts and proc macros are also built by /usr/bin/rustc.
upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
export RUSTC=/usr/bin/rustc
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${triple//-/_}=$gnu-gcc"
export "AR_${triple//-/_}=$gnu-ar"
echo "--- cargo build --profile $profile --target $triple ($($RUSTC --version))"
cargo build --locked -p gateway --profile "$profile" --target "$triple"

bin="target/$triple/$profile/gateway"
file "$bin" 2>/dev/null || true
echo "binary: $bin"
echo "size: $(stat -c %s "$bin") bytes"
