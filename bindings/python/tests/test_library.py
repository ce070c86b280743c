"""Library discovery, version check, ABI agreement, defaults equal to KVC_PLAN_DESC_INIT, and the
kvpress adapter's lazy imports."""
import ctypes
import ctypes.util
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

import kvcompress as kvc
from kvcompress import _lib


def run_python(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_loaded_library_and_version():
    path = kvc.library_path()
    assert os.path.exists(path) or "kvcompress" in path
    version = _lib.lib().kvc_version()
    assert version // 10000 == kvc.EXPECTED_MAJOR
    assert kvc.library_version() == f"{version // 10000}.{version // 100 % 100}.{version % 100}"


def test_bad_env_path_lists_what_was_tried(tmp_path):
    missing = str(tmp_path / "nope" / "libkvcompress.so")
    r = run_python("import kvcompress\nkvcompress.Context('cpu')", KVCOMPRESS_LIBRARY=missing)
    assert r.returncode != 0
    assert "LibraryNotFoundError" in r.stderr and "KVCOMPRESS_LIBRARY" in r.stderr and missing in r.stderr


def test_import_works_without_library(tmp_path):
    r = run_python("import kvcompress, kvcompress.kvpress_adapter; print(kvcompress.__version__)",
                   KVCOMPRESS_LIBRARY=str(tmp_path / "none.so"))
    assert r.returncode == 0 and r.stdout.strip() == kvc.__version__


def test_not_libkvcompress_is_rejected():
    libc = ctypes.util.find_library("c")
    if not libc:
        pytest.skip("no libc name to try")
    r = run_python("import kvcompress\nkvcompress.Context('cpu')", KVCOMPRESS_LIBRARY=libc)
    assert r.returncode != 0 and "not libkvcompress" in r.stderr


def test_candidates_order(monkeypatch):
    monkeypatch.delenv("KVCOMPRESS_LIBRARY", raising=False)
    cands = _lib.candidates()
    kinds = [c[0] for c in cands]
    assert kinds[-2:] == ["ctypes.util.find_library('kvcompress')", "system loader"]
    bundled = os.path.join(os.path.dirname(_lib.__file__), _lib._soname())
    if os.path.isfile(bundled):  # an installed wheel: its own library comes first
        assert cands[0] == ("bundled with the package", bundled)
    elif _lib.repo_root() is not None:  # editable install / source tree: build trees come first
        assert kinds[0] == "repository build tree"
    monkeypatch.setenv("KVCOMPRESS_LIBRARY", "/x/libkvcompress.so")
    assert _lib.candidates() == [("$KVCOMPRESS_LIBRARY", "/x/libkvcompress.so")]


def test_struct_sizes_match_the_library():
    desc = _lib.PlanDescStruct()
    _lib.lib().kvc_plan_desc_init(ctypes.byref(desc))
    assert desc.struct_size == ctypes.sizeof(_lib.PlanDescStruct)


def test_plan_defaults_equal_kvc_plan_desc_init():
    desc = _lib.PlanDescStruct()
    _lib.lib().kvc_plan_desc_init(ctypes.byref(desc))
    from kvcompress.core import DTYPE_TAGS, METHODS, POOLS, REDUCES

    defaults = {k: p.default for k, p in inspect.signature(kvc.Plan.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert DTYPE_TAGS[defaults["dtype"]] == desc.dtype
    assert METHODS[defaults["method"]] == desc.method
    assert POOLS[defaults["pool"]] == desc.pool and REDUCES[defaults["group_reduce"]] == desc.group_reduce
    for name in ("window", "pool_kernel", "sink_tokens", "recent_tokens"):
        assert defaults[name] == getattr(desc, name), name
    assert defaults["scale"] == desc.scale and defaults["fairness"] == desc.fairness
    assert int(defaults["span_local"]) == desc.span_local
    from kvcompress.core import QUOTA_ROUNDINGS, WINDOW_PROTECTIONS

    assert QUOTA_ROUNDINGS[defaults["quota_rounding"]] == desc.quota_rounding
    assert WINDOW_PROTECTIONS[defaults["window_protection"]] == desc.window_protection
    assert defaults["spans"] is None


def test_status_names():
    lib = _lib.lib()
    assert lib.kvc_status_name(3) == b"KVC_ERROR_BUDGET"
    assert lib.kvc_status_name(123) == b"KVC_UNKNOWN_STATUS"


def test_context_auto_and_cpu():
    with kvc.Context("auto") as ctx:
        assert ctx.backend in ("cpu", "cuda")
    with kvc.Context("cpu") as ctx:
        assert ctx.backend == "cpu" and not ctx.is_cuda and ctx.last_error == ""
        assert "cpu" in repr(ctx)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_kvpress_adapter_imports_without_torch():
    from kvcompress import kvpress_adapter

    assert kvpress_adapter.compute_n_kept(100, 0.25) == 75
    with pytest.raises(ImportError, match="needs PyTorch"):
        kvpress_adapter.KvcPress(compression_ratio=0.5)
