#!/usr/bin/env python3
"""CPU benchmark: libkvcompress's CPU backend (through the Python bindings) against a numpy
implementation of the same pipeline and against kvpress's pipeline on PyTorch (CPU), on the same
tensors, side by side in one run, all on the same number of threads (--threads).

The numpy peer is what a user without the library would write: kvpress's pipeline in numpy
(float32, BLAS matmul), one sequence, HF layout [kv_heads, n, head_dim]:
  snapkv     repeat_kv -> Q_win @ K^T * scale -> causal mask -> softmax -> drop window columns ->
             mean over queries -> avg pool (5, zero padding, /5) -> group mean -> window = max+1
  h2o        the full causal attention matrix over all n queries -> sum over queries / number of
             queries that see the key -> group mean (kvpress ObservedAttentionPress)
  knorm      -||k||_2
  streaming  4 sinks + the most recent tokens (kvpress StreamingLLMPress)
then np.argpartition top-k per KV head, sort the indices, gather K and V into new arrays.
The PyTorch peer (where torch imports) is kvpress's pipeline as bench/peers/kvpress_torch.py
writes it line for line (SnapKVPress with the window queries given; H2O: HF eager attention
weights over all queries, then kvpress's own ObservedAttentionPress.score when kvpress imports,
else the same lines from the peer file; KnormPress; StreamingLLMPress), float32 tensors on the
CPU, torch.set_num_threads(--threads), then topk and gather as ScorerPress.compress does.
libkvcompress: plan.compress(cache, queries) (score + select + in-place compaction) on an
hf_cache of the same K/V (copies: it compacts in place) and the same window queries, on a
context with --threads threads.

All keep the same token sets up to ties and float rounding near the k-th score: for every point
the script checks that the symmetric difference of the library's and each peer's kept sets only
holds tokens whose peer score is within 1e-4 (relative) of that peer's k-th score, and that the
library's scores match numpy's (max relative error over scored keys).

Memory: the library's kvc_compress workspace (it compacts in place) against the numpy pipeline's
peak traced allocation (tracemalloc, one untimed call; includes the new K/V arrays it gathers into).

Timing: wall clock (time.perf_counter) around each call, `--reps` repetitions (>= 5) after one
warm-up, one point at a time (the library, numpy, torch); median and p10/p90 (nearest rank), plus
the median process CPU time. numpy's BLAS (OPENBLAS/OMP/MKL_NUM_THREADS) and torch get --threads too.

  build/venv-torch/bin/python bench/cpu_bench.py [--quick] [--threads 1] [--reps 5] [--out bench/results/cpu_bench.jsonl]
  (KVCOMPRESS_LIBRARY=build-bench/libkvcompress.so; bindings from bindings/python)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc

_threads = "1"  # read before numpy and torch load: their thread pools size themselves at import
for i, a in enumerate(sys.argv):
    if a == "--threads" and i + 1 < len(sys.argv):
        _threads = sys.argv[i + 1]
    elif a.startswith("--threads="):
        _threads = a.split("=", 1)[1]
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = _threads

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
if "KVCOMPRESS_LIBRARY" not in os.environ:
    for cand in ("build-bench/libkvcompress.so", "build/libkvcompress.so"):
        if os.path.exists(os.path.join(REPO, cand)):
            os.environ["KVCOMPRESS_LIBRARY"] = os.path.join(REPO, cand)
            break
import kvcompress as kvc  # noqa: E402

SINKS = 4

try:  # the PyTorch peer: torch, kvpress's lines (bench/peers/kvpress_torch.py), kvpress if it imports
    import torch  # noqa: E402

    torch.set_num_threads(int(_threads))
    sys.path.insert(0, os.path.join(HERE, "peers"))
    import kvpress_torch as kvpress_lines  # noqa: E402
except Exception as e:  # ImportError: no torch in this interpreter
    torch, kvpress_lines, _torch_missing = None, None, f"{type(e).__name__}: {e}"
try:
    import importlib.metadata
    import types

    import kvpress  # noqa: E402

    _kvpress_version = importlib.metadata.version("kvpress")
except Exception as e:
    kvpress, _kvpress_missing = None, f"{type(e).__name__}: {e}"


def log(msg):
    print(f"[cpu_bench] {msg}", file=sys.stderr, flush=True)


def stats(times_ms):
    t = sorted(times_ms)
    at = lambda q: t[min(len(t) - 1, int(q * (len(t) - 1) + 0.5))]
    median = t[len(t) // 2] if len(t) % 2 else 0.5 * (t[len(t) // 2 - 1] + t[len(t) // 2])
    return {"median_ms": median, "p10_ms": at(0.1), "p90_ms": at(0.9), "reps": len(t)}


def timed(fn, reps, setup=None):
    """One untimed warm-up call, then `reps` timed calls; setup() (untimed) before each call.
    Wall-clock statistics, plus the median process CPU time (cpu_ms: less sensitive to other
    tenants of a shared machine).
    Returns (stats, result of the last call)."""
    if setup:
        setup()
    fn()
    times, cpu, result = [], [], None
    for i in range(reps):
        if setup:
            setup()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    st = stats(times)
    st["cpu_ms"] = stats(cpu)["median_ms"]
    return st, result


def kept_of(n, ratio):
    return max(1, int(n * (1.0 - ratio)))


# ---------------------------------------------------------------------------------------------
# The numpy pipeline (kvpress semantics)
# ---------------------------------------------------------------------------------------------


def softmax_rows(x):
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def np_scores(method, k, q, window, groups):
    """Scores [kv_heads, n] (higher = keep) for one sequence. k: [Hkv, n, D]; q: [Hq, w, D]."""
    hkv, n, d = k.shape
    scale = np.float32(1.0 / np.sqrt(d))
    if method == "knorm":
        return -np.sqrt(np.einsum("hnd,hnd->hn", k, k))
    if method == "streaming":
        s = np.zeros((hkv, n), dtype=np.float32)
        s[:, :SINKS] = 1.0
        return s + np.arange(n, dtype=np.float32)[None, :] / n  # recency, sinks first (ties: none)
    kr = np.repeat(k, groups, axis=0)  # repeat_kv (materialised, as transformers does)
    if method == "snapkv":
        w = window
        logits = np.matmul(q, kr.transpose(0, 2, 1)) * scale  # [Hq, w, n]
        rows = np.arange(w)[:, None]
        cols = np.arange(n)[None, :]
        logits[:, cols.repeat(w, 0) > (n - w + rows)] = -np.inf
        attn = softmax_rows(logits)[..., : n - w]
        scores = attn.mean(axis=1)  # [Hq, n - w]
        padded = np.pad(scores, ((0, 0), (2, 2)))
        pooled = sum(padded[:, i: i + n - w] for i in range(5)) / np.float32(5)
        s = pooled.reshape(hkv, groups, n - w).mean(axis=1)
        return np.concatenate([s, np.full((hkv, w), s.max() + 1, dtype=np.float32)], axis=1)
    if method == "h2o":
        logits = np.matmul(q, kr.transpose(0, 2, 1)) * scale  # [Hq, n, n]: every query
        logits[:, np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
        attn = softmax_rows(logits)
        s = attn.sum(axis=1) / np.arange(n, 0, -1, dtype=np.float32)
        return s.reshape(hkv, groups, n).mean(axis=1)
    raise ValueError(method)


def np_pipeline(method, k, v, q, window, groups, n_kept):
    scores = np_scores(method, k, q, window, groups)
    idx = np.argpartition(-scores, n_kept - 1, axis=-1)[:, :n_kept]
    idx.sort(axis=-1)
    return np.take_along_axis(k, idx[..., None], axis=1), np.take_along_axis(v, idx[..., None], axis=1), idx, scores


# ---------------------------------------------------------------------------------------------
# The PyTorch pipeline (kvpress's lines, CPU)
# ---------------------------------------------------------------------------------------------


def torch_scores(method, kt, vt, qt, window, ratio):
    """Scores [1, kv_heads, n] as kvpress computes them. kt, vt: [1, Hkv, n, D]; qt: [1, Hq, w, D].
    With kvpress importable its presses' own score() run on the attention weights that kvpress
    would get (SnapKV: compute_window_attention's lines with the queries given; H2O: HF eager
    attention over all queries); without it, the same lines from bench/peers/kvpress_torch.py."""
    n = kt.shape[2]
    module = types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=qt.shape[1] if qt is not None else 0))
    hidden = torch.empty((1, n, 1))  # only its length is read (SnapKVPress asserts n > window)
    if method == "snapkv":
        if kvpress is None:
            return kvpress_lines.snapkv_scores(kt, qt, window, 5)
        attn = kvpress_lines.window_attention(kt, qt, window)
        return kvpress.SnapKVPress(window_size=window, kernel_size=5).score(module, hidden, kt, vt, attn, {})
    if method == "h2o":
        attn = kvpress_lines.eager_attention(kt, qt)
        if kvpress is None:
            return kvpress_lines.h2o_scores(kt, attn)
        return kvpress.ObservedAttentionPress().score(module, hidden, kt, vt, attn, {})
    if method == "knorm":
        return kvpress.KnormPress().score(module, hidden, kt, vt, None, {}) if kvpress else -kt.norm(dim=-1)
    if method == "streaming":  # sinks and the most recent tokens
        if kvpress is not None:
            return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=SINKS).score(module, hidden, kt, vt, None, {})
        return torch.cat([torch.ones((1, kt.shape[1], SINKS)), torch.arange(n - SINKS, dtype=kt.dtype).expand(1, kt.shape[1], -1) / n], -1)
    raise ValueError(method)


def torch_pipeline(method, kt, vt, qt, window, n_kept, ratio):
    scores = torch_scores(method, kt, vt, qt, window, ratio)
    idx = scores.topk(n_kept, dim=-1).indices  # ScorerPress.compress
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, kt.shape[-1])
    return kt.gather(2, gather).contiguous(), vt.gather(2, gather).contiguous(), idx[0], scores[0]


def kept_agreement(keep, idx, s_peer, n, n_kept):
    """(fraction of the peer's kept tokens the library keeps, whether every difference lies
    within 1e-4 relative of the peer's k-th score)."""
    overlap, boundary_only = 0, True
    for h in range(keep.shape[0]):
        a, b = set(keep[h].tolist()), set(idx[h].tolist())
        overlap += len(a & b)
        diff = np.fromiter(a ^ b, dtype=np.int64)
        if diff.size:
            kth = np.partition(s_peer[h], n - n_kept)[n - n_kept]
            near = np.abs(s_peer[h][diff] - kth) <= 1e-4 * max(abs(float(kth)), 1e-30)
            boundary_only &= bool(near.all())
    return overlap / (keep.shape[0] * n_kept), boundary_only


# ---------------------------------------------------------------------------------------------
# One point
# ---------------------------------------------------------------------------------------------


def run_point(ctx, model, method, n, ratio, reps, rng, threads):
    name, hq, hkv, d = model
    groups = hq // hkv
    window = n if method == "h2o" else 64
    n_kept = kept_of(n, ratio)
    k = ((rng.random((hkv, n, d), dtype=np.float32) - 0.5) * 3.4).astype(np.float32)
    v = ((rng.random((hkv, n, d), dtype=np.float32) - 0.5) * 3.4).astype(np.float32)
    needs_q = method in ("snapkv", "h2o")
    q = ((rng.random((hq, window, d), dtype=np.float32) - 0.5) * 3.4).astype(np.float32) if needs_q else None

    plan = ctx.plan(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=[n], budgets=[n_kept], method=method,
                    dtype="f32", window=window, pool_kernel=5 if method == "snapkv" else 1,
                    sink_tokens=SINKS if method == "streaming" else 0)
    # queries in the plan's row order: obs positions are the last `window` positions, ascending
    assert plan.info.obs_total == (window if needs_q else 0), (plan.info.obs_total, window)
    queries = np.ascontiguousarray(q.transpose(1, 0, 2)) if needs_q else None

    kc = np.empty((1, hkv, n, d), dtype=np.float32)
    vc = np.empty_like(kc)

    def restore():
        kc[0] = k
        vc[0] = v

    cache = kvc.hf_cache(kc, vc)
    ours, keep = timed(lambda: plan.compress(cache, queries), reps, setup=restore)
    keep = np.asarray(keep).reshape(hkv, n_kept)
    # compaction check: the library's compacted K rows equal the numpy gather of its own keep set
    compact_ok = bool(np.array_equal(kc[0][:, :n_kept], np.take_along_axis(k, keep[..., None], axis=1)))
    peer, (k_np, v_np, idx, s_np) = timed(lambda: np_pipeline(method, k, v, q, window, groups, n_kept), reps)
    # the numpy pipeline's peak extra memory (numpy reports its buffers to tracemalloc), untimed
    tracemalloc.start()
    np_pipeline(method, k, v, q, window, groups, n_kept)
    peer_extra = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    # apples to apples: same kept sets (up to near-ties); same scores where the two scales agree
    # (STREAMING's numpy score is a different but order-equivalent recency scale). One untimed
    # kvc_score for the score check and the select time (skipped where a score call is slow).
    score_rel_err = select_ms = None
    if method != "streaming" and ours["median_ms"] < 8000:
        restore()
        lib_scores = plan.score(cache, queries)
        t0 = time.perf_counter()
        plan.select(lib_scores)
        select_ms = (time.perf_counter() - t0) * 1e3
        lib_s = np.asarray(lib_scores).reshape(hkv, n)
        finite = np.isfinite(lib_s)
        denom = max(float(np.abs(s_np[finite]).max()), 1e-30) if finite.any() else 1.0
        score_rel_err = float(np.abs(lib_s[finite] - s_np[finite]).max() / denom) if finite.any() else 0.0
    same_np, near_np = kept_agreement(keep, idx, s_np, n, n_kept)
    torch_rec = {}
    if torch is not None:
        kt, vt = torch.from_numpy(k[None]), torch.from_numpy(v[None])
        qt = torch.from_numpy(q[None]) if needs_q else None
        with torch.no_grad():
            tp, (_, _, idx_t, s_t) = timed(lambda: torch_pipeline(method, kt, vt, qt, window, n_kept, ratio), reps)
        same_t, near_t = kept_agreement(keep, idx_t.numpy(), s_t.float().numpy(), n, n_kept)
        torch_rec = {"torch_median_ms": tp["median_ms"], "torch_p10_ms": tp["p10_ms"], "torch_p90_ms": tp["p90_ms"],
                     "torch_cpu_ms": tp["cpu_ms"], "speedup_torch": tp["median_ms"] / ours["median_ms"],
                     "speedup_torch_cpu_time": tp["cpu_ms"] / ours["cpu_ms"], "same_sets_torch_fraction": same_t,
                     "torch_differences_near_ties_only": near_t}

    return {
        "record": "result", "op": "compress", "impl": "kvc_cpu", "peer": "numpy", "model": name, "method": method,
        "n": n, "threads": threads, "batch": 1, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": "f32", "ratio": ratio,
        "window": window if needs_q else 0, "kept": n_kept, **ours,
        "select_ms": select_ms,
        "peer_median_ms": peer["median_ms"], "peer_p10_ms": peer["p10_ms"], "peer_p90_ms": peer["p90_ms"],
        "peer_cpu_ms": peer["cpu_ms"], "speedup": peer["median_ms"] / ours["median_ms"],
        "speedup_cpu_time": peer["cpu_ms"] / ours["cpu_ms"],
        "same_sets_fraction": same_np, "differences_near_ties_only": near_np, **torch_rec,
        "score_max_rel_err": score_rel_err, "compaction_matches_gather": compact_ok,
        "extra_bytes": plan.workspace_size("compress"), "peer_extra_bytes": peer_extra,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="n = 1k only (a smoke test)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of every implementation: the library's context, numpy's BLAS, torch (read before they load)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_bench.jsonl"))
    args = p.parse_args()
    if args.reps < 5 and not args.quick:
        p.error("--reps must be >= 5")

    llama = ("llama", 32, 8, 128)
    grid = [(llama, m, n) for m in ("snapkv", "knorm", "streaming") for n in (1024, 4096, 16384)]
    grid += [(llama, "h2o", n) for n in (1024, 2048, 4096)]
    if args.quick:
        grid = [g for g in grid if g[2] <= 1024]

    ctx = kvc.Context("cpu", threads=args.threads)
    rng = np.random.default_rng(1234)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except Exception:
        commit = "?"
    cpu_model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        pass
    header = {"record": "device", "bench": "cpu_bench", "machine": platform.node(), "cpu": cpu_model,
              "cores": os.cpu_count(), "numpy": np.__version__, "threads": args.threads,
              "torch": torch.__version__ if torch is not None else None,
              "torch_missing": None if torch is not None else _torch_missing,
              "kvpress": _kvpress_version if kvpress is not None else None,
              "kvpress_missing": None if kvpress is not None else _kvpress_missing,
              "library": kvc.library_path(), "kvc_version": kvc.library_version(), "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ratio": args.ratio, "reps": args.reps}
    t_start = time.monotonic()
    with open(args.out, "w") as out:
        out.write(json.dumps(header) + "\n")
        for i, (model, method, n) in enumerate(grid):
            log(f"[{i + 1}/{len(grid)}] {model[0]} {method} n={n} ratio={args.ratio}")
            rec = run_point(ctx, model, method, n, args.ratio, args.reps, rng, args.threads)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            log(f"    kvc {rec['median_ms']:.1f} ms  numpy {rec['peer_median_ms']:.1f} ms ({rec['speedup']:.2f}x)  "
                + (f"torch {rec['torch_median_ms']:.1f} ms ({rec['speedup_torch']:.2f}x, same sets "
                   f"{rec['same_sets_torch_fraction']:.4f} near-ties only {rec['torch_differences_near_ties_only']})  "
                   if "torch_median_ms" in rec else "")
                + f"numpy same sets {rec['same_sets_fraction']:.4f} (near-ties only: "
                f"{rec['differences_near_ties_only']})  score err {rec['score_max_rel_err']}")
    log(f"done in {time.monotonic() - t_start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
