#!/usr/bin/env python3
"""The GPU peers of libkvcompress, timed on the same shapes in the same run (bench/run_device.sh).

What users run today instead of libkvcompress:

  op=compress impl=torch_kvpress   NVIDIA kvpress's pipeline on the same tensors. With the kvpress
      wheel importable (scripts/build_device.sh carries kvpress 0.5.5 to the GPU machine) its own
      SnapKVPress / ObservedAttentionPress .compress() runs ("kvpress": "<version> (wheel)" in each
      line; only the press modules are loaded, not `import kvpress`, whose package init pulls in
      datasets and patches transformers): the peer hands it the window / eager attention it would
      get from the model, computed inside the timed call. Without the wheel, a line-for-line copy
      of the same code runs ("kvpress": "copy of 8bb29b9"); the two are compared on a small case
      first (record "note"). The copy (presses/snapkv_press.py, observed_attention_press.py,
      scorer_press.py of kvpress 8bb29b9):
      SnapKV: repeat_kv -> matmul(Q_window, K^T)/sqrt(d) -> causal mask -> softmax (fp32, cast to
      bf16) -> drop the window columns -> mean over queries -> avg_pool1d(5, pad 2) -> mean over the
      GQA group -> pad the window with max+1 (.item(), a host sync, as kvpress does) -> topk ->
      gather K and V into new contiguous tensors.
      H2O (ObservedAttentionPress): the eager attention matrix over all n queries (softmax fp32 ->
      bf16, as HF eager attention makes it) -> sum over queries / number of queries that see the
      key -> group mean -> topk -> gather. kvpress gets that matrix from the model's eager forward;
      the peer computes it (libkvcompress computes its attention from Q and K too), and reports the
      part after the matrix as press_only_ms.
      The post-RoPE window queries are given (kvpress recomputes them from hidden states; that
      projection is left out of both sides).
  op=select impl=torch_topk        torch.topk(scores, k, sorted=False) per row (rows = batch*heads)
  op=select impl=flashinfer_topk   flashinfer.top_k(scores, k) (radix, unsorted) when importable
  op=compact impl=torch_gather     keys.gather + values.gather of the kept rows (kvpress's last step)

Timing: torch.cuda events around each repetition, after `warmup` untimed ones; before every
repetition a 2 x L2 buffer is read (cold L2 with clean lines, as bench_util.cuh does); median,
p10, p90 by nearest rank. The GPU is kept busy for 200 ms at the start and 20 ms before each point
(its clocks idle low). Peak extra memory: torch.cuda.max_memory_allocated() during one untimed call minus
what was allocated before it (the inputs). Output: JSON lines on stdout with the keys of the C
programs (bench_compress.cu, bench_select.cu), progress on stderr.

  python3 bench/peers/kvpress_torch.py [--ops compress,select,compact] [--models llama:32:8:128,...]
      [--n 4096,32768,131072] [--batch 1,8] [--ratios 0.1,0.5,0.9] [--methods snapkv,h2o]
      [--h2o-max-n 32768] [--select-n 4096,32768,131072,1048576] [--select-keep 0.1,0.5,0.9]
      [--select-batch 4] [--select-heads 8] [--iters 10] [--warmup 2] [--max-seconds 0]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import types

import torch
import torch.nn.functional as F


def emit(record):
    print(json.dumps(record), flush=True)


def log(msg):
    print(f"[kvpress_torch] {msg}", file=sys.stderr, flush=True)


def busy(ms):
    """Keeps the GPU busy with bf16 matrix products for at least `ms` of wall time."""
    a = torch.ones(4096, 4096, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < ms:
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


class Timer:
    """cudaEvent timing with a busy spell, warm-up, L2 flush by reading 2 x L2, nearest-rank
    quantiles (as bench_util.cuh)."""

    def __init__(self):
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
        self.flush_buf = torch.rand(max(2 * l2, 8 << 20) // 4, dtype=torch.float32, device="cuda")

    def __call__(self, fn, warmup, iters):
        busy(20)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for i in range(iters):
            self.flush_buf.sum()  # reads every line: the L2 holds none of fn's data, and nothing dirty
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return stats(times)


def stats(times):
    t = sorted(times)
    at = lambda q: t[min(len(t) - 1, int(q * (len(t) - 1) + 0.5))]
    median = t[len(t) // 2] if len(t) % 2 else 0.5 * (t[len(t) // 2 - 1] + t[len(t) // 2])
    return {"median_ms": median, "p10_ms": at(0.1), "p90_ms": at(0.9), "reps": len(t)}


def peak_extra_bytes(fn):
    """Bytes allocated by one call of fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - base


