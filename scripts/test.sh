#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then
#   1. builds the library (with the CUDA backend when nvcc is present) and runs ctest: CPU tests,
#      the CUDA kernels through the SIMT emulator (plain and shuffled order), GPU tests (skip
#      without a device), the C99 header check, the README example;
#   2. rebuilds the CPU backend and the emulator under AddressSanitizer + UndefinedBehaviorSanitizer
#      and runs the same CPU and emulator tests;
#   3. runs the threading test under ThreadSanitizer;
#   4. runs each libFuzzer target for a bounded minute (clang);
#   5. runs the Python package's pytest suite in a fresh venv;
# and ends with one summary line: "total: N passed, N failed, N skipped" (GPU tests skip without a device).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc 2>/dev/null || echo 2)

need=()
for pkg in cmake pkg-config libcriterion-dev clang libclang-rt-14-dev python3-venv; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null || {
    echo "could not install ${need[*]}"; exit 1; }
fi

passed=0; failed=0; skipped=0
tally() { # reads a ctest log, adds its counts; skipped tests (no GPU) are neither passed nor failed
  local line total bad skip
  line=$(grep -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$1" | tail -n 1)
  if [ -z "$line" ]; then failed=$((failed + 1)); echo "!! no ctest summary in $1"; return; fi
  bad=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
  total=$(sed -E 's/.* failed out of ([0-9]+).*/\1/' <<<"$line")
  skip=$(grep -cE "\(Skipped\)$" "$1")
  passed=$((passed + total - bad - skip)); failed=$((failed + bad)); skipped=$((skipped + skip))
}

run_suite() { # name, build dir, ctest args, cmake args...
  local name=$1 dir=$2 ctest_args=$3; shift 3
  echo "== $name: configure and build ($dir)"
  if ! cmake -S "$root" -B "$dir" "$@" >"$dir.configure.log" 2>&1; then
    cat "$dir.configure.log"; failed=$((failed + 1)); return; fi
  if ! cmake --build "$dir" -j"$jobs" ${target:+--target $target} >"$dir.build.log" 2>&1; then
    tail -n 60 "$dir.build.log"; failed=$((failed + 1)); return; fi
  echo "== $name: ctest"
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" $ctest_args 2>&1 | tee "$dir.ctest.log" | grep -vE "^ +Start|Test +#[0-9]+: .* Passed"
  tally "$dir.ctest.log"
}

mkdir -p build
run_suite "release" build/release "" -DCMAKE_BUILD_TYPE=Release
run_suite "asan+ubsan" build/asan "-L cpu|emu" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_ENABLE_CUDA=OFF \
  -DKVC_BUILD_BENCH=OFF -DKVC_SANITIZE=address,undefined

target=thread_safety run_suite "tsan" build/tsan "-R ^thread_safety$" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_ENABLE_CUDA=OFF \
  -DKVC_BUILD_BENCH=OFF -DKVC_SANITIZE=thread
run_suite "fuzz" build/fuzz "-L fuzz" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVC_ENABLE_CUDA=OFF -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF \
  -DKVC_BUILD_FUZZERS=ON

if [ -d bindings/python/tests ]; then
  echo "== python: venv, package, pytest"
  venv=build/venv
  if { [ -x $venv/bin/python ] || python3 -m venv $venv; } &&
     $venv/bin/python -m pip install -q --upgrade pip numpy pytest >build/pip.log 2>&1 &&
     $venv/bin/python -m pip install -q ./bindings/python >>build/pip.log 2>&1; then
    KVCOMPRESS_LIBRARY=$root/build/release/libkvcompress.so $venv/bin/python -m pytest -q bindings/python/tests \
      2>&1 | tee build/pytest.log | tail -n 25
    line=$(grep -E "[0-9]+ (passed|failed|errors?).* in [0-9.]+s" build/pytest.log | tail -n 1)
    p=$(grep -oE "[0-9]+ passed" <<<"$line" | grep -oE "[0-9]+" || echo 0)
    s_=$(grep -oE "[0-9]+ skipped" <<<"$line" | grep -oE "[0-9]+" || echo 0)
    skipped=$((skipped + s_))
    f=0
    for x in $(grep -oE "[0-9]+ (failed|errors?)" <<<"$line" | grep -oE "^[0-9]+"); do f=$((f + x)); done
    [ -n "$line" ] || f=1
    passed=$((passed + p)); failed=$((failed + ${f:-0}))
  else
    tail -n 20 build/pip.log; failed=$((failed + 1))
  fi
fi

echo "total: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
