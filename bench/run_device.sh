#!/usr/bin/env bash
# bench/run_device.sh - the ONE prepared run on a lent H200 (issue 20): checks correctness on the GPU
# (kvc-gpucheck: the CUDA backend against the CPU backend in one process; the Python bindings'
# CUDA tests with the device's torch), then measures the ceilings, every benchmark program and the
# PyTorch / kvpress / CUB / torch.topk peers, and writes the report. It compiles nothing: the build
# comes prebuilt in .device/ (scripts/build_device.sh), unless that is missing.
#
# ---- Before the call, HERE (free) --------------------------------------------------------------
#   scripts/build_device.sh          # sm_90 build + kvpress wheel into .device/ (~10 MiB; fails >= 48 MiB)
#   bench/run_device.sh --dry-run    # every step that needs no GPU, here: must end "dry run: PASSED"
#   git rev-parse --short HEAD       # the commit to type into the call below
#
# ---- THE DEVICE CALL (one; then give_back at once unless you rerun) ------------------------------
#   run(command="KVC_COMMIT=<short sha> bash bench/run_device.sh", carry=[".device"], timeout_s=300)
# The script budgets itself to 240 s (KVC_DEVICE_BUDGET_S) and skips whatever does not fit, saying
# so; with the machine's start (~1-2 min) and the transfers one call costs ~6 of the session's 15
# device-minutes, which leaves room for one rerun. No network there: everything it needs travels
# in the working tree (64 MiB) and .device/.
#
# ---- What comes back in $OUT (the tool returns at most 8 files, 16 MiB each) ------------------------
#   run.log        everything printed, with timestamps per step
#   results.jsonl  one JSON line per measured point, appended as it is measured, plus records:
#                  run, env, clocks (SM / memory MHz at start and end of every step, and sampled),
#                  gpucheck (totals), note / skipped / timeout / failed
#   gpucheck.log   the checker's output, all shards (failures with their seed and rerun line)
#   pytest.log     bindings/python/tests/test_cuda.py with the device's torch
#   RESULTS.md     bench/report.py's tables for this run;  speedup.png  its plot
#   build.log      only if .device/ was missing and the script had to build there
#
# ---- Afterwards, here ------------------------------------------------------------------------------
#   cp <files_at>/results.jsonl bench/results/gpu_h200_$(date +%F).jsonl
#   <venv with numpy + matplotlib>/bin/python bench/report.py   # rewrites bench/RESULTS.md (all results)
#   commit both with the date, device, commit and clocks (bench/RESULTS.md shows them); give every
#   checker failure a regression case: the "rerun:" line under it in gpucheck.log
#   (`kvc-gpucheck-emu --family F --seed S --cases 1 --max-n M`) reruns that case on the emulator
#   here (build/emu-check/tests/kvc-gpucheck-emu after a dry run), then fix it.
#
# ---- Knobs ------------------------------------------------------------------------------------------
#   --dry-run               run every non-GPU step here (build, carry size, loadability of the carried
#                           binaries, the checker on the emulator, pytest collection, report)
#   KVC_DEVICE_BUDGET_S     seconds for the whole script (default 240)
#   KVC_GPUCHECK_SHARDS     parallel checker processes (default 8; 16 cores there)
#   KVC_PYTHON              the Python to use (default python3, which holds torch on the device)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
export PYTHONUNBUFFERED=1
if [ "$dry" = 1 ]; then
  OUT=$root/build/dry-run
  rm -rf "$OUT"
fi
OUT=${OUT:-$root/build/device-out}
mkdir -p "$OUT"
LOG=$OUT/run.log
RES=$OUT/results.jsonl
: >"$RES"
exec > >(tee -a "$LOG") 2>&1

TOTAL_BUDGET=${KVC_DEVICE_BUDGET_S:-$([ "$dry" = 1 ] && echo 1200 || echo 240)} # the dry run builds, too
SHARDS=${KVC_GPUCHECK_SHARDS:-8}
D=$root/.device
BIN=$D/bin
t0=$(date +%s)
left() { echo $((TOTAL_BUDGET - ($(date +%s) - t0))); }
say() { echo "[run_device +$(($(date +%s) - t0))s] $*"; }
record() { printf '%s\n' "$1" >>"$RES"; }
problems=0 # dry run: anything that would break the device run
problem() { say "PROBLEM: $*"; problems=$((problems + 1)); }

