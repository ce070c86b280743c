"""Round trips against results computed independently in numpy (tests/kvc_reference.py)."""
import numpy as np
import pytest

import kvcompress as kvc
import kvc_reference as ref

H, HQ, D = 2, 4, 16


def hf_arrays(rng, B, n, dtype=np.float32, heads=H):
    k = rng.standard_normal((B, heads, n, D)).astype(dtype)
    v = rng.standard_normal((B, heads, n, D)).astype(dtype)
    return k, v


def rows_equal_gather(plan, cache, originals, keep):
    """After compaction, each sequence's first k_b tokens equal the original tokens at keep."""
    k0, v0 = originals
    for b, rows in enumerate(plan.keep_rows(keep)):
        kb = int(plan.new_lengths[b])
        got_k = cache.read(b, kb, "k")
        got_v = cache.read(b, kb, "v")
        for h in range(plan.num_kv_heads):
            np.testing.assert_array_equal(got_k[h], k0[b][h][rows[h]])
            np.testing.assert_array_equal(got_v[h], v0[b][h][rows[h]])


# ---------------------------------------------------------------------------------------------
# scores


def test_knorm_scores_and_plain_topk(ctx, rng):
    B, n, budget = 2, 40, 12
    k, v = hf_arrays(rng, B, n)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n, n], budgets=budget, method="knorm",
                    dtype="f32")
    cache = kvc.hf_cache(k, v)
    scores = plan.score(cache)
    assert scores.dtype == np.float32 and scores.shape == (plan.info.score_elems,)
    for b, rows in enumerate(plan.score_rows(scores)):
        np.testing.assert_allclose(rows, ref.knorm_scores(k[b]), rtol=1e-6)
    keep = plan.select(scores)
    for b, rows in enumerate(plan.keep_rows(keep)):
        for h in range(H):
            assert list(rows[h]) == ref.select(plan.score_rows(scores)[b][h], budget, set())


def test_streaming_scores_sinks_and_recent(ctx, rng):
    n, budget = 30, 10
    k, v = hf_arrays(rng, 1, n)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[budget],
                    method="streaming", sink_tokens=4, dtype="f32")
    scores = plan.score(kvc.hf_cache(k, v))
    np.testing.assert_array_equal(plan.score_rows(scores)[0], ref.streaming_scores(H, n))
    keep = plan.select(scores)
    assert plan.keep_rows(keep)[0].tolist() == [list(range(4)) + list(range(n - 6, n))] * H


@pytest.mark.parametrize("seq_lens", [[50], [50, 37]])
def test_snapkv_scores_match_numpy(ctx, rng, seq_lens):
    B, n_max, w = len(seq_lens), max(seq_lens), 8
    k, v = hf_arrays(rng, B, n_max)
    q_all = rng.standard_normal((B, HQ, n_max, D)).astype(np.float32)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, budgets=20, window=w,
                    pool_kernel=5, dtype="f32")
    assert plan.info.obs_total == B * w
    queries = plan.gather_queries(q_all)
    assert queries.shape == (B * w, HQ, D) and queries.flags.c_contiguous
    scores = plan.score(kvc.hf_cache(k, v), queries)
    for b, rows in enumerate(plan.score_rows(scores)):
        n = seq_lens[b]
        pos = plan.obs_positions_of(b)
        assert list(pos) == list(range(n - w, n))
        expect = ref.snapkv_scores(k[b][:, :n], q_all[b][:, pos].transpose(1, 0, 2), pos, kernel=5)
        np.testing.assert_allclose(rows, expect, rtol=2e-5, atol=1e-7)


def test_h2o_and_tova_scores_match_numpy(ctx, rng):
    n = 24
    k, v = hf_arrays(rng, 1, n)
    q_all = rng.standard_normal((1, HQ, n, D)).astype(np.float32)
    cache = kvc.hf_cache(k, v)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[10], method="h2o",
                    window=n, dtype="f32")
    pos = plan.obs_positions_of(0)
    s = plan.score(cache, plan.gather_queries(q_all))
    np.testing.assert_allclose(plan.score_rows(s)[0], ref.h2o_scores(k[0], q_all[0][:, pos].transpose(1, 0, 2), pos),
                               rtol=2e-5, atol=1e-7)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[10], method="tova",
                    dtype="f32")
    assert list(plan.obs_positions) == [n - 1]
    s = plan.score(cache, plan.gather_queries(q_all))
    np.testing.assert_allclose(plan.score_rows(s)[0], ref.tova_scores(k[0], q_all[0][:, n - 1]), rtol=2e-5, atol=1e-7)


