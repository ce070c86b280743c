"""The binding cannot be talked into passing the library something other than what it checked:
read-only outputs are refused, a PagedKV cannot change after construction, arguments are not
coerced (16.9 is not 16, '0.5' is not 0.5, 2**32 + 16 is not 16), K and V views that overlap are
refused by the library, and a context that cannot be made says why."""
import mmap

import numpy as np
import pytest

import kvcompress as kvc

H, D, PS, PAGES = 2, 8, 4, 6


def spans_plan(ctx, **kw):
    args = dict(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[16], budgets=[6], method="knorm", dtype="f32",
                spans=[[kvc.Span(0, 8), kvc.Span(8, 16)]])
    args.update(kw)
    return ctx.plan(**args)


def pool(rng, pages=PAGES):
    return rng.standard_normal((pages, PS, H, D)).astype(np.float32)


# ---- read-only outputs ----------------------------------------------------------------------


def test_retention_refuses_read_only_out(ctx, tmp_path):
    plan = spans_plan(ctx)
    keep = np.tile(np.arange(6, dtype=np.int32), H)
    frozen = np.frombuffer(bytes(4 * plan.info.count_elems), dtype=np.int32)
    with pytest.raises(ValueError, match="out: the array is read-only"):
        plan.retention(keep, out=frozen)
    assert not frozen.any()
    path = tmp_path / "counts.bin"
    path.write_bytes(bytes(4 * plan.info.count_elems))
    mapped = np.memmap(path, dtype=np.int32, mode="r", shape=(plan.info.count_elems,))
    with pytest.raises(ValueError, match="read-only"):
        plan.retention(keep, out=mapped)
    good = np.zeros(plan.info.count_elems, dtype=np.int32)
    plan.retention(keep, out=good)
    assert good.tolist() == [6, 0] * H


def test_every_output_refuses_read_only_memory(ctx, rng):
    plan = spans_plan(ctx)
    k, v = pool(rng), pool(rng)
    cache = kvc.vllm_cache(k, v, [[0, 1, 2, 3]])
    scores = plan.score(cache)
    ro_scores = scores.copy()
    ro_scores.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        plan.score(cache, out=ro_scores)
    ro_keep = np.zeros(plan.info.keep_elems, dtype=np.int32)
    ro_keep.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        plan.select(scores, out=ro_keep)
    with pytest.raises(ValueError, match="read-only"):
        plan.compact(cache, plan.select(scores), extras=[ro_scores])
    snap = spans_plan(ctx, method="snapkv", window=4, pool_kernel=1)
    ro_q = np.zeros((snap.info.obs_total, H, D), dtype=np.float32)
    ro_q.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        snap.gather_packed_queries(np.ones((16, H, D), np.float32), np.array([0, 16], np.int32), out=ro_q)
    assert not ro_q.any()
    buf = mmap.mmap(-1, k.nbytes, prot=mmap.PROT_READ)  # a read-only mapping as the K pool
    ro_k = np.frombuffer(buf, dtype=np.float32).reshape(k.shape)
    with pytest.raises(ValueError, match="read-only"):
        plan.compress(kvc.vllm_cache(ro_k, v, [[0, 1, 2, 3]]))


# ---- a PagedKV is frozen --------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("num_pages", 1000), ("stride_page", 10**6), ("stride_token", 1), ("stride_head", 1), ("page_size", 64),
    ("num_kv_heads", 1), ("head_dim", 4), ("max_pages", 100), ("k", None), ("v", None), ("page_table", None),
    ("page_indptr", None), ("dtype", "f16"),
])
def test_paged_kv_fields_cannot_change(rng, field, value):
    cache = kvc.vllm_cache(pool(rng), pool(rng), [[0, 1, 2, 3]])
    before = getattr(cache, field)
    with pytest.raises(AttributeError, match="cannot be changed"):
        setattr(cache, field, value)
    after = getattr(cache, field)
    assert after is before or np.array_equal(after, before)
    with pytest.raises(AttributeError):
        delattr(cache, field)


def test_arrays_changed_after_construction_are_refused(ctx, rng):
    """The fields are frozen; the arrays they point at are re-read at every use, and a pointer, shape
    or strides that no longer match what was checked are refused."""
    plan = spans_plan(ctx)
    k, v = pool(rng), pool(rng)
    cache = kvc.vllm_cache(k, v, [[0, 1, 2, 3]])
    plan.compress(cache)
    k.shape = (PAGES * PS, H, D)  # same memory, another shape: numpy allows it in place
    with pytest.raises(ValueError, match="cache.k changed since the PagedKV was made"):
        plan.compress(cache)


