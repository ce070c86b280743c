"""The built wheel as a user gets it: installed into a fresh venv, `import kvcompress` loads the
library bundled inside the package with no environment variable, and the README example runs
from another directory. Needs the wheel's path in $KVC_WHEEL (scripts/test.sh builds one);
skipped, visibly, otherwise."""
import os
import subprocess
import venv

import pytest

from test_readme import example_source

WHEEL = os.environ.get("KVC_WHEEL")
pytestmark = pytest.mark.skipif(not WHEEL, reason="no wheel to test: set KVC_WHEEL to a built kvcompress wheel")


def test_wheel_in_a_fresh_venv_runs_the_readme_example(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    r = subprocess.run([python, "-m", "pip", "install", "-q", WHEEL], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "example.py").write_text(example_source() + "print('LIBRARY', kvc.library_path())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("KVCOMPRESS_LIBRARY", "PYTHONPATH")}
    r = subprocess.run([python, "example.py"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[60 90]" in r.stdout  # the example's quotas: both spans keep half
    library = r.stdout.split("LIBRARY ", 1)[1].strip()
    assert library.startswith(str(env_dir)), library  # the venv's own copy, not a build tree
    assert library.endswith(os.path.join("site-packages", "kvcompress", "libkvcompress.so")), library
