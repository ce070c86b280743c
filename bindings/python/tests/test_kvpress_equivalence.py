"""kvpress equivalence: with fairness 0 the adapter keeps the same token sets as kvpress's own
SnapKVPress, TOVAPress, KnormPress, StreamingLLMPress and ObservedAttentionPress on the same tensors
(ties aside: where the sets differ, kvpress's scores at the differing positions must tie with its
k-th score within tolerance). Skipped, visibly, when kvpress or torch is not installed."""
import pytest

torch = pytest.importorskip("torch", reason="kvpress/torch not installed (torch missing)")
kvpress = pytest.importorskip("kvpress", reason="kvpress/torch not installed (kvpress missing)")

from kvpress import KnormPress, ObservedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress  # noqa: E402
from kvpress.presses.scorer_press import ScorerPress  # noqa: E402

from kvcompress import Span  # noqa: E402
from kvcompress.kvpress_adapter import KvcPress, compute_n_kept  # noqa: E402
from torch_layer import make_layer  # noqa: E402

B, HQ, HKV, D, HIDDEN, N = 2, 8, 2, 32, 64, 200
WINDOW, KERNEL, RATIO = 16, 5, 0.5


@pytest.fixture(scope="module")
def layer():
    return make_layer(B, HQ, HKV, D, HIDDEN, N)


CASES = [
    ("snapkv", lambda: SnapKVPress(compression_ratio=RATIO, window_size=WINDOW, kernel_size=KERNEL),
     dict(method="snapkv", window_size=WINDOW, kernel_size=KERNEL), False),
    ("tova", lambda: TOVAPress(compression_ratio=RATIO), dict(method="tova"), False),
    ("knorm", lambda: KnormPress(compression_ratio=RATIO), dict(method="knorm"), False),
    ("streaming", lambda: StreamingLLMPress(compression_ratio=RATIO, n_sink=4), dict(method="streaming", n_sink=4),
     False),
    ("observed_attention", lambda: ObservedAttentionPress(compression_ratio=RATIO), dict(method="h2o"), True),
]


def kvpress_keep(press, layer, with_attn):
    with torch.no_grad():
        scores = press.score(layer.module, layer.hidden, layer.keys, layer.values,
                             layer.attn if with_attn else None, layer.kwargs)
    n_kept = compute_n_kept(N, press.compression_ratio)
    return scores.float(), scores.topk(n_kept, dim=-1).indices


@pytest.mark.parametrize("name,make_ref,ours_kwargs,with_attn", CASES, ids=[c[0] for c in CASES])
def test_same_kept_sets_as_kvpress(layer, name, make_ref, ours_kwargs, with_attn):
    ref_scores, ref_idx = kvpress_keep(make_ref(), layer, with_attn)
    press = KvcPress(compression_ratio=RATIO, **ours_kwargs)
    assert isinstance(press, ScorerPress)
    keys, values = layer.keys.clone(), layer.values.clone()
    with torch.no_grad():
        ck, cv = press.compress(layer.module, layer.hidden, keys, values, layer.attn if with_attn else None,
                                layer.kwargs)
    n_kept = compute_n_kept(N, RATIO)
    assert ck.shape == (B, HKV, n_kept, D) and cv.shape == (B, HKV, n_kept, D)
    keep = press.last_keep
    differing = 0
    for b in range(B):
        for h in range(HKV):
            ours = set(keep[b, h].tolist())
            theirs = set(ref_idx[b, h].tolist())
            assert len(ours) == n_kept
            diff = ours ^ theirs
            if diff:
                differing += len(diff)
                row = ref_scores[b, h]
                kth = row.topk(n_kept).values[-1].item()
                tol = 1e-5 * row[torch.isfinite(row)].abs().max().item() + 1e-7
                for j in diff:
                    assert abs(row[j].item() - kth) <= tol, (
                        f"{name} b={b} h={h}: position {j} kept by only one side, kvpress score "
                        f"{row[j].item()} vs k-th {kth}")
            # the compacted rows are the kept rows, in order
            idx = keep[b, h].long()
            assert torch.equal(ck[b, h], layer.keys[b, h, idx])
            assert torch.equal(cv[b, h], layer.values[b, h, idx])
    assert differing <= 2 * B * HKV  # a tie or two at most, never a systematic difference


@pytest.mark.parametrize("name,make_ref,ours_kwargs,with_attn", [c for c in CASES if c[0] != "streaming"],
                         ids=[c[0] for c in CASES if c[0] != "streaming"])
def test_scores_match_kvpress(layer, name, make_ref, ours_kwargs, with_attn):
    ref_scores, _ = kvpress_keep(make_ref(), layer, with_attn)
    press = KvcPress(compression_ratio=RATIO, **ours_kwargs)
    with torch.no_grad():
        ours = press.score(layer.module, layer.hidden, layer.keys, layer.values, None, layer.kwargs)
    protected = {"snapkv": WINDOW, "tova": 1}.get(name, 0)
    scored = slice(0, N - protected)
    torch.testing.assert_close(ours[..., scored], ref_scores[..., scored], rtol=1e-4, atol=1e-6)
    if protected:
        assert torch.isinf(ours[..., N - protected:]).all()


def test_fair_eviction_and_whitelisting(layer):
    spans = [(0, 100), (100, N)]
    press = KvcPress(compression_ratio=RATIO, method="snapkv", window_size=WINDOW, kernel_size=KERNEL,
                     spans=spans, protected=[(10, 30)], fairness=1.0)
    with torch.no_grad():
        press.compress(layer.module, layer.hidden, layer.keys.clone(), layer.values.clone(), None, layer.kwargs)
    keep = press.last_keep
    for b in range(B):
        for h in range(HKV):
            kept = set(keep[b, h].tolist())
            assert set(range(10, 30)) <= kept  # whitelisted
            assert set(range(N - WINDOW, N)) <= kept  # SnapKV's window
    counts = press.last_retention  # spans sorted: fair(0,100), protect(10,30), fair(100,200)
    assert counts.shape == (B, HKV, 3)
    plan = press.last_plan
    quotas = plan.span_quotas_of(0)
    assert quotas[0] == quotas[2] == 50  # same share of both equal-length spans
    assert (counts[..., 0] >= 50).all() and (counts[..., 2] >= 50).all()
    assert (counts[..., 1] == 20).all()
    press.close()


def test_kvpress_pipeline_hook_on_tiny_llama():
    transformers = pytest.importorskip("transformers")
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 96))
    press = KvcPress(compression_ratio=0.5, method="snapkv", window_size=8, kernel_size=5,
                     spans=[(0, 48), (48, 96)], fairness=1.0, protected=[(0, 4)])
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    assert cache.layers[0].keys.shape[2] == 48 and cache.layers[1].keys.shape[2] == 48
    assert transformers.__version__
    press.close()


def test_span_objects_accepted(layer):
    press = KvcPress(compression_ratio=RATIO, method="knorm", spans=[Span(0, 50, weight=2.0), Span(50, N)],
                     fairness=1.0)
    with torch.no_grad():
        press.compress(layer.module, layer.hidden, layer.keys.clone(), layer.values.clone(), None, layer.kwargs)
    q = press.last_plan.span_quotas_of(0)
    assert q.sum() == compute_n_kept(N, RATIO)
    assert q[0] > 50 * q[1] / (N - 50)  # the weight-2 span gets a larger share
