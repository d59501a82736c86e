#!/usr/bin/env bash
# The main job: install, build, boot the Soft-RoCE guest and show a verbs round trip.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

scripts/install-deps.sh
[[ -f build/build.ninja ]] || meson setup build
ninja -C build bench/rxio-verbs-roundtrip

tests/rxe/guest.sh --timeout 300 -- bash -c '
  set -e
  echo "== RDMA devices in the guest"; ibv_devices
  echo "== rxio-verbs-roundtrip over $RXIO_RXE_DEV (Soft-RoCE on lo)"
  build/bench/rxio-verbs-roundtrip -d "$RXIO_RXE_DEV" -s 4096 -n 200
  echo "== the same with 64 KiB messages"
  build/bench/rxio-verbs-roundtrip -d "$RXIO_RXE_DEV" -s 65536 -n 50'