def kept_of(n, ratio):
    """kvpress's compute_n_kept: int(n * (1 - ratio)), at least 1."""
    return max(1, int(n * (1.0 - ratio)))


def repeat_kv(x, groups):
    """transformers' repeat_kv: [B, Hkv, n, D] -> [B, Hkv*groups, n, D] (materialised)."""
    b, h, n, d = x.shape
    if groups == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def window_attention(keys, queries, window):
    """kvpress SnapKVPress.compute_window_attention with the (post-RoPE) window queries given:
    the window rows' attention over all keys, causal inside the window."""
    bsz, hkv, k_len, head_dim = keys.shape
    groups = queries.shape[1] // hkv
    key_states = repeat_kv(keys, groups)
    attn = torch.matmul(queries, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.ones_like(attn) * float("-inf")
    mask = torch.triu(mask, diagonal=k_len - window + 1)
    attn += mask
    return F.softmax(attn, dim=-1, dtype=torch.float32).to(queries.dtype)


def snapkv_scores(keys, queries, window, kernel):
    """kvpress SnapKVPress.score (compute_window_attention with the queries given)."""
    bsz, hkv, k_len, head_dim = keys.shape
    groups = queries.shape[1] // hkv
    attn = window_attention(keys, queries, window)[..., :-window]
    scores = attn.mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)
    scores = scores.view(bsz, hkv, groups, k_len - window).mean(2)
    scores = F.pad(scores, (0, window), value=scores.max().item() + 1)
    return scores


def eager_attention(keys, queries):
    """HF eager attention weights over all queries (causal), softmax in fp32 cast to the dtype."""
    bsz, hkv, n, head_dim = keys.shape
    groups = queries.shape[1] // hkv
    key_states = repeat_kv(keys, groups)
    attn = torch.matmul(queries, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    causal = torch.full((n, n), float("-inf"), device=keys.device, dtype=attn.dtype).triu(1)
    attn = attn + causal
    return F.softmax(attn, dim=-1, dtype=torch.float32).to(queries.dtype)


def h2o_scores(keys, attentions):
    """kvpress ObservedAttentionPress.score."""
    scores = attentions.sum(2)
    bsz, hkv, n_tokens, _ = keys.shape
    n_in_sum = torch.arange(n_tokens, 0, -1).to(attentions.device, attentions.dtype)
    scores = scores / n_in_sum
    return scores.view(bsz, hkv, -1, n_tokens).mean(2)


def compress_tail(scores, keys, values, n_kept):
    """kvpress ScorerPress.compress after the scores."""
    idx = scores.topk(n_kept, dim=-1).indices
    idx = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()


KVPRESS_COPY = "copy of 8bb29b9"


def load_kvpress():
    """kvpress's SnapKVPress and ObservedAttentionPress from the installed wheel, without running the
    package's __init__ (which imports datasets, fire, every press, and patches transformers'
    attention functions): a bare package object whose __path__ is the wheel's directory lets the
    two press modules import what they need (kvpress.utils, scorer_press, base_press). Returns
    (snapkv_class, observed_class, version) or (None, None, reason)."""
    try:
        spec = importlib.util.find_spec("kvpress")
        if spec is None or not spec.submodule_search_locations:
            return None, None, "kvpress not installed"
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("kvpress", root), ("kvpress.presses", os.path.join(root, "presses"))):
            if name not in sys.modules:
                module = types.ModuleType(name)
                module.__path__ = [path]
                sys.modules[name] = module
        from kvpress.presses.observed_attention_press import ObservedAttentionPress
        from kvpress.presses.snapkv_press import SnapKVPress

        try:
            from importlib.metadata import version

            ver = version("kvpress")
        except Exception:
            ver = "?"
        return SnapKVPress, ObservedAttentionPress, f"{ver} (wheel)"
    except Exception as e:  # a transformers version kvpress does not know, a missing module, ...
        return None, None, f"kvpress not loadable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def press_module(hq, hkv, d):
    """What a press reads of the attention layer it hooks: the config's head counts, head_dim."""
    return types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=hq, num_key_value_heads=hkv),
                                 head_dim=d)