# ---- no coercion ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(head_dim=16.9), TypeError, "head_dim: expected an integer, got float 16.9"),
    (dict(head_dim=8.0), TypeError, "head_dim: expected an integer"),
    (dict(head_dim="8"), TypeError, "head_dim: expected an integer, got str"),
    (dict(num_kv_heads=True), TypeError, "num_kv_heads: expected an integer, got bool"),
    (dict(head_dim=2**32 + 8), ValueError, "head_dim: 4294967304 does not fit int32"),
    (dict(window=1.5, method="snapkv"), TypeError, "window"),
    (dict(sink_tokens=-2**31 - 1), ValueError, "sink_tokens"),
    (dict(budgets=6.5), TypeError, "budgets"),
    (dict(fairness="0.5"), TypeError, "fairness: expected a real number, got str '0.5'"),
    (dict(fairness=None), TypeError, "fairness"),
    (dict(scale="1"), TypeError, "scale"),
    (dict(span_local=2), ValueError, "span_local"),
    (dict(span_local="yes"), TypeError, "span_local"),
    (dict(spans=[[(0, 8.5)]]), TypeError, "Span.end"),
])
def test_plan_arguments_are_not_coerced(ctx, kw, exc, needle):
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        spans_plan(ctx, **kw)


def test_numpy_scalars_and_exact_values_still_work(ctx):
    plan = spans_plan(ctx, head_dim=np.int64(D), num_kv_heads=np.int32(H), fairness=np.float32(0.5), scale=1,
                      budgets=np.int32(6), span_local=np.bool_(False))
    assert plan.head_dim == D and plan.fairness == 0.5


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(page_size=4.5), TypeError, "page_size: expected an integer, got float"),
    (dict(strides=(PS * H * D, H * D, 1.5)), TypeError, "stride_head"),
    (dict(strides=(2**63, H * D, D)), ValueError, "stride_page: 9223372036854775808 does not fit int64"),
    (dict(num_pages=2**31), ValueError, "num_pages"),
    (dict(head_dim=np.float64(8)), TypeError, "head_dim"),
])
def test_descriptor_arguments_are_not_coerced(rng, kw, exc, needle):
    args = dict(page_size=PS, strides=(PS * H * D, H * D, D), num_kv_heads=H, head_dim=D)
    args.update(kw)
    with pytest.raises(exc, match=needle):
        kvc.paged_kv(pool(rng), pool(rng), page_table=[[0, 1]], **args)


def test_span_fields_are_checked():
    with pytest.raises(TypeError, match="Span.weight: expected a real number, got str"):
        kvc.Span(0, 4, "fair", "2")
    with pytest.raises(TypeError, match="Span.start"):
        kvc.Span(0.5, 4)
    assert kvc.Span(np.int64(1), 4, "protect").start == 1


def test_context_device_is_an_integer():
    with pytest.raises(TypeError, match="device"):
        kvc.Context("cpu", device=0.5)


# ---- overlapping K and V views --------------------------------------------------------------


def test_overlapping_numpy_views_are_refused(ctx, rng):
    plan = spans_plan(ctx)
    base = pool(rng, PAGES + 1)
    before = base.copy()
    for shift in (base[1:], base.reshape(-1)[3:3 + PAGES * PS * H * D].reshape(PAGES, PS, H, D)):
        cache = kvc.vllm_cache(base[:PAGES], shift, [[0, 1, 2, 3]])
        with pytest.raises(kvc.InvalidValueError, match="overlap"):
            plan.compress(cache)
        assert np.array_equal(base, before)


def test_shared_allocations_compress_like_separate_pools(ctx, rng):
    plan = spans_plan(ctx)
    table = [[3, 0, 5, 1]]
    kv = rng.standard_normal((2, PAGES, PS, H, D)).astype(np.float32)  # vLLM (2, blocks, ...)
    inter = np.ascontiguousarray(kv.transpose(1, 0, 2, 3, 4))  # FlashInfer (pages, 2, ...)
    k, v = kv[0].copy(), kv[1].copy()
    ref_keep = plan.compress(kvc.vllm_cache(k, v, table))
    assert np.array_equal(plan.compress(kvc.vllm_cache(kv[0], kv[1], table)), ref_keep)
    assert np.array_equal(kv[0], k) and np.array_equal(kv[1], v)
    fi = kvc.flashinfer_cache(inter, None, [0, 4], [3, 0, 5, 1])
    assert np.array_equal(plan.compress(fi), ref_keep)
    assert np.array_equal(inter[:, 0], k) and np.array_equal(inter[:, 1], v)


# ---- a context that cannot be made ----------------------------------------------------------


def test_failed_context_says_why():
    try:
        kvc.Context("cuda", 7).close()
    except kvc.KvcError as e:
        assert e.function == "kvc_context_create"
        # the library's own reason: no device, or how many there are
        assert "kvc_context_create: backend CUDA, device 7" in e.detail, e.detail
        assert ("no usable device" in e.detail) or ("there are" in e.detail), e.detail
    else:
        pytest.skip("this machine has 8 CUDA devices")
