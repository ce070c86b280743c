"""Every error path: binding-side checks (ValueError/TypeError naming the argument) and C statuses
mapped to KvcError subclasses carrying the status name and kvc_last_error's detail."""
import gc

import numpy as np
import pytest

import kvcompress as kvc
from kvcompress import _lib

H, D = 2, 8


def small_plan(ctx, **kw):
    args = dict(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[16], budgets=[4], method="knorm", dtype="f32")
    args.update(kw)
    return ctx.plan(**args)


def hf(n=16, B=1, dtype=np.float32):
    return (np.zeros((B, H, n, D), dtype=dtype), np.zeros((B, H, n, D), dtype=dtype))


# ---------------------------------------------------------------------------------------------
# C statuses -> exception classes


@pytest.mark.parametrize("kw,cls,needle", [
    (dict(seq_lens=[0]), kvc.InvalidValueError, "seq_lens[0]"),
    (dict(num_q_heads=3), kvc.InvalidValueError, "num_q_heads"),
    (dict(window=0, method="snapkv"), kvc.InvalidValueError, "window"),
    (dict(pool_kernel=4, method="snapkv"), kvc.InvalidValueError, "pool_kernel"),
    (dict(fairness=1.5), kvc.InvalidValueError, "fairness"),
    (dict(spans=[[kvc.Span(10, 30)]]), kvc.InvalidValueError, "span"),
    (dict(sink_tokens=5), kvc.BudgetError, "sequence 0"),
    (dict(head_dim=300), kvc.NotSupportedError, "head_dim"),
    (dict(dtype="fp8_e4m3", method="snapkv"), kvc.NotSupportedError, "no fp8 queries"),
    (dict(dtype="fp8_e4m3", method="knorm", k_scale=0.0), kvc.InvalidValueError, "k_scale is 0"),
    (dict(query_dtype="bf16"), kvc.NotSupportedError, "query_dtype KVC_DTYPE_BF16"),
])
def test_plan_status_to_exception(ctx, kw, cls, needle):
    with pytest.raises(cls) as info:
        small_plan(ctx, **kw)
    err = info.value
    assert isinstance(err, kvc.KvcError)
    assert err.status == cls.status and err.status_name == _lib.lib().kvc_status_name(cls.status).decode()
    assert err.function == "kvc_plan_create"
    assert needle in err.detail and needle in str(err)
    assert ctx.last_error == err.detail


def test_budget_error_is_also_value_error(ctx):
    with pytest.raises(ValueError):
        small_plan(ctx, recent_tokens=8)


def test_no_device_or_cuda(ctx):
    try:
        c = kvc.Context("cuda", 0)
    except kvc.NoDeviceError as e:
        assert e.status_name == "KVC_ERROR_NO_DEVICE" and "cuda" in str(e).lower()
    else:
        c.close()
        pytest.skip("this library has a usable CUDA device: no NO_DEVICE error to provoke")


def test_bad_backend_and_device():
    with pytest.raises(ValueError, match="backend"):
        kvc.Context("tpu")
    with pytest.raises(ValueError, match="device"):
        kvc.Context("cpu", -1)


def test_c_detail_from_execute_calls(ctx):
    # page id past num_pages: caught by the C library on the CPU backend, named in its detail
    pool_k = np.zeros((4, 4, H, D), np.float32)
    pool_v = np.zeros_like(pool_k)
    plan = small_plan(ctx, seq_lens=[8], budgets=[3])
    bad = kvc.vllm_cache(pool_k, pool_v, np.array([[1, 7]], np.int32))
    with pytest.raises(kvc.InvalidValueError) as info:
        plan.score(bad)
    assert info.value.function == "kvc_score" and "page id 7" in info.value.detail
    shared = kvc.vllm_cache(pool_k, pool_v, np.array([[1, 2], [2, 3]], np.int32))
    plan2 = small_plan(ctx, seq_lens=[8, 8], budgets=[3, 3])
    keep = plan2.select(np.zeros(plan2.info.score_elems, np.float32))
    with pytest.raises(kvc.InvalidValueError, match="used twice"):
        plan2.compact(shared, keep)


def test_exception_class_table():
    from kvcompress.errors import STATUS_CLASSES, error_for

    lib = _lib.lib()
    for status, cls in STATUS_CLASSES.items():
        err = error_for(status, lib.kvc_status_name(status).decode(), "f", "detail")
        assert type(err) is cls and err.status_name.startswith("KVC_ERROR_")
    assert type(error_for(99, "KVC_UNKNOWN_STATUS", "f", "")) is kvc.KvcError
    assert issubclass(kvc.OutOfMemoryError, MemoryError) and issubclass(kvc.NotSupportedError, NotImplementedError)