# --- clocks: one reading, and a 4 Hz sampler around each step --------------------------------------
have_smi=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && have_smi=1
clock_reading() { # -> "sm_mhz,mem_mhz,temp_c,power_w" or empty
  [ "$have_smi" = 1 ] || return 0
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader,nounits 2>/dev/null |
    head -1 | tr -d ' '
}
clock_record() { # step, when
  local c
  c=$(clock_reading)
  [ -n "$c" ] || return 0
  IFS=, read -r sm mem temp power <<<"$c"
  record "{\"record\":\"clocks\",\"step\":\"$1\",\"at\":\"$2\",\"sm_mhz\":${sm:-null},\"mem_mhz\":${mem:-null},\"temp_c\":${temp:-null},\"power_w\":${power:-null}}"
}
sampler_pid=""
sampler_start() {
  [ "$have_smi" = 1 ] || return 0
  nvidia-smi --query-gpu=clocks.sm,clocks.mem --format=csv,noheader,nounits -lms 250 >/tmp/kvc_clocks.csv 2>/dev/null &
  sampler_pid=$!
}
sampler_stop() { # step
  [ -n "$sampler_pid" ] || return 0
  kill "$sampler_pid" 2>/dev/null
  wait "$sampler_pid" 2>/dev/null
  sampler_pid=""
  awk -F', *' -v step="$1" 'NF >= 2 && $1 + 0 > 0 { sm[n] = $1 + 0; mem[n] = $2 + 0; n++ }
    function sort(a, k,   i, j, t) { for (i = 1; i < k; i++) for (j = i; j > 0 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t } }
    END { if (!n) exit; sort(sm, n); sort(mem, n);
          printf "{\"record\":\"clocks\",\"step\":\"%s\",\"at\":\"sampled\",\"samples\":%d,\"sm_mhz_min\":%d,\"sm_mhz_median\":%d,\"sm_mhz_max\":%d,\"mem_mhz_min\":%d,\"mem_mhz_median\":%d,\"mem_mhz_max\":%d}\n",
                 step, n, sm[0], sm[int(n/2)], sm[n-1], mem[0], mem[int(n/2)], mem[n-1] }' /tmp/kvc_clocks.csv >>"$RES"
}

# --- step NAME SECONDS CMD...: CMD under a hard timeout of min(SECONDS, time left); KVC_BENCH_BUDGET_S
# (the C programs, bench_util.cuh) and STEP_SECONDS (for --max-seconds) tell it to stop itself at 80 %
# of that, skipping the rest of its points. JSON lines of its stdout go to results.jsonl as they come.
step() {
  local name=$1 budget=$2 remaining rc s
  shift 2
  remaining=$(left)
  if [ "$remaining" -lt 8 ]; then
    say "SKIP $name: the script's ${TOTAL_BUDGET}s budget is spent"
    record "{\"record\":\"skipped\",\"step\":\"$name\",\"reason\":\"script budget spent\"}"
    return 1
  fi
  [ "$budget" -gt "$remaining" ] && budget=$remaining
  export KVC_BENCH_BUDGET_S=$((budget * 4 / 5)) STEP_SECONDS=$((budget * 4 / 5))
  say "START $name (budget ${budget}s, stops itself after ${KVC_BENCH_BUDGET_S}s)"
  clock_record "$name" start
  sampler_start
  s=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" | awk -v res="$RES" '/^\{/ { print >> res; fflush(res); next } { print; fflush() }'
  rc=${PIPESTATUS[0]}
  sampler_stop "$name"
  clock_record "$name" end
  unset KVC_BENCH_BUDGET_S STEP_SECONDS
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    say "TIMEOUT $name after ${budget}s (its lines so far are kept)"
    record "{\"record\":\"timeout\",\"step\":\"$name\",\"seconds\":$budget}"
  elif [ "$rc" -ne 0 ]; then
    say "FAILED $name (exit $rc) after $(($(date +%s) - s))s"
    record "{\"record\":\"failed\",\"step\":\"$name\",\"rc\":$rc}"
  else
    say "DONE $name in $(($(date +%s) - s))s"
  fi
  return "$rc"
}

