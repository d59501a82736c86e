#!/usr/bin/env bash
# Every test tier: `unit` in plain, ASan+UBSan and TSan builds, a bounded libFuzzer
# run over the wire decoders, `apps` (real programs under rxio-run, plain build: a
# sanitized shim cannot be preloaded into unsanitized programs), then `rxe` inside the
# Soft-RoCE guest. Ends with one line 'total: N passed, M failed, K skipped'.
set -uo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

scripts/install-deps.sh || exit 1

failed=()
# meson_test BUILD_DIR LOGBASE ARGS...: runs, remembers a failure, keeps going.
meson_test() {
  local dir=$1 logbase=$2
  shift 2
  echo "== meson test -C $dir $*"
  meson test -C "$dir" --logbase "$logbase" --print-errorlogs "$@" || failed+=("$dir $logbase")
}
# setup DIR [MESON_ARGS...]: configures once, then builds everything (or $targets).
setup() {
  local dir=$1
  shift
  [[ -f $dir/build.ninja ]] || meson setup "$dir" "$@" || exit 1
  ninja -C "$dir" ${targets:-} || exit 1
}

setup build
setup build-asan -Db_sanitize=address,undefined -Db_lundef=false
setup build-tsan -Db_sanitize=thread -Db_lundef=false
# libFuzzer wants clang; only the fuzz targets are built in that tree.
CXX=clang++ targets="tests/fuzz/rxio-wire-fuzz tests/fuzz/rxio-negotiation-fuzz" setup build-fuzz -Db_sanitize=address,undefined -Db_lundef=false

meson_test build unit --suite unit
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  meson_test build-asan unit --suite unit
TSAN_OPTIONS=halt_on_error=1 meson_test build-tsan unit --suite unit
meson_test build-fuzz fuzz --suite fuzz --no-rebuild
meson_test build apps --suite apps
# --verbose: the guest's output belongs in the log.
meson_test build rxe --suite rxe --verbose

scripts/summarize-tests.py build/meson-logs/unit.junit.xml build-asan/meson-logs/unit.junit.xml \
  build-tsan/meson-logs/unit.junit.xml build-fuzz/meson-logs/fuzz.junit.xml build/meson-logs/apps.junit.xml \
  build/meson-logs/rxe.junit.xml || failed+=("summary")
if ((${#failed[@]})); then
  echo "test.sh: failed: ${failed[*]}" >&2
  exit 1
fi