def test_score_accumulate_adds(ctx, rng):
    k, v = hf_arrays(rng, 1, 20)
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[20], budgets=[5], method="knorm",
                    dtype="f32")
    cache = kvc.hf_cache(k, v)
    once = plan.score(cache)
    acc = once.copy()
    out = plan.score(cache, out=acc, accumulate=True)
    assert out is acc
    np.testing.assert_allclose(acc, 2 * once, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# selection: ties, NaN, protection, quotas


def test_select_ties_prefer_later_positions_and_nan_last(ctx):
    n = 10
    plan = ctx.plan(num_q_heads=1, num_kv_heads=1, head_dim=4, seq_lens=[n], budgets=[4], method="knorm",
                    dtype="f32")
    scores = np.array([1, 1, 1, 1, 1, np.nan, -np.inf, 1, 0, 1], dtype=np.float32)
    keep = plan.select(scores)
    assert keep.tolist() == ref.select(scores, 4, set()) == [3, 4, 7, 9]
    scores = np.array([np.nan] * 7 + [-np.inf] * 3, dtype=np.float32)
    assert plan.select(scores).tolist() == [6, 7, 8, 9]


def test_select_with_protection_matches_reference(ctx, rng):
    n, budget = 60, 20
    spans = [kvc.Span(5, 12, "protect"), kvc.Span(40, 44, "protect")]
    plan = ctx.plan(num_q_heads=2, num_kv_heads=2, head_dim=8, seq_lens=[n], budgets=[budget], spans=[spans],
                    method="knorm", sink_tokens=2, recent_tokens=3, dtype="f32")
    scores = rng.standard_normal(plan.info.score_elems).astype(np.float32)
    keep = plan.select(scores)
    protected = set(range(2)) | set(range(n - 3, n)) | set(range(5, 12)) | set(range(40, 44))
    for h, row in enumerate(plan.keep_rows(keep)[0]):
        assert list(row) == ref.select(plan.score_rows(scores)[0][h], budget, protected)
    np.testing.assert_array_equal(plan.span_quotas, [7, 4])  # PROTECT span -> its length


def test_fair_quotas_and_selection(ctx, rng):
    n, budget = 100, 30
    spans = [kvc.Span(0, 20), kvc.Span(20, 70, weight=2.0), kvc.Span(80, 100)]
    plan = ctx.plan(num_q_heads=2, num_kv_heads=2, head_dim=8, seq_lens=[n], budgets=[budget], spans=[spans],
                    method="knorm", fairness=1.0, dtype="f32")
    lengths, weights = [20, 50, 20, 10], [1, 2, 1, 1]  # + the implicit partition [70, 80)
    expect = ref.quotas(lengths, weights, [0, 0, 0, 0], budget)
    np.testing.assert_array_equal(plan.span_quotas, expect[:3])
    assert plan.implicit_quotas.tolist() == [expect[3]]
    scores = rng.standard_normal(plan.info.score_elems).astype(np.float32)
    keep = plan.select(scores)
    parts = [list(range(0, 20)), list(range(20, 70)), list(range(80, 100)), list(range(70, 80))]
    qs = list(expect[:3]) + [expect[3]]
    for h, row in enumerate(plan.keep_rows(keep)[0]):
        assert list(row) == ref.select(plan.score_rows(scores)[0][h], budget, set(), parts, qs)
    counts = plan.retention(keep)
    for h, row in enumerate(plan.count_rows(counts)[0]):
        for i, s in enumerate(spans):
            assert row[i] == np.count_nonzero((plan.keep_rows(keep)[0][h] >= s.start) &
                                              (plan.keep_rows(keep)[0][h] < s.end))
    rates = plan.retention_rates(counts)[0]
    assert rates.shape == (2, 3)


def test_equal_spans_get_equal_quotas_with_fairness_one(ctx):
    plan = ctx.plan(num_q_heads=1, num_kv_heads=1, head_dim=8, seq_lens=[200, 120], budgets=[50, 60],
                    spans=[[kvc.Span(0, 100), kvc.Span(100, 200)], [(0, 60), (60, 120)]], method="knorm",
                    fairness=1.0, dtype="f32")
    assert plan.span_quotas_of(0).tolist() == [25, 25]
    assert plan.span_quotas_of(1).tolist() == [30, 30]
    assert plan.implicit_quotas.tolist() == [-1, -1]
    half = ctx.plan(num_q_heads=1, num_kv_heads=1, head_dim=8, seq_lens=[200], budgets=[50],
                    spans=[[kvc.Span(0, 100), kvc.Span(100, 200)]], method="knorm", fairness=0.5, dtype="f32")
    assert sum(half.span_quotas) == 25  # F = floor(0.5 * 50 + 0.5)


# ---------------------------------------------------------------------------------------------
# compaction in every layout


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_hf_compress_roundtrip(ctx, rng, dtype):
    B, n = 2, 48
    k, v = hf_arrays(rng, B, n, dtype)
    k0, v0 = k.copy(), v.copy()
    q_all = rng.standard_normal((B, HQ, n, D)).astype(dtype)
    tag = "f32" if dtype == np.float32 else "f16"
    plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n, 40], budgets=[16, 100], window=8,
                    dtype=tag, sink_tokens=2)
    cache = kvc.hf_cache(k, v)
    queries = plan.gather_queries(q_all)
    # stage by stage on a copy, then kvc_compress on the original: same keep, same cache
    k2, v2 = k.copy(), v.copy()
    cache2 = kvc.hf_cache(k2, v2)
    scores = plan.score(cache2, queries)
    keep_staged = plan.select(scores)
    plan.compact(cache2, keep_staged)
    keep = plan.compress(cache, queries)
    np.testing.assert_array_equal(keep, keep_staged)
    np.testing.assert_array_equal(k, k2)
    assert plan.new_lengths.tolist() == [16, 40]
    rows = plan.keep_rows(keep)
    assert rows[1].tolist() == [list(range(40))] * H  # budget >= length: untouched
    rows_equal_gather(plan, cache, (k0, v0), keep)
    np.testing.assert_array_equal(k[1], k0[1])


