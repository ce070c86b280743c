#!/usr/bin/env bash
# scripts/build_device.sh - builds HERE (no GPU needed) everything a GPU run needs, for sm_90 only,
# into .device/ (ignored by git), so the device call of bench/run_device.sh compiles nothing:
#
#   .device/lib/libkvcompress.so.0   the library; the CUDA runtime is linked in (static, symbols
#                                    hidden), so on the GPU machine it needs only the driver
#                                    (bench_ceilings also needs libcublas.so.13, which the device
#                                    image's CUDA 13 toolkit has)
#   .device/bin/kvc-gpucheck         the GPU checker (tests/gpucheck), RUNPATH $ORIGIN/../lib
#   .device/bin/engine_loop_cuda     examples/engine_loop.c on the CUDA backend (it checks itself)
#   .device/bin/bench_*              every benchmark program, RUNPATH $ORIGIN/../lib
#   .device/whl/*.whl                Python wheels the device image lacks (KINDS.md's package list):
#                                    kvpress (pure Python, 0.1 MiB). FlashInfer is NOT carried:
#                                    flashinfer-python 0.7.2.post1 alone is a 62.1 MB wheel (plus
#                                    apache-tvm-ffi, nvidia-cutlass-dsl, ... and a JIT compile on
#                                    first use), over the 64 MiB a device call may carry.
#   .device/BUILD_INFO               commit, date, toolkit, flags, sizes
#
# Then: bench/run_device.sh --dry-run (here), and the one device call its header gives.
#
#   scripts/build_device.sh [--jobs N] [--no-wheels]
#
# Fails when the carried folder reaches 48 MiB, when a binary needs a library the GPU machine
# may not have (libcudart.so, libcriterion), or when the build is not for sm_90.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=2
wheels=1
while [ $# -gt 0 ]; do
  case $1 in
    --jobs) jobs=$2; shift 2 ;;
    --no-wheels) wheels=0; shift ;;
    *) echo "usage: scripts/build_device.sh [--jobs N] [--no-wheels]" >&2; exit 2 ;;
  esac
done
limit_mib=48
B=$root/build/device-sm90
D=$root/.device
say() { echo "[build_device] $*"; }

command -v nvcc >/dev/null || { echo "build_device: nvcc not found (the CUDA 13 toolkit builds the sm_90 code)" >&2; exit 1; }
need=()
for pkg in cmake ninja-build pkg-config libcriterion-dev; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then # the test tree's CMake needs Criterion, though kvc-gpucheck does not use it
  say "installing ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
fi
git check-ignore -q .device/BUILD_INFO || { echo "build_device: .device/ is not ignored by git (.gitignore)" >&2; exit 1; }

say "configure $B (sm_90, static CUDA runtime, RUNPATH \$ORIGIN/../lib)"
mkdir -p "$root/build"
cmake -S "$root" -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DKVC_CUDART_STATIC=ON \
  -DKVC_BUILD_TESTS=ON -DKVC_BUILD_BENCH=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib' \
  >"$root/build/device-sm90.configure.log" 2>&1 || { tail -n 30 "$root/build/device-sm90.configure.log"; exit 1; }
say "build (-j$jobs): kvcompress kvc-gpucheck engine_loop_cuda kvc_benches"
t0=$(date +%s)
nice cmake --build "$B" -j"$jobs" --target kvcompress kvc-gpucheck engine_loop_cuda kvc_benches >"$root/build/device-sm90.build.log" 2>&1 ||
  { tail -n 60 "$root/build/device-sm90.build.log"; exit 1; }
say "built in $(($(date +%s) - t0)) s"

