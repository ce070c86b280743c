"""A kvpress press that scores, selects and compacts through libkvcompress.

    from kvcompress.kvpress_adapter import KvcPress
    press = KvcPress(compression_ratio=0.5, method="snapkv", window_size=64, kernel_size=5,
                     spans=[(0, 120), (120, 400)], fairness=1.0,      # fair eviction over two spans
                     protected=[(0, 40)])                             # whitelist the guardrail
    with press(model):          # any kvpress pipeline / model, like SnapKVPress
        model(input_ids, past_key_values=cache)

It follows kvpress's ScorerPress interface (``score(module, hidden_states, keys, values,
attentions, kwargs)`` -> (batch, kv_heads, n) scores; ``compress(...)`` -> compressed keys and
values, ``compression_ratio``), and is an instance of kvpress's ScorerPress when kvpress is
installed. CPU tensors run on the CPU backend, CUDA tensors on the CUDA backend of their device
(on torch's current stream).

Methods (fairness 0, no spans: the same kept sets as kvpress's presses on the same tensors):
  'snapkv'     SnapKVPress(window_size, kernel_size)
  'tova'       TOVAPress
  'knorm'      KnormPress
  'streaming'  StreamingLLMPress(n_sink): set n_sink=4
  'h2o'        ObservedAttentionPress: every prompt position is an observation query, with
               span_local too (alias 'observed_attention')

Spans from text: find_spans(tokenizer, prompt, fair=[instruction, ...], protect=[key phrase, ...])
locates each text in a (chat-templated) prompt through the tokenizer's offset mapping and returns
the FAIR spans covering the whole prompt (template tokens go to the adjacent instruction, as the
paper's code does) and the PROTECT spans of the key phrases, ready for KvcPress(spans=...,
protected=...).

Queries: attention methods need the post-RoPE queries of the observation positions. They are
computed from hidden_states with the module's q projection and kwargs["position_embeddings"], as
kvpress's SnapKVPress does (kvpress.utils.get_prerope_query_states when kvpress is installed,
a Llama-style q_proj otherwise), or by `query_fn(module, hidden_states, positions, kwargs)` ->
(batch, num_q_heads, len(positions), head_dim) if given. The eager attention matrix is never used.

Importing this module needs neither torch nor kvpress; creating a press needs torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Tuple

import numpy as np

from .core import Context, Span

_METHOD_ALIASES = {
    "snapkv": "snapkv", "tova": "tova", "knorm": "knorm", "streaming": "streaming", "streamingllm": "streaming",
    "h2o": "h2o", "observed_attention": "h2o", "observedattention": "h2o",
}
_ATTENTION_METHODS = ("snapkv", "tova", "h2o")


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised where torch is absent
        raise ImportError(
            "kvcompress.kvpress_adapter needs PyTorch (pip install torch; kvpress too for its pipelines: "
            "pip install kvpress)") from e
    return torch


def compute_n_kept(k_len, compression_ratio):
    """kvpress's rule: int(k_len * (1 - ratio)), at least 1 (0 when the ratio is >= 1)."""
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(k_len * (1 - compression_ratio)))


class PromptSpans(NamedTuple):
    """find_spans' result: the prompt's token ids (feed exactly these to the model), the FAIR spans
    and the PROTECT spans, as [(start, end), ...] token ranges."""

    input_ids: List[int]
    fair: List[Tuple[int, int]]
    protect: List[Tuple[int, int]]


def _locate(prompt, text, what):
    """The one character range of `text` in `prompt`; ValueError if absent or repeated."""
    if not text:
        raise ValueError(f"{what}: empty text")
    at = prompt.find(text)
    if at < 0:
        raise ValueError(f"{what}: text not found in the prompt: {text[:60]!r}")
    again = prompt.find(text, at + 1)
    if again >= 0:
        raise ValueError(f"{what}: text occurs more than once in the prompt (characters {at} and {again}); "
                         f"pass a longer, unique text: {text[:60]!r}")
    return at, at + len(text)