def test_hf_cache_noncontiguous_strides(ctx, rng):
    # (batch, n, heads, D) storage viewed as (batch, heads, n, D): HF caches from transposes
    B, n = 2, 32
    base_k = rng.standard_normal((B, n, H, D)).astype(np.float32)
    base_v = rng.standard_normal((B, n, H, D)).astype(np.float32)
    k, v = base_k.transpose(0, 2, 1, 3), base_v.transpose(0, 2, 1, 3)
    k0, v0 = k.copy(), v.copy()
    cache = kvc.hf_cache(k, v)
    assert cache.strides == (n * H * D, H * D, D)
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n, n], budgets=10, method="knorm",
                    dtype="f32")
    keep = plan.compress(cache)
    rows_equal_gather(plan, cache, (k0, v0), keep)
    for b, rows in enumerate(plan.keep_rows(keep)):
        for h in range(H):
            assert list(rows[h]) == ref.select(ref.knorm_scores(k0[b])[h], 10, set())


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_vllm_cache_roundtrip(ctx, rng, layout):
    num_blocks, bs = 12, 4
    shape = (num_blocks, bs, H, D) if layout == "NHD" else (num_blocks, H, bs, D)
    kc = rng.standard_normal(shape).astype(np.float32)
    vc = rng.standard_normal(shape).astype(np.float32)
    table = np.array([[7, 2, 9, 0, 0], [1, 11, 4, 5, 3]], dtype=np.int32)
    seq_lens = [10, 19]
    cache = kvc.vllm_cache(kc, vc, table, layout=layout)
    assert cache.num_pages == num_blocks and cache.max_pages == 5

    def dense(pool, b, n):
        pages = table[b][np.arange(n) // bs]
        slots = np.arange(n) % bs
        return pool[pages, slots] if layout == "NHD" else pool[pages, :, slots].transpose(0, 1, 2)

    originals_k = [dense(kc, b, n).transpose(1, 0, 2) for b, n in enumerate(seq_lens)]  # (H, n, D)
    originals_v = [dense(vc, b, n).transpose(1, 0, 2) for b, n in enumerate(seq_lens)]
    for b, n in enumerate(seq_lens):
        np.testing.assert_array_equal(cache.read(b, n, "k"), originals_k[b])
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, budgets=[6, 9], method="knorm",
                    dtype="f32")
    keep = plan.compress(cache)
    for b in range(2):
        for h in range(H):
            assert list(plan.keep_rows(keep)[b][h]) == ref.select(ref.knorm_scores(originals_k[b])[h],
                                                                  plan.new_lengths[b], set())
    rows_equal_gather(plan, cache, (originals_k, originals_v), keep)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_flashinfer_csr_roundtrip_and_combined_tensor(ctx, rng, layout):
    pages, ps = 10, 8
    inner = (ps, H, D) if layout == "NHD" else (H, ps, D)
    kv = rng.standard_normal((pages, 2) + inner).astype(np.float32)
    indptr = np.array([0, 3, 5], dtype=np.int32)
    indices = np.array([4, 0, 9, 6, 2], dtype=np.int32)
    seq_lens = [20, 9]
    cache = kvc.flashinfer_cache(kv, None, indptr, indices, layout=layout)
    originals_k = [cache.read(b, n, "k") for b, n in enumerate(seq_lens)]
    originals_v = [cache.read(b, n, "v") for b, n in enumerate(seq_lens)]
    # read() agrees with direct indexing of the K half
    b, t = 0, 13
    page, slot = indices[indptr[b] + t // ps], t % ps
    direct = kv[page, 0, slot] if layout == "NHD" else kv[page, 0, :, slot]
    np.testing.assert_array_equal(originals_k[0][:, t], direct)
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=seq_lens, budgets=[7, 5], method="knorm",
                    dtype="f32")
    keep = plan.compress(cache)
    rows_equal_gather(plan, cache, (originals_k, originals_v), keep)


