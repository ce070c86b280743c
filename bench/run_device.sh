#!/usr/bin/env bash
# bench/run_device.sh - the ONE prepared script for a lent H200 (tracker issue 7): builds the library,
# the GPU tests and the benchmarks for sm_90, runs the GPU tests, the ceilings, every GPU benchmark
# and the PyTorch/FlashInfer peers, and writes the report - all in under 8 minutes, each step under
# its own `timeout`, progress on stdout.
#
# How to call it through the device tool (one call; leave time to rerun: timeout_s 560):
#
#   run(command="KVC_COMMIT=<git rev-parse --short HEAD, typed in> bash bench/run_device.sh", timeout_s=560)
#
# (the working tree travels without .git, so the commit is passed in; KVC_DEVICE_BUDGET_S overrides the
# 470 s budget; KVC_DEVICE_CUDA=OFF, KVC_DEVICE_TESTS=OFF and KVC_PYTHON=<python> exercise the script's flow on a CPU machine.)
#
# Optional extras, prepared HERE before the call (.whl/ is in .gitignore; for .debs/ first run
# `echo /.debs/ >> .git/info/exclude`):
#   FlashInfer (the selection peer; skipped, and said so, when absent): flashinfer-python is not in
#     the device image (KINDS.md). flashinfer.top_k(input, k, sorted=False) is the radix top-k API of
#     current releases (docs.flashinfer.ai/generated/flashinfer.top_k.html). Since 0.6 the wheel is
#     pure Python and JIT-compiles its kernels with the device's nvcc on first use (the peer's warm-up
#     absorbs that; the step's timeout bounds it); its requirements include apache-tvm-ffi,
#     nvidia-cudnn-frontend and nvidia-cutlass-dsl (large: check that .whl/ stays under the 64 MiB
#     carry limit). Download them into .whl/ as the device tool's README says ("nvidia-h200" note):
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         flashinfer-python==<version> apache-tvm-ffi==<version> ...
#     and call with carry=[".whl"]: this script pip-installs them (--no-index) into /tmp/site.
#   Criterion (the C test framework; the GPU tests are skipped, and said so, without it): put the
#     device OS's .deb files of libcriterion-dev, libcriterion3 and their libraries in .debs/ and
#     call with carry=[".debs"]; they are unpacked under /tmp/debs (never over /).
#
# What comes back under $OUT (at most 8 files, the device tool's limit):
#   run.log        everything printed (build tails, ctest summary, every step's stderr)
#   results.jsonl  every JSON line of every benchmark and peer (bench/report.py's input)
#   RESULTS.md     bench/report.py's tables for this run;  speedup.png  its plot
#   ctest.log      the GPU tests' output;  build.log  the full build output
# Afterwards, here: cp <files_at>/results.jsonl bench/results/gpu_h200_<date>.jsonl, then
# .venv-bench/bin/python bench/report.py (reads every bench/results/*.jsonl; writes bench/RESULTS.md,
# bench/speedup.png and bench/cpu_speedup.png, the CPU section from bench/results/cpu_bench.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PYTHONUNBUFFERED=1
OUT=${OUT:-$root/build-device/out}
mkdir -p "$OUT"
LOG=$OUT/run.log
RES=$OUT/results.jsonl
: >"$RES"
exec > >(tee -a "$LOG") 2>&1

TOTAL_BUDGET=${KVC_DEVICE_BUDGET_S:-470} # seconds for the whole script (the steps below sum to ~365 + build)
t0=$(date +%s)
left() { echo $((TOTAL_BUDGET - ($(date +%s) - t0))); }
say() { echo "[run_device +$(($(date +%s) - t0))s] $*"; }

