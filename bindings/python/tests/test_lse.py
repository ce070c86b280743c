"""plan.score(..., lse=): the engine's normalisers, computed here in numpy (float64), give the same
scores as the library computing its own (kvc_score's `lse` in kvcompress.h)."""
import numpy as np
import pytest

import kvcompress as kvc

H, HQ, D = 2, 4, 16


def numpy_lse(plan, k, q, lows):
    """float32 [obs_total, HQ]: ln sum_j exp(scale * <q, k_j>) over the keys [lo, p] of each
    observation row (lows[b](p) is the first key position p sees)."""
    scale = 1.0 / np.sqrt(D)
    out = np.empty((plan.info.obs_total, HQ), dtype=np.float64)
    for b in range(plan.batch):
        for r in range(plan.obs_indptr[b], plan.obs_indptr[b + 1]):
            p = int(plan.obs_positions[r])
            lo = lows[b](p)
            for g in range(HQ):
                logits = scale * (k[b, g // (HQ // H), lo:p + 1].astype(np.float64) @ q[b, g, p].astype(np.float64))
                m = logits.max()
                out[r, g] = m + np.log(np.exp(logits - m).sum())
    return out.astype(np.float32)


@pytest.mark.parametrize("method,window", [("snapkv", 8), ("h2o", 1000), ("tova", 1)])
def test_score_with_numpy_lse_matches_score_without(ctx, rng, method, window):
    seq_lens = [40, 29]
    k = rng.standard_normal((2, H, 40, D)).astype(np.float32)
    v = rng.standard_normal((2, H, 40, D)).astype(np.float32)
    q = rng.standard_normal((2, HQ, 40, D)).astype(np.float32)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, budgets=20, method=method,
                    window=window, dtype="f32")
    cache = kvc.hf_cache(k, v)
    queries = plan.gather_queries(q)
    lse = numpy_lse(plan, k, q, [lambda p: 0] * 2)
    without = plan.score(cache, queries)
    with_lse = plan.score(cache, queries, lse=lse)
    assert np.isfinite(without).sum() > 0
    np.testing.assert_allclose(with_lse, without, rtol=1e-5, atol=1e-12)


def test_span_local_lse_is_over_the_span(ctx, rng):
    n = 60
    spans = [kvc.Span(0, 25), kvc.Span(25, 60)]
    k = rng.standard_normal((1, H, n, D)).astype(np.float32)
    v = rng.standard_normal((1, H, n, D)).astype(np.float32)
    q = rng.standard_normal((1, HQ, n, D)).astype(np.float32)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=30, spans=[spans],
                    span_local=True, method="snapkv", window=10, dtype="f32")
    cache = kvc.hf_cache(k, v)
    queries = plan.gather_queries(q)
    lse = numpy_lse(plan, k, q, [lambda p: 0 if p < 25 else 25])
    np.testing.assert_allclose(plan.score(cache, queries, lse=lse), plan.score(cache, queries), rtol=1e-5, atol=1e-12)
    # a prefix normaliser (what a plain causal prefill has) is not the span's: the scores differ
    prefix = numpy_lse(plan, k, q, [lambda p: 0])
    assert not np.allclose(plan.score(cache, queries, lse=prefix), plan.score(cache, queries), rtol=1e-5)
