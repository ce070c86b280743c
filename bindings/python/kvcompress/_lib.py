"""Loading libkvcompress through ctypes, the C structs and the function prototypes.

Discovery order (the first that loads wins):
  1. the environment variable KVCOMPRESS_LIBRARY (a path to the shared library);
  2. the library bundled inside this package (kvcompress/libkvcompress.so: what the wheel ships);
  3. when this package sits inside the libkvcompress repository (an editable install or a run
     from the source tree): <repo>/build/*/libkvcompress.so and <repo>/build/libkvcompress.so,
     newest first;
  4. the install prefix / system: ctypes.util.find_library('kvcompress'), then the bare soname.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading

#: The library major version this package speaks (the C ABI's KVC_VERSION_MAJOR).
EXPECTED_MAJOR = 0

_SONAMES = {"darwin": "libkvcompress.dylib", "win32": "kvcompress.dll"}


class LibraryNotFoundError(ImportError):
    """libkvcompress could not be found or loaded; the message lists every place tried."""


# --------------------------------------------------------------------------------------------
# C structs (must match include/kvcompress.h exactly; checked against kvc_plan_desc_init)
# --------------------------------------------------------------------------------------------


class PagedKVStruct(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("page_size", ctypes.c_int32),
        ("num_pages", ctypes.c_int32),
        ("stride_page", ctypes.c_int64),
        ("stride_token", ctypes.c_int64),
        ("stride_head", ctypes.c_int64),
        ("page_table", ctypes.c_void_p),
        ("page_indptr", ctypes.c_void_p),
        ("max_pages", ctypes.c_int32),
    ]


class PageTableStruct(ctypes.Structure):
    """kvc_page_table_t: the destination pages of an out-of-place compaction."""

    _fields_ = [
        ("page_table", ctypes.c_void_p),
        ("page_indptr", ctypes.c_void_p),
        ("max_pages", ctypes.c_int32),
    ]


class SpanStruct(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_int32),
        ("end", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("weight", ctypes.c_float),
    ]


class PlanDescStruct(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("num_q_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("dtype", ctypes.c_int),
        ("batch", ctypes.c_int32),
        ("seq_lens", ctypes.c_void_p),
        ("budgets", ctypes.c_void_p),
        ("span_indptr", ctypes.c_void_p),
        ("spans", ctypes.c_void_p),
        ("method", ctypes.c_int),
        ("window", ctypes.c_int32),
        ("pool_kernel", ctypes.c_int32),
        ("pool", ctypes.c_int),
        ("group_reduce", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("span_local", ctypes.c_int32),
        ("sink_tokens", ctypes.c_int32),
        ("recent_tokens", ctypes.c_int32),
        ("fairness", ctypes.c_float),
        ("budget_policy", ctypes.c_int),
        ("device_memory", ctypes.c_int),
        ("quota_rounding", ctypes.c_int),
        ("window_protection", ctypes.c_int),
        ("spans_per_head", ctypes.c_int32),
        ("score_row_capacity", ctypes.c_int32),
        ("query_dtype", ctypes.c_int),
        ("k_scale", ctypes.c_float),
        ("k_scales", ctypes.c_void_p),
    ]


class PlanInfoStruct(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("total_tokens", ctypes.c_int64),
        ("total_kept", ctypes.c_int64),
        ("obs_total", ctypes.c_int64),
        ("score_elems", ctypes.c_int64),
        ("keep_elems", ctypes.c_int64),
        ("total_spans", ctypes.c_int64),
        ("count_elems", ctypes.c_int64),
        ("keep_offset_bytes", ctypes.c_size_t),
        ("compact_status_offset_bytes", ctypes.c_size_t),
        ("compress_status_offset_bytes", ctypes.c_size_t),
    ]


class LayersStruct(ctypes.Structure):
    """kvc_layers_t: num_layers and four arrays of per-layer pointers."""

    _fields_ = [
        ("num_layers", ctypes.c_int32),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("queries", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
    ]


class WorkspaceLayoutStruct(ctypes.Structure):
    _fields_ = [
        ("workspace_bytes", ctypes.c_size_t),
        ("keep_offset_bytes", ctypes.c_size_t),
        ("status_offset_bytes", ctypes.c_size_t),
    ]


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _soname() -> str:
    return _SONAMES.get(sys.platform, "libkvcompress.so")


def repo_root():
    """The libkvcompress repository this package sits in, or None (installed into site-packages)."""
    here = os.path.dirname(os.path.abspath(__file__))  # <repo>/bindings/python/kvcompress
    root = os.path.abspath(os.path.join(here, "..", "..", ".."))
    if os.path.isfile(os.path.join(root, "include", "kvcompress.h")) and os.path.isdir(
        os.path.join(root, "bindings", "python")
    ):
        return root
    return None


def candidates():
    """(description, path-or-name) pairs in the order they are tried."""
    out = []
    env = os.environ.get("KVCOMPRESS_LIBRARY")
    if env:
        out.append(("$KVCOMPRESS_LIBRARY", env))
        return out  # an explicit choice is never silently replaced by another library
    bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), _soname())
    if os.path.isfile(bundled):
        out.append(("bundled with the package", bundled))
    root = repo_root()
    if root is not None:
        name = _soname()
        found = glob.glob(os.path.join(root, "build", "*", name)) + glob.glob(os.path.join(root, "build", name))
        found.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        if found:
            out.extend(("repository build tree", p) for p in found)
        else:
            out.append(("repository build tree", os.path.join(root, "build", "*", name)))
    found = ctypes.util.find_library("kvcompress")
    out.append(("ctypes.util.find_library('kvcompress')", found or "(nothing found)"))
    out.append(("system loader", _soname() + ".0" if sys.platform.startswith("linux") else _soname()))
    return out


_lock = threading.Lock()
_lib = None
_lib_path = None


def _declare(lib):
    c = ctypes
    P = c.c_void_p
    st = c.c_int  # kvc_status_t
    proto = {
        "kvc_status_name": (c.c_char_p, [st]),
        "kvc_status_string": (c.c_char_p, [st]),
        "kvc_version": (c.c_uint, []),
        "kvc_version_string": (c.c_char_p, []),
        "kvc_context_create": (st, [c.c_int, c.c_int, c.POINTER(P)]),
        "kvc_context_create_with_detail": (st, [c.c_int, c.c_int, c.POINTER(P), c.c_char_p, c.c_size_t]),
        "kvc_context_destroy": (st, [P]),
        "kvc_context_backend": (st, [P, c.POINTER(c.c_int)]),
        "kvc_context_set_threads": (st, [P, c.c_int32]),
        "kvc_context_threads": (st, [P, c.POINTER(c.c_int32)]),
        "kvc_last_error": (c.c_char_p, [P]),
        "kvc_plan_desc_init": (None, [c.POINTER(PlanDescStruct)]),
        "kvc_plan_create": (st, [P, c.POINTER(PlanDescStruct), c.POINTER(P)]),
        "kvc_plan_destroy": (st, [P]),
        "kvc_plan_get_info": (st, [P, c.POINTER(PlanInfoStruct)]),
        "kvc_plan_obs_positions": (st, [P, P, P]),
        "kvc_plan_new_lengths": (st, [P, P]),
        "kvc_plan_span_quotas": (st, [P, P, P]),
        "kvc_spans_after_compaction": (st, [P, P, P, P, c.c_int64, P, c.POINTER(c.c_int64)]),
        "kvc_plan_outcomes": (st, [P, P]),
        "kvc_plan_device_bytes": (st, [P, c.POINTER(c.c_size_t)]),
        "kvc_plan_host_image": (st, [P, c.POINTER(P), c.POINTER(c.c_size_t)]),
        "kvc_plan_upload": (st, [P, P, P, c.c_size_t, P]),
        "kvc_plan_compatible": (st, [P, P, c.POINTER(c.c_int)]),
        "kvc_gather_queries": (st, [P, P, P, c.c_int64, c.c_int64, P, P, P]),
        "kvc_plan_workspace_size": (st, [P, c.c_int, c.POINTER(c.c_size_t)]),
        "kvc_score": (st, [P, P, c.POINTER(PagedKVStruct), P, P, P, c.c_int, P, c.c_size_t, P]),
        "kvc_select": (st, [P, P, P, P, P, c.c_size_t, P]),
        "kvc_compact": (st, [P, P, c.POINTER(PagedKVStruct), P, P, c.c_int32, P, c.c_size_t, P]),
        "kvc_retention": (st, [P, P, P, P, P, c.c_size_t, P]),
        "kvc_compress": (st, [P, P, c.POINTER(PagedKVStruct), P, P, P, c.c_size_t, P]),
        "kvc_plan_workspace_layout": (st, [P, c.c_int, c.c_int32, c.POINTER(WorkspaceLayoutStruct)]),
        "kvc_score_layers": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(LayersStruct), P, c.c_int, P, c.c_size_t,
                                  P]),
        "kvc_select_layers": (st, [P, P, c.c_int32, P, P, P, c.c_size_t, P]),
        "kvc_compact_layers": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(LayersStruct), P, P, c.c_int32, P,
                                    c.c_size_t, P]),
        "kvc_retention_layers": (st, [P, P, c.c_int32, P, P, P, c.c_size_t, P]),
        "kvc_compress_layers": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(LayersStruct), P, c.c_size_t, P]),
        "kvc_compact_into": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(PageTableStruct), P, P, c.c_int32, P,
                                  c.c_size_t, P]),
        "kvc_compress_into": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(PageTableStruct), P, P, P, c.c_size_t,
                                   P]),
        "kvc_compact_layers_into": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(LayersStruct),
                                         c.POINTER(PageTableStruct), P, P, c.c_int32, P, c.c_size_t, P]),
        "kvc_compress_layers_into": (st, [P, P, c.POINTER(PagedKVStruct), c.POINTER(LayersStruct),
                                          c.POINTER(PageTableStruct), P, c.c_size_t, P]),
    }
    for name, (res, args) in proto.items():
        fn = getattr(lib, name)  # AttributeError: the library is not libkvcompress
        fn.restype = res
        fn.argtypes = args


def _check(lib, path):
    version = int(lib.kvc_version())
    major = version // 10000
    if major != EXPECTED_MAJOR:
        raise LibraryNotFoundError(
            f"{path} is libkvcompress {lib.kvc_version_string().decode()} (major {major}), but this "
            f"kvcompress Python package speaks major version {EXPECTED_MAJOR}; install a matching "
            f"library or package"
        )
    desc = PlanDescStruct()
    lib.kvc_plan_desc_init(ctypes.byref(desc))
    if desc.struct_size != ctypes.sizeof(PlanDescStruct):
        raise LibraryNotFoundError(
            f"{path}: sizeof(kvc_plan_desc_t) is {desc.struct_size} in the library but "
            f"{ctypes.sizeof(PlanDescStruct)} in the Python binding (ABI mismatch)"
        )


def load(path=None):
    """Loads (once) and returns the ctypes CDLL. `path` forces a specific file."""
    global _lib, _lib_path
    with _lock:
        if _lib is not None and path is None:
            return _lib
        tried = []
        cands = [("explicit path", path)] if path is not None else candidates()
        for what, p in cands:
            if p == "(nothing found)":
                tried.append(f"  - {what}: nothing found")
                continue
            try:
                lib = ctypes.CDLL(p)
            except OSError as e:
                tried.append(f"  - {what}: {p}: {e}")
                continue
            try:
                _declare(lib)
            except AttributeError as e:
                tried.append(f"  - {what}: {p}: not libkvcompress ({e})")
                continue
            _check(lib, p)
            _lib, _lib_path = lib, p
            return lib
        raise LibraryNotFoundError(
            "could not load libkvcompress. Tried, in order:\n"
            + "\n".join(tried)
            + "\nBuild it (cmake -S . -B build/release && cmake --build build/release) and/or set "
            "KVCOMPRESS_LIBRARY=/path/to/libkvcompress.so"
        )


def lib():
    return _lib if _lib is not None else load()


def library_path():
    """The path (or name) the library was loaded from; loads it if needed."""
    lib()
    return _lib_path