# ---------------------------------------------------------------------------------------------
# binding-side checks naming the argument


def test_queries_shape_dtype_contiguity(ctx):
    plan = small_plan(ctx, method="snapkv", window=4, budgets=[8])
    cache = kvc.hf_cache(*hf())
    with pytest.raises(ValueError, match="queries: required"):
        plan.score(cache)
    with pytest.raises(ValueError, match=r"queries: expected shape \(4, 2, 8\)"):
        plan.score(cache, np.zeros((3, H, D), np.float32))
    with pytest.raises(TypeError, match="queries: dtype f16"):
        plan.score(cache, np.zeros((4, H, D), np.float16))
    with pytest.raises(ValueError, match="queries: must be C-contiguous"):
        plan.score(cache, np.zeros((4, D, H), np.float32).transpose(0, 2, 1))
    with pytest.raises(TypeError, match="queries: expected a numpy array"):
        plan.score(cache, [[0.0]])


def test_cache_checks(ctx):
    plan = small_plan(ctx)
    with pytest.raises(TypeError, match="cache: expected a PagedKV"):
        plan.score(np.zeros(4))
    with pytest.raises(TypeError, match="plan's dtype f32"):
        plan.score(kvc.hf_cache(*hf(dtype=np.float16)))
    with pytest.raises(ValueError, match="num_kv_heads"):
        plan.score(kvc.hf_cache(np.zeros((1, 3, 16, D), np.float32), np.zeros((1, 3, 16, D), np.float32)))
    with pytest.raises(ValueError, match="longest sequence"):
        plan.score(kvc.hf_cache(*hf(n=8)))
    with pytest.raises(ValueError, match="batch"):
        small_plan(ctx, seq_lens=[16, 16], budgets=4).score(kvc.hf_cache(*hf()))
    k, v = hf()
    k.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        plan.compact(kvc.hf_cache(k, v), np.zeros(8, np.int32))


def test_descriptor_checks():
    k = np.zeros((1, H, 16, D), np.float32)
    with pytest.raises(ValueError, match="head_dim .* must be contiguous"):
        kvc.hf_cache(np.zeros((1, H, 16, 2 * D), np.float32)[..., ::2], np.zeros((1, H, 16, D), np.float32))
    with pytest.raises(ValueError, match="v: shape"):
        kvc.hf_cache(k, np.zeros((1, H, 15, D), np.float32))
    with pytest.raises(TypeError, match="v: dtype"):
        kvc.hf_cache(k, k.astype(np.float16))
    with pytest.raises(TypeError, match="not a cache dtype"):
        kvc.hf_cache(k.astype(np.float64), k.astype(np.float64))
    with pytest.raises(ValueError, match="expected \\(batch"):
        kvc.hf_cache(k[0], k[0])
    with pytest.raises(ValueError, match="layout"):
        kvc.vllm_cache(np.zeros((4, 4, H, D), np.float32), np.zeros((4, 4, H, D), np.float32),
                       np.zeros((1, 2), np.int32), layout="DHN")
    with pytest.raises(ValueError, match="dense table must be 2-D"):
        kvc.vllm_cache(np.zeros((4, 4, H, D), np.float32), np.zeros((4, 4, H, D), np.float32), np.zeros(2, np.int32))
    with pytest.raises(TypeError, match="page_table: expected integers"):
        kvc.vllm_cache(np.zeros((4, 4, H, D), np.float32), np.zeros((4, 4, H, D), np.float32), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="strides must be positive"):
        kvc.hf_cache(k[:, :, ::-1], k[:, :, ::-1])
    with pytest.raises(ValueError, match="only 2 pages"):
        kvc.paged_kv(np.zeros(2 * 4 * H * D, np.float32), np.zeros(2 * 4 * H * D, np.float32), 4,
                     strides=(4 * H * D, H * D, D), num_kv_heads=H, head_dim=D, num_pages=3)
    with pytest.raises(ValueError, match="strides"):
        kvc.paged_kv(k, k, 4, strides=(1, 2), num_kv_heads=H, head_dim=D)