def test_general_paged_kv_and_extras(ctx, rng):
    ps, pages = 4, 6
    flat_k = rng.standard_normal(pages * ps * H * D).astype(np.float32)
    flat_v = rng.standard_normal(pages * ps * H * D).astype(np.float32)
    cache = kvc.paged_kv(flat_k, flat_v, ps, page_table=np.array([[3, 1, 5]]), strides=(ps * H * D, H * D, D),
                         num_kv_heads=H, head_dim=D)
    assert cache.num_pages == pages
    n = 11
    k0, v0 = [cache.read(0, n, "k")], [cache.read(0, n, "v")]
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[5], method="streaming",
                    sink_tokens=1, dtype="f32")
    scores = plan.score(cache)
    keep = plan.select(scores)
    extra = np.arange(plan.info.score_elems, dtype=np.float32)
    before = extra.copy()
    plan.compact(cache, keep, extras=[extra])
    rows_equal_gather(plan, cache, (k0, v0), keep)
    for h, row in enumerate(plan.keep_rows(keep)[0]):
        np.testing.assert_array_equal(plan.score_rows(extra)[0][h][:5], plan.score_rows(before)[0][h][row])
        np.testing.assert_array_equal(plan.score_rows(extra)[0][h][5:], plan.score_rows(before)[0][h][5:])


# ---------------------------------------------------------------------------------------------
# dtypes


def test_bf16_raw_uint16(ctx, rng):
    n = 24
    f = rng.standard_normal((1, H, n, D)).astype(np.float32)
    raw_k = (f.view(np.uint32) >> 16).astype(np.uint16)  # truncated bf16 bits
    raw_v = raw_k[..., ::-1].copy()
    as_f32 = (raw_k.astype(np.uint32) << 16).view(np.float32)
    k0, v0 = raw_k.copy(), raw_v.copy()
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[8], method="knorm",
                    dtype="bf16")
    cache = kvc.hf_cache(raw_k, raw_v)
    scores = plan.score(cache)
    np.testing.assert_allclose(plan.score_rows(scores)[0], ref.knorm_scores(as_f32[0]), rtol=1e-6)
    keep = plan.select(scores)
    plan.compact(cache, keep)
    rows_equal_gather(plan, cache, (k0, v0), keep)
    with pytest.raises(TypeError, match="dtype"):
        ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[8], method="knorm",
                 dtype="f16").score(cache)


def test_bf16_ml_dtypes(ctx, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes not installed")
    n = 16
    k = rng.standard_normal((1, H, n, D)).astype(ml_dtypes.bfloat16)
    v = rng.standard_normal((1, H, n, D)).astype(ml_dtypes.bfloat16)
    k0, v0 = k.copy(), v.copy()
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[6], method="knorm",
                    dtype=ml_dtypes.bfloat16)
    assert plan.dtype == "bf16"
    cache = kvc.hf_cache(k, v)
    scores = plan.score(cache)
    np.testing.assert_allclose(plan.score_rows(scores)[0], ref.knorm_scores(k0[0].astype(np.float32)), rtol=1e-6)
    keep = plan.compress(cache)
    rows_equal_gather(plan, cache, (k0, v0), keep)


def test_fp8_compaction_as_uint8(ctx, rng):
    n = 20
    k = rng.integers(0, 255, (2, H, n, D), dtype=np.uint8)
    v = rng.integers(0, 255, (2, H, n, D), dtype=np.uint8)
    k0, v0 = k.copy(), v.copy()
    plan = ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n, n], budgets=[5, 7],
                    method="streaming", sink_tokens=2, dtype="fp8_e4m3")
    cache = kvc.hf_cache(k, v)
    keep = plan.compress(cache)
    rows_equal_gather(plan, cache, (k0, v0), keep)
    assert plan.keep_rows(keep)[0][0].tolist() == [0, 1, 17, 18, 19]
    with pytest.raises(kvc.NotSupportedError, match="no fp8 queries"):
        ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[5], method="snapkv",
                 dtype="fp8_e4m3")


