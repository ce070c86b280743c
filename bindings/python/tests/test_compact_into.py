"""Out-of-place compaction (kvc_compact_into / kvc_compress_into) from Python: a vLLM-style pool
whose two requests share their first two blocks (prefix caching). The kept rows land in the new
blocks exactly as numpy gathers them from a copy of the pool taken before; every other byte of
the pool, the shared blocks included, is unchanged; in place, the same table is refused."""
import numpy as np
import pytest

import kvcompress as kvc

H, D, BLOCK, BLOCKS = 2, 16, 16, 40
SEQ_LENS, BUDGETS = [50, 40], [20, 40]  # the second request keeps all: copied whole
SOURCE = np.array([[3, 7, 1, 9], [3, 7, 12, 0]], dtype=np.int32)  # blocks 3 and 7 shared
DST = np.array([[20, 21, 0], [22, 23, 24]], dtype=np.int32)       # ceil(k / 16) new blocks each


def pools(rng):
    k = rng.standard_normal((BLOCKS, BLOCK, H, D)).astype(np.float32)
    v = rng.standard_normal((BLOCKS, BLOCK, H, D)).astype(np.float32)
    return k, v


def plan_for(ctx):
    return ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=SEQ_LENS, budgets=BUDGETS, dtype="f32",
                    method="knorm")


def expected_pools(k, v, keep):
    """numpy: destination token j of request b, head h <- source token keep[j] (j when k = n)."""
    want_k, want_v = k.copy(), v.copy()
    offset = 0
    for b, (n, budget) in enumerate(zip(SEQ_LENS, BUDGETS)):
        kept = min(n, budget)
        for h in range(H):
            rows = keep[offset + h * kept: offset + (h + 1) * kept] if kept < n else np.arange(n)
            for j, t in enumerate(rows):
                src_block, dst_block = SOURCE[b, t // BLOCK], DST[b, j // BLOCK]
                want_k[dst_block, j % BLOCK, h] = k[src_block, t % BLOCK, h]
                want_v[dst_block, j % BLOCK, h] = v[src_block, t % BLOCK, h]
        offset += H * kept
    return want_k, want_v


def test_compact_into_writes_only_the_new_blocks(ctx, rng):
    k, v = pools(rng)
    plan = plan_for(ctx)
    cache = kvc.vllm_cache(k, v, SOURCE)
    keep = plan.select(plan.score(cache))
    want_k, want_v = expected_pools(k, v, keep)
    assert plan.compact(cache, keep, dst_table=DST) is cache
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    assert plan.status("compact").tolist() == [[0, 0]]
    # read back through the destination table: the kept tokens in order
    after = kvc.vllm_cache(k, v, DST)
    assert after.read(1, 40).shape == (H, 40, D)
    np.testing.assert_array_equal(after.read(1, 40), kvc.vllm_cache(want_k, want_v, SOURCE).read(1, 40))


def test_csr_destination_and_compress_into(ctx, rng):
    k, v = pools(rng)
    plan = plan_for(ctx)
    cache = kvc.vllm_cache(k, v, SOURCE)
    keep = plan.select(plan.score(cache))
    want_k, want_v = expected_pools(k, v, keep)
    indices = np.array([20, 21, 22, 23, 24], dtype=np.int32)
    indptr = np.array([0, 2, 5], dtype=np.int32)
    got = plan.compress(cache, dst_table=indices, dst_indptr=indptr)
    np.testing.assert_array_equal(got, keep)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)


def test_unsafe_tables_are_refused_untouched(ctx, rng):
    k, v = pools(rng)
    k0, v0 = k.copy(), v.copy()
    plan = plan_for(ctx)
    cache = kvc.vllm_cache(k, v, SOURCE)
    keep = plan.select(plan.score(cache))
    with pytest.raises(kvc.InvalidValueError, match="used twice"):  # in place would corrupt the sharer
        plan.compact(cache, keep)
    overlap = DST.copy()
    overlap[1, 2] = 7  # a shared source block as a destination
    with pytest.raises(kvc.InvalidValueError, match=r"dst page id 7 \(sequence 1, page 2 of its destination list\) "
                                                    r"is also a source page"):
        plan.compact(cache, keep, dst_table=overlap)
    with pytest.raises(ValueError, match="dst_table: a dense destination table must be 2-D"):
        plan.compact(cache, keep, dst_table=DST[0])
    with pytest.raises(ValueError, match="dst_table: the destination pages are needed"):
        plan.compact(cache, keep, dst_indptr=np.array([0, 2, 5], dtype=np.int32))
    np.testing.assert_array_equal(k, k0)
    np.testing.assert_array_equal(v, v0)


def test_status_flag_names_match_the_header():
    header = open(__file__.rsplit("/bindings/", 1)[0] + "/include/kvcompress.h").read()
    for name, value in kvc.COMPACT_STATUS.items():
        assert f"KVC_COMPACT_{name.upper()} = {value}" in header, name


def test_layers_into_match_single_layer_calls(ctx, rng):
    plan = plan_for(ctx)
    layers = [pools(rng) for _ in range(3)]
    caches = [kvc.vllm_cache(k, v, SOURCE) for k, v in layers]
    keep = np.stack([plan.select(plan.score(c)) for c in caches])
    want = [expected_pools(k, v, keep[i]) for i, (k, v) in enumerate(layers)]
    plan.compact_layers(caches, keep, dst_table=DST)
    for (k, v), (want_k, want_v) in zip(layers, want):
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)
    assert plan.status("compact").tolist() == [[0, 0]] * 3
    layers = [pools(rng) for _ in range(3)]
    caches = [kvc.vllm_cache(k, v, SOURCE) for k, v in layers]
    keep = np.stack([plan.select(plan.score(c)) for c in caches])
    want = [expected_pools(k, v, keep[i]) for i, (k, v) in enumerate(layers)]
    np.testing.assert_array_equal(plan.compress_layers(caches, dst_table=DST), keep)
    for (k, v), (want_k, want_v) in zip(layers, want):
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)
