"""Context(threads=...): the CPU backend's threads give the same bits as one thread, and bad
counts are refused with the library's status."""
import numpy as np
import pytest

import kvcompress as kvc

H, HQ, D = 4, 16, 32


def scores_with(threads, method, dtype, k, v, q_all, seq_lens, window):
    with kvc.Context("cpu", threads=threads) as ctx:
        assert ctx.threads == threads
        plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, budgets=[n // 2 for n in seq_lens],
                        method=method, dtype=dtype, window=window)
        queries = plan.gather_queries(q_all) if plan.info.obs_total else None
        cache = kvc.hf_cache(k, v)
        scores = np.array(plan.score(cache, queries))
        keep = np.array(plan.compress(cache, queries))
        return scores, keep


@pytest.mark.parametrize("method", ["snapkv", "h2o", "tova", "knorm"])
def test_one_two_three_threads_identical(rng, method):
    seq_lens = [300, 300]  # hf_cache: equal lengths
    k = rng.standard_normal((2, H, 300, D)).astype(np.float16)
    v = rng.standard_normal((2, H, 300, D)).astype(np.float16)
    q_all = rng.standard_normal((2, HQ, 300, D)).astype(np.float16)
    window = 300 if method == "h2o" else 32
    ref_scores, ref_keep = scores_with(1, method, "f16", k.copy(), v.copy(), q_all, seq_lens, window)
    assert np.isfinite(ref_scores).any()
    for threads in (2, 3):
        scores, keep = scores_with(threads, method, "f16", k.copy(), v.copy(), q_all, seq_lens, window)
        assert scores.tobytes() == ref_scores.tobytes(), f"{method}: {threads} threads differ from 1"
        np.testing.assert_array_equal(keep, ref_keep)


def test_bad_thread_counts_are_refused(ctx):
    for bad in (0, -1, 257):
        with pytest.raises(kvc.KvcError) as e:
            ctx.threads = bad
        assert e.value.status_name == "KVC_ERROR_INVALID_VALUE" and "threads" in str(e.value)
        assert ctx.threads == 1
    with pytest.raises(TypeError):
        kvc.Context("cpu", threads=2.5)
    ctx.threads = 4
    assert ctx.threads == 4
    ctx.threads = 1
    assert ctx.threads == 1