def e4m3_bytes(rng, shape):
    """fp8 e4m3 codes built by hand (no ml_dtypes): random sign, exponent field 0..8 (subnormals
    included, magnitudes below 4 so logits stay moderate), random mantissa."""
    sign = rng.integers(0, 2, shape, dtype=np.uint8) << 7
    exponent = rng.integers(0, 9, shape, dtype=np.uint8) << 3
    return sign | exponent | rng.integers(0, 8, shape, dtype=np.uint8)


def e4m3_decode(codes):
    """By the format's definition: 1 sign, 4 exponent bits of bias 7, 3 mantissa bits."""
    c = codes.astype(np.int64)
    e, m = (c >> 3) & 15, c & 7
    magnitude = np.where(e == 0, m * 2.0 ** -9, (8 + m) * 2.0 ** (e - 10))
    return np.where(c & 0x80, -magnitude, magnitude)


def test_fp8_keys_scored_with_k_scale(ctx, rng):
    """SnapKV, H2O and KNORM on fp8 keys with a per-KV-head k_scale and f16 queries, against numpy on
    the decoded keys times their scale; then compress keeps the bytes of the selected rows."""
    n, w = 40, 8
    k = e4m3_bytes(rng, (1, H, n, D))
    v = rng.integers(0, 255, (1, H, n, D), dtype=np.uint8)
    scales = np.array([0.55, 1.9], dtype=np.float32)
    keys = e4m3_decode(k[0]) * scales.astype(np.float64)[:, None, None]
    q_all = rng.standard_normal((1, HQ, n, D)).astype(np.float16)
    for method in ("snapkv", "h2o", "knorm"):
        plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[12], method=method,
                        window=w, dtype="fp8_e4m3", query_dtype="f16", k_scale=scales)
        assert plan.query_dtype == "f16"
        queries = plan.gather_queries(q_all) if method != "knorm" else None
        pos = plan.obs_positions_of(0)
        q_obs = q_all[0][:, pos].transpose(1, 0, 2).astype(np.float64)
        expect = {"snapkv": lambda: ref.snapkv_scores(keys, q_obs, pos, kernel=5),
                  "h2o": lambda: ref.h2o_scores(keys, q_obs, pos),
                  "knorm": lambda: ref.knorm_scores(keys)}[method]()
        cache = kvc.hf_cache(k.copy(), v.copy())
        np.testing.assert_allclose(plan.score_rows(plan.score(cache, queries))[0], expect, rtol=2e-5, atol=1e-7)
        before = (k.copy(), v.copy())
        rows_equal_gather(plan, cache, before, plan.compress(cache, queries))
    with pytest.raises(TypeError, match="query dtype f16"):
        plan = ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[12], window=w,
                        dtype="fp8_e4m3", query_dtype="f16", k_scale=0.5)
        plan.score(kvc.hf_cache(k.copy(), v.copy()), plan.gather_queries(q_all).astype(np.float32))
    with pytest.raises(kvc.InvalidValueError, match="k_scale is -1"):
        ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[12], method="knorm",
                 dtype="fp8_e4m3", k_scale=-1.0)
    with pytest.raises(ValueError, match="3 per-head scales for 2 KV heads"):
        ctx.plan(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n], budgets=[12], method="knorm",
                 dtype="fp8_e4m3", k_scale=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# plan read-outs


def test_plan_readouts(ctx):
    plan = ctx.plan(num_q_heads=8, num_kv_heads=2, head_dim=64, seq_lens=[100, 30], budgets=[40, 50], window=16,
                    spans=[[kvc.Span(0, 50), (50, 100)], []])
    info = plan.info
    assert (info.batch, info.num_kv_heads, info.total_tokens, info.total_kept) == (2, 2, 130, 70)
    assert info.obs_total == 32 and info.score_elems == 260 and info.keep_elems == 140
    assert info.total_spans == 2 and info.count_elems == 4
    assert plan.obs_indptr.tolist() == [0, 16, 32]
    assert plan.obs_positions_of(1).tolist() == list(range(14, 30))
    assert plan.new_lengths.tolist() == [40, 30]
    assert plan.workspace_size("compress") >= 4 * (info.score_elems + info.keep_elems)
    for op in ("score", "select", "compact", "retention", "compress"):
        assert plan.workspace_size(op) >= 0
    with pytest.raises(ValueError, match="op"):
        plan.workspace_size("gather")
    assert plan.dtype == "f16" and "snapkv" in repr(plan)
