"""The README's example runs verbatim."""
import contextlib
import io
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def example_source():
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no marked python example"
    return m.group(1)


def test_readme_example_runs_verbatim():
    src = example_source()
    assert len(src.strip().splitlines()) <= 12
    out = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(out):
        exec(compile(src, "README.md", "exec"), scope)
    plan, keep, k = scope["plan"], scope["keep"], scope["k"]
    assert plan.closed  # the context manager closed the context and its plan
    assert plan.span_quotas.tolist() == [60, 90]  # fairness 1: both spans keep half
    assert keep.shape == (2 * 150,) and k.shape == (1, 2, 300, 64)
    assert "[60 90]" in out.getvalue()
    assert np.isfinite(k).all()
