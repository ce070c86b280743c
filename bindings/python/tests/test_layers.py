"""Every layer in one call (Plan.*_layers) and the compaction status array (Plan.status), on the CPU
backend: each layer-batched method equals one single-layer call per layer, and a corrupt page table
is reported through the status array."""
import numpy as np
import pytest

import kvcompress as kvc

H, HQ, D, L = 2, 4, 16, 3


def layer_caches(rng, B, n, layers=L):
    """One HF-style cache per layer (the same layout, different data) and their originals."""
    arrays = [(rng.standard_normal((B, H, n, D)).astype(np.float32), rng.standard_normal((B, H, n, D)).astype(np.float32))
              for _ in range(layers)]
    originals = [(k.copy(), v.copy()) for k, v in arrays]
    return [kvc.hf_cache(k, v) for k, v in arrays], originals


def knorm_plan(ctx, B, n):
    spans = [[kvc.Span(0, n // 2), kvc.Span(n // 2, n, weight=2.0)] for _ in range(B)]
    return ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n] * B, budgets=n // 3, spans=spans,
                    method="knorm", dtype="f32", fairness=0.5)


def test_workspace_layout(ctx):
    plan = knorm_plan(ctx, 2, 30)
    one = plan.workspace_layout("compress")
    assert one.workspace_bytes == plan.workspace_size("compress")
    assert one.keep_offset_bytes == plan.info.keep_offset_bytes
    assert one.status_offset_bytes == plan.info.compress_status_offset_bytes
    assert plan.workspace_layout("compact").status_offset_bytes == plan.info.compact_status_offset_bytes
    assert plan.workspace_layout("compress", 32).workspace_bytes > one.workspace_bytes
    with pytest.raises(ValueError):
        plan.workspace_layout("compress", 0)


def test_score_select_compact_retention_layers_equal_single_calls(ctx, rng):
    B, n = 2, 30
    plan = knorm_plan(ctx, B, n)
    caches, originals = layer_caches(rng, B, n)
    scores = plan.score_layers(caches)
    assert scores.shape == (L, plan.info.score_elems)
    for layer in range(L):
        np.testing.assert_array_equal(scores[layer], plan.score(caches[layer]))
    keep = plan.select_layers(scores)
    assert keep.shape == (L, plan.info.keep_elems)
    for layer in range(L):
        np.testing.assert_array_equal(keep[layer], plan.select(scores[layer]))
    assert any((keep[layer] != keep[0]).any() for layer in range(1, L)), "different data, different choices"
    counts = plan.retention_layers(keep)
    for layer in range(L):
        np.testing.assert_array_equal(counts[layer], plan.retention(keep[layer]))
    extra = rng.standard_normal((L, plan.info.score_elems)).astype(np.float32)
    extra0 = extra.copy()
    plan.compact_layers(caches, keep, extras=[extra])
    assert plan.status("compact").shape == (L, B) and not plan.status("compact").any()
    for layer in range(L):
        k0, v0 = originals[layer]
        for b, rows in enumerate(plan.keep_rows(keep[layer])):
            kb = int(plan.new_lengths[b])
            for h in range(H):
                np.testing.assert_array_equal(caches[layer].read(b, kb, "k")[h], k0[b][h][rows[h]])
                np.testing.assert_array_equal(caches[layer].read(b, kb, "v")[h], v0[b][h][rows[h]])
        for b, (got, before, rows) in enumerate(zip(plan.score_rows(extra[layer]), plan.score_rows(extra0[layer]),
                                                    plan.keep_rows(keep[layer]))):
            for h in range(H):
                np.testing.assert_array_equal(got[h][: rows.shape[1]], before[h][rows[h]])


def test_compress_layers_equals_single_calls(ctx, rng):
    B, n = 2, 40
    plan = knorm_plan(ctx, B, n)
    caches, originals = layer_caches(rng, B, n)
    singles = [kvc.hf_cache(k.copy(), v.copy()) for k, v in originals]
    keep = plan.compress_layers(caches)
    assert keep.shape == (L, plan.info.keep_elems)
    assert plan.status("compress").shape == (L, B) and not plan.status("compress").any()
    for layer in range(L):
        np.testing.assert_array_equal(keep[layer], plan.compress(singles[layer]))
        np.testing.assert_array_equal(caches[layer].k, singles[layer].k)
        np.testing.assert_array_equal(caches[layer].v, singles[layer].v)


def test_snapkv_layers_take_per_layer_queries_and_lse(ctx, rng):
    B, n = 1, 50
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=20, window=8, dtype="f32")
    caches, _ = layer_caches(rng, B, n)
    queries = [rng.standard_normal((plan.info.obs_total, HQ, D)).astype(np.float32) for _ in range(L)]
    scores = plan.score_layers(caches, queries)
    for layer in range(L):
        np.testing.assert_array_equal(scores[layer], plan.score(caches[layer], queries[layer]))
    with pytest.raises(ValueError, match="queries"):
        plan.score_layers(caches)
    with pytest.raises(ValueError, match="layers"):
        plan.score_layers(caches, queries[:2])


def test_layers_must_share_one_layout(ctx, rng):
    plan = knorm_plan(ctx, 1, 30)
    caches, _ = layer_caches(rng, 1, 30, layers=2)
    k = rng.standard_normal((1, H, 32, D)).astype(np.float32)
    other = kvc.hf_cache(k[:, :, :30].copy(), k[:, :, :30].copy() + 1)
    wide = kvc.paged_kv(k, k + 1, page_size=32, strides=(H * 32 * D, D, 32 * D), num_kv_heads=H, head_dim=D)
    with pytest.raises(ValueError, match="share one layout"):
        plan.score_layers([caches[0], wide])
    plan.score_layers([caches[0], other])  # the same layout: fine


def test_status_reports_a_shared_page_and_nothing_moves(ctx, rng):
    """CPU: a page used by two sequences is refused before anything moves (the CUDA backend leaves the
    sequences untouched and flags them in plan.status instead)."""
    page, B, n = 8, 2, 24
    pages = rng.standard_normal((8, page, H, D)).astype(np.float32)
    k, v = pages, pages + 1.0
    table = np.array([[0, 1, 2], [3, 1, 5]], dtype=np.int32)  # page 1 is in both sequences
    cache = kvc.vllm_cache(k, v, table)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n] * B, budgets=10, method="knorm",
                    dtype="f32")
    before = k.copy()
    with pytest.raises(kvc.InvalidValueError, match="used twice"):
        plan.compress(cache)
    np.testing.assert_array_equal(k, before)
    with pytest.raises(ValueError, match="no compact call"):
        plan.status("compact")
    good = kvc.vllm_cache(k, v, np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int32))
    plan.compact(good, plan.select(plan.score(good)))
    assert plan.status("compact").tolist() == [[0, 0]]