def window_attention(keys, queries, window):
    """kvpress SnapKVPress.compute_window_attention from the post-RoPE window queries (no slicing)."""
    bsz, hkv, k_len, head_dim = keys.shape
    key_states = repeat_kv(keys, queries.shape[1] // hkv)
    attn = torch.matmul(queries, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.triu(torch.ones_like(attn) * float("-inf"), diagonal=k_len - window + 1)
    attn += mask
    return F.softmax(attn, dim=-1, dtype=torch.float32).to(queries.dtype)


def kvpress_pipeline(method, keys, values, queries, window, ratio, n_kept, kvpress):
    """The timed call: the wheel's press when loaded, else the line-for-line copy."""
    snap, observed, _ = kvpress
    bsz, hkv, n, d = keys.shape
    if snap is not None:
        module = press_module(queries.shape[1], hkv, d)
        hidden = torch.empty((bsz, n, 0), device=keys.device, dtype=keys.dtype)  # kvpress reads its shape only
        if method == "snapkv":
            press = snap(compression_ratio=ratio, window_size=window, kernel_size=5)
            return lambda: press.compress(module, hidden, keys, values, window_attention(keys, queries, window), {})
        press = observed(compression_ratio=ratio)
        return lambda: press.compress(module, hidden, keys, values, eager_attention(keys, queries), {})
    if method == "snapkv":
        return lambda: compress_tail(snapkv_scores(keys, queries, window, 5), keys, values, n_kept)
    return lambda: compress_tail(h2o_scores(keys, eager_attention(keys, queries)), keys, values, n_kept)


def check_kvpress_copy(kvpress, gen):
    """The wheel's SnapKV and H2O scores against the copy's on one small case (a note record)."""
    snap, observed, ver = kvpress
    if snap is None:
        return {"record": "note", "bench": "kvpress_torch", "note": f"kvpress wheel not used: {ver}; the copy runs"}
    keys = randn_like_c((1, 2, 256, 64), torch.bfloat16, gen)
    queries = randn_like_c((1, 8, 256, 64), torch.bfloat16, gen)
    module, hidden = press_module(8, 2, 64), torch.empty((1, 256, 0), device="cuda", dtype=torch.bfloat16)
    w = 32
    ours = snapkv_scores(keys, queries[:, :, -w:], w, 5)
    theirs = snap(compression_ratio=0.5, window_size=w, kernel_size=5).score(
        module, hidden, keys, keys, window_attention(keys, queries[:, :, -w:], w), {})
    attn = eager_attention(keys, queries)
    d_snap = (ours.float() - theirs.float()).abs().max().item()
    d_h2o = (h2o_scores(keys, attn).float() - observed(compression_ratio=0.5).score(
        module, hidden, keys, keys, attn, {}).float()).abs().max().item()
    for method in ("snapkv", "h2o"):  # the timed calls themselves, once: an API mismatch shows here
        k, _ = kvpress_pipeline(method, keys, keys, queries[:, :, -w:] if method == "snapkv" else queries, w, 0.5,
                                128, kvpress)()
        if tuple(k.shape) != (1, 2, 128, 64):
            raise RuntimeError(f"kvpress {method} compress returned keys of shape {tuple(k.shape)}, expected (1, 2, 128, 64)")
    return {"record": "note", "bench": "kvpress_torch",
            "note": f"kvpress {ver} runs; its scores vs the copy's: max |diff| SnapKV {d_snap:.3g}, H2O {d_h2o:.3g}"}


def randn_like_c(shape, dtype, gen):
    """Uniform in [-1.7, 1.7), the distribution of bench_util.cuh's fill_random."""
    return ((torch.rand(shape, generator=gen, device="cuda", dtype=torch.float32) - 0.5) * 3.4).to(dtype)


def bench_compress(args, timer, gen, deadline, kvpress):
    dtype = torch.bfloat16
    points = []
    for model in args.models:
        for method in args.methods:
            for n in args.n:
                if method == "h2o" and n > args.h2o_max_n:
                    continue
                for batch in args.batch:
                    for ratio in args.ratios:
                        points.append((model, method, n, batch, ratio))
    for i, (model, method, n, batch, ratio) in enumerate(points):
        name, hq, hkv, d = model
        window = n if method == "h2o" else args.window
        key = {"op": "compress", "impl": "torch_kvpress", "model": name, "method": method, "n": n, "batch": batch,
               "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": "bf16", "ratio": ratio, "window": window,
               "layout": "hf", "kept": kept_of(n, ratio), "kvpress": kvpress[2] if kvpress[0] else KVPRESS_COPY}
        if deadline and time.monotonic() > deadline:
            log(f"[{i + 1}/{len(points)}] SKIP compress {name} {method} n={n} batch={batch} (time budget)")
            emit({"record": "skipped", **key, "reason": "time budget"})
            continue
        log(f"[{i + 1}/{len(points)}] compress {name} {method} n={n} batch={batch} ratio={ratio}")
        keys = values = queries = None
        try:
            keys = randn_like_c((batch, hkv, n, d), dtype, gen)
            values = randn_like_c((batch, hkv, n, d), dtype, gen)
            queries = randn_like_c((batch, hq, window, d), dtype, gen)
            n_kept = kept_of(n, ratio)
            fn = kvpress_pipeline(method, keys, values, queries, window, ratio, n_kept, kvpress)
            press_only = None if method == "snapkv" else "h2o"
            extra = peak_extra_bytes(fn)
            st = timer(fn, args.warmup, args.iters)
            rec = {"record": "result", **key, **st, "extra_bytes": extra}
            if press_only:
                attn = eager_attention(keys, queries)
                rec["press_only_ms"] = timer(lambda: compress_tail(h2o_scores(keys, attn), keys, values, n_kept),
                                             args.warmup, args.iters)["median_ms"]
                attn = None
            emit(rec)
        except torch.cuda.OutOfMemoryError as e:
            attn_bytes = batch * hq * window * n * (4 + 2 + 2)
            emit({"record": "result", **key, "error": "oom", "need_bytes_estimate": attn_bytes,
                  "detail": str(e).splitlines()[0][:200]})
            log(f"  out of memory (the attention matrix alone is ~{attn_bytes / 2**30:.0f} GiB)")
        finally:
            keys = values = queries = None  # (not `del`: the timed lambdas close over these names)
            torch.cuda.empty_cache()


def bench_select(args, timer, gen, deadline, flashinfer):
    impls = [("torch_topk", lambda s, k: torch.topk(s, k, dim=-1, sorted=False))]
    if flashinfer is not None:
        impls.append(("flashinfer_topk", lambda s, k: flashinfer.top_k(s, k)))
    points = [(n, keep) for n in args.select_n for keep in args.select_keep]
    for i, (n, keep) in enumerate(points):
        rows = args.select_batch * args.select_heads
        k = max(68, int(keep * n))  # bench_select.cu's k
        if deadline and time.monotonic() > deadline:
            log(f"[{i + 1}/{len(points)}] SKIP select n={n} k={k} (time budget)")
            continue
        log(f"[{i + 1}/{len(points)}] select n={n} k={k} rows={rows}")
        scores = randn_like_c((rows, n), torch.float32, gen)
        for impl, fn in impls:
            try:
                extra = peak_extra_bytes(lambda: fn(scores, k))
                st = timer(lambda: fn(scores, k), args.warmup, args.iters)
                emit({"record": "result", "op": "select", "impl": impl, "mode": "plain", "n": n,
                      "batch": args.select_batch, "kv_heads": args.select_heads, "k": k, **st,
                      "score_gbps": 4.0 * rows * n / (st["median_ms"] * 1e-3) / 1e9, "extra_bytes": extra})
            except Exception as e:  # an API that refuses a shape is reported, not fatal
                emit({"record": "result", "op": "select", "impl": impl, "mode": "plain", "n": n,
                      "batch": args.select_batch, "kv_heads": args.select_heads, "k": k,
                      "error": type(e).__name__, "detail": str(e).splitlines()[0][:200] if str(e) else ""})
        scores = None
        torch.cuda.empty_cache()


def bench_compact(args, timer, gen, deadline):
    """kvpress's gather of the kept rows (new tensors), on the compress grid's first model."""
    name, hq, hkv, d = args.models[0]
    for n in args.n:
        for batch in args.batch:
            for ratio in args.ratios:
                if deadline and time.monotonic() > deadline:
                    continue
                kept = kept_of(n, ratio)
                keys = randn_like_c((batch, hkv, n, d), torch.bfloat16, gen)
                values = randn_like_c((batch, hkv, n, d), torch.bfloat16, gen)
                idx = torch.sort(torch.rand(batch, hkv, n, device="cuda", generator=gen).argsort(-1)[..., :kept], -1)[0]
                idx = idx.unsqueeze(-1).expand(-1, -1, -1, d)
                fn = lambda: (keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous())
                st = timer(fn, args.warmup, args.iters)
                moved = 2 * 2 * batch * hkv * kept * d * 2  # K and V kept rows, read + written
                emit({"record": "result", "op": "compact", "impl": "torch_gather", "model": name, "n": n,
                      "batch": batch, "kv_heads": hkv, "head_dim": d, "dtype": "bf16", "ratio": ratio, "kept": kept,
                      **st, "gbps": moved / (st["median_ms"] * 1e-3) / 1e9})
                keys = values = idx = None
                torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in s.split(",") if x]

    def models(s):
        out = []
        for m in s.split(","):
            name, hq, hkv, d = m.split(":")
            out.append((name, int(hq), int(hkv), int(d)))
        return out

    p.add_argument("--ops", default="compress,select,compact")
    p.add_argument("--models", type=models, default=models("llama:32:8:128,qwen:40:8:128"))
    p.add_argument("--n", type=ints, default=[4096, 32768, 131072])
    p.add_argument("--batch", type=ints, default=[1, 8])
    p.add_argument("--ratios", type=floats, default=[0.1, 0.5, 0.9])
    p.add_argument("--methods", default="snapkv,h2o")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--h2o-max-n", type=int, default=32768)
    p.add_argument("--select-n", type=ints, default=[4096, 32768, 131072, 1048576])
    p.add_argument("--select-keep", type=floats, default=[0.1, 0.5, 0.9])
    p.add_argument("--select-batch", type=int, default=4)
    p.add_argument("--select-heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=0.0, help="skip the remaining points after this long")
    args = p.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    ops = [o for o in args.ops.split(",") if o]

    if not torch.cuda.is_available():
        log("no CUDA device: nothing to do")
        return 1
    try:
        import flashinfer  # noqa: F401

        if not hasattr(flashinfer, "top_k"):
            log(f"flashinfer {getattr(flashinfer, '__version__', '?')} has no top_k: FlashInfer peer skipped")
            flashinfer = None
    except Exception as e:  # ImportError, or a JIT/driver problem at import
        log(f"flashinfer not importable ({type(e).__name__}: {e}): FlashInfer selection peer skipped")
        flashinfer = None

    props = torch.cuda.get_device_properties(0)
    emit({"record": "device", "bench": "kvpress_torch", "gpu": props.name, "sms": props.multi_processor_count,
          "mem_bytes": props.total_memory, "torch": torch.__version__, "cuda": torch.version.cuda,
          "flashinfer": getattr(flashinfer, "__version__", "unknown") if flashinfer else None})
    if flashinfer is None:
        emit({"record": "note", "bench": "kvpress_torch", "note": "flashinfer absent: FlashInfer top-k peer skipped"})

    busy(200)  # from idle clocks to full ones before anything is timed
    timer = Timer()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    kvpress = load_kvpress() if "compress" in ops else (None, None, "not needed")
    if "compress" in ops:
        try:
            emit(check_kvpress_copy(kvpress, gen))
        except Exception as e:
            emit({"record": "note", "bench": "kvpress_torch", "note": f"kvpress check failed: {type(e).__name__}: {e}"})
            kvpress = (None, None, f"check failed: {type(e).__name__}")
    # the copy ceiling as PyTorch sees it (bytes read + written)
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    st = timer(lambda: b.copy_(a), 2, 10)
    emit({"record": "ceiling", "bench": "kvpress_torch", "kind": "copy", "gbps": 2 * a.numel() / (st["median_ms"] * 1e-3) / 1e9})
    a = b = None

    deadline = time.monotonic() + args.max_seconds if args.max_seconds > 0 else None
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        if "select" in ops:
            bench_select(args, timer, gen, deadline, flashinfer)
        if "compact" in ops:
            bench_compact(args, timer, gen, deadline)
        if "compress" in ops:
            bench_compress(args, timer, gen, deadline, kvpress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
