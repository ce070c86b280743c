"""Context, Span and Plan: the Python face of kvc_context_t / kvc_span_t / kvc_plan_t."""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import numpy as np

from . import _arrays, _lib
from .cache import PagedKV, destination_table
from .errors import error_for

BACKENDS = {"auto": 0, "cpu": 1, "cuda": 2}
BACKEND_NAMES = {1: "cpu", 2: "cuda"}
DTYPE_TAGS = {"f32": 0, "f16": 1, "bf16": 2, "fp8_e4m3": 3}
QUERY_DTYPE_TAGS = {"f32": 1, "f16": 2, "bf16": 3}  # kvc_query_dtype_t (0: the cache's dtype)
_DTYPE_ALIASES = {
    "f32": "f32", "float32": "f32", "fp32": "f32", "float": "f32",
    "f16": "f16", "float16": "f16", "fp16": "f16", "half": "f16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp8_e4m3": "fp8_e4m3", "fp8": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "e4m3": "fp8_e4m3",
}
METHODS = {"snapkv": 0, "h2o": 1, "tova": 2, "knorm": 3, "streaming": 4}
POOLS = {"avg": 0, "max": 1}
REDUCES = {"mean": 0, "max": 1}
OPS = {"score": 0, "select": 1, "compact": 2, "retention": 3, "compress": 4}
SPAN_KINDS = {"fair": 0, "protect": 1}
BUDGET_POLICIES = {"fail": 0, "clamp": 1, "skip": 2}
DEVICE_MEMORY = {"owned": 0, "caller": 1}
#: kvc_outcome_t by value: what a plan does to each sequence (Plan.outcomes, Plan.outcome_names).
OUTCOMES = ("compressed", "within_budget", "clamped", "skipped")
QUOTA_ROUNDINGS = {"largest_remainder": 0, "later_first": 1}
WINDOW_PROTECTIONS = {"protected": 0, "ranked": 1}


def _dtype_tag(dtype):
    if dtype is None:
        return "f16"
    if isinstance(dtype, type):  # numpy scalar types: np.float32, ml_dtypes.bfloat16
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            pass
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    name = str(name or dtype).replace("torch.", "").lower()
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"dtype: expected one of f32, f16, bf16, fp8_e4m3 (or a numpy/torch dtype), got {dtype!r}")
    return _DTYPE_ALIASES[name]


def _choice(table, value, name):
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}")


def _raise(ctx_handle, status, function):
    lib = _lib.lib()
    name = lib.kvc_status_name(status).decode()
    summary = lib.kvc_status_string(status).decode()
    detail = lib.kvc_last_error(ctx_handle).decode() if ctx_handle else ""
    raise error_for(status, name, function, detail, summary)


# ============================================================================================
# Context
# ============================================================================================


class Context:
    """A libkvcompress context on one backend ('cpu', 'cuda' or 'auto') and CUDA device.

    threads: host threads a CPU context scores with (kvc_context_set_threads; default 1, results
    bit-identical for any count). Plans size their workspace for the count the context has when
    they are made, so set it here or before making plans. A CUDA context takes only 1.

    Use as a context manager or call close(); plans made from it keep it alive and are closed
    first when it is closed.
    """

    def __init__(self, backend="auto", device=0, threads=1):
        lib = _lib.lib()
        code = _choice(BACKENDS, backend, "backend")
        device = _arrays.integer(device, "device")
        if device < 0:
            raise ValueError(f"device: must be >= 0, got {device}")
        handle = ctypes.c_void_p()
        detail = ctypes.create_string_buffer(512)  # no context exists yet to hold the reason
        status = lib.kvc_context_create_with_detail(code, device, ctypes.byref(handle), detail, len(detail))
        if status != 0:
            name = lib.kvc_status_name(status).decode()
            summary = lib.kvc_status_string(status).decode()
            raise error_for(status, name, "kvc_context_create", detail.value.decode(errors="replace"), summary)
        self._handle = handle
        self._lib = lib
        out = ctypes.c_int()
        lib.kvc_context_backend(handle, ctypes.byref(out))
        self.backend = BACKEND_NAMES[out.value]
        self.device = device if self.backend == "cuda" else 0
        self._plans = weakref.WeakSet()
        if threads != 1:
            self.threads = threads

    @property
    def threads(self):
        """Host threads of the context (kvc_context_threads)."""
        out = ctypes.c_int32()
        self._lib.kvc_context_threads(self.handle, ctypes.byref(out))
        return out.value

    @threads.setter
    def threads(self, count):
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"threads: must be an int, got {count!r}")
        self._check(self._lib.kvc_context_set_threads(self.handle, count), "kvc_context_set_threads")

    @property
    def is_cuda(self):
        return self.backend == "cuda"

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("the context is closed")
        return self._handle

    @property
    def closed(self):
        return self._handle is None

    @property
    def last_error(self):
        """kvc_last_error: the detail of the last failed call on this context ("" after a success)."""
        return self._lib.kvc_last_error(self._handle).decode() if self._handle else ""

    def close(self):
        if getattr(self, "_handle", None) is None:
            return
        for plan in list(self._plans):
            plan.close()
        self._lib.kvc_context_destroy(self._handle)
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self.closed else (f"cuda:{self.device}" if self.is_cuda else "cpu")
        return f"Context({state})"

    def _check(self, status, function):
        if status != 0:
            _raise(self._handle, status, function)

    def plan(self, **kwargs):
        """Builds a validated :class:`Plan`; see Plan for the keyword arguments."""
        return Plan(self, **kwargs)


# ============================================================================================
# Spans
# ============================================================================================


@dataclass(frozen=True)
class Span:
    """Token range [start, end) of one sequence: kind 'fair' (an instruction partition with a quota
    proportional to weight * length) or 'protect' (whitelisted: always kept)."""

    start: int
    end: int
    kind: str = "fair"
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in SPAN_KINDS:
            raise ValueError(f"Span.kind: expected 'fair' or 'protect', got {self.kind!r}")
        # exact values, stored as plain Python numbers (the dataclass is frozen)
        object.__setattr__(self, "start", _arrays.integer(self.start, "Span.start"))
        object.__setattr__(self, "end", _arrays.integer(self.end, "Span.end"))
        object.__setattr__(self, "weight", _arrays.real(self.weight, "Span.weight"))

    def __len__(self):
        return max(0, self.end - self.start)


def _as_span(s, where):
    if isinstance(s, Span):
        return s
    if isinstance(s, (tuple, list)) and 2 <= len(s) <= 4:
        return Span(*s)
    raise TypeError(f"{where}: expected a Span or a (start, end[, kind[, weight]]) tuple, got {s!r}")


