"""CUDA backend through device arrays (torch, else cupy). Skipped, visibly, when the library has no
usable CUDA device or neither array library is installed."""
import numpy as np
import pytest

import kvcompress as kvc

H, HQ, D = 2, 8, 64


@pytest.fixture(scope="module")
def xp():
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy  # noqa: F401

        return "cupy"
    except ImportError:
        pytest.skip("neither torch (with CUDA) nor cupy is installed")


def to_device(xp, a):
    if xp == "torch":
        import torch

        return torch.as_tensor(a).cuda()
    import cupy

    return cupy.asarray(a)


def to_host(a):
    return a.cpu().numpy() if hasattr(a, "cpu") else a.get()


@pytest.mark.parametrize("method", ["knorm", "snapkv", "streaming"])
def test_cuda_matches_cpu(cuda_ctx, xp, method):
    rng = np.random.default_rng(7)
    B, n = 2, 160
    k = rng.standard_normal((B, H, n, D)).astype(np.float16)
    v = rng.standard_normal((B, H, n, D)).astype(np.float16)
    q = rng.standard_normal((B, HQ, n, D)).astype(np.float16)
    kw = dict(num_q_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=[n, 120], budgets=[48, 64], method=method,
              window=16, sink_tokens=4 if method == "streaming" else 0,
              spans=[[kvc.Span(0, 80), kvc.Span(80, 160)], [kvc.Span(0, 120)]], fairness=1.0)
    with kvc.Context("cpu") as cpu:
        plan = cpu.plan(**kw)
        kc, vc = k.copy(), v.copy()
        cpu_scores = plan.score(kvc.hf_cache(kc, vc), plan.gather_queries(q) if plan.info.obs_total else None)
        cpu_keep = plan.compress(kvc.hf_cache(kc, vc), plan.gather_queries(q) if plan.info.obs_total else None)
    plan = cuda_ctx.plan(**kw)
    kd, vd = to_device(xp, k), to_device(xp, v)
    cache = kvc.hf_cache(kd, vd)
    queries = plan.gather_queries(to_device(xp, q)) if plan.info.obs_total else None
    scores = plan.score(cache, queries)
    np.testing.assert_allclose(to_host(scores), cpu_scores, rtol=2e-3, atol=1e-5)
    keep = plan.compress(cache, queries)
    if method != "snapkv":  # attention scores differ in the last bits (fp32 vs double): ties may flip
        np.testing.assert_array_equal(to_host(keep), cpu_keep)
        np.testing.assert_array_equal(to_host(kd)[0, :, :48], kc[0, :, :48])
    counts = plan.retention(keep)
    assert to_host(counts).shape == (plan.info.count_elems,)


def test_cuda_bf16_and_wrong_device(cuda_ctx, xp):
    if xp != "torch":
        pytest.skip("bfloat16 device arrays need torch")
    import torch

    k = torch.randn(1, H, 64, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, H, 64, D, device="cuda", dtype=torch.bfloat16)
    k0 = k.clone()
    plan = cuda_ctx.plan(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[64], budgets=[16], method="knorm",
                         dtype="bf16")
    keep = plan.compress(kvc.hf_cache(k, v))
    torch.cuda.synchronize()
    idx = keep.view(H, 16).long()
    for h in range(H):
        assert torch.equal(k[0, h, :16], k0[0, h, idx[h]])
    with pytest.raises(ValueError, match="cache.k is on cpu"):
        plan.score(kvc.hf_cache(k.cpu(), v.cpu()))
    with pytest.raises(ValueError, match="scores is on cpu"):
        plan.select(np.zeros(plan.info.score_elems, np.float32))



def test_layered_calls_on_a_side_stream(cuda_ctx, xp):
    """compress_layers with a host dst_table on a stream that is not the current one, held back by
    a long kernel queued first: the call's device pointer arrays and its int32 destination table
    are dropped when it returns, and what the current stream allocates right after must not reuse
    their memory before the side stream has run the call (the binding allocates them on the call's
    stream). Keep indices and destination blocks equal the CPU backend's."""
    if xp != "torch":
        pytest.skip("the side stream is a torch.cuda.Stream")
    import torch

    rng = np.random.default_rng(11)
    L, blocks, block = 3, 12, 16
    source = np.arange(6, dtype=np.int32)[None]     # one 96-token request in blocks 0..5
    dst = np.array([[6, 7, 8]], dtype=np.int32)     # its 40 kept tokens go to blocks 6..8
    kw = dict(num_q_heads=H, num_kv_heads=H, head_dim=D, seq_lens=[96], budgets=[40], method="knorm")
    pools = [(rng.standard_normal((blocks, block, H, D)).astype(np.float16),
              rng.standard_normal((blocks, block, H, D)).astype(np.float16)) for _ in range(L)]
    host = [(k.copy(), v.copy()) for k, v in pools]
    with kvc.Context("cpu") as cpu:
        want = cpu.plan(**kw).compress_layers([kvc.vllm_cache(k, v, source) for k, v in host], dst_table=dst)
    plan = cuda_ctx.plan(**kw)
    dev = [(torch.as_tensor(k).cuda(), torch.as_tensor(v).cuda()) for k, v in pools]
    caches = [kvc.vllm_cache(k, v, torch.as_tensor(source).cuda()) for k, v in dev]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(500_000_000)  # ~0.3 s of spinning ahead of the call on the side stream
    got = plan.compress_layers(caches, stream=side, dst_table=dst)
    scribble = [torch.full((1 << 12,), -1, dtype=torch.int64, device="cuda") for _ in range(256)]
    torch.cuda.synchronize()
    del scribble
    np.testing.assert_array_equal(to_host(got), want)
    for (k, v), (hk, hv) in zip(dev, host):
        np.testing.assert_array_equal(to_host(k)[6:9], hk[6:9])
        np.testing.assert_array_equal(to_host(v)[6:9], hv[6:9])
