"""Cache descriptors: one layer's paged K/V pools, as kvc_paged_kv_t describes them.

A :class:`PagedKV` holds references to every array it points at (K, V, page table, indptr), so
they stay alive as long as the descriptor. Element strides are read from the arrays (never
assumed); head_dim must be contiguous. Builders:

  hf_cache(k, v)                                  HF-style (batch, heads, n, head_dim): one page per sequence
  vllm_cache(k_cache, v_cache, block_table, layout='NHD'|'HND')
                                                  vLLM pools (num_blocks, block_size, heads, head_dim) and
                                                  a dense block table [batch, max_blocks]
  flashinfer_cache(k, v, indptr, indices, layout='NHD'|'HND')
                                                  FlashInfer pools and a CSR page list
  paged_kv(k, v, page_size, page_table=None, page_indptr=None, strides=(page, token, head), ...)
                                                  anything else
"""
from __future__ import annotations

import numpy as np

from . import _arrays
from ._lib import PagedKVStruct

CACHE_DTYPES = ("f32", "f16", "bf16", "fp8_e4m3", "u16", "u8")


def _index_array(obj, name, like, queued=False):
    """The page table / indptr as an int32 C-contiguous array where the cache lives. A host array is
    copied to the device before this returns, or with queued=True (a call's temporary, built in its
    _arrays.on_stream context) by a non-blocking copy queued on the current stream ahead of the call."""
    if obj is None:
        return None
    if like.is_cuda:
        v = _arrays.view(obj, name) if not isinstance(obj, (list, tuple)) else None
        if v is None or not v.is_cuda:
            host = _arrays.to_int32_host(obj, name)
            lib = _arrays.alloc_lib(like)
            if lib == "torch":
                import torch

                dev = torch.device("cuda", like.device[1] or 0)
                if not queued:
                    return torch.as_tensor(host, device=dev)
                # pinned: torch's pinned pool holds the host copy until the copy has run
                return torch.tensor(host).pin_memory().to(dev, non_blocking=True)
            import cupy

            with cupy.cuda.Device(like.device[1] or 0):
                return cupy.asarray(host)
        if v.dtype != "i32" or not v.is_c_contiguous():
            if v.lib == "torch":
                import torch

                return v.obj.to(torch.int32).contiguous()
            if v.lib == "cupy":
                import cupy

                return cupy.ascontiguousarray(v.obj, dtype=cupy.int32)
            raise TypeError(f"{name}: a device page table must be int32 and C-contiguous (got {v.dtype})")
        return obj
    if isinstance(obj, np.ndarray) or isinstance(obj, (list, tuple)) or type(obj).__module__.split(".")[0] == "torch":
        if type(obj).__module__.split(".")[0] == "torch" and obj.device.type != "cpu":
            raise ValueError(f"{name} is on {obj.device} but the cache arrays are host arrays")
        return _arrays.to_int32_host(obj, name)
    v = _arrays.view(obj, name)
    if v.is_cuda:
        raise ValueError(f"{name} is on {v.where()} but the cache arrays are host arrays")
    return _arrays.to_int32_host(np.asarray(obj), name)


