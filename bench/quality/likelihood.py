"""Teacher-forced log-likelihoods of replies after a (compressed) KV cache.

The model sees a reply exactly as during generation: the cache holds the system prompt's kept
tokens at their original RoPE positions; the user turn and then the reply take positions
orig_len, orig_len + 1, ...  Teacher forcing in one forward pass equals token-by-token decoding
(causal attention), so the log-probability of reply token t is read from the logits of the row
before it.

Several replies after the same user turn are scored in one pass: the user turn is fed once and
each reply attends to the cache, the user turn and causally to itself, not to the other replies
(a block mask), every reply starting at the same position.  Several caches of the same length
(different methods / variants at one ratio) are stacked along a batch axis so that each weight
matrix is read once for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from model import _rms_norm


def _rope_tables(model, positions):
    """cos, sin [m, 1, head_dim / 2] float32 of the adjacent-pair RoPE (Model._rope's values),
    computed once per pass instead of twice per layer."""
    ang = positions.astype(np.float64)[:, None] * model._inv_freq[None, :]
    return np.cos(ang).astype(np.float32)[:, None], np.sin(ang).astype(np.float32)[:, None]


def _rope_pairs(x, cos, sin):
    """x [..., m, heads, hd/2, 2] rotated pair-wise: Model._rope's arithmetic, for the query and
    key heads in one call."""
    x0, x1 = x[..., 0], x[..., 1]
    out = np.empty_like(x)
    np.subtract(x0 * cos, x1 * sin, out=out[..., 0])
    np.add(x0 * sin, x1 * cos, out=out[..., 1])
    return out


def _swiglu(gu, d_ff):
    """silu(gate) * up from the fused [rows, 2 d_ff] projection (model._silu's arithmetic) in one
    buffer."""
    g = gu[:, :d_ff]
    a = np.negative(g)
    np.exp(a, out=a)
    a += 1.0
    np.divide(g, a, out=a)
    a *= gu[:, d_ff:]
    return a


def forward_batch(model, ids, cache, positions, mask=None, keep_cache=True):
    """The model's forward pass for B caches at once.

    ids [m] (the same new tokens for every cache) or [B, m]; cache per layer (K, V), each
    [B, n_kv, k, head_dim] (one k for all B); positions [m] RoPE positions of the new tokens;
    mask [m, m] additive (0 / -inf) among the new tokens, default causal; every cached entry is
    visible.  Returns (final-normed hidden states [B, m, d], new cache per layer or None).

    Model._forward's arithmetic, except that the softmax is normalised after the product with V
    (one division per output element instead of one per score; equal to float rounding) and the
    1/sqrt(head_dim) scale goes on the queries (exact: it is a power of two for head_dim 64)."""
    c = model.cfg
    K0 = cache[0][0]
    B = K0.shape[0]
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, (B, ids.size))
    m = ids.shape[1]
    positions = np.asarray(positions, dtype=np.int64)
    if mask is None:
        mask = np.triu(np.full((m, m), -np.inf, dtype=np.float32), k=1)
    hd, nh, nkv = c.head_dim, c.n_heads, c.n_kv_heads
    grp = nh // nkv
    scale = np.float32(1.0 / np.sqrt(hd))
    cos, sin = _rope_tables(model, positions)
    x = model.tok_embd[ids]  # [B, m, d]
    new = [] if keep_cache else None
    for li, L in enumerate(model.layers):
        h = _rms_norm(x, L["attn_norm"], c.rms_eps).reshape(B * m, -1)
        qkv = (h @ L["wqkv_t"]).reshape(B, m, -1)  # one GEMM for the whole batch
        qk = _rope_pairs(qkv[..., : (nh + nkv) * hd].reshape(B, m, nh + nkv, hd // 2, 2), cos, sin)
        qk = qk.reshape(B, m, nh + nkv, hd)
        q = qk[:, :, :nh].transpose(0, 2, 1, 3) * scale  # [B, nh, m, hd]
        k = qk[:, :, nh:].transpose(0, 2, 1, 3)
        v = qkv[..., (nh + nkv) * hd:].reshape(B, m, nkv, hd).transpose(0, 2, 1, 3)
        Kc, Vc = cache[li]
        K = np.concatenate([Kc, k], axis=2)
        V = np.concatenate([Vc, v], axis=2)
        n_prev = Kc.shape[2]
        if keep_cache:
            new.append((K, V))
        qg = q.reshape(B, nkv, grp * m, hd)  # query heads of a group stacked along rows
        s = np.matmul(qg, K.transpose(0, 1, 3, 2))
        s5 = s.reshape(B, nkv, grp, m, n_prev + m)
        s5[..., n_prev:] += mask
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        o = np.matmul(s, V)  # [B, nkv, grp*m, hd], unnormalised
        o /= s.sum(axis=-1, keepdims=True)
        o = o.reshape(B, nh, m, hd).transpose(0, 2, 1, 3).reshape(B * m, nh * hd)
        x = x + (o @ L["wo_t"]).reshape(B, m, -1)
        h = _rms_norm(x, L["ffn_norm"], c.rms_eps).reshape(B * m, -1)
        x = x + (_swiglu(h @ L["wgu_t"], c.d_ff) @ L["wdown_t"]).reshape(B, m, -1)
    return _rms_norm(x, model.out_norm, c.rms_eps), new


def log_softmax_at(model, hidden, targets, chunk=1024):
    """log p(targets[i] | row i) from final-normed hidden rows [R, d]: float64 [R].  The logits
    are float32, as the model samples from; each row's sum of exponentials is float64.  Rows go
    through the vocabulary GEMM `chunk` at a time (a 200 MB float32 buffer)."""
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), chunk):
        logits = hidden[i:i + chunk] @ model.out_t  # [rows, vocab]
        t = targets[i:i + chunk]
        picked = logits[np.arange(len(t)), t].astype(np.float64)
        mx = logits.max(axis=1, keepdims=True)
        logits -= mx
        np.exp(logits, out=logits)
        out[i:i + chunk] = picked - mx[:, 0] - np.log(logits.sum(axis=1, dtype=np.float64))
    return out


@dataclass
class Packed:
    """A user turn followed by several replies, laid out for one forward pass."""

    ids: np.ndarray  # [m] the user turn, then each reply without its last token
    rel_pos: np.ndarray  # [m] position relative to the end of the cache
    mask: np.ndarray  # [m, m] additive: causal inside the user turn and inside each reply
    rows: List[np.ndarray]  # per reply: the rows whose logits predict its tokens
    targets: List[np.ndarray]  # per reply: its token ids


def pack(prefix: Sequence[int], replies: Sequence[Sequence[int]]) -> Packed:
    u = len(prefix)
    if u == 0 or any(len(r) == 0 for r in replies):
        raise ValueError("the prefix and every reply must be non-empty")
    ids, pos, seg = list(prefix), list(range(u)), [0] * u
    rows, targets = [], []
    for j, r in enumerate(replies, start=1):
        start = len(ids)
        body = list(r[:-1])  # the last token is predicted, never fed
        ids += body
        pos += range(u, u + len(body))
        seg += [j] * len(body)
        rows.append(np.array([u - 1] + list(range(start, start + len(body))), dtype=np.int64))
        targets.append(np.asarray(r, dtype=np.int64))
    seg = np.asarray(seg)
    m = len(ids)
    order = np.arange(m)
    visible = (order[None, :] <= order[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    mask = np.where(visible, 0.0, -np.inf).astype(np.float32)
    return Packed(np.asarray(ids, dtype=np.int64), np.asarray(pos, dtype=np.int64), mask, rows, targets)


def stack_caches(caches):
    """A list of B caches (per layer (K, V) [n_kv, k, hd], one k) -> per layer [B, n_kv, k, hd]."""
    return [(np.stack([c[li][0] for c in caches]), np.stack([c[li][1] for c in caches]))
            for li in range(len(caches[0]))]


def reply_logprobs(model, caches, orig_len, prefix, replies, packed=None):
    """Per-token log-probabilities of each reply after each cache.

    caches: list of B caches of one length (per layer (K, V) [n_kv, k, hd]) whose uncompressed
    prompt length was orig_len; prefix: the user turn ids (ending with the assistant header);
    replies: token id lists.  Returns out[b][j] = float64 [len(replies[j])]."""
    P = packed or pack(prefix, replies)
    hidden, _ = forward_batch(model, P.ids, stack_caches(caches), orig_len + P.rel_pos, P.mask,
                              keep_cache=False)
    all_rows = np.concatenate(P.rows)
    all_targets = np.concatenate(P.targets)
    splits = np.cumsum([len(t) for t in P.targets])[:-1]
    B = len(caches)  # every cache's rows through the vocabulary GEMM together
    lp = log_softmax_at(model, hidden[:, all_rows].reshape(B * len(all_rows), -1), np.tile(all_targets, B))
    return [np.split(x, splits) for x in lp.reshape(B, -1)]


def reply_ids(tok, user_text, reply):
    """Token ids of `reply` as the assistant's answer to `user_text`: the ids the tokenizer gives
    the whole chat (user turn + reply) after the user turn's own ids (checked)."""
    prefix = tok.user_turn(user_text)
    ids = tok.encode(reply)
    joined = tok.encode(f"{tok.IM_START}user\n{user_text}{tok.IM_END}\n{tok.IM_START}assistant\n{reply}")
    if joined != list(prefix) + list(ids):
        raise ValueError(f"reply {reply!r} does not tokenize the same after the user turn")
    return ids


def score_keeps(model, cache, orig_len, prefix, replies, keeps_list, batch=16):
    """Per-token log-probabilities of `replies` after `cache` (per layer (K, V) [n_kv, n, hd])
    compressed by each entry of keeps_list (per layer int [n_kv, k] kept indices; None = the
    uncompressed cache): out[i][j] = float64 [len(replies[j])].  Entries with identical keep
    indices are scored once; those of one kept length share forward passes, `batch` at a time."""
    from model import compress_cache

    P = pack(prefix, replies)
    unique, slot = {}, []
    for keeps in keeps_list:
        key = None if keeps is None else b"".join(np.ascontiguousarray(k, dtype=np.int64).tobytes()
                                                  for k in keeps)
        slot.append(unique.setdefault(key, len(unique)))
    by_len = {}
    for key, u in unique.items():
        k = orig_len if key is None else keeps_list[slot.index(u)][0].shape[1]
        by_len.setdefault(k, []).append(u)
    scored = {}
    for us in by_len.values():
        for i in range(0, len(us), batch):
            chunk = us[i:i + batch]
            caches = []
            for u in chunk:
                keeps = keeps_list[slot.index(u)]
                caches.append(cache if keeps is None else compress_cache(cache, keeps))
            for u, lp in zip(chunk, reply_logprobs(model, caches, orig_len, prefix, replies, P)):
                scored[u] = lp
    return [scored[u] for u in slot]