run_bin() { # name budget args...
  local name=$1 budget=$2
  shift 2
  if [ -x "$BIN/$name" ]; then step "$name" "$budget" "$BIN/$name" "$@"
  else say "SKIP $name: not built"; record "{\"record\":\"skipped\",\"step\":\"$name\",\"reason\":\"not built\"}"; fi
}

# --- the checker: SHARDS processes share the GPU (the CPU reference is the slow half) -----------------
# run_gpucheck BINARY SECONDS ARGS...: writes $OUT/gpucheck.log and a {"record":"gpucheck"} line.
run_gpucheck() {
  local binary=$1 seconds=$2 shards=$3
  shift 3
  local k pids=() total_p=0 total_f=0 total_s=0 line
  for ((k = 0; k < shards; k++)); do
    "$binary" --shard "$k/$shards" --time-budget "$seconds" "$@" >"/tmp/kvc_gpucheck.$k.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  : >"$OUT/gpucheck.log"
  for ((k = 0; k < shards; k++)); do
    echo "=== shard $k/$shards" >>"$OUT/gpucheck.log"
    head -c 2000000 "/tmp/kvc_gpucheck.$k.log" >>"$OUT/gpucheck.log"
    line=$(grep -E '^gpucheck: [0-9]+ passed, [0-9]+ failed' "/tmp/kvc_gpucheck.$k.log" | tail -1)
    if [ -z "$line" ]; then
      echo "shard $k ended without a summary (crash?): $(tail -n 3 "/tmp/kvc_gpucheck.$k.log" | tr '\n' ' ')"
      total_f=$((total_f + 1))
      continue
    fi
    set -- $(sed -E 's/^gpucheck: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped.*/\1 \2 \3/' <<<"$line")
    total_p=$((total_p + $1)) total_f=$((total_f + $2)) total_s=$((total_s + $3))
  done
  grep -h '^FAIL\|^FATAL' /tmp/kvc_gpucheck.*.log | head -n 20
  echo "{\"record\":\"gpucheck\",\"binary\":\"$(basename "$binary")\",\"shards\":$shards,\"seconds\":$seconds,\"passed\":$total_p,\"failed\":$total_f,\"skipped\":$total_s}"
  echo "kvc-gpucheck, all shards: $total_p passed, $total_f failed, $total_s skipped"
  [ "$total_f" -eq 0 ] && [ "$total_p" -gt 0 ]
}