def _token_range(offsets, c0, c1, what):
    """Tokens whose characters overlap [c0, c1) (a token straddling an edge belongs to the text)."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
    if not hits:
        raise ValueError(f"{what}: the text maps to no token of the prompt (offsets missing?)")
    return hits[0], hits[-1] + 1


def find_spans(tokenizer, prompt, fair=(), protect=(), add_special_tokens=False, cover=True):
    """FAIR spans of the instruction texts `fair` and PROTECT spans of the key phrases `protect` in
    `prompt`, as token ranges of the prompt's tokenization.

    tokenizer  a Hugging Face tokenizer with offset mappings (a "fast" tokenizer)
    prompt     the text the model sees, e.g. tokenizer.apply_chat_template(messages, tokenize=False);
               or its token ids (e.g. a kvpress pipeline's preprocess()["context_ids"]), which are
               decoded and must tokenize back to the same ids
    fair       instruction texts, each occurring exactly once in the prompt
    protect    key phrases to whitelist, each occurring exactly once
    cover      True: the FAIR spans are widened to cover the whole prompt (what span_local needs):
               tokens before the first instruction (BOS, the template header) go to the first, tokens
               between two instructions to the later one, tokens after the last to the last (the
               paper's code gives the earlier span [0, its end) and the later [its start, n)).
               False: exactly the tokens overlapping each text.

    Returns PromptSpans(input_ids, fair, protect). A text that is absent, occurs twice, or shares
    all its tokens with another instruction raises ValueError naming it.
    """
    ids_given = not isinstance(prompt, str)
    text = prompt
    if ids_given:
        ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    except NotImplementedError as e:
        raise TypeError("find_spans needs a tokenizer with offset mappings (a Hugging Face fast tokenizer)") from e
    input_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if ids_given and input_ids != ids:
        raise ValueError("prompt: the given token ids do not tokenize back from their decoded text; "
                         "pass the prompt text instead")
    n = len(input_ids)
    found = sorted((_locate(text, t, f"fair[{i}]") + (i,) for i, t in enumerate(fair)))
    spans = []
    for c0, c1, i in found:
        s, e = _token_range(offsets, c0, c1, f"fair[{i}]")
        if spans and s < spans[-1][1]:
            if found[len(spans) - 1][1] > c0:
                raise ValueError(f"fair[{i}] overlaps fair[{found[len(spans) - 1][2]}] in the prompt")
            s = spans[-1][1]  # a token shared by two adjacent texts goes to the earlier one
            if s >= e:
                raise ValueError(f"fair[{i}]: all its tokens are shared with the previous instruction")
        spans.append((s, e))
    if cover and spans:
        starts = [0] + [end for _, end in spans[:-1]]
        ends = [end for _, end in spans[:-1]] + [n]
        spans = list(zip(starts, ends))
    fair_spans = [None] * len(found)  # back to the order the texts were given in
    for (_, _, i), span in zip(found, spans):
        fair_spans[i] = span
    prot = [_token_range(offsets, *_locate(text, t, f"protect[{i}]"), f"protect[{i}]")
            for i, t in enumerate(protect)]
    return PromptSpans(input_ids, fair_spans, prot)


_press_cls = None


def _press_class():
    """KvcPress itself, or (kvpress installed) a subclass that is also a kvpress ScorerPress."""
    global _press_cls
    if _press_cls is None:
        _require_torch()
        try:
            from kvpress.presses.scorer_press import ScorerPress
        except ImportError:
            _press_cls = KvcPress
        else:
            _press_cls = type("KvcPress", (KvcPress, ScorerPress), {"__module__": __name__,
                                                                    "__doc__": KvcPress.__doc__})
    return _press_cls


def _rope(q, cos, sin):
    half = q.shape[-1] // 2
    rot = q.new_empty(q.shape)
    rot[..., :half] = -q[..., half:]
    rot[..., half:] = q[..., :half]
    return q * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def _prerope_queries(module, hidden_states):
    try:
        from kvpress.utils import get_prerope_query_states
    except ImportError:
        get_prerope_query_states = None
    if get_prerope_query_states is not None:
        return get_prerope_query_states(module, hidden_states)
    bsz, q_len, _ = hidden_states.shape
    heads = module.config.num_attention_heads
    q = module.q_proj(hidden_states).view(bsz, q_len, heads, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    return q


@dataclass
class KvcPress:
    """kvpress-compatible press backed by libkvcompress, with fair eviction and whitelisting.

    compression_ratio  fraction of tokens evicted per KV head (kvpress's rule for the kept count)
    method             'snapkv' | 'tova' | 'knorm' | 'streaming' | 'h2o' (= 'observed_attention')
    window_size, kernel_size   SnapKV observation window and pooling kernel (64, 5); pool 'avg'|'max'
    n_sink, n_recent   protected prefix / suffix tokens (StreamingLLM: n_sink=4)
    spans              FAIR spans: [(start, end[, weight]) | Span, ...] for every sequence, one such list
                       per sequence, or a callable (module, keys, kwargs) -> either. Negative
                       positions count from the end; end None = the end.
    protected          whitelisted ranges [(start, end), ...] (same forms), always kept
    fairness           lambda in [0, 1]: 0 = plain policy, 1 = every span keeps the same share
    span_local         score each FAIR span on its own (the paper's fair variants)
    quota_rounding     'largest_remainder' | 'later_first' (the paper code's floor-then-rest)
    window_protection  'protected' | 'ranked' (the paper code's max-score window, see the README)
    span_softmax       'local': with span_local, each span's queries are normalised over the span's
                       keys; 'causal': over their whole causal prefix, the slice of the full
                       attention the paper's code uses (computed here and passed as kvc_score's lse)
    query_fn           optional (module, hidden_states, positions, kwargs) -> post-RoPE queries
    inplace            compact the given key/value tensors in place (True) or a copy (False)

    After compress(): ``last_keep`` (batch, kv_heads, n_kept) kept indices, ``last_plan`` the plan,
    ``last_retention`` (batch, kv_heads, spans) kept counts per span (None without spans), and for
    every layer compressed in the current forward pass (keyed by the attention module's layer_idx;
    a new pass starts when a layer seen before is compressed again) ``keep_by_layer`` and
    ``retention_by_layer``; ``span_keep_rates()`` averages the latter over layers and KV heads.
    """

    compression_ratio: float = 0.0
    method: str = "snapkv"
    window_size: int = 64
    kernel_size: int = 5
    n_sink: int = 0
    n_recent: int = 0
    spans: object = None
    protected: object = None
    fairness: float = 0.0
    span_local: bool = False
    pool: str = "avg"
    group_reduce: str = "mean"
    quota_rounding: str = "largest_remainder"
    window_protection: str = "protected"
    span_softmax: str = "local"
    query_fn: object = None
    inplace: bool = True
    last_keep: object = field(default=None, init=False, repr=False, compare=False)
    last_plan: object = field(default=None, init=False, repr=False, compare=False)
    last_retention: object = field(default=None, init=False, repr=False, compare=False)
    keep_by_layer: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    retention_by_layer: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __new__(cls, *args, **kwargs):
        if cls is KvcPress:
            cls = _press_class()
        else:
            _require_torch()
        return object.__new__(cls)

    def __post_init__(self):
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        key = str(self.method).lower()
        if key not in _METHOD_ALIASES:
            raise ValueError(f"method: expected one of {sorted(set(_METHOD_ALIASES))}, got {self.method!r}")
        self.method = _METHOD_ALIASES[key]
        if not 0 <= self.fairness <= 1:
            raise ValueError(f"fairness must be in [0, 1], got {self.fairness}")
        if self.span_softmax not in ("local", "causal"):
            raise ValueError(f"span_softmax: expected 'local' or 'causal', got {self.span_softmax!r}")
        self._contexts = {}

    # kvpress's BasePress.post_init_from_model hook (no-op here)
    def post_init_from_model(self, model):
        pass

    # ------------------------------------------------------------------------------------
    def _context(self, device):
        ctxs = self.__dict__.setdefault("_contexts", {})
        key = (device.type, device.index if device.index is not None else 0)
        ctx = ctxs.get(key)
        if ctx is None or ctx.closed:
            ctx = Context("cuda", key[1]) if device.type == "cuda" else Context("cpu")
            ctxs[key] = ctx
        return ctx

    @staticmethod
    def _ranges(spec, n, kind, where):
        out = []
        for item in spec or ():
            if isinstance(item, Span):
                s, e, w = item.start, item.end, item.weight
                kind_ = item.kind if kind is None else kind
            else:
                item = tuple(item)
                s, e = item[0], item[1]
                w = float(item[2]) if len(item) > 2 else 1.0
                kind_ = kind or "fair"
            s = 0 if s is None else (s + n if s < 0 else s)
            e = n if e is None else (e + n if e < 0 else e)
            s, e = max(0, min(n, int(s))), max(0, min(n, int(e)))
            if e > s:
                out.append(Span(s, e, kind_, w))
        return out

    def _spans_for(self, module, keys, kwargs):
        bsz, n = keys.shape[0], keys.shape[2]

        def per_seq(spec):
            if callable(spec):
                spec = spec(module, keys, kwargs)
            if spec is None:
                return [None] * bsz
            spec = list(spec)
            if spec and isinstance(spec[0], (list, tuple)) and spec[0] and isinstance(spec[0][0], (list, tuple, Span)):
                if len(spec) != bsz:
                    raise ValueError(f"spans: {len(spec)} per-sequence lists for a batch of {bsz}")
                return spec
            return [spec] * bsz

        fair = per_seq(self.spans)
        prot = per_seq(self.protected)
        if all(f is None for f in fair) and all(p is None for p in prot):
            return None
        rows = []
        for b in range(bsz):
            row = self._ranges(fair[b], n, None, "spans") + self._ranges(prot[b], n, "protect", "protected")
            row.sort(key=lambda s: (s.start, s.kind != "fair"))
            rows.append(row)
        return rows

    def _plan(self, module, keys, kwargs):
        torch = _require_torch()
        bsz, h_kv, n, d = keys.shape
        cfg = getattr(module, "config", None)
        h_q = getattr(cfg, "num_attention_heads", None) or getattr(module, "num_heads", None) or h_kv
        dtype = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}.get(keys.dtype)
        if dtype is None:
            raise TypeError(f"keys: dtype {keys.dtype} is not supported (float32, float16, bfloat16)")
        ctx = self._context(keys.device)
        n_kept = compute_n_kept(n, self.compression_ratio)
        spans = self._spans_for(module, keys, kwargs)
        window = self.window_size
        if self.method == "h2o":
            # every position observes: with span_local the library splits the window across the FAIR
            # spans, ceil(left / spans left) each, so n per span lets every span use all its tokens
            fair = max((sum(s.kind == "fair" for s in row) for row in spans or ()), default=0)
            window = n * max(1, fair if self.span_local else 1)
        key = (str(keys.device), dtype, bsz, h_q, h_kv, n, d, n_kept, window, self.method, self.kernel_size,
               self.pool, self.group_reduce, self.span_local, self.n_sink, self.n_recent, self.fairness,
               self.quota_rounding, self.window_protection,
               None if spans is None else tuple(tuple(r) for r in spans))
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] == key and not cached[1].closed:
            return cached[1]  # one plan serves every layer of a compression event
        if cached is not None:
            self._retire(cached[1])
        plan = ctx.plan(num_q_heads=h_q, num_kv_heads=h_kv, head_dim=d, seq_lens=[n] * bsz, budgets=[n_kept] * bsz,
                        spans=spans, method=self.method, dtype=dtype, window=window,
                        pool_kernel=self.kernel_size, pool=self.pool, group_reduce=self.group_reduce,
                        span_local=self.span_local, sink_tokens=self.n_sink, recent_tokens=self.n_recent,
                        fairness=self.fairness, quota_rounding=self.quota_rounding,
                        window_protection=self.window_protection)
        self.__dict__["_plan_cache"] = (key, plan)
        return plan

    @staticmethod
    def _retire(plan):
        if plan.context.is_cuda:  # work queued with the plan must finish before it is freed
            torch = _require_torch()
            torch.cuda.current_stream(plan.context.device).synchronize()
        plan.close()

    def _queries(self, plan, module, hidden_states, keys, kwargs):
        torch = _require_torch()
        if plan.info.obs_total == 0:
            return None
        positions = sorted(set(int(p) for p in plan.obs_positions))
        col = {p: i for i, p in enumerate(positions)}
        pos_t = torch.as_tensor(positions, device=keys.device)
        if self.query_fn is not None:
            q = self.query_fn(module, hidden_states, positions, kwargs)
        else:
            if hidden_states is None:
                raise ValueError(f"method {self.method!r} needs hidden_states (or query_fn) to compute queries")
            q = _prerope_queries(module, hidden_states[:, pos_t])
            pe = kwargs.get("position_embeddings") if kwargs else None
            if pe is None:
                raise ValueError(f"method {self.method!r} needs kwargs['position_embeddings'] (cos, sin) for RoPE, "
                                 f"or query_fn")
            cos, sin = pe
            q = _rope(q, cos[:, pos_t], sin[:, pos_t])
        seq = torch.repeat_interleave(torch.arange(plan.batch), torch.as_tensor(plan.obs_indptr).diff().long())
        cols = torch.as_tensor([col[int(p)] for p in plan.obs_positions])
        q = q[seq.to(q.device), :, cols.to(q.device), :]  # (obs_total, num_q_heads, head_dim)
        return q.to(keys.dtype).contiguous()

    def _lse(self, plan, keys, queries):
        """span_softmax='causal': each observation row's log-sum-exp over its whole causal prefix
        [0, p] (float32 (obs_total, num_q_heads)), so the library's span-local scores become the
        full causal attention sliced to the span. None when the library's own normaliser applies."""
        if self.span_softmax != "causal" or not self.span_local or queries is None:
            return None
        torch = _require_torch()
        h_q, h_kv = queries.shape[1], keys.shape[1]
        out = torch.empty(queries.shape[0], h_q, dtype=torch.float32, device=queries.device)
        positions = torch.as_tensor(plan.obs_positions, device=keys.device).long()
        scale = keys.shape[-1] ** -0.5  # the plan's default softmax scale (the press sets none)
        for b in range(plan.batch):
            r0, r1 = int(plan.obs_indptr[b]), int(plan.obs_indptr[b + 1])
            k = keys[b].float().repeat_interleave(h_q // h_kv, dim=0)  # (h_q, n, d)
            for c in range(r0, r1, 256):  # rows in chunks: (rows, h_q, n) logits at a time
                rows = slice(c, min(r1, c + 256))
                logits = torch.einsum("rhd,hnd->rhn", queries[rows].float(), k) * scale
                future = torch.arange(keys.shape[2], device=keys.device)[None, :] > positions[rows, None]
                out[rows] = logits.masked_fill(future[:, None, :], float("-inf")).logsumexp(-1)
        return out

    # ------------------------------------------------------------------------------------
    # kvpress interface
    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        """(batch, kv_heads, n) float32 scores from libkvcompress (higher = keep). Protected
        positions (window, sinks, whitelisted spans) score +inf."""
        from . import hf_cache

        plan = self._plan(module, keys, kwargs)
        queries = self._queries(plan, module, hidden_states, keys, kwargs)
        scores = plan.score(hf_cache(keys, values), queries, lse=self._lse(plan, keys, queries))
        return scores.view(keys.shape[0], keys.shape[1], keys.shape[2])

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        """Scores, selects and compacts through libkvcompress; returns (keys, values) of shape
        (batch, kv_heads, n_kept, head_dim)."""
        from . import hf_cache

        if self.compression_ratio == 0:
            return keys, values
        if not self.inplace or keys.stride(-1) != 1 or values.stride(-1) != 1:
            keys, values = keys.clone(), values.clone()
        plan = self._plan(module, keys, kwargs)
        queries = self._queries(plan, module, hidden_states, keys, kwargs)
        cache = hf_cache(keys, values)
        keep = plan.select(plan.score(cache, queries, lse=self._lse(plan, keys, queries)))
        plan.compact(cache, keep)
        bsz, h_kv = keys.shape[0], keys.shape[1]
        k = int(plan.new_lengths[0])
        self.last_keep = keep.view(bsz, h_kv, k)
        self.last_retention = plan.retention(keep).view(bsz, h_kv, -1) if plan.info.total_spans else None
        self.last_plan = plan
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = len(self.keep_by_layer)
        elif layer in self.keep_by_layer:  # a layer compressed again: a new forward pass
            self.keep_by_layer.clear()
            self.retention_by_layer.clear()
        self.keep_by_layer[layer] = self.last_keep
        if self.last_retention is not None:
            self.retention_by_layer[layer] = self.last_retention
        return keys[:, :, :k].contiguous(), values[:, :, :k].contiguous()

    def span_keep_rates(self):
        """(batch, spans) numpy float64: the kept fraction of each span of last_plan (its order:
        kvcompress.Plan.spans), averaged over the layers of retention_by_layer and the KV heads."""
        if not self.retention_by_layer or self.last_plan is None:
            raise ValueError("span_keep_rates: no spans were compressed yet (give spans= or protected=)")
        counts = np.stack([c.detach().cpu().numpy() for c in self.retention_by_layer.values()])
        lengths = np.array([[len(s) for s in row] for row in self.last_plan.spans], dtype=np.float64)
        return counts.mean(axis=(0, 2)) / lengths

    def close(self):
        cached = self.__dict__.pop("_plan_cache", None)
        if cached is not None:
            self._retire(cached[1])
        for ctx in self.__dict__.get("_contexts", {}).values():
            ctx.close()
        self.__dict__["_contexts"] = {}


LibKVCompressPress = KvcPress

__all__ = ["KvcPress", "LibKVCompressPress", "PromptSpans", "compute_n_kept", "find_spans"]
