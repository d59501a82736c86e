#!/usr/bin/env bash
# Installs every Debian 12 package that rxio's build, tests and benchmarks need.
# Idempotent: when everything is present it changes nothing and needs no network.
set -euo pipefail

packages=(
  # build
  g++ meson ninja-build pkg-config python3
  libibverbs-dev librdmacm-dev libgtest-dev libgmock-dev libboost-dev liburing-dev nlohmann-json3-dev
  # fuzzing (libFuzzer)
  clang libclang-rt-14-dev
  # the Soft-RoCE guest of the rxe tier (tests/rxe/guest.sh)
  qemu-system-x86 linux-image-amd64 busybox-static cpio kmod iproute2
  rdma-core ibverbs-providers ibverbs-utils rdmacm-utils perftest
  # the kernel TCP loopback that bench/compare-local.sh measures against
  sockperf iperf3
  # real programs the apps tier runs under rxio-run
  redis-server redis-tools memcached libmemcached-tools
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

if ((EUID != 0)); then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root (or with sudo) to install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