say "run_device $([ "$dry" = 1 ] && echo "DRY RUN (no GPU used)" || echo "on the device") at $(date -u +%FT%TZ), budget ${TOTAL_BUDGET}s"
commit=${KVC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
record "{\"record\":\"run\",\"commit\":\"$commit\",\"date\":\"$(date -u +%FT%TZ)\",\"host\":\"$(hostname)\",\"dry_run\":$([ "$dry" = 1 ] && echo true || echo false)}"
[ "$have_smi" = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm --format=csv 2>&1 | head -3

# ================================================================================================
# 1. The carried build (or, failing that, a build here)
# ================================================================================================
if [ "$dry" = 1 ]; then
  say "build: scripts/build_device.sh (incremental)"
  scripts/build_device.sh || problem "scripts/build_device.sh failed"
fi
if [ -f "$D/BUILD_INFO" ]; then
  say "carried build: $(head -1 "$D/BUILD_INFO"), built $(sed -n 's/^date //p' "$D/BUILD_INFO")"
  built=$(sed -n 's/^commit \([0-9a-f]*\).*/\1/p' "$D/BUILD_INFO")
  [ "$commit" = unknown ] || [ "${built:0:7}" = "${commit:0:7}" ] ||
    say "WARNING: .device/ was built at $built, the tree is $commit: rebuild with scripts/build_device.sh"
  record "{\"record\":\"note\",\"note\":\"carried build: $(head -1 "$D/BUILD_INFO")\"}"
elif [ "$dry" = 0 ]; then
  say "NO .device/ (was carry=[\".device\"] given?): building here for sm_90 (costs device minutes)"
  record '{"record":"note","note":".device missing: built on the device"}'
  B=$root/build-device
  if cmake -S "$root" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DKVC_BUILD_TESTS=OFF \
       -DKVC_BUILD_BENCH=ON >"$OUT/build.log" 2>&1 && cmake --build "$B" -j16 --target kvcompress kvc_benches >>"$OUT/build.log" 2>&1; then
    mkdir -p "$BIN" "$D/lib" && cp "$B"/bench/bench_* "$BIN/" && cp "$B/libkvcompress.so.0."* "$D/lib/libkvcompress.so.0"
    # the checker without Criterion or CMake's test tree: plain C against the library just built
    cc -O2 -std=gnu99 -o "$BIN/kvc-gpucheck" tests/gpucheck/gpucheck.c tests/gpucheck/family_*.c tests/gpucheck/device_cuda.c \
      tests/support/*.c -Iinclude -I"$B/include" -Itests/support -Itests/gpucheck -I/usr/local/cuda/include \
      -L"$D/lib" -l:libkvcompress.so.0 -L/usr/local/cuda/lib64 -lcudart -lm -Wl,-rpath,'$ORIGIN/../lib' >>"$OUT/build.log" 2>&1 ||
      say "the checker did not build (see build.log)"
  else
    tail -n 30 "$OUT/build.log"; say "build FAILED: only the Python steps can run"
  fi
fi
if [ -d "$D" ]; then
  carried=$(du -sb "$D" | cut -f1)
  say "carried folder .device: $(awk -v b="$carried" 'BEGIN { printf "%.1f MiB", b / 1048576 }')"
  if [ "$dry" = 1 ]; then
    tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
    travel=$((tracked + ${untracked:-0} + carried))
    say "the working tree that travels: $(awk -v b="$travel" 'BEGIN { printf "%.1f MiB", b / 1048576 }') (tracked, untracked, .device) of 64 MiB"
    [ "$carried" -lt $((48 * 1048576)) ] || problem ".device is 48 MiB or more"
    [ "$travel" -lt $((60 * 1048576)) ] || problem "the working tree and .device come to 60 MiB or more"
    record "{\"record\":\"note\",\"note\":\"dry run: .device $carried bytes, travelling tree $travel bytes\"}"
  fi
fi

# ================================================================================================
# 2. The environment there: libcublas (bench_ceilings' GEMM: the only CUDA library not linked in), the carried wheels
# ================================================================================================
PY=${KVC_PYTHON:-python3}
if [ "$dry" = 1 ] && ! "$PY" -c "import numpy, pytest, matplotlib" >/dev/null 2>&1; then
  venv=$root/build/venv-device # the device's python3 has these; here a venv gets them (once)
  say "python: $venv with numpy, pytest, matplotlib"
  { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } && "$venv/bin/python" -m pip install -q numpy pytest matplotlib >/dev/null 2>&1 ||
    problem "could not make a venv with numpy, pytest, matplotlib"
  PY=$venv/bin/python
fi
if [ -f "$D/lib/libkvcompress.so.0" ]; then
  if ldd "$D/lib/libkvcompress.so.0" "$BIN"/* 2>/dev/null | grep -q 'not found'; then
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
               $("$PY" -c 'import site, glob; print(" ".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib")})))' 2>/dev/null); do
      [ -e "$dir/libcublas.so.13" ] && { export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; say "libcublas.so.13 from $dir"; break; }
    done
  fi
  missing=$(for f in "$D/lib/libkvcompress.so.0" "$BIN"/*; do ldd "$f" 2>/dev/null | grep 'not found' | sed "s|^|$(basename "$f"): |"; done)
  if [ -n "$missing" ]; then
    echo "$missing"; problem "carried binaries miss libraries (above)"
    record "{\"record\":\"note\",\"note\":\"missing libraries: $(echo "$missing" | tr '\n\t"' '  _' | head -c 300)\"}"
  else
    say "every carried binary finds its libraries"
  fi
  export KVCOMPRESS_LIBRARY=$D/lib/libkvcompress.so.0
fi
if ls "$D"/whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvc_site "$D"/whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH=/tmp/kvc_site${PYTHONPATH:+:$PYTHONPATH}
    say "wheels installed: $(ls "$D"/whl | tr '\n' ' ')"
  else
    say "WARNING: carried wheels did not install: the kvpress peer uses its copy"
  fi
fi
record "{\"record\":\"env\",\"python\":\"$("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)\",\"torch\":\"$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)\",\"flashinfer\":\"not carried: flashinfer-python 0.7.2.post1 is a 62.1 MB wheel, over the carry limit\",\"ld_library_path\":\"${LD_LIBRARY_PATH:-}\"}"

# ================================================================================================
# 3. Correctness first
# ================================================================================================
GPUCHECK_ARGS=(--seed "${KVC_GPUCHECK_SEED:-$((($(date +%s) / 86400) * 1000))}" --cases 1000000 --max-n 131072)
if [ "$dry" = 1 ]; then
  # the loadability of the carried checker (no device here: it must say so and exit 77)
  if [ -x "$BIN/kvc-gpucheck" ]; then
    "$BIN/kvc-gpucheck" --list >/dev/null || problem "kvc-gpucheck --list failed"
    "$BIN/kvc-gpucheck" --cases 1 >/dev/null 2>&1
    rc=$?
    [ "$rc" -eq 77 ] && say "carried kvc-gpucheck loads and reports no device (exit 77)" || problem "carried kvc-gpucheck exited $rc without a device (expected 77)"
  else
    problem "no .device/bin/kvc-gpucheck"
  fi
  # the same checker source on the emulator, both halves for real, sharded as on the device
  E=$root/build/emu-check
  say "the checker on the emulator: configure and build $E"
  if cmake -S "$root" -B "$E" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVC_ENABLE_CUDA=OFF -DKVC_BUILD_BENCH=OFF >"$E.configure.log" 2>&1 &&
     nice cmake --build "$E" -j2 --target kvc-gpucheck-emu >"$E.build.log" 2>&1; then
    step gpucheck_emu 150 bash -c "$(declare -f run_gpucheck); OUT='$OUT'; run_gpucheck '$E/tests/kvc-gpucheck-emu' 50 2 --seed 7 --cases 1000000 --max-n 768" ||
      problem "kvc-gpucheck-emu found failures (gpucheck.log)"
  else
    tail -n 30 "$E.build.log"; problem "kvc-gpucheck-emu did not build"
  fi
else
  if [ -x "$BIN/kvc-gpucheck" ]; then
    step gpucheck 60 bash -c "$(declare -f run_gpucheck); OUT='$OUT'; run_gpucheck '$BIN/kvc-gpucheck' 45 $SHARDS ${GPUCHECK_ARGS[*]}"
  else
    say "SKIP gpucheck: no checker"; record '{"record":"skipped","step":"gpucheck","reason":"not built"}'
  fi
  # the engine-style example on the GPU: prefill and decode events, self-checked
  if [ -x "$BIN/engine_loop_cuda" ]; then
    step engine_loop 20 bash -c "exec '$BIN/engine_loop_cuda' --cuda >'$OUT/engine_loop.log' 2>&1" ||
      problem "engine_loop_cuda failed (engine_loop.log)"
  else
    say "SKIP engine_loop: not built"; record '{"record":"skipped","step":"engine_loop","reason":"not built"}'
  fi
fi
export PYTHONPATH=$root/bindings/python${PYTHONPATH:+:$PYTHONPATH} # the bindings, uninstalled
step pytest_cuda 25 bash -c "exec '$PY' -m pytest -q -rs -p no:cacheprovider bindings/python/tests/test_cuda.py >'$OUT/pytest.log' 2>&1"
tail -n 5 "$OUT/pytest.log"
summary=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)" "$OUT/pytest.log" | tail -1)
count() { grep -oE "[0-9]+ $1" <<<"$summary" | grep -oE "^[0-9]+" || echo 0; }
[ -n "$summary" ] && record "{\"record\":\"pytest\",\"file\":\"test_cuda.py\",\"passed\":$(count passed),\"failed\":$(($(count failed) + $(count error))),\"skipped\":$(count skipped)}"
[ -n "$summary" ] || problem "pytest did not run test_cuda.py (pytest.log)"

# ================================================================================================
# 4. Benchmarks, most important first (a tight budget cuts the tail), then the report
# ================================================================================================
PEER=bench/peers/kvpress_torch.py
if [ "$dry" = 1 ]; then
  for f in "$PEER" bench/report.py bench/cpu_bench.py; do "$PY" -m py_compile "$f" || problem "$f does not compile"; done
  step plumbing 10 printf '{"record":"note","note":"dry run: a JSON line through step()"}\nnot json\n'
  grep -q 'a JSON line through step' "$RES" || problem "step() lost a JSON line"
else
  run_bin bench_ceilings 10 --iters 10
  gemm=$(grep '"kind": *"gemm_bf16"' "$RES" | tail -1 | sed -E 's/.*"tflops": *([0-9.e+]+).*/\1/')
  [ -n "$gemm" ] && export KVC_BENCH_GEMM_TFLOPS=$gemm && say "bf16 GEMM ceiling ${gemm} TFLOP/s (the floors' math term)"
  # the headline pair: the full pipeline (SnapKV w64), ours vs kvpress on PyTorch
  run_bin bench_compress 28 --models llama:32:8:128,qwen:40:8:128 --n 32768,4096,131072 --batch 1,8 \
    --ratios 0.5,0.1,0.9 --methods snapkv --iters 10
  step peers_compress 32 bash -c "exec $PY $PEER --ops compress --methods snapkv --models llama:32:8:128,qwen:40:8:128 \
    --n 32768,4096,131072 --batch 1,8 --ratios 0.5,0.1,0.9 --iters 10 --max-seconds \$STEP_SECONDS"
  # selection (ours plain / quota, CUB) | torch.topk; compaction | torch gather
  run_bin bench_select 14 --shapes 1:32768,1:131072,1:4096,1:1048576,64:2048
  step peers_select_compact 18 bash -c "exec $PY $PEER --ops select,compact --n 32768,131072,4096 --batch 1,8 \
    --ratios 0.5,0.1,0.9 --select-n 32768,131072,4096,1048576 --iters 10 --max-seconds \$STEP_SECONDS"
  run_bin bench_score 12 --n 32768,4096,131072 --heads 8:32 --method snapkv,knorm,h2o,tova --batch 1 --iters 10
  run_bin bench_score 6 --n 32768,131072 --heads 8:32 --method snapkv --engine-lse 1 --batch 1 --iters 10
  run_bin bench_score 6 --n 32768,131072 --heads 8:32 --method snapkv,knorm --dtype fp8 --query-dtype bf16 --batch 1 --iters 10
  run_bin bench_compact 10 --shapes 1:32768,1:131072,1:4096,64:2048 --keep 0.5,0.1,0.9 --modes in_place,into
  # H2O over all queries, ratio 0.5
  run_bin bench_compress 8 --models llama:32:8:128 --n 4096,32768 --batch 1 --ratios 0.5 --methods h2o --iters 5 --warmup 1
  step peers_compress_h2o 8 bash -c "exec $PY $PEER --ops compress --methods h2o --models llama:32:8:128 --n 4096,32768 \
    --batch 1 --ratios 0.5 --iters 5 --warmup 1 --max-seconds \$STEP_SECONDS"
fi

# The report of this run; the dry run also renders a synthetic fixture of every record kind.
if [ "$dry" = 1 ]; then
  "$PY" bench/report.py --selftest "$OUT/synthetic.jsonl" >/dev/null || problem "bench/report.py --selftest failed"
  "$PY" bench/report.py --in "$OUT/synthetic.jsonl" --md "$OUT/RESULTS.synthetic.md" --png "$OUT/speedup.synthetic.png" \
    --no-cpu-png || problem "bench/report.py failed on the synthetic fixture"
fi
step report 10 "$PY" bench/report.py --in "$RES" --md "$OUT/RESULTS.md" --png "$OUT/speedup.png" --no-cpu-png
say "finished in $(($(date +%s) - t0))s; $(grep -c '"record":"result"' "$RES") result lines"
ls -la "$OUT"
if [ "$dry" = 1 ]; then
  if [ "$problems" -eq 0 ]; then say "dry run: PASSED"; exit 0; fi
  say "dry run: FAILED ($problems problems above)"
  exit 1
fi
