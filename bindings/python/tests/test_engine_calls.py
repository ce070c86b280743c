"""The engine-facing calls: per-sequence outcomes (budget_policy), the query gather from packed q
(kvc_gather_queries, against a numpy gather written here) and the graph-reuse calls on the CPU
backend (device_bytes 0, upload a no-op, compatible)."""
import numpy as np
import pytest

import kvcompress as kvc

H, HQ, D = 2, 4, 16


def window64_plan(ctx, **kw):
    # the default SnapKV window 64 with budgets of a quarter of each prompt: the 100- and 40-token
    # prompts protect more than they keep
    return ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[300, 100, 40], budgets=[75, 25, 10],
                    dtype="f32", **kw)


def test_default_policy_fails_the_batch(ctx):
    with pytest.raises(kvc.BudgetError) as e:
        window64_plan(ctx)
    assert "sequence 1 protects 64 tokens" in str(e.value) and "budget_policy" in str(e.value)


def test_clamp_and_skip_outcomes(ctx):
    clamp = window64_plan(ctx, budget_policy="clamp")
    assert clamp.outcome_names == ["compressed", "clamped", "clamped"]
    assert list(clamp.outcomes) == [0, 2, 2]
    assert list(clamp.new_lengths) == [75, 64, 40]
    assert clamp.info.keep_elems == H * (75 + 64 + 40)
    skip = window64_plan(ctx, budget_policy="skip")
    assert skip.outcome_names == ["compressed", "skipped", "skipped"]
    assert list(skip.new_lengths) == [75, 100, 40]
    assert kvc.OUTCOMES == ("compressed", "within_budget", "clamped", "skipped")
    with pytest.raises(ValueError, match="budget_policy"):
        window64_plan(ctx, budget_policy="drop")


def test_skipped_sequence_is_untouched(ctx, rng):
    plan = window64_plan(ctx, budget_policy="skip")
    n = 300
    k = rng.standard_normal((3, H, n, D)).astype(np.float32)
    v = rng.standard_normal((3, H, n, D)).astype(np.float32)
    k0, v0 = k.copy(), v.copy()
    q = rng.standard_normal((plan.info.obs_total, HQ, D)).astype(np.float32)
    cache = kvc.hf_cache(k, v)  # one page per sequence; only the first seq_lens[b] tokens are used
    plan.compress(cache, q)
    np.testing.assert_array_equal(k[1], k0[1])
    np.testing.assert_array_equal(v[2], v0[2])
    assert not np.array_equal(k[0], k0[0])


def numpy_gather(plan, packed, qo):
    """Observation row r of sequence b at position p <- packed row qo[b] + p - (n_b - len_b)."""
    rows = []
    for b in range(plan.batch):
        n, length = int(plan.seq_lens[b]), int(qo[b + 1] - qo[b])
        for p in plan.obs_positions_of(b):
            rows.append(packed[qo[b] + p - (n - length)])
    return np.stack(rows).reshape(plan.info.obs_total, HQ, D)


def test_gather_packed_queries(ctx, rng):
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[120, 30, 64], budgets=[40, 30, 20],
                    dtype="f32", window=16)
    # whole prefills packed [tokens, Hq, D]
    qo = np.array([0, 120, 150, 214], dtype=np.int32)
    packed = rng.standard_normal((214, HQ, D)).astype(np.float32)
    got = plan.gather_packed_queries(packed, qo)
    assert got.shape == (plan.info.obs_total, HQ, D)
    np.testing.assert_array_equal(got, numpy_gather(plan, packed.reshape(214, -1), qo))
    # last chunks only, q as the first columns of a fused qkv tensor
    qo = np.array([0, 20, 50, 66], dtype=np.int32)
    qkv = rng.standard_normal((70, (HQ + 2 * H) * D)).astype(np.float32)
    q = qkv[:, : HQ * D]
    out = np.empty((plan.info.obs_total, HQ, D), dtype=np.float32)
    assert plan.gather_packed_queries(q, qo, out=out) is out
    np.testing.assert_array_equal(out, numpy_gather(plan, q, qo))


def test_gather_rejects_rows_that_miss_the_window(ctx, rng):
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[120, 30], budgets=[40, 30], dtype="f32",
                    window=16)
    packed = rng.standard_normal((20, HQ, D)).astype(np.float32)
    with pytest.raises(kvc.InvalidValueError, match="observation queries start at position 104"):
        plan.gather_packed_queries(packed, np.array([0, 10, 20], dtype=np.int32))
    with pytest.raises(ValueError, match="qo_indptr"):
        plan.gather_packed_queries(packed, np.array([0, 10], dtype=np.int32))
    with pytest.raises(TypeError, match="dtype"):
        plan.gather_packed_queries(packed.astype(np.float16), np.array([0, 10, 20], dtype=np.int32))


def test_graph_calls_on_cpu(ctx):
    a = window64_plan(ctx, budget_policy="clamp", device_memory="caller")
    b = window64_plan(ctx, budget_policy="clamp", fairness=0.5)  # only device data differs
    c = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[301, 100, 40], budgets=[75, 25, 10],
                 dtype="f32", budget_policy="clamp")
    assert a.device_bytes == 0
    a.upload(None)  # nothing to upload on the CPU backend
    assert a.compatible(b) and b.compatible(a)
    assert not a.compatible(c)
    with pytest.raises(ValueError, match="device_memory"):
        window64_plan(ctx, device_memory="mine")