# step NAME SECONDS CMD...: runs CMD under timeout min(SECONDS, time left); JSON lines of its stdout
# go to results.jsonl, the rest of stdout and all of stderr to the log.
step() {
  local name=$1 budget=$2
  shift 2
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 10 ]; then
    say "SKIP $name: the script's ${TOTAL_BUDGET}s budget is spent"
    echo "{\"record\":\"skipped\",\"step\":\"$name\",\"reason\":\"script budget spent\"}" >>"$RES"
    return 1
  fi
  [ "$budget" -gt "$remaining" ] && budget=$remaining
  say "START $name (timeout ${budget}s)"
  local s=$(date +%s) rc
  timeout --kill-after=5 "$budget" "$@" >/tmp/kvc_step.out
  rc=$?
  grep '^{' /tmp/kvc_step.out >>"$RES"
  grep -v '^{' /tmp/kvc_step.out
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "TIMEOUT $name after ${budget}s (its lines so far are kept)"
    echo "{\"record\":\"timeout\",\"step\":\"$name\",\"seconds\":$budget}" >>"$RES"
  elif [ "$rc" -ne 0 ]; then
    say "FAILED $name (exit $rc)"
    echo "{\"record\":\"failed\",\"step\":\"$name\",\"rc\":$rc}" >>"$RES"
  else
    say "DONE $name in $(($(date +%s) - s))s"
  fi
  return "$rc"
}

