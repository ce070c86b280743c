#!/usr/bin/env python3
"""Turns the benchmarks' JSON lines into bench/RESULTS.md and the plots.

Inputs: JSON lines from bench/run_device.sh (results.jsonl: the C programs and the PyTorch /
FlashInfer peers of one GPU run) and from bench/cpu_bench.py (bench/results/cpu_bench.jsonl).
Rows are joined on the keys the programs share:
  compress  (model, method, n, batch, ratio)          kvc  vs  torch_kvpress
  select    (n, batch, kv_heads, k)                   kvc (mode plain|quota)  vs  cub, torch_topk, flashinfer_topk
  compact   (n, batch, kv_heads, ratio|kept)          kvc (bench_compact or bench_compress's stage)  vs  torch_gather
and every rate is set against the ceilings measured in the same run (record "ceiling").

Besides the timings: the GPU checker's totals (record "gpucheck"), the Python CUDA tests ("pytest"),
the clocks of every step ("clocks": SM / memory MHz at its start and end and sampled during it),
which peers ran, and each point's analytic floor (floor_ms / pct_of_floor, written by the programs
through bench_util.cuh's add_floor from bench/cost_model.h's counts; "–" where a program gives none),
and bench/results/cost_model.md (bench/cost_model_table: the model's floors, computed, not measured).

Outputs: --md (bench/RESULTS.md), --png (bench/speedup.png: our speedup over the kvpress/PyTorch
pipeline against n, GPU) and --cpu-png (bench/cpu_speedup.png: CPU backend vs numpy against n).

  python3 bench/report.py [--in FILE ...] [--md bench/RESULTS.md] [--png bench/speedup.png]
                          [--cpu-png bench/cpu_speedup.png] [--no-cpu-png]
  python3 bench/report.py --selftest FILE   writes a synthetic fixture of every record kind (made-up
                          numbers, each line marked "synthetic": true) for bench/run_device.sh
                          --dry-run to render; a report of it says SYNTHETIC at the top
  Default inputs: every bench/results/*.jsonl.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NO_DEVICE_DATE = "2026-12-01"


def load(paths):
    recs = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                r["_file"] = os.path.basename(p)
                recs.append(r)
    return recs


def fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def span(a, b):
    return f"{fmt(a)}–{fmt(b)}"


def mib(b):
    return None if b is None else b / 2**20


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(out)


def commit():
    try:
        c = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        return c.strip() or "?"
    except Exception:
        return "?"


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def ceilings(recs):
    copy = [r["gbps"] for r in recs if r.get("record") == "ceiling" and r.get("kind") == "copy"]
    gemm = [r["tflops"] for r in recs if r.get("record") == "ceiling" and r.get("kind") == "gemm_bf16"]
    return (statistics.median(copy) if copy else None), (max(gemm) if gemm else None)


def floor_cells(r):
    """(floor ms, % of floor) of a result line, None where the program gave no floor."""
    if not r or not r.get("floor_ms"):
        return None, None
    return r["floor_ms"], r.get("pct_of_floor")


def results(recs, op, impl=None):
    return [r for r in recs if r.get("record", "result") == "result" and r.get("op") == op
            and (impl is None or r.get("impl", "kvc") == impl) and "median_ms" in r]


def impl_name(r):
    """kvc/<mode> for our selection rows; every CUB variant as 'cub'."""
    impl = r.get("impl", "kvc")
    if impl.startswith("cub"):
        return "cub"
    return impl + (f"/{r['mode']}" if impl == "kvc" and r.get("mode") else "")


def select_table(recs):
    keyed = {}
    for r in results(recs, "select"):
        keyed.setdefault((r["n"], r.get("batch"), r.get("kv_heads"), r.get("k")), {})[impl_name(r)] = r
    return keyed


def compress_pairs(recs):
    ours = {(r["model"], r["method"], r["n"], r["batch"], round(r["ratio"], 4)): r for r in results(recs, "compress", "kvc")}
    peers = {}
    for r in recs:
        if r.get("op") == "compress" and r.get("impl") == "torch_kvpress":
            peers[(r["model"], r["method"], r["n"], r["batch"], round(r["ratio"], 4))] = r
    rows = []
    for key in sorted(set(ours) | set(peers)):
        o, p = ours.get(key), peers.get(key)
        speed = mem = None
        if o and p and "median_ms" in p:
            speed = p["median_ms"] / o["median_ms"]
            if p.get("extra_bytes"):
                mem = o["extra_bytes"] / p["extra_bytes"]
        rows.append((key, o, p, speed, mem))
    return rows


def gpu_sections(recs, lines):
    copy_gbps, gemm_tflops = ceilings(recs)
    dev = next((r for r in recs if r.get("record") == "device" and r.get("bench") != "cpu_bench" and "gpu" in r), None)
    run = next((r for r in recs if r.get("record") == "run"), None)
    lines.append(f"Device: **{dev['gpu']}** ({dev.get('sms', '?')} SMs), run of commit "
                 f"`{run['commit'] if run else '?'}` on {run['date'] if run else '?'}.")
    lines.append(f"Ceilings measured in the same run: copy **{fmt(copy_gbps)} GB/s** (cudaMemcpy D2D, read + write), "
                 f"bf16 GEMM **{fmt(gemm_tflops)} TFLOP/s** (cuBLAS 8192³, random data).\n")
    notes = [r for r in recs if r.get("record") in ("note", "skipped", "timeout", "failed")]
    if notes:
        lines.append("Run notes: " + "; ".join(
            r.get("note") or f"{r.get('record')} {r.get('step') or r.get('op', '')} {r.get('reason', '')}".strip()
            for r in notes[:20]) + "\n")

    lines.append("### Full pipeline: kvc_compress vs the kvpress pipeline in PyTorch\n")
    lines.append("Ours: paged NHD cache (16-token pages), score + select + in-place compaction in one call. "
                 "Peer: kvpress's SnapKV/ObservedAttention + ScorerPress.compress on HF tensors "
                 "(new K/V tensors). Memory: extra device bytes beyond cache and queries "
                 "(ours: the workspace; peer: torch.cuda.max_memory_allocated minus the inputs).\n")
    rows = []
    for key, o, p, speed, mem in compress_pairs(recs):
        model, method, n, batch, ratio = key
        peer_ms = p.get("median_ms") if p else None
        peer_txt = peer_ms if peer_ms is not None else (p.get("error") if p else None)
        rows.append((model, method, n, batch, ratio, o and o["median_ms"],
                     o and span(o['p10_ms'], o['p90_ms']), *floor_cells(o), peer_txt, speed,
                     o and mib(o["extra_bytes"]), p and mib(p.get("extra_bytes")), mem,
                     o and o.get("pct_copy"), o and o.get("tflops"),
                     o and o.get("score_ms"), o and o.get("select_ms"), o and o.get("compact_ms")))
    lines.append(table(["model", "method", "n", "batch", "ratio", "ours ms", "p10–p90", "floor ms", "% of floor",
                        "peer ms", "speedup", "our extra MiB", "peer extra MiB", "mem ratio", "% copy bw", "TFLOP/s",
                        "score ms", "select ms", "compact ms"], rows) + "\n")

    lines.append("### Selection: kvc_select vs CUB sort, torch.topk, FlashInfer top_k\n")
    keyed = select_table(recs)
    impls = sorted({i for d in keyed.values() for i in d})
    rows = []
    for key in sorted(keyed):
        d = keyed[key]
        row = list(key)
        for i in impls:
            row.append(d[i]["median_ms"] if i in d else None)
        q = d.get("kvc/quota") or d.get("kvc/plain")
        row.extend(floor_cells(q))
        for peer in ("flashinfer_topk", "cub", "torch_topk"):
            row.append(d[peer]["median_ms"] / q["median_ms"] if (q and peer in d) else None)
        rows.append(row)
    lines.append(table(["n", "batch", "kv heads", "k"] + [f"{i} ms" for i in impls]
                       + ["floor ms", "quota % of floor", "quota vs FlashInfer", "quota vs CUB", "quota vs torch.topk"],
                       rows) + "\n")

    lines.append("### Compaction and score rates against the copy ceiling\n")
    lines.append("Compaction: `bench_compact` (moved K/V rows read + written; pct_memcpy = a cudaMemcpy of the "
                 "same bytes / our time), the compaction stage inside `bench_compress`, and kvpress's "
                 "`gather` (torch) for reference. Score: K bytes read over the time (SnapKV w64 is "
                 "arithmetic-heavy, KNORM purely memory-bound).\n")
    rows = []
    for r in results(recs, "compact"):
        g = r.get("gbps")
        kept = r.get("keep", (1 - r["ratio"]) if "ratio" in r else None)
        rows.append(("compact", r.get("impl", "kvc"), r.get("n"), r.get("batch"), kept, r["median_ms"],
                     *floor_cells(r), g, 100 * g / copy_gbps if (g and copy_gbps) else None, r.get("pct_memcpy")))
    for r in results(recs, "compress", "kvc"):
        if r.get("compact_gbps"):
            rows.append(("compact (stage of compress)", "kvc", r["n"], r["batch"], 1 - r["ratio"], r["compact_ms"],
                         None, None, r["compact_gbps"], 100 * r["compact_gbps"] / copy_gbps if copy_gbps else None,
                         None))
    for r in results(recs, "score"):
        g = r.get("k_gbps")
        rows.append((f"score {r.get('method')} ({r.get('kv_heads')}:{r.get('q_heads')} heads)", r.get("impl", "kvc"),
                     r.get("n"), r.get("batch"), None, r["median_ms"], *floor_cells(r), g,
                     100 * g / copy_gbps if (g and copy_gbps) else None, None))
    lines.append(table(["what", "impl", "n", "batch", "kept fraction", "ms", "floor ms", "% of floor", "GB/s",
                        "% of copy", "% of memcpy"], rows) + "\n")
    if not any(r.get("floor_ms") for r in recs if r.get("record", "result") == "result"):
        lines.append("Floors: none in this run (\"–\"): bench_score adds them (bench_util.cuh's `add_floor` from "
                     "`bench/cost_model.h`); the other programs until their stages get a `kvc_floor_<op>` there.\n")


def run_sections(recs, lines):
    """Correctness on the device, which peers ran, the clocks of every step."""
    checks = [r for r in recs if r.get("record") == "gpucheck"]
    tests = [r for r in recs if r.get("record") == "pytest"]
    if checks or tests:
        lines.append("### Correctness in the same run\n")
        rows = [(f"`{r.get('binary', 'kvc-gpucheck')}` ({r.get('shards', 1)} shards, {r.get('seconds')} s)",
                 r.get("passed"), r.get("failed"), r.get("skipped")) for r in checks]
        rows += [("`bindings/python/tests/test_cuda.py`", r.get("passed"), r.get("failed"), r.get("skipped"))
                 for r in tests]
        lines.append(table(["check", "passed", "failed", "skipped"], rows) + "\n")
        lines.append("kvc-gpucheck runs the CUDA backend against the CPU backend in one process on seeded cases "
                     "(tests/gpucheck); its failures, each with the seed that reruns it, are in `gpucheck.log`.\n")
    impls = sorted({r.get("impl") for r in recs if r.get("record", "result") == "result" and "median_ms" in r
                    and r.get("impl") and not r.get("impl", "").startswith("kvc")})
    env = next((r for r in recs if r.get("record") == "env"), None)
    sources = sorted({r.get("kvpress") for r in recs if r.get("impl") == "torch_kvpress" and r.get("kvpress")})
    if impls or env:
        text = "Peers that ran: " + (", ".join(f"`{i}`" for i in impls) if impls else "none")
        if sources:
            text += f"; the kvpress pipeline was kvpress {', '.join(sources)}"
        if env and env.get("flashinfer"):
            text += f". FlashInfer: {env['flashinfer']}"
        lines.append(text + ".\n")
    clocks = [r for r in recs if r.get("record") == "clocks"]
    if clocks:
        steps = []
        for r in clocks:
            if r["step"] not in steps:
                steps.append(r["step"])
        rows = []
        for st in steps:
            at = {r.get("at"): r for r in clocks if r["step"] == st}
            a, b, m = at.get("start", {}), at.get("end", {}), at.get("sampled", {})
            rows.append((st, a.get("sm_mhz"), b.get("sm_mhz"),
                         m and f"{m['sm_mhz_min']}–{m['sm_mhz_median']}–{m['sm_mhz_max']}", a.get("mem_mhz"),
                         m and f"{m['mem_mhz_min']}–{m['mem_mhz_max']}", b.get("temp_c"), b.get("power_w")))
        lines.append("### Clocks per step\n")
        lines.append(table(["step", "SM MHz at start", "SM MHz at end", "SM MHz sampled (min–median–max)",
                            "memory MHz at start", "memory MHz sampled", "°C at end", "W at end"], rows) + "\n")


def selftest_fixture(path):
    """Made-up lines of every record kind the run writes (for the dry run to render)."""
    fake = {"synthetic": True}
    lines = [
        {"record": "run", "commit": "0000000", "date": "2000-01-01T00:00:00Z", "host": "fixture"},
        {"record": "env", "python": "3.12", "torch": "0", "flashinfer": "not carried (fixture)"},
        {"record": "device", "bench": "bench_compress", "gpu": "SYNTHETIC GPU", "sms": 1, "l2_bytes": 1, "mem_bytes": 1},
        {"record": "ceiling", "bench": "bench_ceilings", "kind": "copy", "gbps": 1000.0},
        {"record": "ceiling", "bench": "bench_ceilings", "kind": "gemm_bf16", "tflops": 100.0},
        {"record": "gpucheck", "binary": "kvc-gpucheck", "shards": 2, "seconds": 1, "passed": 9, "failed": 1, "skipped": 0},
        {"record": "pytest", "passed": 3, "failed": 0, "skipped": 0},
        {"record": "clocks", "step": "bench_compress", "at": "start", "sm_mhz": 1000, "mem_mhz": 2000, "temp_c": 30, "power_w": 100},
        {"record": "clocks", "step": "bench_compress", "at": "sampled", "samples": 3, "sm_mhz_min": 900,
         "sm_mhz_median": 1000, "sm_mhz_max": 1100, "mem_mhz_min": 2000, "mem_mhz_median": 2000, "mem_mhz_max": 2000},
        {"record": "clocks", "step": "bench_compress", "at": "end", "sm_mhz": 1100, "mem_mhz": 2000, "temp_c": 40, "power_w": 200},
        {"record": "skipped", "step": "bench_score", "reason": "fixture"},
    ]
    base = {"n": 32768, "batch": 1, "ratio": 0.5, "model": "llama", "method": "snapkv", "median_ms": 2.0, "p10_ms": 1.9,
            "p90_ms": 2.1, "reps": 10}
    lines += [
        {"record": "result", "op": "compress", "impl": "kvc", **base, "extra_bytes": 1 << 20, "pct_copy": 10.0,
         "tflops": 1.0, "score_ms": 1.0, "select_ms": 0.5, "compact_ms": 0.5, "compact_gbps": 500.0,
         "score_k_gbps": 100.0, "floor_ms": 0.5, "pct_of_floor": 25.0},
        {"record": "result", "op": "compress", "impl": "torch_kvpress", **base, "median_ms": 10.0, "extra_bytes": 1 << 30,
         "kvpress": "0.0 (fixture)"},
        {"record": "result", "op": "select", "impl": "kvc", "mode": "quota", "n": 32768, "batch": 4, "kv_heads": 8,
         "k": 16384, "median_ms": 0.1, "p10_ms": 0.1, "p90_ms": 0.1, "reps": 10, "extra_bytes": 0},
        {"record": "result", "op": "select", "impl": "torch_topk", "mode": "plain", "n": 32768, "batch": 4, "kv_heads": 8,
         "k": 16384, "median_ms": 0.3, "p10_ms": 0.3, "p90_ms": 0.3, "reps": 10},
        {"record": "result", "op": "compact", "impl": "kvc", "n": 32768, "batch": 1, "keep": 0.5, "median_ms": 0.05,
         "p10_ms": 0.05, "p90_ms": 0.05, "reps": 10, "gbps": 800.0, "pct_memcpy": 80.0},
        {"record": "result", "op": "score", "impl": "kvc", "method": "knorm", "n": 32768, "batch": 1, "kv_heads": 8,
         "q_heads": 32, "median_ms": 0.02, "p10_ms": 0.02, "p90_ms": 0.02, "reps": 10, "k_gbps": 600.0},
    ]
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps({**line, **fake}) + "\n")


def gpu_targets(recs):
    """Achieved values per target, or None where not measured."""
    copy_gbps, _ = ceilings(recs)
    out = {}
    pairs = [x for x in compress_pairs(recs) if x[0][2] == 32768 and x[3] is not None]
    if pairs:
        sp = [x[3] for x in pairs]
        mem = [x[4] for x in pairs if x[4] is not None]
        out["compress_speed"] = f"{min(sp):.2f}–{max(sp):.2f}× (median {statistics.median(sp):.2f}×, {len(sp)} points)"
    oom = [x for x in compress_pairs(recs) if x[0][2] == 32768 and x[1] and x[2] and x[2].get("error") == "oom"]
    if oom:
        out["compress_speed"] = out.get("compress_speed", "–") + (
            f"; the peer ran out of device memory at {len(oom)} more point(s) "
            f"({', '.join(sorted({x[0][1] for x in oom}))}) that the library ran")
        if mem:
            out["compress_mem"] = f"{min(mem):.3f}–{max(mem):.3f} (median {statistics.median(mem):.3f})"
    keyed = select_table(recs)
    for peer, name in (("flashinfer_topk", "select_fi"), ("cub", "select_cub"), ("torch_topk", "select_torch")):
        ratios = [d[peer]["median_ms"] / d["kvc/quota"]["median_ms"] for d in keyed.values()
                  if "kvc/quota" in d and peer in d]
        if ratios:
            out[name] = f"{min(ratios):.2f}–{max(ratios):.2f}× (median {statistics.median(ratios):.2f}×)"
    if copy_gbps:
        comp = [r["gbps"] for r in results(recs, "compact", "kvc") if r.get("gbps")]
        memc = [r["pct_memcpy"] for r in results(recs, "compact", "kvc") if r.get("pct_memcpy")]
        if not comp:  # fall back on the compaction stage of bench_compress
            comp = [r["compact_gbps"] for r in results(recs, "compress", "kvc") if r.get("compact_gbps")]
        if comp:
            out["compact"] = (f"{100 * max(comp) / copy_gbps:.0f}% best, {100 * statistics.median(comp) / copy_gbps:.0f}% "
                              f"median of the copy ceiling" + (f"; {statistics.median(memc):.0f}% median of a memcpy "
                                                               f"of the same bytes" if memc else ""))
        sc = [r["k_gbps"] for r in results(recs, "score") if r.get("k_gbps") and r.get("method") == "snapkv"]
        sc += [r["score_k_gbps"] for r in results(recs, "compress", "kvc")
               if r.get("score_k_gbps") and r.get("method") == "snapkv"]
        if sc:
            out["score"] = f"{100 * max(sc) / copy_gbps:.0f}% best, {100 * statistics.median(sc) / copy_gbps:.0f}% median (SnapKV w64)"
    return out


def gpu_plot(recs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    series = {}
    for key, o, p, speed, mem in compress_pairs(recs):
        model, method, n, batch, ratio = key
        if speed is None or abs(ratio - 0.5) > 1e-6:
            continue
        series.setdefault(f"{model} {method} batch {batch}", []).append((n, speed))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.axhline(5, color="red", ls="--", lw=1, label="target 5×")
    ax.axhline(1, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sequence length n (tokens)")
    ax.set_ylabel("speedup (kvpress-PyTorch time / kvc_compress time)")
    ax.set_title("GPU full pipeline, compression ratio 0.5")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------


CPU_PEAK_GFLOPS = 2.1 * 2 * 16 * 2  # the bench machine's single-core fp32 FMA peak (AVX-512, 2.1 GHz)


def cpu_rows(recs):
    return [r for r in recs if r.get("impl") == "kvc_cpu" and r.get("record") == "result"]


def cpu_section(recs, lines):
    dev = next((r for r in recs if r.get("record") == "device" and r.get("bench") == "cpu_bench"), None)
    rows = cpu_rows(recs)
    if not rows:
        lines.append("No CPU numbers yet: run `bench/cpu_bench.py`.\n")
        return
    threads = dev.get("threads", dev.get("blas_threads", 1))
    torch_note = (f"PyTorch {dev['torch']}" + (f", kvpress {dev['kvpress']}" if dev.get("kvpress") else
                                                f" (kvpress not importable: {dev.get('kvpress_missing')}; its lines "
                                                f"from bench/peers/kvpress_torch.py)")
                  if dev.get("torch") else f"no PyTorch peer ({dev.get('torch_missing')})")
    stretch = sorted(r["median_ms"] / r["cpu_ms"] for r in rows if r.get("cpu_ms"))
    lines.append(f"Measured {dev['date']} at commit `{dev['commit']}` on **{dev['cpu']}**, {dev['cores']} cores: "
                 f"a **2-core VM shared with other engineers' builds and tests while it ran** (the library's wall "
                 f"time was on median {stretch[len(stretch) // 2]:.1f}× its process CPU time), so the wall-clock "
                 f"numbers are **noisy**; the CPU-time columns (process CPU time) are steadier. **{threads} "
                 f"thread(s) for every implementation** (the library's context, numpy's BLAS, torch). numpy "
                 f"{dev['numpy']}, {torch_note}, library {dev['kvc_version']}, compression ratio {dev['ratio']}, "
                 f"median of {dev['reps']} repetitions after a warm-up, the three implementations one after the "
                 f"other on each point's tensors.\n")
    lines.append(f"Command: `KVCOMPRESS_LIBRARY=build/bench/libkvcompress.so nice build/venv-torch/bin/python "
                 f"bench/cpu_bench.py --threads {threads}` (CPU build: `cmake -S . -B build/bench "
                 f"-DKVC_ENABLE_CUDA=OFF && cmake --build build/bench`; venv: `python3 -m venv build/venv-torch && "
                 f"build/venv-torch/bin/pip install kvpress numpy`).\n")
    t = []
    for r in sorted(rows, key=lambda r: (r["method"], r["n"])):
        t.append((r["method"], r["n"], r["kept"], r["median_ms"], span(r["p10_ms"], r["p90_ms"]),
                  r["peer_median_ms"], r.get("torch_median_ms"), r["speedup"], r["speedup_cpu_time"],
                  r.get("speedup_torch"), r.get("speedup_torch_cpu_time"),
                  f"{r['same_sets_fraction']:.4f} / " + (f"{r['same_sets_torch_fraction']:.4f}"
                                                         if "same_sets_torch_fraction" in r else "–"),
                  ("yes" if r["differences_near_ties_only"] else "NO") + " / " +
                  (("yes" if r["torch_differences_near_ties_only"] else "NO") if "torch_differences_near_ties_only" in r else "–"),
                  r.get("score_max_rel_err"), r["compaction_matches_gather"], mib(r["extra_bytes"]),
                  mib(r.get("peer_extra_bytes"))))
    lines.append(table(["method", "n", "kept", "kvc ms", "p10–p90", "numpy ms", "torch ms", "vs numpy (wall)",
                        "vs numpy (CPU time)", "vs torch (wall)", "vs torch (CPU time)", "same kept set numpy / torch",
                        "diffs near ties only", "score rel err", "compaction = gather", "kvc extra MiB",
                        "numpy extra MiB"], t) + "\n")
    lines.append("Llama-3.1-8B-like heads (32 q / 8 KV, head_dim 128), batch 1, f32. \"vs numpy\" / \"vs torch\" = peer "
                 "time / kvc time (> 1: the library is faster). \"same kept set\": fraction of the peer's kept tokens "
                 "the library also keeps; differences are allowed only between tokens whose peer scores tie within "
                 "1e-4 relative of its k-th score (both score in float32, in different orders, so near-ties may go "
                 "either way). \"score rel err\": max |kvc − numpy| over scored keys / max |numpy| (STREAMING: not "
                 "comparable, different recency scale; – where the extra score call was skipped because one call "
                 "takes over 8 s). Extra memory: the library's kvc_compress workspace (it compacts in place) vs the "
                 "numpy pipeline's peak traced allocation (tracemalloc, one untimed call; includes the new K/V arrays "
                 "it gathers into). Analytic floor of the attention methods: 2·32·w·n·128 flops of QKᵀ (w = 64 "
                 "window queries for SnapKV; H2O's causal triangle n(n+1)/2 pairs), against this CPU's single-core "
                 "fp32 peak of 2.1 GHz × 2 FMA × 16 lanes × 2 = 134 GFLOP/s (AVX-512); the \"GFLOP/s\" figures "
                 "below are those flops over kvc's median time (the whole kvc_compress call: scoring, selection, "
                 "compaction).\n")
    att = [r for r in sorted(rows, key=lambda r: (r["method"], r["n"])) if r["method"] in ("snapkv", "h2o")]
    if att:
        g = []
        for r in att:
            w = r["window"] if r["method"] == "snapkv" else None
            pairs = w * r["n"] if w else r["n"] * (r["n"] + 1) / 2
            flops = 2 * r["q_heads"] * pairs * r["head_dim"]
            g.append((r["method"], r["n"], flops / 1e9, flops / (r["cpu_ms"] * 1e-3) / 1e9,
                      flops / (r["cpu_ms"] * 1e-3) / 1e9 / CPU_PEAK_GFLOPS, flops / (r["median_ms"] * 1e-3) / 1e9))
        lines.append(table(["method", "n", "QKᵀ GFLOP", "kvc GFLOP/s (CPU time)", "fraction of peak", "kvc GFLOP/s (wall)"],
                           g) + "\n")


def cpu_plot(recs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    rows = cpu_rows(recs)
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, peer in ((axes[0], "speedup_cpu_time", "numpy"), (axes[1], "speedup_torch_cpu_time", "kvpress on PyTorch")):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["n"], r[key]) for r in rows if r["method"] == method and r.get(key))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(1, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_title(f"vs {peer} (CPU-time ratio)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup = peer time / libkvcompress time")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("CPU backend, Llama-like heads, ratio 0.5, same thread count (2-core shared VM: noisy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cpu_summary(recs):
    rows = cpu_rows(recs)
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    parts = []
    for m, rs in sorted(by.items()):
        rs.sort(key=lambda r: r["n"])
        parts.append(f"{m}: " + ", ".join(f"{r['speedup_cpu_time']:.2g}×" + (f" / {r['speedup_torch_cpu_time']:.2g}×"
                                                                              if r.get("speedup_torch_cpu_time") else "")
                                          + f" at {r['n']}" for r in rs))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="inputs", nargs="*", default=None)
    ap.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--png", default=os.path.join(HERE, "speedup.png"))
    ap.add_argument("--cpu-png", default=os.path.join(HERE, "cpu_speedup.png"))
    ap.add_argument("--no-cpu-png", action="store_true")
    ap.add_argument("--selftest", metavar="FILE", help="write the synthetic fixture to FILE and stop")
    args = ap.parse_args()
    if args.selftest:
        selftest_fixture(args.selftest)
        return 0
    inputs = args.inputs if args.inputs else sorted(glob.glob(os.path.join(HERE, "results", "*.jsonl")))
    # the CPU numbers always come from the repository's file unless given explicitly
    cpu_file = os.path.join(HERE, "results", "cpu_bench.jsonl")
    if os.path.exists(cpu_file) and cpu_file not in [os.path.abspath(p) for p in inputs]:
        inputs.append(cpu_file)
    recs = load(inputs)
    has_gpu = any(r.get("record") == "ceiling" or (r.get("impl") in ("kvc", "torch_kvpress") and "median_ms" in r)
                  for r in recs)

    L = ["# libkvcompress benchmark results", ""]
    if any(r.get("synthetic") for r in recs):
        L.append("**SYNTHETIC FIXTURE: made-up numbers that exercise bench/report.py. Not measurements.**\n")
    L.append(f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `bench/report.py` at commit `{commit()}` from "
             + ", ".join(f"`{os.path.relpath(p, REPO) if os.path.isabs(p) else p}`" for p in inputs) + ".\n")
    L.append("\"Fast\" here is always a ratio against what users would otherwise run, measured side by side in "
             "the same run on the same shapes (GPU: `bench/run_device.sh`; CPU: `bench/cpu_bench.py`), "
             "and every rate is set against ceilings measured in that same run.\n")

    L.append("How to reproduce: GPU, `scripts/build_device.sh` here (an sm_90 build carried in `.device/`), then one "
             "device call of `bench/run_device.sh` (its header gives the call; it runs the checker `kvc-gpucheck`, "
             "`bindings/python/tests/test_cuda.py`, `bench_ceilings`, `bench_compress`, `bench_select`, `bench_score`, "
             "`bench_compact` and `bench/peers/kvpress_torch.py`, and writes `results.jsonl`); copy that file to "
             "`bench/results/` and run `bench/report.py`. CPU: `bench/cpu_bench.py` (command below).\n")
    L.append("## Targets\n")
    achieved = gpu_targets(recs) if has_gpu else {}
    pending = f"not yet run: no device was lent to this session ({NO_DEVICE_DATE})"
    g = lambda k: achieved.get(k, pending if not has_gpu else "not measured in this run")
    L.append(table(["target", "required", "achieved"], [
        ("Full compress vs the PyTorch/kvpress pipeline, n = 32k (SnapKV w64, H2O)", "≥ 5× faster", g("compress_speed")),
        ("Full compress extra peak memory vs the PyTorch/kvpress pipeline, n = 32k", "≤ 1/10", g("compress_mem")),
        ("Selection with quotas vs FlashInfer plain top-k (throughput)", "≥ 0.8×", g("select_fi")),
        ("Selection with quotas vs the CUB sort baseline", "≥ 3×", g("select_cub")),
        ("Selection with quotas vs torch.topk", "≥ 3×", g("select_torch")),
        ("Compaction bandwidth (kept K/V rows read + written)", "≥ 80% of copy bandwidth", g("compact")),
        ("Score bandwidth over the bytes of K it reads", "≥ 40% of copy bandwidth", g("score")),
        ("CPU backend vs numpy / vs kvpress on PyTorch (CPU, same threads), SnapKV n = 1k–16k, H2O n = 1k–4k",
         "≥ 1.5× / ≥ 1×", cpu_summary(recs) + " (CPU-time ratios, numpy / torch)" if cpu_rows(recs) else "not run"),
    ]) + "\n")

    L.append("## GPU\n")
    run_sections(recs, L)
    if has_gpu:
        gpu_sections(recs, L)
        if gpu_plot(recs, args.png):
            L.append(f"![GPU speedup]({os.path.basename(args.png)})\n")
    else:
        for sec in ("Full pipeline: kvc_compress vs the kvpress pipeline in PyTorch",
                    "Selection: kvc_select vs CUB sort, torch.topk, FlashInfer top_k",
                    "Compaction and score rates against the copy ceiling", "Ceilings (copy bandwidth, bf16 GEMM)"):
            L.append(f"### {sec}\n\n{pending.capitalize()}. `bench/run_device.sh` measures it in one device "
                     f"call (see its header).\n")

    model = os.path.join(HERE, "results", "cost_model.md")
    if os.path.exists(model):  # written by bench/cost_model_table (bench/cost_model.h)
        L.append("## Analytic floors (the cost model: computed, not measured)\n")
        with open(model) as f:
            L.append(f.read().strip() + "\n")

    L.append("## CPU (this machine)\n")
    cpu_section(recs, L)
    if (cpu_plot(recs, args.cpu_png) if not args.no_cpu_png else os.path.exists(args.cpu_png)):
        L.append(f"![CPU speedup]({os.path.basename(args.cpu_png)})\n")

    with open(args.md, "w") as f:
        f.write("\n".join(L))
    print(f"wrote {args.md}" + (f", {args.png}" if has_gpu else "") + ("" if args.no_cpu_png else f", {args.cpu_png}"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