def _normalise_spans(spans, batch, heads=None):
    """Per sequence a list of Span; with `heads` (spans_per_head) per sequence a list of `heads`
    such lists."""
    if spans is None:
        return None
    spans = list(spans)
    if batch == 1 and spans and all(isinstance(s, Span) for s in spans):
        spans = [spans]  # one sequence: a flat list is allowed
    if len(spans) != batch:
        raise ValueError(f"spans: expected one list of spans per sequence ({batch}), got {len(spans)}")
    if heads is None:
        return [[_as_span(s, f"spans[{b}][{i}]") for i, s in enumerate(row or [])] for b, row in enumerate(spans)]
    out = []
    for b, seq in enumerate(spans):
        seq = list(seq or [])
        if len(seq) != heads:
            raise ValueError(f"spans[{b}]: spans_per_head needs one list of spans per KV head ({heads}), "
                             f"got {len(seq)}")
        out.append([[_as_span(s, f"spans[{b}][{h}][{i}]") for i, s in enumerate(row or [])]
                    for h, row in enumerate(seq)])
    return out


# ============================================================================================
# Plan
# ============================================================================================


@dataclass(frozen=True)
class PlanInfo:
    batch: int
    num_kv_heads: int
    total_tokens: int
    total_kept: int
    obs_total: int
    score_elems: int
    keep_elems: int
    total_spans: int
    count_elems: int
    keep_offset_bytes: int
    compact_status_offset_bytes: int
    compress_status_offset_bytes: int


#: kvc_compact_status_t flags (Plan.status): 0 = the sequence was compacted (or needed no move)
COMPACT_STATUS = {"bad_page_id": 1, "short_page_list": 2, "shared_page": 4, "bad_pool": 8, "dst_bad_page_id": 16,
                  "dst_short_page_list": 32, "dst_overlap": 64}


@dataclass(frozen=True)
class WorkspaceLayout:
    """kvc_plan_workspace_layout: the bytes a call over num_layers layers needs and where it leaves
    its results (keep layouts: COMPRESS; status array: COMPACT and COMPRESS)."""

    workspace_bytes: int
    keep_offset_bytes: int
    status_offset_bytes: int