say "device run at $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
commit=${KVC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
dirty=$(git status --porcelain 2>/dev/null | grep -vc '^??' || true)
echo "{\"record\":\"run\",\"commit\":\"$commit\",\"dirty_files\":$dirty,\"date\":\"$(date -u +%FT%TZ)\",\"host\":\"$(hostname)\"}" >>"$RES"

# --- optional carried extras -------------------------------------------------------------------
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} # for FlashInfer's JIT
if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || say "wheel install failed: peers run without them"
fi
if ! pkg-config --exists criterion 2>/dev/null && ls .debs/*.deb >/dev/null 2>&1; then
  say "unpacking carried .debs under /tmp/debs"
  mkdir -p /tmp/debs && for f in .debs/*.deb; do dpkg -x "$f" /tmp/debs; done
  libdir=$(dirname "$(find /tmp/debs -name 'criterion.pc' | head -1)")
  export PKG_CONFIG_PATH=$libdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH} PKG_CONFIG_SYSROOT_DIR=/tmp/debs
  export LD_LIBRARY_PATH=$(find /tmp/debs -name 'libcriterion.so*' -printf '%h\n' | head -1)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
tests=${KVC_DEVICE_TESTS:-ON}
if [ "$tests" = ON ] && ! pkg-config --exists criterion 2>/dev/null; then
  tests=OFF
  say "NOTE: Criterion is absent on this machine: the GPU tests are NOT built or run (see the top of this script)"
  echo '{"record":"note","note":"GPU tests skipped: Criterion absent on the device"}' >>"$RES"
fi

# --- 1. build (sm_90 only, -j16) -------------------------------------------------------------------
B=$root/build-device
gen=""
command -v ninja >/dev/null && gen="-G Ninja"
say "configure (tests $tests)"
if ! cmake -S "$root" -B "$B" $gen -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DKVC_ENABLE_CUDA=${KVC_DEVICE_CUDA:-ON} \
    -DKVC_BUILD_TESTS=$tests -DKVC_BUILD_BENCH=ON >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; say "configure FAILED"; exit 1
fi
grep -q "CUDA backend ON" "$OUT/build.log" || say "WARNING: the CUDA backend is OFF (no nvcc?)"
say "build"
if ! timeout $(($(left) - 250 > 60 ? $(left) - 250 : 60)) cmake --build "$B" -j16 >>"$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"; say "build FAILED or timed out; benchmarks that built still run"
fi
say "build done"
BIN=$B/bench
export KVCOMPRESS_LIBRARY=$B/libkvcompress.so

run_bin() { # name budget args...
  local name=$1 budget=$2
  shift 2
  if [ -x "$BIN/$name" ]; then step "$name" "$budget" "$BIN/$name" "$@"
  else say "SKIP $name: not built"; echo "{\"record\":\"skipped\",\"step\":\"$name\",\"reason\":\"not built\"}" >>"$RES"; fi
}
PY=${KVC_PYTHON:-python3}
PEER=bench/peers/kvpress_torch.py
$PY -c "import flashinfer" >/dev/null 2>&1 && say "flashinfer importable: FlashInfer peer ON" ||
  say "flashinfer NOT importable: the FlashInfer top-k peer is skipped (carry its wheels, see the top)"

# Ordered by what the targets need most, so a tight budget cuts the least important steps.
# --- 2. the ceilings, then the headline pair: full pipeline (SnapKV w64) ours vs kvpress/PyTorch --
run_bin bench_ceilings 15
run_bin bench_compress 45 --models llama:32:8:128,qwen:40:8:128 --n 4096,32768,131072 --batch 1,8 \
  --ratios 0.1,0.5,0.9 --methods snapkv --iters 10 --max-seconds 38
step peers_compress 70 $PY $PEER --ops compress --methods snapkv --models llama:32:8:128,qwen:40:8:128 \
  --n 4096,32768,131072 --batch 1,8 --ratios 0.1,0.5,0.9 --iters 10 --max-seconds 55

# --- 3. GPU tests ----------------------------------------------------------------------------------
if [ "$tests" = ON ]; then
  step ctest_gpu 45 bash -c "ctest --test-dir '$B' -L gpu --output-on-failure --timeout 40 >'$OUT/ctest.log' 2>&1"
  tail -n 12 "$OUT/ctest.log"
fi

# --- 4. selection (ours, CUB sort baseline | torch.topk, FlashInfer top_k) and compaction --------
run_bin bench_select 25
step peers_select_compact 40 $PY $PEER --ops select,compact --n 4096,32768,131072 --batch 1,8 \
  --ratios 0.1,0.5,0.9 --iters 10 --max-seconds 30

# --- 5. H2O over all queries (window = n), ratio 0.5 ------------------------------------------------
run_bin bench_compress 30 --models llama:32:8:128,qwen:40:8:128 --n 4096,32768 --batch 1,8 --ratios 0.5 \
  --methods h2o --iters 5 --warmup 1 --max-seconds 24
step peers_compress_h2o 25 $PY $PEER --ops compress --methods h2o --models llama:32:8:128,qwen:40:8:128 \
  --n 4096,32768 --batch 1,8 --ratios 0.5 --iters 5 --warmup 1 --max-seconds 18

# --- 6. the stage benches and the 9-ratio sweep -----------------------------------------------------
run_bin bench_score 20 --n 4096,32768,131072 --heads 8:32,8:40 --method snapkv,tova,knorm --batch 1 --iters 10
run_bin bench_score 20 --n 4096,32768,131072 --heads 8:32 --method snapkv --engine-lse 1 --batch 1 --iters 10
run_bin bench_score 30 --n 4096,32768 --heads 8:32 --method h2o --window n --batch 1 --iters 3
[ -f bench/bench_compact.cu ] && run_bin bench_compact 20
for f in bench/bench_*.cu; do # any other bench program a colleague added
  n=$(basename "$f" .cu)
  case $n in bench_ceilings|bench_compress|bench_score|bench_select|bench_compact) ;; *) run_bin "$n" 15 ;; esac
done
run_bin bench_compress 10 --models llama:32:8:128 --n 32768 --batch 1 --ratios 0.2,0.3,0.4,0.6,0.7,0.8 \
  --methods snapkv --iters 10 --max-seconds 8

# --- 7. report -------------------------------------------------------------------------------------
step report 20 $PY bench/report.py --in "$RES" --md "$OUT/RESULTS.md" --png "$OUT/speedup.png" --no-cpu-png
say "finished in $(($(date +%s) - t0))s; results: $(grep -c '"record":"result"' "$RES") result lines"
ls -la "$OUT"
