"""Re-compression during decode from Python: per-head spans (spans_per_head) against per-sequence
one-head plans of each (sequence, head) row, identical per-head spans against per-sequence spans,
Plan.spans_after_compaction against spans recomputed here from the keep indices, and the
fixed-capacity score layout (score_row_capacity) across growing decode steps."""
import numpy as np
import pytest

import kvcompress as kvc

H, HQ, D = 2, 4, 8


def random_spans(rng, n):
    """A FAIR span, a PROTECT span inside or after it, sorted by start."""
    a = int(rng.integers(0, n // 3))
    b = int(rng.integers(a + 1, n))
    p = int(rng.integers(0, n - 2))
    return sorted([kvc.Span(a, b, "fair", float(rng.choice([0.5, 1.0, 2.0]))), kvc.Span(p, p + 2, "protect")],
                  key=lambda s: (s.start, s.kind != "fair"))


def test_per_head_spans_select_like_one_head_plans(ctx, rng):
    lens, budgets = [40, 64], [15, 20]
    spans = [[random_spans(rng, n) for _ in range(H)] for n in lens]
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=lens, budgets=budgets, dtype="f32",
                    method="h2o", window=4, fairness=1.0, spans=spans, spans_per_head=True)
    assert plan.info.count_elems == plan.info.total_spans == sum(len(s) for seq in spans for s in seq)
    scores = rng.standard_normal(plan.info.score_elems).astype(np.float32)
    keep = plan.select(scores)
    counts = plan.retention(keep)
    for b, (rows, krows, crows) in enumerate(zip(plan.score_rows(scores), plan.keep_rows(keep),
                                                 plan.count_rows(counts))):
        for h in range(H):
            one = ctx.plan(num_q_heads=1, num_kv_heads=1, head_dim=D, seq_lens=[lens[b]], budgets=[budgets[b]],
                           dtype="f32", method="h2o", window=4, fairness=1.0, spans=[spans[b][h]])
            np.testing.assert_array_equal(krows[h], one.select(np.ascontiguousarray(rows[h])))
            np.testing.assert_array_equal(plan.span_quotas_of(b, h), one.span_quotas)
            want = [np.count_nonzero((krows[h] >= s.start) & (krows[h] < s.end)) for s in spans[b][h]]
            np.testing.assert_array_equal(crows[h], want)


def test_identical_per_head_spans_equal_per_sequence_spans(ctx, rng):
    lens = [50, 33]
    spans = [random_spans(rng, n) for n in lens]
    kw = dict(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=lens, budgets=[20, 12], dtype="f32",
              method="tova", fairness=0.5)
    seq = ctx.plan(spans=spans, **kw)
    head = ctx.plan(spans=[[s] * H for s in spans], spans_per_head=True, **kw)
    scores = rng.standard_normal(seq.info.score_elems).astype(np.float32)
    np.testing.assert_array_equal(seq.select(scores), head.select(scores))
    with pytest.raises(kvc.InvalidValueError, match="TOVA selects one set for all KV heads"):
        ctx.plan(spans=[[s, s[:1]] for s in spans], spans_per_head=True, **kw)


def test_spans_after_compaction_follow_the_keep_indices(ctx, rng):
    lens = [48, 30]
    spans = [random_spans(rng, n) for n in lens]
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=lens, budgets=[16, 12], dtype="f32",
                    window=4, fairness=1.0, spans=spans)
    k = rng.standard_normal((2, H, 60, D)).astype(np.float32)
    v = rng.standard_normal((2, H, 60, D)).astype(np.float32)
    q = rng.standard_normal((plan.info.obs_total, HQ, D)).astype(np.float32)
    cache = kvc.hf_cache(k, v)
    scores = plan.score(cache, q)
    keep = plan.select(scores)
    plan.compact(cache, keep)
    nxt = plan.spans_after_compaction(keep)
    for b, krows in enumerate(plan.keep_rows(keep)):
        for h in range(H):
            want = []
            for s in spans[b]:
                slots = np.nonzero((krows[h] >= s.start) & (krows[h] < s.end))[0]
                if slots.size:
                    want.append(kvc.Span(int(slots[0]), int(slots[-1]) + 1, s.kind, s.weight))
            assert nxt[b][h] == want
    # directly usable by the next event, after 5 appended decode tokens
    lens2 = [int(n) + 5 for n in plan.new_lengths]
    plan2 = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=lens2, budgets=[12, 10], dtype="f32",
                     window=4, fairness=1.0, spans=nxt, spans_per_head=True)
    plan2.compress(cache, rng.standard_normal((plan2.info.obs_total, HQ, D)).astype(np.float32))
    with pytest.raises(ValueError, match="keep"):
        plan.spans_after_compaction(keep[:-1])


def test_fixed_capacity_scores_accumulate_across_growing_steps(ctx, rng):
    C, n0 = 40, [20, 25]
    k = rng.standard_normal((2, H, C, D)).astype(np.float32)
    v = rng.standard_normal((2, H, C, D)).astype(np.float32)
    cache = kvc.hf_cache(k, v)
    acc = np.zeros(2 * H * C, dtype=np.float32)
    packed_sum = None
    for step in range(3):
        lens = [n + step for n in n0]
        kw = dict(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=lens, budgets=lens, dtype="f32",
                  method="h2o", window=1)
        fixed = ctx.plan(score_row_capacity=C, **kw)
        packed = ctx.plan(**kw)
        assert fixed.info.score_elems == 2 * H * C
        q = rng.standard_normal((fixed.info.obs_total, HQ, D)).astype(np.float32)
        fixed.score(cache, q, out=acc, accumulate=True)
        rows = packed.score_rows(packed.score(cache, q))
        packed_sum = rows if packed_sum is None else [np.concatenate([s, np.zeros((H, 1), np.float32)], 1) + r
                                                      for s, r in zip(packed_sum, rows)]
    for got, want in zip(fixed.score_rows(acc), packed_sum):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(acc.reshape(2, H, C)[0, :, n0[0] + 2:] == 0)  # past each row's tokens: untouched
    with pytest.raises(kvc.InvalidValueError, match="score_row_capacity is 24 but seq_lens.1. is 27"):
        ctx.plan(score_row_capacity=24, **kw)


def test_per_head_spans_need_one_list_per_head(ctx):
    with pytest.raises(ValueError, match="one list of spans per KV head"):
        ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[10], budgets=[5], dtype="f32",
                 spans=[[kvc.Span(0, 4)]], spans_per_head=True)
