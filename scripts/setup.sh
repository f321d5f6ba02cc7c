#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (as root) for fleetprobe's tests, lab and demo. Idempotent.
#   apt: OpenSSH (test hosts), qemu for five architectures + cpio (the lab), cross compilers and
#   kernel-module build tools (module probes), chromium (HTML report test), busybox + dash (runner shells).
#   Python: a venv in .venv with fleetprobe installed editable, with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it installs Debian packages and the tests create network namespaces)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
packages=(
  openssh-server openssh-client iproute2 procps sudo busybox-static dash
  qemu-system-x86 qemu-system-ppc qemu-system-mips qemu-system-arm qemu-utils cpio zstd
  make gcc binutils libelf-dev bc flex bison
  gcc-powerpc64le-linux-gnu gcc-mips64el-linux-gnuabi64 gcc-mipsel-linux-gnu gcc-aarch64-linux-gnu
  chromium
  python3-venv
  jq
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
mkdir -p /run/sshd
# tracefs: fleetprobe's own tests probe this machine's kernel (uprobes and tracepoints).
[ -e /sys/kernel/tracing/README ] || mount -t tracefs nodev /sys/kernel/tracing || true
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done ($(.venv/bin/fleetprobe --version))"