class PagedKV:
    """One layer's paged K/V cache (see kvc_paged_kv_t in kvcompress.h).

    Element (page p, slot s, head h, dim d) of K is k[p*stride_page + s*stride_token +
    h*stride_head + d] counted from k's first element; token t of sequence b is in page
    pages_b[t // page_size], slot t % page_size.

    Immutable: the fields cannot be changed after construction (make a new PagedKV), and every
    use re-reads the arrays and refuses one whose pointer, shape or strides changed since (e.g. a
    reshape in place or a torch resize_). The contents of the page table may change between calls
    (engines update block tables in place); the library checks them at every call.
    """

    def __init__(self, k, v, *, page_size, num_kv_heads, head_dim, stride_page, stride_token, stride_head,
                 num_pages=None, page_table=None, page_indptr=None, max_pages=None):
        kv = _arrays.view(k, "k")
        vv = _arrays.view(v, "v")
        if kv.dtype != vv.dtype:
            raise TypeError(f"v: dtype {vv.dtype} differs from k's {kv.dtype}")
        if kv.dtype not in CACHE_DTYPES:
            raise TypeError(
                f"k: dtype {kv.dtype} is not a cache dtype (float32, float16, bfloat16 via ml_dtypes/torch, "
                f"raw uint16 for bf16, uint8 or float8_e4m3fn for fp8_e4m3)"
            )
        if kv.device != vv.device:
            raise ValueError(f"v is on {vv.where()} but k is on {kv.where()}")
        if kv.shape != vv.shape or kv.strides != vv.strides:
            raise ValueError(
                f"v: shape {vv.shape} / strides {vv.strides} differ from k's {kv.shape} / {kv.strides}; K and V "
                f"pools must share one layout"
            )
        page_size = _arrays.integer(page_size, "page_size")
        num_kv_heads = _arrays.integer(num_kv_heads, "num_kv_heads")
        head_dim = _arrays.integer(head_dim, "head_dim")
        for nm, val in (("page_size", page_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if val < 1:
                raise ValueError(f"{nm} is {val}, must be >= 1")
        strides = [_arrays.integer(val, nm, bits=64) for nm, val in
                   (("stride_page", stride_page), ("stride_token", stride_token), ("stride_head", stride_head))]
        for nm, val in zip(("stride_page", "stride_token", "stride_head"), strides):
            if val < 1:
                raise ValueError(f"{nm} is {val}: strides must be positive (no broadcast or reversed axes)")
        self.k, self.v = k, v
        self._kview, self._vview = kv, vv
        self.dtype = kv.dtype
        self.device = kv.device
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.stride_page, self.stride_token, self.stride_head = strides
        # the pool capacity the arrays' memory really holds: page ids past it would leave the arrays
        inner = (self.page_size - 1) * self.stride_token + (self.num_kv_heads - 1) * self.stride_head + self.head_dim
        extent = kv.extent()
        capacity = 0 if extent < inner else (extent - inner) // self.stride_page + 1
        if capacity < 1:
            raise ValueError(
                f"k: its {extent} reachable elements cannot hold one page of {self.page_size} tokens x "
                f"{self.num_kv_heads} heads x {self.head_dim} dims with strides (page {self.stride_page}, token "
                f"{self.stride_token}, head {self.stride_head})"
            )
        if num_pages is None:
            num_pages = min(capacity, 2**31 - 1)
        elif _arrays.integer(num_pages, "num_pages") > capacity:
            raise ValueError(f"num_pages is {num_pages} but the arrays hold only {capacity} pages")
        self.num_pages = num_pages
        self.page_table = _index_array(page_table, "page_table", kv)
        self.page_indptr = _index_array(page_indptr, "page_indptr", kv)
        if self.page_indptr is not None and self.page_table is None:
            raise ValueError("page_indptr is given without page_table (the CSR page indices)")
        if self.page_table is not None:
            tv = _arrays.view(self.page_table, "page_table")
            if self.page_indptr is None:
                if tv.ndim != 2:
                    raise ValueError(f"page_table: a dense table must be 2-D [batch, max_pages], got shape {tv.shape}")
                self.max_pages = int(tv.shape[1]) if max_pages is None else _arrays.integer(max_pages, "max_pages")
                if self.max_pages > tv.shape[1]:
                    raise ValueError(f"max_pages {self.max_pages} exceeds the table's row length {tv.shape[1]}")
            else:
                if tv.ndim != 1:
                    raise ValueError(f"page_table: CSR page indices must be 1-D, got shape {tv.shape}")
                iv = _arrays.view(self.page_indptr, "page_indptr")
                if iv.ndim != 1 or iv.shape[0] < 2:
                    raise ValueError(f"page_indptr: must be 1-D [batch + 1], got shape {iv.shape}")
                self.max_pages = 0
        else:
            self.max_pages = 0
        self._table_views = tuple(None if a is None else _arrays.view(a, nm)
                                  for nm, a in (("page_table", self.page_table), ("page_indptr", self.page_indptr)))
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"PagedKV.{name} cannot be changed after construction (the descriptor was checked "
                                 f"as built): make a new PagedKV")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"PagedKV.{name} cannot be changed after construction: make a new PagedKV")

    def _unchanged(self):
        """Fresh views of the arrays, refused if the pointer, shape or strides moved since construction
        (what the capacity guard and the C descriptor were computed from)."""
        fresh = []
        for nm, arr, then in (("k", self.k, self._kview), ("v", self.v, self._vview),
                              ("page_table", self.page_table, self._table_views[0]),
                              ("page_indptr", self.page_indptr, self._table_views[1])):
            if arr is None:
                fresh.append(None)
                continue
            now = _arrays.view(arr, nm)
            if (now.ptr, now.shape, now.strides, now.dtype, now.device) != (
                    then.ptr, then.shape, then.strides, then.dtype, then.device):
                raise ValueError(f"cache.{nm} changed since the PagedKV was made (pointer, shape, strides or dtype): "
                                 f"make a new PagedKV")
            fresh.append(now)
        return fresh

    # -- layout names ---------------------------------------------------------------------
    @property
    def strides(self):
        return (self.stride_page, self.stride_token, self.stride_head)

    def __repr__(self):
        kind = "contiguous" if self.page_table is None else ("csr" if self.page_indptr is not None else "dense")
        return (f"PagedKV(dtype={self.dtype}, heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"page_size={self.page_size}, num_pages={self.num_pages}, strides={self.strides}, table={kind}, "
                f"device={self._kview.where()})")

    # -- the C struct ---------------------------------------------------------------------
    def _check_for(self, plan):
        """Shape/dtype/device agreement with a plan (before any C call)."""
        from .core import DTYPE_TAGS  # noqa: avoid a cycle at import time

        ctx = plan.context
        if ctx.is_cuda:
            if not self._kview.is_cuda:
                raise ValueError(f"cache.k is on {self._kview.where()} but the context runs on cuda:{ctx.device}")
            if self._kview.device[1] is not None and self._kview.device[1] != ctx.device:
                raise ValueError(f"cache.k is on {self._kview.where()} but the context runs on cuda:{ctx.device}")
        elif self._kview.device != _arrays.CPU:
            raise ValueError(f"cache.k is on {self._kview.where()} but the context runs on the CPU backend")
        if not _dtype_compatible(self.dtype, plan.dtype):
            raise TypeError(
                f"cache: arrays of dtype {self.dtype} do not match the plan's dtype {plan.dtype} "
                f"(pass dtype={_suggest(self.dtype)!r} to Context.plan)"
            )
        if self.num_kv_heads != plan.num_kv_heads:
            raise ValueError(f"cache: num_kv_heads {self.num_kv_heads} but the plan's is {plan.num_kv_heads}")
        if self.head_dim != plan.head_dim:
            raise ValueError(f"cache: head_dim {self.head_dim} but the plan's is {plan.head_dim}")
        if self.page_table is None:
            if plan.max_seq_len > self.page_size:
                raise ValueError(
                    f"cache: one page per sequence of {self.page_size} tokens, but the plan's longest sequence "
                    f"has {plan.max_seq_len}")
            if self.num_pages < plan.batch:
                raise ValueError(f"cache: {self.num_pages} sequences (pages) but the plan's batch is {plan.batch}")
        else:
            tv = _arrays.view(self.page_table, "page_table")
            if self.page_indptr is None:
                if tv.shape[0] < plan.batch:
                    raise ValueError(f"page_table: {tv.shape[0]} rows but the plan's batch is {plan.batch}")
            else:
                iv = _arrays.view(self.page_indptr, "page_indptr")
                if iv.shape[0] < plan.batch + 1:
                    raise ValueError(f"page_indptr: {iv.shape[0]} entries but the plan's batch needs {plan.batch + 1}")
                if not iv.is_cuda:
                    ip = np.asarray(self.page_indptr)
                    if ip[: plan.batch + 1].max(initial=0) > tv.shape[0]:
                        raise ValueError(
                            f"page_indptr: points past the end of page_table ({tv.shape[0]} indices)")
        for nm in ("page_table", "page_indptr"):
            arr = getattr(self, nm)
            if arr is not None:
                av = _arrays.view(arr, nm)
                if av.device != self._kview.device and av.device[1] is not None:
                    raise ValueError(f"{nm} is on {av.where()} but the cache is on {self._kview.where()}")
        return DTYPE_TAGS[plan.dtype]

    def struct(self, plan):
        kv, vv, _, _ = self._unchanged()
        if kv.readonly or vv.readonly:
            raise ValueError("cache: the K/V arrays are read-only")
        code = self._check_for(plan)
        s = PagedKVStruct()
        s.k = kv.ptr
        s.v = vv.ptr
        s.dtype = code
        s.num_kv_heads = self.num_kv_heads
        s.head_dim = self.head_dim
        s.page_size = self.page_size
        s.num_pages = self.num_pages
        s.stride_page, s.stride_token, s.stride_head = self.strides
        s.page_table = _arrays.view(self.page_table, "page_table").ptr if self.page_table is not None else None
        s.page_indptr = _arrays.view(self.page_indptr, "page_indptr").ptr if self.page_indptr is not None else None
        s.max_pages = self.max_pages
        return s

    # -- reading tokens back (host arrays; for tests and inspection) ------------------------
    def pages_of(self, b):
        if self.page_table is None:
            return None
        table = np.asarray(self.page_table)
        if self.page_indptr is None:
            return table[b]
        ip = np.asarray(self.page_indptr)
        return table[ip[b]: ip[b + 1]]

    def read(self, b, length, which="k"):
        """Sequence b's first `length` tokens as a (num_kv_heads, length, head_dim) numpy copy.
        Host (numpy) caches only."""
        arr = self.k if which == "k" else self.v
        if not isinstance(arr, np.ndarray):
            raise TypeError("PagedKV.read works on numpy caches only")
        flat = np.lib.stride_tricks.as_strided(arr, shape=(self._kview.extent(),), strides=(arr.itemsize,))
        t = np.arange(length)
        if self.page_table is None:
            pages = np.full(length, b)
        else:
            pages = np.asarray(self.pages_of(b))[t // self.page_size]
        base = pages * self.stride_page + (t % self.page_size) * self.stride_token  # [n]
        h = np.arange(self.num_kv_heads)[:, None, None] * self.stride_head
        d = np.arange(self.head_dim)[None, None, :]
        return flat[h + base[None, :, None] + d].copy()


def destination_table(page_table, page_indptr, cache, batch):
    """The kvc_page_table_t of an out-of-place compaction of `cache` (kvc_compact_into) and the
    arrays it points into, which must stay alive for the call: a dense [batch, max_pages] table
    (page_indptr None) or CSR indices and indptr [batch + 1], int32 where the cache lives."""
    from ._lib import PageTableStruct

    if page_table is None:
        raise ValueError("dst_table: the destination pages are needed (dst_indptr alone is not a table)")
    table = _index_array(page_table, "dst_table", cache._kview, queued=True)
    indptr = _index_array(page_indptr, "dst_indptr", cache._kview, queued=True)
    tv = _arrays.view(table, "dst_table")
    s = PageTableStruct()
    s.page_table = tv.ptr
    if indptr is None:
        if tv.ndim != 2 or tv.shape[0] < batch:
            raise ValueError(f"dst_table: a dense destination table must be 2-D [batch = {batch}, max_pages], got "
                             f"shape {tv.shape}")
        s.max_pages = int(tv.shape[1])
    else:
        iv = _arrays.view(indptr, "dst_indptr")
        if tv.ndim != 1:
            raise ValueError(f"dst_table: CSR page indices must be 1-D, got shape {tv.shape}")
        if iv.ndim != 1 or iv.shape[0] < batch + 1:
            raise ValueError(f"dst_indptr: must be 1-D [batch + 1 = {batch + 1}], got shape {iv.shape}")
        if not iv.is_cuda and np.asarray(indptr)[: batch + 1].max(initial=0) > tv.shape[0]:
            raise ValueError(f"dst_indptr: points past the end of dst_table ({tv.shape[0]} indices)")
        s.page_indptr = iv.ptr
    return s, (table, indptr)


def _dtype_compatible(array_tag, plan_tag):
    if array_tag == plan_tag:
        return True
    return (array_tag == "u16" and plan_tag == "bf16") or (array_tag == "u8" and plan_tag == "fp8_e4m3")


def _suggest(tag):
    return {"u16": "bf16", "u8": "fp8_e4m3"}.get(tag, tag)


def _head_dim_contiguous(view, axis, name):
    if view.shape[axis] != 1 and view.strides[axis] != 1:
        raise ValueError(
            f"{name}: head_dim (axis {axis}) must be contiguous (element stride 1), got stride {view.strides[axis]}")


def hf_cache(k, v):
    """An HF-style contiguous cache: k, v of shape (batch, num_kv_heads, n, head_dim), any strides
    with head_dim contiguous. One page per sequence (page_size = n, page b = sequence b)."""
    kv = _arrays.view(k, "k")
    if kv.ndim != 4:
        raise ValueError(f"k: expected (batch, num_kv_heads, n, head_dim), got shape {kv.shape}")
    _head_dim_contiguous(kv, 3, "k")
    B, H, n, D = kv.shape
    s = kv.strides
    return PagedKV(k, v, page_size=n, num_kv_heads=H, head_dim=D, stride_page=s[0] if B > 1 else max(s[0], 1),
                   stride_token=s[2] if n > 1 else max(s[2], D), stride_head=s[1] if H > 1 else max(s[1], 1),
                   num_pages=B)


def _pool_strides(kv, layout, name):
    if kv.ndim != 4:
        want = "(num_pages, page_size, heads, head_dim)" if layout == "NHD" else "(num_pages, heads, page_size, head_dim)"
        raise ValueError(f"{name}: expected {want} for layout {layout}, got shape {kv.shape}")
    _head_dim_contiguous(kv, 3, name)
    P, a, b, D = kv.shape
    s = kv.strides
    if layout == "NHD":
        page_size, heads, st, sh = a, b, s[1], s[2]
    elif layout == "HND":
        heads, page_size, sh, st = a, b, s[1], s[2]
    else:
        raise ValueError(f"layout: expected 'NHD' or 'HND', got {layout!r}")
    # size-1 axes carry arbitrary strides (e.g. numpy reports 0 or the full size); any positive works
    st = st if page_size > 1 else max(st, 1)
    sh = sh if heads > 1 else max(sh, 1)
    sp = s[0] if P > 1 else max(s[0], 1)
    return dict(page_size=page_size, num_kv_heads=heads, head_dim=D, stride_page=sp, stride_token=st,
                stride_head=sh, num_pages=P)


def vllm_cache(k_cache, v_cache, block_table, layout="NHD"):
    """vLLM pools (num_blocks, block_size, num_kv_heads, head_dim) (NHD; HND swaps block_size and
    heads) with a dense block table [batch, max_blocks]. For vLLM's single (2, num_blocks, ...)
    tensor pass kv[0], kv[1]."""
    kv = _arrays.view(k_cache, "k_cache")
    return PagedKV(k_cache, v_cache, page_table=block_table, **_pool_strides(kv, layout.upper(), "k_cache"))


def flashinfer_cache(k, v, indptr, indices, layout="NHD"):
    """FlashInfer pools (max_pages, page_size, heads, head_dim) (NHD) or (max_pages, heads, page_size,
    head_dim) (HND) with the CSR page list kv_indptr [batch+1] / kv_indices. Passing one
    (max_pages, 2, ...) tensor as k with v=None splits it into its K and V halves."""
    if v is None:
        kv5 = _arrays.view(k, "k")
        if kv5.ndim != 5 or kv5.shape[1] != 2:
            raise ValueError(f"k: with v=None expected a (max_pages, 2, ...) tensor, got shape {kv5.shape}")
        k, v = k[:, 0], k[:, 1]
    kv = _arrays.view(k, "k")
    return PagedKV(k, v, page_table=indices, page_indptr=indptr, **_pool_strides(kv, layout.upper(), "k"))


def paged_kv(k, v, page_size, page_table=None, page_indptr=None, *, strides, num_kv_heads, head_dim,
             num_pages=None, max_pages=None):
    """A general descriptor: strides = (stride_page, stride_token, stride_head) in elements, counted
    from the first element of k (and v). num_pages defaults to what the arrays' memory holds."""
    if len(strides) != 3:
        raise ValueError(f"strides: expected (stride_page, stride_token, stride_head), got {strides!r}")
    kv = _arrays.view(k, "k")
    if kv.ndim >= 1 and kv.shape[-1] > 1 and kv.strides[-1] != 1:
        raise ValueError(f"k: the last axis must be contiguous (element stride 1), got stride {kv.strides[-1]}")
    return PagedKV(k, v, page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   stride_page=strides[0], stride_token=strides[1], stride_head=strides[2], num_pages=num_pages,
                   page_table=page_table, page_indptr=page_indptr, max_pages=max_pages)