def test_score_keep_count_arrays(ctx):
    plan = small_plan(ctx, spans=[[kvc.Span(0, 8)]])
    n = plan.info.score_elems
    with pytest.raises(TypeError, match="scores: dtype must be float32"):
        plan.select(np.zeros(n, np.float64))
    with pytest.raises(ValueError, match=r"scores: expected 32 elements"):
        plan.select(np.zeros(n + 1, np.float32))
    with pytest.raises(ValueError, match="scores: must be C-contiguous"):
        plan.select(np.zeros(2 * n, np.float32)[::2])
    with pytest.raises(TypeError, match="out: dtype must be int32"):
        plan.select(np.zeros(n, np.float32), out=np.zeros(plan.info.keep_elems, np.int64))
    with pytest.raises(TypeError, match="keep: dtype must be int32"):
        plan.retention(np.zeros(plan.info.keep_elems, np.int64))
    with pytest.raises(ValueError, match=r"out: expected 2 elements \(count layout\)"):
        plan.retention(np.zeros(plan.info.keep_elems, np.int32), out=np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="extras\\[0\\]"):
        plan.compact(kvc.hf_cache(*hf()), np.zeros(plan.info.keep_elems, np.int32), extras=[np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="accumulate"):
        plan.score(kvc.hf_cache(*hf()), accumulate=True)


def test_plan_argument_checks(ctx):
    with pytest.raises(ValueError, match="budgets: 2 values for 1"):
        small_plan(ctx, budgets=[1, 2])
    with pytest.raises(ValueError, match="method"):
        small_plan(ctx, method="random")
    with pytest.raises(ValueError, match="dtype"):
        small_plan(ctx, dtype="int4")
    with pytest.raises(ValueError, match="pool"):
        small_plan(ctx, pool="sum")
    with pytest.raises(ValueError, match="spans: expected one list"):
        small_plan(ctx, spans=[[], []])
    with pytest.raises(ValueError, match="Span.kind"):
        kvc.Span(0, 1, "keep")
    with pytest.raises(TypeError, match=r"spans\[0\]\[0\]"):
        small_plan(ctx, spans=[["x"]])
    with pytest.raises(TypeError, match="seq_lens: expected integers"):
        small_plan(ctx, seq_lens=[1.5])
    with pytest.raises(TypeError, match="context"):
        kvc.Plan(object(), num_q_heads=1, num_kv_heads=1, head_dim=1, seq_lens=[1], budgets=[1])


class FakeCudaArray:
    """An object with __cuda_array_interface__ (no memory behind it: must never reach C on CPU)."""

    def __init__(self, shape, typestr="<f4"):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0xDEAD000, False),
                                         "version": 3, "strides": None}


def test_wrong_device_on_cpu_context(ctx):
    plan = small_plan(ctx)
    with pytest.raises(ValueError, match="scores is on cuda"):
        plan.select(FakeCudaArray((plan.info.score_elems,)))
    cache = kvc.hf_cache(FakeCudaArray((1, H, 16, D)), FakeCudaArray((1, H, 16, D)))
    assert cache.device[0] == "cuda"
    with pytest.raises(ValueError, match="cache.k is on cuda"):
        plan.score(cache)
    with pytest.raises(ValueError, match="v is on cpu but k is on cuda"):
        kvc.hf_cache(FakeCudaArray((1, H, 16, D)), np.zeros((1, H, 16, D), np.float32))


# ---------------------------------------------------------------------------------------------
# lifetimes


def test_close_and_context_managers():
    ctx = kvc.Context("cpu")
    plan = small_plan(ctx)
    with plan:
        assert not plan.closed
    assert plan.closed
    plan.close()  # idempotent
    with pytest.raises(ValueError, match="plan is closed"):
        plan.select(np.zeros(32, np.float32))
    p2 = small_plan(ctx)
    ctx.close()
    assert ctx.closed and p2.closed  # closing a context closes its plans first
    ctx.close()
    with pytest.raises(ValueError, match="context is closed"):
        small_plan(ctx)


def test_plan_keeps_context_alive():
    plan = small_plan(kvc.Context("cpu"))
    gc.collect()
    assert not plan.context.closed
    keep = plan.select(np.arange(32, dtype=np.float32))
    assert keep.tolist() == [12, 13, 14, 15] * 2
    del plan
    gc.collect()


def test_workspace_alignment_and_cache(ctx):
    plan = small_plan(ctx, method="snapkv", window=4, budgets=[8])
    k, v = hf()
    cache = kvc.hf_cache(k, v)
    q = np.zeros((4, H, D), np.float32)
    plan.compress(cache, q)
    plan.compress(cache, q)
    assert len(plan._workspaces) == 1
    ws = next(iter(plan._workspaces.values()))
    assert ws.ptr % 256 == 0 and ws.nbytes == plan.workspace_size("compress")