rm -rf "$D.new"
mkdir -p "$D.new/bin" "$D.new/lib" "$D.new/whl"
cp "$B/libkvcompress.so.0."* "$D.new/lib/libkvcompress.so.0" # real files only: links travel as links
cp "$B/tests/kvc-gpucheck" "$B/tests/engine_loop_cuda" "$D.new/bin/"
for f in "$B"/bench/bench_*; do [ -x "$f" ] && [ -f "$f" ] && cp "$f" "$D.new/bin/"; done
strip --strip-unneeded "$D.new/lib/libkvcompress.so.0" "$D.new"/bin/*

# What the binaries need at run time: nothing beyond glibc, libstdc++, ourselves, and libcublas for
# bench_ceilings.
bad=0
for f in "$D.new/lib/libkvcompress.so.0" "$D.new"/bin/*; do
  needed=$(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  for lib in $needed; do
    case $lib in
      libkvcompress.so.0|libcublas.so.13|libcublasLt.so.13|libstdc++.so.6|libm.so.6|libgcc_s.so.1|libc.so.6|ld-linux-x86-64.so.2|libdl.so.2|libpthread.so.0|librt.so.1) ;;
      *) echo "build_device: $(basename "$f") needs $lib, which the GPU machine may not have" >&2; bad=1 ;;
    esac
  done
  [ "$(basename "$f")" = libkvcompress.so.0 ] || readelf -d "$f" | grep -q 'RUNPATH.*\$ORIGIN/../lib' ||
    { echo "build_device: $(basename "$f") has no RUNPATH \$ORIGIN/../lib" >&2; bad=1; }
done
if nm -D --defined-only "$D.new/lib/libkvcompress.so.0" | grep -q ' cuda[A-Z]'; then
  echo "build_device: libkvcompress.so exports CUDA runtime symbols (they would clash with torch's)" >&2; bad=1
fi
# The SASS check needs cuobjdump: the toolkit's, else PyPI's nvidia-cuda-cuobjdump (0.6 MB) unpacked
# once into build/cuobjdump (skipped, and said so in BUILD_INFO, without a package index).
cuobjdump=$(command -v cuobjdump || true)
if [ -z "$cuobjdump" ]; then
  cuobjdump=$root/build/cuobjdump/nvidia/cu13/bin/cuobjdump
  if [ ! -x "$cuobjdump" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$root/build/cuobjdump" nvidia-cuda-cuobjdump \
      >/dev/null 2>&1 && (cd "$root/build/cuobjdump" && unzip -oq nvidia_cuda_cuobjdump-*.whl) || true
  fi
fi
sass=$("$cuobjdump" --list-elf "$D.new/lib/libkvcompress.so.0" 2>/dev/null | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ' || true)
[ -z "$sass" ] || [ "$sass" = "sm_90 " ] || { echo "build_device: device code for $sass, expected sm_90 only" >&2; bad=1; }
glibc=$(objdump -T "$D.new/lib/libkvcompress.so.0" "$D.new"/bin/* | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)
glibcxx=$(objdump -T "$D.new/lib/libkvcompress.so.0" "$D.new"/bin/* | grep -o 'GLIBCXX_[0-9.]*' | sort -Vu | tail -1)
[ "$bad" = 0 ] || exit 1

if [ "$wheels" = 1 ]; then
  # Python 3.12 on the device (KINDS.md); kvpress's own requirements are there already, and
  # bench/peers/kvpress_torch.py loads only the press modules it times (no `import kvpress`).
  cached=$(ls "$D"/whl/kvpress-0.5.5-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$cached" ]; then cp "$cached" "$D.new/whl/"
  elif ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$D.new/whl" kvpress==0.5.5; then
    say "WARNING: no kvpress wheel (no package index?): the peer falls back to its line-for-line copy"
  fi
fi

commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain --untracked-files=no | wc -l)
{
  if [ "$dirty" -gt 0 ]; then echo "commit $commit with $dirty uncommitted changes"; else echo "commit $commit"; fi
  echo "date $(date -u +%FT%TZ)"
  echo "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  echo "flags -DCMAKE_CUDA_ARCHITECTURES=90 -DKVC_CUDART_STATIC=ON Release"
  echo "sass ${sass:-unknown (cuobjdump not installed)}"
  echo "needs glibc >= ${glibc#GLIBC_}, libstdc++ ${glibcxx:-(none)}, libcublas.so.13 (bench_ceilings)"
  (cd "$D.new" && find . -type f -printf '%P %s\n' | sort)
} >"$D.new/BUILD_INFO"
rm -rf "$D"
mv "$D.new" "$D"
bytes=$(du -sb "$D" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
say "carried folder .device: $mib MiB ($bytes bytes; limit $limit_mib MiB); binaries need glibc >= ${glibc#GLIBC_}"
(cd "$D" && ls -la bin lib whl | sed 's/^/  /')
if [ "$bytes" -ge $((limit_mib * 1048576)) ]; then
  echo "build_device: .device is $mib MiB, at or over the $limit_mib MiB limit" >&2
  exit 1
fi
