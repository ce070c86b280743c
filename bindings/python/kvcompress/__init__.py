"""kvcompress: Python bindings for libkvcompress (paged KV-cache eviction with whitelisting and
fair eviction), over the C ABI through ctypes.

    import kvcompress as kvc
    with kvc.Context("cpu") as ctx:
        plan = ctx.plan(num_q_heads=8, num_kv_heads=2, head_dim=64, seq_lens=[300], budgets=[100],
                        spans=[[kvc.Span(0, 150), kvc.Span(150, 300)]], fairness=1.0, dtype="f32")
        keep = plan.compress(kvc.hf_cache(k, v), plan.gather_queries(q))

The shared library is found through $KVCOMPRESS_LIBRARY, the repository's build trees, or the
system loader (see kvcompress._lib); it is loaded on first use.
"""
from ._lib import EXPECTED_MAJOR, LibraryNotFoundError
from ._lib import library_path as _library_path
from ._lib import load as load_library
from .cache import PagedKV, flashinfer_cache, hf_cache, paged_kv, vllm_cache
from .core import COMPACT_STATUS, OUTCOMES, Context, Plan, PlanInfo, Span, WorkspaceLayout
from .errors import (
    BudgetError,
    CudaError,
    InternalError,
    InvalidValueError,
    KvcError,
    NoDeviceError,
    NotSupportedError,
    OutOfMemoryError,
    WorkspaceTooSmallError,
)

__version__ = "0.1.0"


def library_path():
    """Path of the loaded libkvcompress (loads it if needed)."""
    return _library_path()


def library_version():
    """The loaded library's version string, e.g. "0.1.0"."""
    from ._lib import lib

    return lib().kvc_version_string().decode()


def cuda_available(device=0):
    """True when the library has a CUDA backend and `device` is usable."""
    try:
        Context("cuda", device).close()
        return True
    except (NoDeviceError, InvalidValueError, CudaError):
        return False


__all__ = [
    "Context", "Plan", "PlanInfo", "Span", "OUTCOMES", "WorkspaceLayout", "COMPACT_STATUS", "PagedKV", "hf_cache",
    "vllm_cache", "flashinfer_cache", "paged_kv",
    "KvcError", "InvalidValueError", "NotSupportedError", "BudgetError", "WorkspaceTooSmallError",
    "OutOfMemoryError", "NoDeviceError", "CudaError", "InternalError", "LibraryNotFoundError",
    "load_library", "library_path", "library_version", "cuda_available", "EXPECTED_MAJOR", "__version__",
]
