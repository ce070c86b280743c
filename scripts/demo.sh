#!/usr/bin/env bash
# The main job: build libkvcompress and run the eviction-bias demo.
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in cmake; do dpkg -s "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$pkg"; }; done
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_BENCH=OFF >/dev/null
cmake --build build/demo -j"$(nproc)" --target kvc-demo >/dev/null
exec build/demo/kvc-demo "$@"
