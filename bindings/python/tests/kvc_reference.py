"""Independent numpy re-implementations of the C semantics (kvcompress.h), for the round-trip tests."""
import math

import numpy as np


def softmax(x):
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def knorm_scores(k):
    """k: (H, n, D) -> (H, n) = -||k||."""
    return -np.sqrt((k.astype(np.float64) ** 2).sum(-1))


def streaming_scores(H, n):
    return np.tile(np.arange(n, dtype=np.float64), (H, 1))


def _pool_avg(x, kernel):
    if kernel == 1:
        return x.copy()
    r = kernel // 2
    padded = np.concatenate([np.zeros(r), x, np.zeros(r)])
    return np.array([padded[j: j + kernel].sum() / kernel for j in range(len(x))])


def snapkv_scores(k, q_obs, positions, kernel=5, scale=None):
    """k: (H, n, D); q_obs: (w, Hq, D) post-RoPE queries at `positions` (the last w). -> (H, n)."""
    H, n, D = k.shape
    Hq = q_obs.shape[1]
    G = Hq // H
    scale = 1.0 / math.sqrt(D) if not scale else scale
    first = int(positions[0])
    out = np.full((H, n), np.inf)
    per_head = np.zeros((Hq, first))
    for g in range(Hq):
        h = g // G
        acc = np.zeros(first)
        for i, p in enumerate(positions):
            a = softmax(scale * (k[h, : p + 1].astype(np.float64) @ q_obs[i, g].astype(np.float64)))
            acc += a[:first]
        per_head[g] = _pool_avg(acc / len(positions), kernel)
    for h in range(H):
        out[h, :first] = per_head[h * G: (h + 1) * G].mean(0)
    return out


def h2o_scores(k, q_obs, positions, scale=None):
    H, n, D = k.shape
    Hq = q_obs.shape[1]
    G = Hq // H
    scale = 1.0 / math.sqrt(D) if not scale else scale
    per_head = np.zeros((Hq, n))
    seen = np.zeros(n)
    for p in positions:
        seen[: p + 1] += 1
    for g in range(Hq):
        h = g // G
        for i, p in enumerate(positions):
            per_head[g, : p + 1] += softmax(scale * (k[h, : p + 1].astype(np.float64) @ q_obs[i, g].astype(np.float64)))
    per_head /= seen[None, :]
    return np.stack([per_head[h * G: (h + 1) * G].mean(0) for h in range(H)])


def tova_scores(k, q_last, scale=None):
    """q_last: (Hq, D), the query of position n-1."""
    H, n, D = k.shape
    Hq = q_last.shape[0]
    G = Hq // H
    scale = 1.0 / math.sqrt(D) if not scale else scale
    acc = np.zeros(n)
    for g in range(Hq):
        acc += softmax(scale * (k[g // G].astype(np.float64) @ q_last[g].astype(np.float64)))
    row = acc / Hq
    row[n - 1] = np.inf
    return np.tile(row, (H, 1))


def _order_key(scores, j):
    s = scores[j]
    if np.isnan(s):
        return (0, -np.inf, j)
    return (1, s, j)


def top(scores, candidates, count):
    """The `count` best of `candidates`: score descending, ties by position descending, NaN last."""
    ranked = sorted(candidates, key=lambda j: _order_key(scores, j), reverse=True)
    return ranked[:count]


def select(scores, k, protected, partitions=None, quotas=None):
    """Selection semantics for one row. partitions: list of index lists (FAIR spans, then implicit);
    quotas: q_p per partition (F = sum). Without partitions: plain top-k with protection."""
    n = len(scores)
    kept = set(protected)
    F = 0
    if partitions:
        for part, q in zip(partitions, quotas):
            lo = sum(1 for j in part if j in protected)
            kept.update(top(scores, [j for j in part if j not in protected], q - lo))
            F += q
        F = max(F, len(protected))
    else:
        F = len(protected)
    rest = [j for j in range(n) if j not in kept]
    kept.update(top(scores, rest, k - len(kept)))
    return sorted(kept)


def quotas(lengths, weights, lows, F):
    """Reference quota computation: q_p = clamp(mu * w_p * L_p, lo_p, L_p), sum = F, largest
    remainder rounding with ties to the later partition."""
    L = np.asarray(lengths, float)
    w = np.asarray(weights, float)
    lo = np.asarray(lows, float)

    def total(mu):
        return np.clip(mu * w * L, lo, L).sum()

    a, b = 0.0, 1.0
    while total(b) < F:
        b *= 2
    for _ in range(200):
        m = (a + b) / 2
        if total(m) < F:
            a = m
        else:
            b = m
    real = np.clip(b * w * L, lo, L)
    q = np.floor(real + 1e-9).astype(int)
    rem = real - q
    left = int(F - q.sum())
    order = sorted(range(len(q)), key=lambda p: (rem[p], p), reverse=True)
    for p in order[:left]:
        q[p] += 1
    return q