class Plan:
    """An immutable, validated compression plan (kvc_plan_t) for one batch; reuse it for every layer.

    Keyword arguments (defaults are KVC_PLAN_DESC_INIT's):
      num_q_heads, num_kv_heads, head_dim   required
      seq_lens                              [batch] token counts
      budgets                               [batch] tokens kept per KV head (an int applies to all)
      spans=None                            per sequence a list of Span (or (start, end, kind, weight));
                                            with spans_per_head=True per sequence a list of
                                            num_kv_heads such lists (spans_after_compaction makes them)
      spans_per_head=False                  spans per (sequence, KV head) (desc.spans_per_head)
      score_row_capacity=0                  0: packed score layout; C: every score row (b, h) at
                                            (b * num_kv_heads + h) * C, C >= every seq_len, so H2O
                                            scores accumulated over growing decode steps stay put
      method='snapkv'                       'snapkv' | 'h2o' | 'tova' | 'knorm' | 'streaming'
      dtype='f16'                           'f32' | 'f16' | 'bf16' | 'fp8_e4m3' (or a numpy/torch dtype)
      window=64, pool_kernel=5, pool='avg', group_reduce='mean', scale=0.0 (= 1/sqrt(head_dim)),
      span_local=False, sink_tokens=0, recent_tokens=0, fairness=0.0
      budget_policy='fail'                  'fail' | 'clamp' | 'skip': a sequence protecting more
                                            tokens than its budget fails the plan (BudgetError),
                                            keeps exactly its protected tokens, or stays
                                            uncompressed; `outcomes` says what happened
      device_memory='owned'                 'owned' | 'caller' (CUDA: see upload())
      quota_rounding='largest_remainder'    | 'later_first' (kvc_quota_rounding_t)
      window_protection='protected'         | 'ranked' (kvc_window_protection_t)
      query_dtype=None                      the queries' dtype: None = dtype; 'f16' | 'bf16' | 'f32'
                                            for an 'fp8_e4m3' cache (there are no fp8 queries)
      k_scale=1.0                           fp8 keys: key = k_scale * fp8 value; a float (per tensor,
                                            vLLM's k_scale) or num_kv_heads floats (per KV head)

    Array layouts are the C ones, flat: scores float32 [score_elems] ("score layout"), keep int32
    [keep_elems] ("keep layout"), counts int32 [count_elems] ("count layout"); score_rows /
    keep_rows / count_rows split them into per-sequence (num_kv_heads, ...) views.
    """

    def __init__(self, context, *, num_q_heads, num_kv_heads, head_dim, seq_lens, budgets, spans=None,
                 method="snapkv", dtype="f16", window=64, pool_kernel=5, pool="avg", group_reduce="mean",
                 scale=0.0, span_local=False, sink_tokens=0, recent_tokens=0, fairness=0.0, budget_policy="fail",
                 device_memory="owned",
                 quota_rounding="largest_remainder", window_protection="protected", spans_per_head=False,
                 score_row_capacity=0, query_dtype=None, k_scale=1.0):
        if not isinstance(context, Context):
            raise TypeError(f"context: expected a kvcompress.Context, got {type(context).__name__}")
        lib = context._lib
        self.context = context  # keeps the context alive
        self._handle = None
        seq = _arrays.to_int32_host(seq_lens, "seq_lens").reshape(-1)
        batch = int(seq.shape[0])
        if batch < 1:
            raise ValueError("seq_lens: needs at least one sequence")
        if np.isscalar(budgets) or (isinstance(budgets, np.ndarray) and budgets.ndim == 0):
            bud = np.full(batch, _arrays.integer(budgets.item() if isinstance(budgets, np.ndarray) else budgets,
                                                 "budgets"), dtype=np.int32)
        else:
            bud = _arrays.to_int32_host(budgets, "budgets").reshape(-1)
            if bud.shape[0] != batch:
                raise ValueError(f"budgets: {bud.shape[0]} values for {batch} sequences (seq_lens)")
        # exact values only: ctypes would truncate floats and wrap integers past int32 silently
        num_q_heads = _arrays.integer(num_q_heads, "num_q_heads")
        num_kv_heads = _arrays.integer(num_kv_heads, "num_kv_heads")
        spans_per_head = _arrays.flag(spans_per_head, "spans_per_head")
        score_row_capacity = _arrays.integer(score_row_capacity, "score_row_capacity")
        nested = _normalise_spans(spans, batch, num_kv_heads if spans_per_head else None)
        # span rows: one per sequence, or per (sequence, KV head)
        rows = [r for seq in nested for r in seq] if spans_per_head and nested is not None else nested
        head_dim = _arrays.integer(head_dim, "head_dim")
        window = _arrays.integer(window, "window")
        pool_kernel = _arrays.integer(pool_kernel, "pool_kernel")
        sink_tokens = _arrays.integer(sink_tokens, "sink_tokens")
        recent_tokens = _arrays.integer(recent_tokens, "recent_tokens")
        span_local = _arrays.flag(span_local, "span_local")
        scale = _arrays.real(scale, "scale")
        fairness = _arrays.real(fairness, "fairness")

        desc = _lib.PlanDescStruct()
        lib.kvc_plan_desc_init(ctypes.byref(desc))
        desc.num_q_heads = num_q_heads
        desc.num_kv_heads = num_kv_heads
        desc.head_dim = head_dim
        self.dtype = _dtype_tag(dtype)
        desc.dtype = DTYPE_TAGS[self.dtype]
        desc.batch = batch
        desc.seq_lens = seq.ctypes.data
        desc.budgets = bud.ctypes.data
        span_arr = indptr = None
        if rows is not None:
            indptr = np.zeros(len(rows) + 1, dtype=np.int32)
            flat = [s for row in rows for s in row]
            for r, row in enumerate(rows):
                indptr[r + 1] = indptr[r] + len(row)
            span_arr = (_lib.SpanStruct * max(1, len(flat)))()
            for i, s in enumerate(flat):
                span_arr[i].start, span_arr[i].end = int(s.start), int(s.end)
                span_arr[i].kind = SPAN_KINDS[s.kind]
                span_arr[i].weight = float(s.weight)
            desc.span_indptr = indptr.ctypes.data
            desc.spans = ctypes.addressof(span_arr)
        self.method = method.lower() if isinstance(method, str) else method
        desc.method = _choice(METHODS, method, "method")
        desc.window = window
        desc.pool_kernel = pool_kernel
        desc.pool = _choice(POOLS, pool, "pool")
        desc.group_reduce = _choice(REDUCES, group_reduce, "group_reduce")
        desc.scale = scale
        desc.span_local = span_local
        desc.sink_tokens = sink_tokens
        desc.recent_tokens = recent_tokens
        desc.fairness = fairness
        desc.budget_policy = _choice(BUDGET_POLICIES, budget_policy, "budget_policy")
        desc.device_memory = _choice(DEVICE_MEMORY, device_memory, "device_memory")
        desc.quota_rounding = _choice(QUOTA_ROUNDINGS, quota_rounding, "quota_rounding")
        desc.window_protection = _choice(WINDOW_PROTECTIONS, window_protection, "window_protection")
        desc.spans_per_head = spans_per_head
        desc.score_row_capacity = score_row_capacity
        self.query_dtype = self.dtype if query_dtype is None else _dtype_tag(query_dtype)
        if self.query_dtype != self.dtype:
            desc.query_dtype = _choice(QUERY_DTYPE_TAGS, self.query_dtype, "query_dtype")
        head_scales = None  # kept alive until kvc_plan_create has copied it
        if np.ndim(k_scale) == 0:
            desc.k_scale = _arrays.real(k_scale, "k_scale")
        else:
            head_scales = np.ascontiguousarray(k_scale, dtype=np.float32).reshape(-1)
            if head_scales.shape[0] != num_kv_heads:
                raise ValueError(f"k_scale: {head_scales.shape[0]} per-head scales for {num_kv_heads} KV heads")
            desc.k_scales = head_scales.ctypes.data

        handle = ctypes.c_void_p()
        status = lib.kvc_plan_create(context.handle, ctypes.byref(desc), ctypes.byref(handle))
        if status != 0:
            _raise(context.handle, status, "kvc_plan_create")
        self._handle = handle
        self._lib = lib
        context._plans.add(self)

        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.batch = batch
        self.seq_lens = seq.copy()
        self.budgets = bud.copy()
        self.spans = nested
        self.spans_per_head = bool(spans_per_head)
        self.score_row_capacity = score_row_capacity
        self._span_rows = rows  # flat list of span rows (desc order), or None
        self.fairness = fairness
        self.max_seq_len = int(seq.max())
        info = _lib.PlanInfoStruct()
        self._call(lib.kvc_plan_get_info, "kvc_plan_get_info", handle, ctypes.byref(info))
        self.info = PlanInfo(*(int(getattr(info, f)) for f, _ in _lib.PlanInfoStruct._fields_))
        ip = np.zeros(batch + 1, dtype=np.int32)
        pos = np.zeros(max(1, self.info.obs_total), dtype=np.int32)
        self._call(lib.kvc_plan_obs_positions, "kvc_plan_obs_positions", handle, ip.ctypes.data, pos.ctypes.data)
        self.obs_indptr = ip
        self.obs_positions = pos[: self.info.obs_total]
        nl = np.zeros(batch, dtype=np.int32)
        self._call(lib.kvc_plan_new_lengths, "kvc_plan_new_lengths", handle, nl.ctypes.data)
        self.new_lengths = nl
        oc = np.zeros(batch, dtype=np.int32)
        self._call(lib.kvc_plan_outcomes, "kvc_plan_outcomes", handle, oc.ctypes.data)
        self.outcomes = oc
        nbytes = ctypes.c_size_t()
        self._call(lib.kvc_plan_device_bytes, "kvc_plan_device_bytes", handle, ctypes.byref(nbytes))
        self.device_bytes = int(nbytes.value)
        q = np.zeros(max(1, self.info.total_spans), dtype=np.int32)
        imp = np.zeros(batch * (num_kv_heads if spans_per_head else 1), dtype=np.int32)
        self._call(lib.kvc_plan_span_quotas, "kvc_plan_span_quotas", handle, q.ctypes.data, imp.ctypes.data)
        self.span_quotas = q[: self.info.total_spans]
        self.implicit_quotas = imp
        self._ws_sizes = {}
        for op, code in OPS.items():
            n = ctypes.c_size_t()
            self._call(lib.kvc_plan_workspace_size, "kvc_plan_workspace_size", handle, code, ctypes.byref(n))
            self._ws_sizes[op] = int(n.value)
        self._workspaces = {}
        self._last_status = {}  # op -> (workspace, byte offset, num_layers, stream) of the last compaction

    # -- lifetime ---------------------------------------------------------------------------
    def _call(self, fn, name, *args):
        status = fn(*args)
        if status != 0:
            _raise(self.context._handle, status, name)

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("the plan is closed")
        return self._handle

    @property
    def closed(self):
        return self._handle is None

    def close(self):
        """Frees the plan and its cached workspaces. On CUDA, make sure queued work that uses the plan
        has finished (e.g. synchronise the stream) first."""
        if getattr(self, "_handle", None) is None:
            return
        self._lib.kvc_plan_destroy(self._handle)
        self._handle = None
        self._workspaces = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"Plan(method={self.method!r}, dtype={self.dtype!r}, batch={self.batch}, heads="
                f"{self.num_q_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, fairness={self.fairness}"
                f"{', closed' if self.closed else ''})")

    # -- read-outs --------------------------------------------------------------------------
    @property
    def keep_lens(self):
        """k_b = min(budget, n) per sequence (same as new_lengths)."""
        return self.new_lengths

    @property
    def outcome_names(self):
        """Per sequence the name of its outcome: 'compressed', 'within_budget', 'clamped', 'skipped'."""
        return [OUTCOMES[int(o)] for o in self.outcomes]

    def workspace_size(self, op):
        """Bytes of workspace the execute call `op` ('score', 'select', 'compact', 'retention',
        'compress') needs."""
        _choice(OPS, op, "op")
        return self._ws_sizes[op.lower()]

    def workspace_layout(self, op, num_layers=1):
        """kvc_plan_workspace_layout: a WorkspaceLayout for the call `op` over num_layers layers."""
        code = _choice(OPS, op, "op")
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or int(num_layers) < 1:
            raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
        out = _lib.WorkspaceLayoutStruct()
        self._call(self._lib.kvc_plan_workspace_layout, "kvc_plan_workspace_layout", self.handle, code,
                   int(num_layers), ctypes.byref(out))
        return WorkspaceLayout(int(out.workspace_bytes), int(out.keep_offset_bytes), int(out.status_offset_bytes))

    def status(self, op="compact"):
        """The compaction status array of the last compact / compact_layers (op='compact') or
        compress / compress_layers (op='compress') call on this plan: int32 [num_layers, batch] of
        COMPACT_STATUS flags, 0 where the sequence was compacted, nonzero where it was left untouched
        (a bad page id, a short CSR list, a page shared with another sequence, a bad layer pool). A
        copy of the array's library, queued on that call's stream (on CUDA: valid once the stream has
        run it; the stream must still exist when status() is called)."""
        if op not in ("compact", "compress"):
            raise ValueError(f"op: expected 'compact' or 'compress', got {op!r}")
        if op not in self._last_status:
            raise ValueError(f"status: no {op} call has run on this plan yet")
        ws, offset, layers, stream = self._last_status[op]
        flat = ws.read_i32(offset, layers * self.batch, stream)
        return flat.reshape(layers, self.batch)

    def obs_positions_of(self, b):
        return self.obs_positions[self.obs_indptr[b]: self.obs_indptr[b + 1]]

    def span_quotas_of(self, b, h=None):
        """Quotas of sequence b's spans (with spans_per_head: of KV head h's)."""
        r = self._span_row(b, h)
        return self.span_quotas[self._span_lo(r): self._span_lo(r + 1)]

    def _span_row(self, b, h):
        if self.spans_per_head != (h is not None):
            raise ValueError("h: give a KV head exactly when the plan has spans_per_head")
        return b * self.num_kv_heads + h if self.spans_per_head else b

    def _span_lo(self, r):
        if self._span_rows is None:
            return 0
        return sum(len(x) for x in self._span_rows[:r])

    def spans_after_compaction(self, keep):
        """kvc_spans_after_compaction: the next event's per-head spans (per sequence a list of
        num_kv_heads lists of Span, compacted coordinates) from this plan's keep layout (int32
        [keep_elems], any library; read on the host). Pass them with spans_per_head=True to the
        next plan, whose seq_lens are new_lengths plus the tokens appended since."""
        host = np.ascontiguousarray(np.asarray(_to_host(keep)).reshape(-1), dtype=np.int32)
        if host.size != self.info.keep_elems:
            raise ValueError(f"keep: expected {self.info.keep_elems} indices (keep layout), got {host.size}")
        count = ctypes.c_int64()
        self._call(self._lib.kvc_spans_after_compaction, "kvc_spans_after_compaction", self.context.handle,
                   self.handle, host.ctypes.data, None, 0, None, ctypes.byref(count))
        rows = self.batch * self.num_kv_heads
        out = (_lib.SpanStruct * max(1, count.value))()
        indptr = np.zeros(rows + 1, dtype=np.int32)
        self._call(self._lib.kvc_spans_after_compaction, "kvc_spans_after_compaction", self.context.handle,
                   self.handle, host.ctypes.data, ctypes.addressof(out), count.value, indptr.ctypes.data,
                   ctypes.byref(count))
        kinds = {v: k for k, v in SPAN_KINDS.items()}
        spans = [Span(int(s.start), int(s.end), kinds[int(s.kind)], float(s.weight)) for s in out[: count.value]]
        H = self.num_kv_heads
        return [[spans[indptr[b * H + h]: indptr[b * H + h + 1]] for h in range(H)] for b in range(self.batch)]

    def _rows(self, arr, lens):
        H = self.num_kv_heads
        out, off = [], 0
        for n in lens:
            n = int(n)
            out.append(arr[off: off + H * n].reshape(H, n))
            off += H * n
        return out

    def score_rows(self, scores):
        """Per sequence b a (num_kv_heads, n_b) view of a score-layout array."""
        C = self.score_row_capacity
        if C:
            H = self.num_kv_heads
            return [scores[b * H * C: (b + 1) * H * C].reshape(H, C)[:, : int(n)] for b, n in enumerate(self.seq_lens)]
        return self._rows(scores, self.seq_lens)

    def keep_rows(self, keep):
        """Per sequence b a (num_kv_heads, k_b) view of a keep-layout array."""
        return self._rows(keep, self.new_lengths)

    def count_rows(self, counts):
        """Per sequence b a (num_kv_heads, spans_b) view of a count-layout array; with
        spans_per_head per sequence a list of num_kv_heads 1-D views (one count per span of the head)."""
        if self.spans_per_head:
            H, lo = self.num_kv_heads, np.cumsum([0] + [len(r) for r in self._span_rows or []])
            return [[counts[lo[b * H + h]: lo[b * H + h + 1]] for h in range(H)] if self._span_rows else
                    [counts[0:0] for _ in range(H)] for b in range(self.batch)]
        return self._rows(counts, [len(r) for r in self.spans] if self.spans else [0] * self.batch)

    def gather_queries(self, q):
        """Builds the `queries` argument ([obs_total, num_q_heads, head_dim], C-contiguous) from an
        HF-style query tensor (batch, num_q_heads, n, head_dim) of numpy / torch / cupy, whose
        position p of sequence b is q[b, :, p]."""
        b_idx = np.repeat(np.arange(self.batch), np.diff(self.obs_indptr)).astype(np.int64)
        p_idx = self.obs_positions.astype(np.int64)
        mod = type(q).__module__.split(".")[0]
        if mod == "torch":
            import torch

            bi = torch.as_tensor(b_idx, device=q.device)
            pi = torch.as_tensor(p_idx, device=q.device)
            return q[bi, :, pi, :].contiguous()
        if mod == "cupy":
            import cupy

            return cupy.ascontiguousarray(q[cupy.asarray(b_idx), :, cupy.asarray(p_idx), :])
        return np.ascontiguousarray(np.asarray(q)[b_idx, :, p_idx, :])

    def gather_packed_queries(self, packed_q, qo_indptr, out=None, stream=None):
        """The `queries` argument gathered from an engine's packed q (kvc_gather_queries).

        packed_q: (tokens, num_q_heads, head_dim) with heads and head_dim contiguous, or
        (tokens, num_q_heads * head_dim) with the columns contiguous (e.g. the q slice of a fused
        qkv tensor); any token stride. qo_indptr: int32 [batch + 1]; sequence b's packed rows
        qo_indptr[b] .. qo_indptr[b+1] are its newest tokens, positions [n_b - len_b, n_b). Both in
        the context's memory space. Returns `out` ((obs_total, num_q_heads, head_dim), allocated
        like packed_q when None)."""
        qv = _arrays.view(packed_q, "packed_q")
        self._device_ok(qv)
        from .cache import _dtype_compatible

        if not _dtype_compatible(qv.dtype, self.query_dtype):
            raise TypeError(f"packed_q: dtype {qv.dtype} does not match the plan's query dtype {self.query_dtype}")
        row = self.num_q_heads * self.head_dim
        if qv.ndim == 3 and qv.shape[1:] == (self.num_q_heads, self.head_dim):
            ok = (self.head_dim == 1 or qv.strides[2] == 1) and (self.num_q_heads == 1 or qv.strides[1] == self.head_dim)
        elif qv.ndim == 2 and qv.shape[1] == row:
            ok = row == 1 or qv.strides[1] == 1
        else:
            raise ValueError(f"packed_q: expected shape (tokens, {self.num_q_heads}, {self.head_dim}) or "
                             f"(tokens, {row}), got {qv.shape}")
        if not ok:
            raise ValueError(f"packed_q: each token's {row} elements must be contiguous, got strides {qv.strides}")
        tokens = qv.shape[0]
        token_stride = qv.strides[0] if tokens > 1 else row
        if token_stride < row:
            raise ValueError(f"packed_q: token stride {token_stride} is below num_q_heads * head_dim = {row}")
        iv = _arrays.view(qo_indptr, "qo_indptr")
        self._device_ok(iv)
        if iv.dtype != "i32" or iv.size != self.batch + 1 or not iv.is_c_contiguous():
            raise ValueError(f"qo_indptr: expected a C-contiguous int32 array of {self.batch + 1} elements, got "
                             f"{iv.dtype} shape {iv.shape}")
        shape = (self.info.obs_total, self.num_q_heads, self.head_dim)
        if out is None:
            out = _empty_like(packed_q, shape)
        ov = _arrays.view(out, "out")
        self._device_ok(ov)
        if ov.dtype != qv.dtype or ov.shape != shape or not ov.is_c_contiguous():
            raise ValueError(f"out: expected a C-contiguous {qv.dtype} array of shape {shape}, got {ov.dtype} {ov.shape}")
        if ov.readonly:
            raise ValueError("out: the array is read-only")
        self._call(self._lib.kvc_gather_queries, "kvc_gather_queries", self.context.handle, self.handle, qv.ptr or None,
                   tokens, token_stride, iv.ptr or None, ov.ptr or None, self._stream(stream, qv))
        return out

    # -- plans in a caller's device buffer (CUDA graphs) ------------------------------------
    def upload(self, buffer, stream=None):
        """kvc_plan_upload: enqueues the copy of the plan's metadata into `buffer` (a device array of
        at least `device_bytes` bytes, 256-byte aligned, which must outlive the plan's use) and makes
        the plan read it. A no-op on the CPU backend (device_bytes is 0). Keep the plan alive until
        the stream has passed the copy."""
        if not self.context.is_cuda:
            self._call(self._lib.kvc_plan_upload, "kvc_plan_upload", self.context.handle, self.handle, None, 0, None)
            return
        bv = _arrays.view(buffer, "buffer")
        self._device_ok(bv)
        nbytes = bv.size * bv.itemsize
        if not bv.is_c_contiguous():
            raise ValueError(f"buffer: must be contiguous, got strides {bv.strides}")
        if bv.readonly:
            raise ValueError("buffer: the array is read-only")
        self._call(self._lib.kvc_plan_upload, "kvc_plan_upload", self.context.handle, self.handle, bv.ptr or None,
                   nbytes, self._stream(stream, bv))
        self._upload_buffer = buffer  # the plan reads it from now on

    def compatible(self, other):
        """kvc_plan_compatible: True when a CUDA graph captured with this plan replays `other`'s event
        once `other` is uploaded into this plan's buffer."""
        if not isinstance(other, Plan):
            raise TypeError(f"other: expected a Plan, got {type(other).__name__}")
        out = ctypes.c_int()
        self._call(self._lib.kvc_plan_compatible, "kvc_plan_compatible", self.handle, other.handle, ctypes.byref(out))
        return bool(out.value)

    # -- argument checks --------------------------------------------------------------------
    def _device_ok(self, v):
        ctx = self.context
        if ctx.is_cuda:
            if not v.is_cuda:
                raise ValueError(f"{v.name} is on {v.where()} but the context runs on cuda:{ctx.device}")
            if v.device[1] is not None and v.device[1] != ctx.device:
                raise ValueError(f"{v.name} is on {v.where()} but the context runs on cuda:{ctx.device}")
        elif v.device != _arrays.CPU:
            raise ValueError(f"{v.name} is on {v.where()} but the context runs on the CPU backend (host arrays)")

    def _flat(self, obj, name, tag, count, writable=False, layout=None):
        v = _arrays.view(obj, name)
        self._device_ok(v)
        want = {"f32": "float32", "i32": "int32"}[tag]
        if v.dtype != tag:
            raise TypeError(f"{name}: dtype must be {want}, got {v.dtype}")
        if v.size != count:
            raise ValueError(f"{name}: expected {count} elements ({layout or ('score' if tag == 'f32' else 'keep')} "
                             f"layout), got shape {v.shape} ({v.size})")
        if not v.is_c_contiguous():
            raise ValueError(f"{name}: must be C-contiguous, got strides {v.strides} for shape {v.shape}")
        if writable and v.readonly:
            raise ValueError(f"{name}: the array is read-only")
        return v

    def _cache(self, cache):
        if not isinstance(cache, PagedKV):
            raise TypeError(f"cache: expected a PagedKV (see hf_cache, vllm_cache, flashinfer_cache, paged_kv), "
                            f"got {type(cache).__name__}")
        return cache.struct(self)  # re-reads the arrays: moved or read-only ones are refused

    def _queries(self, queries):
        if self.info.obs_total == 0:
            if queries is None:
                return None, 0
        elif queries is None:
            raise ValueError(f"queries: required, the plan has {self.info.obs_total} observation queries "
                             f"(see plan.obs_positions / plan.gather_queries)")
        v = _arrays.view(queries, "queries")
        self._device_ok(v)
        from .cache import _dtype_compatible, _suggest

        if not _dtype_compatible(v.dtype, self.query_dtype):
            raise TypeError(f"queries: dtype {v.dtype} does not match the plan's query dtype {self.query_dtype} "
                            f"(the queries have the plan's dtype unless query_dtype says; {_suggest(v.dtype)!r} "
                            f"would need dtype={_suggest(v.dtype)!r}, or query_dtype= for an fp8 cache)")
        want = (self.info.obs_total, self.num_q_heads, self.head_dim)
        if v.shape != want:
            raise ValueError(f"queries: expected shape {want} (obs_total, num_q_heads, head_dim), got {v.shape}")
        if not v.is_c_contiguous():
            raise ValueError(f"queries: must be C-contiguous, got strides {v.strides} for shape {v.shape}")
        return v, v.ptr

    def _lse(self, lse):
        if lse is None:
            return None
        v = _arrays.view(lse, "lse")
        self._device_ok(v)
        want = (self.info.obs_total, self.num_q_heads)
        if v.dtype != "f32":
            raise TypeError(f"lse: dtype must be float32, got {v.dtype}")
        if v.shape != want and not (v.ndim == 1 and v.size == want[0] * want[1]):
            raise ValueError(f"lse: expected shape {want} (obs_total, num_q_heads), got {v.shape}")
        if not v.is_c_contiguous():
            raise ValueError(f"lse: must be C-contiguous, got strides {v.strides} for shape {v.shape}")
        return v.ptr

    def _workspace(self, op, like):
        nbytes = self._ws_sizes[op]
        lib = _arrays.alloc_lib(like)
        key = (op, lib, like.device)
        ws = self._workspaces.get(key)
        if ws is None:
            if nbytes == 0 and op != "compress":
                return None, 0, 0
            ws = _arrays.Workspace(lib, like.device, nbytes)
            self._workspaces[key] = ws
        return ws, ws.ptr, nbytes

    def _stream(self, stream, like):
        if not self.context.is_cuda:
            return None
        h = _arrays.stream_handle(stream)
        if h is None:
            h = _arrays.current_stream(_arrays.alloc_lib(like), like.device)
        return h or None

    def _call_stream(self, stream, like):
        """The call's stream handle and the context that builds the call's temporaries on it
        (_arrays.on_stream): they are dropped when the call returns, before the stream has run it."""
        h = self._stream(stream, like)
        return h, _arrays.on_stream(_arrays.alloc_lib(like), like.device, h or 0)

    def _compaction(self, name, head, tail, dst_table, dst_indptr, cache):
        """kvc_<name>(ctx, plan, *head, *tail), or with a destination table kvc_<name>_into with it
        between head and tail (built here: call inside the call's on_stream context)."""
        fn, mid, alive = f"kvc_{name}", (), None
        if dst_table is not None or dst_indptr is not None:
            dst, alive = destination_table(dst_table, dst_indptr, cache, self.batch)
            fn, mid = f"kvc_{name}_into", (ctypes.byref(dst),)
        self._call(getattr(self._lib, fn), fn, self.context.handle, self.handle, *head, *mid, *tail)
        del alive  # the arrays dst points into, held until the call has queued its work

    def _out(self, out, like, count, tag, name):
        if out is None:
            return _arrays.empty(_arrays.alloc_lib(like), like.device, (count,), tag)
        return out

    # -- execute calls ----------------------------------------------------------------------
    def score(self, cache, queries=None, out=None, accumulate=False, stream=None, lse=None):
        """Scores every token (kvc_score). Returns `out` (score layout, float32 [score_elems]),
        allocated like the cache when None; accumulate=True adds to it instead. `lse`: optional
        float32 [obs_total, num_q_heads] natural-log normalisers of the observation rows (the
        engine's attention log-sum-exp, see kvc_score in kvcompress.h)."""
        s = self._cache(cache)
        qv, qptr = self._queries(queries)
        lptr = self._lse(lse)
        if accumulate and out is None:
            raise ValueError("out: accumulate=True needs the score array to add to")
        like = cache._kview
        out = self._out(out, like, self.info.score_elems, "f32", "out")
        ov = self._flat(out, "out", "f32", self.info.score_elems, writable=True)
        ws, wptr, wbytes = self._workspace("score", like)
        self._call(self._lib.kvc_score, "kvc_score", self.context.handle, self.handle, ctypes.byref(s), qptr or None,
                   lptr, ov.ptr, 1 if accumulate else 0, wptr or None, wbytes, self._stream(stream, like))
        return out

    def select(self, scores, out=None, stream=None):
        """Selects the kept tokens (kvc_select). Returns `out` (keep layout, int32 [keep_elems])."""
        sv = self._flat(scores, "scores", "f32", self.info.score_elems)
        out = self._out(out, sv, self.info.keep_elems, "i32", "out")
        ov = self._flat(out, "out", "i32", self.info.keep_elems, writable=True)
        ws, wptr, wbytes = self._workspace("select", sv)
        self._call(self._lib.kvc_select, "kvc_select", self.context.handle, self.handle, sv.ptr, ov.ptr,
                   wptr or None, wbytes, self._stream(stream, sv))
        return out

    def compact(self, cache, keep, extras=(), stream=None, dst_table=None, dst_indptr=None):
        """Moves the kept K/V rows (and the kept values of each float32 score-layout array in
        `extras`) to the front of each sequence, in place (kvc_compact). Returns the cache.
        With `dst_table` (a dense [batch, max_pages] table, or CSR indices with `dst_indptr`) the
        kept rows go to those pages of the same pools instead and the cache's own pages are only
        read (kvc_compact_into, copy-on-write of shared prefix blocks); the extras still move in
        place. Read the result through a PagedKV with page_table=dst_table."""
        s = self._cache(cache)
        kv = self._flat(keep, "keep", "i32", self.info.keep_elems)
        extras = list(extras or ())
        views = [self._flat(e, f"extras[{i}]", "f32", self.info.score_elems, writable=True)
                 for i, e in enumerate(extras)]
        ptrs = (ctypes.c_void_p * max(1, len(views)))(*[v.ptr for v in views])
        like = cache._kview
        ws, wptr, wbytes = self._workspace("compact", like)
        h, on_stream = self._call_stream(stream, like)
        tail = (kv.ptr, ptrs if views else None, len(views), wptr or None, wbytes, h)
        with on_stream:
            self._compaction("compact", (ctypes.byref(s),), tail, dst_table, dst_indptr, cache)
        self._last_status["compact"] = (ws, self.info.compact_status_offset_bytes, 1, h)
        return cache

    def retention(self, keep, out=None, stream=None):
        """Kept counts per (sequence, KV head, span) (kvc_retention). Returns `out` (count layout,
        int32 [count_elems])."""
        kv = self._flat(keep, "keep", "i32", self.info.keep_elems)
        out = self._out(out, kv, self.info.count_elems, "i32", "out")
        if self.info.count_elems == 0:
            return out
        ov = self._flat(out, "out", "i32", self.info.count_elems, writable=True, layout="count")
        ws, wptr, wbytes = self._workspace("retention", kv)
        self._call(self._lib.kvc_retention, "kvc_retention", self.context.handle, self.handle, kv.ptr, ov.ptr,
                   wptr or None, wbytes, self._stream(stream, kv))
        return out

    def compress(self, cache, queries=None, stream=None, lse=None, dst_table=None, dst_indptr=None):
        """score + select + compact in one call (kvc_compress). Returns the keep indices (keep
        layout), copied out of the plan's cached workspace. `lse` as for score(). `dst_table` /
        `dst_indptr` as for compact(): the compaction out of place (kvc_compress_into)."""
        s = self._cache(cache)
        qv, qptr = self._queries(queries)
        lptr = self._lse(lse)
        like = cache._kview
        ws, wptr, wbytes = self._workspace("compress", like)
        h, on_stream = self._call_stream(stream, like)
        tail = (qptr or None, lptr, wptr or None, wbytes, h)
        with on_stream:
            self._compaction("compress", (ctypes.byref(s),), tail, dst_table, dst_indptr, cache)
        self._last_status["compress"] = (ws, self.info.compress_status_offset_bytes, 1, h)
        return ws.read_i32(self.info.keep_offset_bytes, self.info.keep_elems, h)

    # -- every layer in one call ------------------------------------------------------------
    # Per-layer arrays are the single-layer layouts stacked: shape (num_layers, elems), or flat.

    def _layer_caches(self, caches):
        """The shared descriptor (k = v = NULL) and the per-layer pool pointers of a list of PagedKV
        that share one layout and page table."""
        caches = list(caches) if not isinstance(caches, PagedKV) else [caches]
        if not caches:
            raise ValueError("caches: needs one PagedKV per layer, got none")
        structs = [self._cache(c) for c in caches]
        first = structs[0]
        for i, s in enumerate(structs[1:], 1):
            for f, _ in _lib.PagedKVStruct._fields_:
                if f not in ("k", "v") and getattr(s, f) != getattr(first, f):
                    raise ValueError(f"caches[{i}]: {f} is {getattr(s, f)} but caches[0]'s is {getattr(first, f)}; "
                                     f"the layers must share one layout and page table")
        desc = _lib.PagedKVStruct.from_buffer_copy(first)
        desc.k = desc.v = None
        return caches, desc, [s.k for s in structs], [s.v for s in structs]

    def _stacked(self, obj, name, tag, layers, elems, writable=False):
        v = _arrays.view(obj, name)
        if v.size != layers * elems:
            raise ValueError(f"{name}: expected {layers} layers x {elems} elements, got shape {v.shape}")
        return self._flat(obj, name, tag, v.size, writable=writable) if v.size else v

    def _pointers(self, ptrs, like, name):
        """An array of pointers the call can read: numpy on CPU, device memory on CUDA."""
        host = np.array([p or 0 for p in ptrs], dtype=np.uint64)
        if not self.context.is_cuda:
            return host, host.ctypes.data
        lib = _arrays.alloc_lib(like)
        if lib == "torch":
            import torch

            # pinned and non-blocking: a pageable copy would block the host on the call's stream
            # (torch's pinned pool holds the host buffer until the copy has run)
            arr = torch.from_numpy(host.view(np.int64)).pin_memory().to(torch.device("cuda", like.device[1] or 0),
                                                                         non_blocking=True)
            return arr, int(arr.data_ptr())
        import cupy

        with cupy.cuda.Device(like.device[1] or 0):
            arr = cupy.asarray(host)
        return arr, int(arr.data.ptr)

    def _layers_struct(self, k_ptrs, v_ptrs, like, queries=None, lse=None):
        keep_alive = []
        arrays = {}
        for name, ptrs in (("k", k_ptrs), ("v", v_ptrs), ("queries", queries), ("lse", lse)):
            if ptrs is None:
                arrays[name] = None
                continue
            arr, ptr = self._pointers(ptrs, like, f"layers.{name}")
            keep_alive.append(arr)
            arrays[name] = ptr
        s = _lib.LayersStruct(len(k_ptrs), arrays["k"], arrays["v"], arrays["queries"], arrays["lse"])
        return s, keep_alive

    def _layer_workspace(self, op, layers, like):
        layout = self.workspace_layout(op, layers)
        lib = _arrays.alloc_lib(like)
        key = (op, layers, lib, like.device)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = _arrays.Workspace(lib, like.device, max(1, layout.workspace_bytes))
            self._workspaces[key] = ws
        return ws, layout

    def _layer_queries(self, queries, lse, layers):
        if queries is None:
            if self.info.obs_total > 0:
                raise ValueError(f"queries: required, one array per layer (the plan has {self.info.obs_total} "
                                 f"observation queries)")
            q_ptrs = None
        else:
            queries = list(queries)
            if len(queries) != layers:
                raise ValueError(f"queries: {len(queries)} arrays for {layers} layers")
            q_ptrs = [self._queries(q)[1] for q in queries]
        if lse is None:
            return q_ptrs, None
        lse = list(lse)
        if len(lse) != layers:
            raise ValueError(f"lse: {len(lse)} arrays for {layers} layers")
        return q_ptrs, [self._lse(x) for x in lse]

    def score_layers(self, caches, queries=None, out=None, accumulate=False, stream=None, lse=None):
        """kvc_score_layers: scores every layer (caches: one PagedKV per layer sharing one layout and
        page table; queries and lse: one array per layer, an lse entry may be None). Returns `out`,
        float32 (num_layers, score_elems)."""
        caches, desc, k_ptrs, v_ptrs = self._layer_caches(caches)
        layers, like = len(caches), caches[0]._kview
        q_ptrs, l_ptrs = self._layer_queries(queries, lse, layers)
        if accumulate and out is None:
            raise ValueError("out: accumulate=True needs the score array to add to")
        if out is None:
            out = _arrays.empty(_arrays.alloc_lib(like), like.device, (layers, self.info.score_elems), "f32")
        ov = self._stacked(out, "out", "f32", layers, self.info.score_elems, writable=True)
        ws, layout = self._layer_workspace("score", layers, like)
        h, on_stream = self._call_stream(stream, like)
        with on_stream:
            st, keep_alive = self._layers_struct(k_ptrs, v_ptrs, like, q_ptrs, l_ptrs)
            self._call(self._lib.kvc_score_layers, "kvc_score_layers", self.context.handle, self.handle,
                       ctypes.byref(desc), ctypes.byref(st), ov.ptr, 1 if accumulate else 0, ws.ptr,
                       layout.workspace_bytes, h)
        return out

    def select_layers(self, scores, out=None, stream=None):
        """kvc_select_layers: scores float32 (num_layers, score_elems) in, keep int32
        (num_layers, keep_elems) out."""
        sv = _arrays.view(scores, "scores")
        layers = sv.size // max(1, self.info.score_elems)
        if layers < 1:
            raise ValueError(f"scores: expected num_layers x {self.info.score_elems} elements, got shape {sv.shape}")
        sv = self._stacked(scores, "scores", "f32", layers, self.info.score_elems)
        if out is None:
            out = _arrays.empty(_arrays.alloc_lib(sv), sv.device, (layers, self.info.keep_elems), "i32")
        ov = self._stacked(out, "out", "i32", layers, self.info.keep_elems, writable=True)
        ws, layout = self._layer_workspace("select", layers, sv)
        self._call(self._lib.kvc_select_layers, "kvc_select_layers", self.context.handle, self.handle, layers, sv.ptr,
                   ov.ptr, ws.ptr, layout.workspace_bytes, self._stream(stream, sv))
        return out

    def compact_layers(self, caches, keep, extras=(), stream=None, dst_table=None, dst_indptr=None):
        """kvc_compact_layers: compacts every layer's pools by its keep rows (int32 (num_layers,
        keep_elems)); each extra is float32 (num_layers, score_elems). Returns the caches; the status
        array is plan.status('compact'). `dst_table` / `dst_indptr` as for compact(), one table for
        every layer (kvc_compact_layers_into)."""
        caches, desc, k_ptrs, v_ptrs = self._layer_caches(caches)
        layers, like = len(caches), caches[0]._kview
        kv = self._stacked(keep, "keep", "i32", layers, self.info.keep_elems)
        views = [self._stacked(e, f"extras[{i}]", "f32", layers, self.info.score_elems, writable=True)
                 for i, e in enumerate(list(extras or ()))]
        ptrs = (ctypes.c_void_p * max(1, len(views)))(*[v.ptr for v in views])
        ws, layout = self._layer_workspace("compact", layers, like)
        h, on_stream = self._call_stream(stream, like)
        tail = (kv.ptr, ptrs if views else None, len(views), ws.ptr, layout.workspace_bytes, h)
        with on_stream:
            st, keep_alive = self._layers_struct(k_ptrs, v_ptrs, like)
            self._compaction("compact_layers", (ctypes.byref(desc), ctypes.byref(st)), tail, dst_table, dst_indptr,
                             caches[0])
        self._last_status["compact"] = (ws, layout.status_offset_bytes, layers, h)
        return caches

    def retention_layers(self, keep, out=None, stream=None):
        """kvc_retention_layers: keep int32 (num_layers, keep_elems) in, counts int32
        (num_layers, count_elems) out."""
        kv = _arrays.view(keep, "keep")
        layers = kv.size // max(1, self.info.keep_elems)
        kv = self._stacked(keep, "keep", "i32", max(1, layers), self.info.keep_elems)
        if out is None:
            out = _arrays.empty(_arrays.alloc_lib(kv), kv.device, (layers, self.info.count_elems), "i32")
        if self.info.count_elems == 0:
            return out
        ov = self._stacked(out, "out", "i32", layers, self.info.count_elems, writable=True)
        ws, layout = self._layer_workspace("retention", layers, kv)
        self._call(self._lib.kvc_retention_layers, "kvc_retention_layers", self.context.handle, self.handle, layers,
                   kv.ptr, ov.ptr, ws.ptr, layout.workspace_bytes, self._stream(stream, kv))
        return out

    def compress_layers(self, caches, queries=None, stream=None, lse=None, dst_table=None, dst_indptr=None):
        """kvc_compress_layers: score + select + compact of every layer in one call. Returns the keep
        indices, int32 (num_layers, keep_elems); the status array is plan.status('compress').
        `dst_table` / `dst_indptr`: the compaction out of place (kvc_compress_layers_into)."""
        caches, desc, k_ptrs, v_ptrs = self._layer_caches(caches)
        layers, like = len(caches), caches[0]._kview
        q_ptrs, l_ptrs = self._layer_queries(queries, lse, layers)
        ws, layout = self._layer_workspace("compress", layers, like)
        h, on_stream = self._call_stream(stream, like)
        tail = (ws.ptr, layout.workspace_bytes, h)
        with on_stream:
            st, keep_alive = self._layers_struct(k_ptrs, v_ptrs, like, q_ptrs, l_ptrs)
            self._compaction("compress_layers", (ctypes.byref(desc), ctypes.byref(st)), tail, dst_table, dst_indptr,
                             caches[0])
        self._last_status["compress"] = (ws, layout.status_offset_bytes, layers, h)
        return ws.read_i32(layout.keep_offset_bytes, layers * self.info.keep_elems, h).reshape(layers,
                                                                                             self.info.keep_elems)

    def retention_rates(self, counts):
        """Per sequence a (num_kv_heads, spans_b) float array: kept fraction of each span."""
        host = np.asarray(counts if isinstance(counts, np.ndarray) else _to_host(counts))
        out = []
        for b, rows in enumerate(self.count_rows(host)):
            if self.spans_per_head:
                out.append([r / np.array([max(1, len(s)) for s in self.spans[b][h]] if self.spans else [],
                                         dtype=np.float64) for h, r in enumerate(rows)])
                continue
            lens = np.array([max(1, len(s)) for s in self.spans[b]], dtype=np.float64) if self.spans else np.ones(0)
            out.append(rows / lens[None, :])
        return out


def _empty_like(a, shape):
    """An uninitialised array of a's library, dtype and device."""
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        import torch

        return torch.empty(shape, dtype=a.dtype, device=a.device)
    if mod == "cupy":
        import cupy

        with a.device:
            return cupy.empty(shape, dtype=a.dtype)
    if isinstance(a, np.ndarray):
        return np.empty(shape, dtype=a.dtype)
    raise TypeError(f"out: cannot allocate an array like a {type(a).__name__}: pass out=")


def _to_host(a):
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        return a.detach().cpu().numpy()
    if mod == "cupy":
        return a.get()
    return np.asarray(a)
