#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then
#   1. builds the library (with the CUDA backend when nvcc is present) and runs ctest: CPU tests,
#      the CUDA kernels through the SIMT emulator (plain and shuffled order), GPU tests (skip
#      without a device), the C99 header check, the README example;
#   2. rebuilds the CPU backend and the emulator under AddressSanitizer + UndefinedBehaviorSanitizer
#      and runs the same CPU and emulator tests;
# and ends with one summary line: "total: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc 2>/dev/null || echo 2)

need=()
for pkg in cmake pkg-config libcriterion-dev; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null || {
    echo "could not install ${need[*]}"; exit 1; }
fi

passed=0; failed=0
tally() { # reads a ctest log, adds its counts
  local line total bad
  line=$(grep -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$1" | tail -n 1)
  if [ -z "$line" ]; then failed=$((failed + 1)); echo "!! no ctest summary in $1"; return; fi
  bad=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
  total=$(sed -E 's/.* failed out of ([0-9]+).*/\1/' <<<"$line")
  passed=$((passed + total - bad)); failed=$((failed + bad))
}

run_suite() { # name, build dir, ctest args, cmake args...
  local name=$1 dir=$2 ctest_args=$3; shift 3
  echo "== $name: configure and build ($dir)"
  if ! cmake -S "$root" -B "$dir" "$@" >"$dir.configure.log" 2>&1; then
    cat "$dir.configure.log"; failed=$((failed + 1)); return; fi
  if ! cmake --build "$dir" -j"$jobs" >"$dir.build.log" 2>&1; then
    tail -n 60 "$dir.build.log"; failed=$((failed + 1)); return; fi
  echo "== $name: ctest"
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" $ctest_args 2>&1 | tee "$dir.ctest.log" | grep -vE "^ +Start|Test +#[0-9]+: .* Passed"
  tally "$dir.ctest.log"
}

mkdir -p build
run_suite "release" build/release "" -DCMAKE_BUILD_TYPE=Release
run_suite "asan+ubsan" build/asan "-L cpu|emu" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_ENABLE_CUDA=OFF \
  -DKVC_BUILD_BENCH=OFF -DKVC_SANITIZE=address,undefined

echo "total: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
