/*
 * bench_select - times kvc_select on the device (plain top-k, and with FAIR-span quotas) and the
 * CUB baseline (kernels/select_cub.h: segmented radix sort) with CUDA events; one JSON line per
 * point:
 *   {"op":"select","impl":"kvc","mode":"plain","n":131072,"batch":4,"kv_heads":8,"k":13107,
 *    "median_ms":...,"p10_ms":...,"p90_ms":...,"score_gbps":...}
 * score_gbps is the batch's scores (rows * n * 4 bytes) over the median time: what any selection
 * must read once, so it compares directly with the device's copy bandwidth (pct_copy: against the
 * cudaMemcpy D2D bandwidth measured at the start of the same run). Timing, L2 flush between
 * repetitions, statistics and JSON: bench_util.cuh. Every line also has "record":"result" and
 * "extra_bytes" (the implementation's workspace); the first lines are the device and the copy ceiling.
 * Rows = batch * kv_heads, every row n tokens; 4 sinks and 64 recent tokens are protected; the
 * quota mode adds 4 equal FAIR spans and fairness 1. The CUB baseline has no quotas (plain only).
 *
 *   bench_select [--n 4096,32768,131072,1048576] [--keep 0.1,0.5,0.9] [--mode plain,quota]
 *                [--batch 4] [--heads 8] [--iters 20] [--no-cub]
 */
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "kvcompress.h"
#include "select_cub.h"

namespace {

#define CHECK_CUDA KVC_BENCH_CHECK

using bench::split;

struct Options {
  std::vector<int> n = {4096, 32768, 131072, 1048576};
  std::vector<double> keep = {0.1, 0.5, 0.9};
  std::vector<std::string> modes = {"plain", "quota"};
  int batch = 4, heads = 8, iters = 20;
  bool cub = true;
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--no-cub") {
      o.cub = false;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "bench_select: %s needs a value\n", key.c_str());
      exit(2);
    }
    const char *value = argv[++i];
    if (key == "--n") {
      o.n.clear();
      for (const std::string &s : split(value)) o.n.push_back(atoi(s.c_str()));
    } else if (key == "--keep") {
      o.keep.clear();
      for (const std::string &s : split(value)) o.keep.push_back(atof(s.c_str()));
    } else if (key == "--mode") {
      o.modes = split(value);
    } else if (key == "--batch") {
      o.batch = atoi(value);
    } else if (key == "--heads") {
      o.heads = atoi(value);
    } else if (key == "--iters") {
      o.iters = atoi(value);
    } else {
      fprintf(stderr, "bench_select: unknown option %s\n", key.c_str());
      exit(2);
    }
  }
  return o;
}

void check(kvc_status_t status, kvc_context_t ctx, const char *what) {
  if (status == KVC_SUCCESS) return;
  fprintf(stderr, "bench_select: %s: %s (%s)\n", what, kvc_status_name(status), kvc_last_error(ctx));
  exit(1);
}

/* Shared by every point: the copy ceiling of this run and the L2 flusher (bench_util.cuh). */
double g_copy_gbps = 0;
bench::L2Flusher *g_flusher = nullptr;

/* bench::time_gpu: one warm-up, then o.iters repetitions between events, each from a cold L2;
 * prints the JSON line. extra_bytes: the device memory the implementation needs beyond scores and
 * keep indices (its workspace). */
void time_and_print(const Options &o, cudaStream_t stream, const char *impl, const std::string &mode, int n, int k,
                    size_t extra_bytes, const std::function<void()> &launch) {
  const bench::Stats s = bench::time_gpu([&](cudaStream_t) { launch(); }, stream, 1, o.iters, g_flusher);
  const double score_bytes = 4.0 * o.batch * o.heads * (double)n, gbps = score_bytes / (s.median_ms * 1e-3) / 1e9;
  bench::Json()
      .add("record", "result").add("op", "select").add("impl", impl).add("mode", mode).add("n", n)
      .add("batch", o.batch).add("kv_heads", o.heads).add("k", k).add_stats(s).add("score_gbps", gbps)
      .add("pct_copy", g_copy_gbps > 0 ? 100.0 * gbps / g_copy_gbps : 0.0).add("extra_bytes", (long long)extra_bytes)
      .print();
}

void bench_point(kvc_context_t ctx, const Options &o, cudaStream_t stream, const std::string &mode, int n,
                 double keep_fraction) {
  const int k = std::max(68, (int)(keep_fraction * n)), sink = 4, recent = 64;
  std::vector<int32_t> seq_lens(o.batch, n), budgets(o.batch, k), span_indptr(o.batch + 1);
  std::vector<kvc_span_t> spans;
  for (int b = 0; b < o.batch; ++b) {
    span_indptr[b] = (int32_t)spans.size();
    if (mode == "quota")
      for (int s = 0; s < 4; ++s) spans.push_back({s * (n / 4), (s + 1) * (n / 4), KVC_SPAN_FAIR, 1.0f});
  }
  span_indptr[o.batch] = (int32_t)spans.size();
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = o.heads;
  desc.num_q_heads = o.heads;
  desc.head_dim = 128;
  desc.batch = o.batch;
  desc.seq_lens = seq_lens.data();
  desc.budgets = budgets.data();
  desc.span_indptr = spans.empty() ? nullptr : span_indptr.data();
  desc.spans = spans.empty() ? nullptr : spans.data();
  desc.method = KVC_SCORE_KNORM;
  desc.sink_tokens = sink;
  desc.recent_tokens = recent;
  desc.fairness = mode == "quota" ? 1.0f : 0.0f;
  kvc_plan_t plan = nullptr;
  check(kvc_plan_create(ctx, &desc, &plan), ctx, "kvc_plan_create");
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);

  float *scores = nullptr;
  int32_t *keep = nullptr;
  void *workspace = nullptr;
  size_t ws_bytes = 0;
  kvc_plan_workspace_size(plan, KVC_OP_SELECT, &ws_bytes);
  CHECK_CUDA(cudaMalloc(&scores, sizeof(float) * (size_t)info.score_elems));
  CHECK_CUDA(cudaMalloc(&keep, sizeof(int32_t) * (size_t)info.keep_elems));
  CHECK_CUDA(cudaMalloc(&workspace, std::max<size_t>(ws_bytes, 1)));
  bench::fill_random(scores, (size_t)info.score_elems, KVC_DTYPE_F32, 7u + (unsigned)n, stream);

  time_and_print(o, stream, "kvc", mode, n, k, ws_bytes, [&] {
    check(kvc_select(ctx, plan, scores, keep, workspace, ws_bytes, (kvc_stream_t)stream), ctx, "kvc_select");
  });

  if (o.cub && mode == "plain") {
    const int words = (n + 31) / 32;
    std::vector<uint32_t> bits(words, 0u);
    for (int t = 0; t < n; ++t)
      if (t < sink || t >= n - recent) bits[t / 32] |= 1u << (t % 32);
    uint32_t *dev_bits = nullptr;
    void *cub_ws = nullptr;
    size_t cub_bytes = 0;
    const int rows = o.batch * o.heads;
    CHECK_CUDA(cudaMalloc(&dev_bits, sizeof(uint32_t) * words));
    CHECK_CUDA(cudaMemcpy(dev_bits, bits.data(), sizeof(uint32_t) * words, cudaMemcpyHostToDevice));
    CHECK_CUDA(kvc_select_cub_baseline(nullptr, &cub_bytes, scores, dev_bits, rows, n, k, keep, stream));
    CHECK_CUDA(cudaMalloc(&cub_ws, cub_bytes));
    time_and_print(o, stream, "cub_segmented_sort", mode, n, k, cub_bytes, [&] {
      CHECK_CUDA(kvc_select_cub_baseline(cub_ws, &cub_bytes, scores, dev_bits, rows, n, k, keep, stream));
    });
    cudaFree(dev_bits), cudaFree(cub_ws);
  }
  cudaFree(scores), cudaFree(keep), cudaFree(workspace);
  kvc_plan_destroy(plan);
}

}  // namespace

int main(int argc, char **argv) {
  Options o = parse(argc, argv);
  kvc_context_t ctx = nullptr;
  check(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), ctx, "kvc_context_create");
  g_copy_gbps = bench::print_device_and_copy_ceiling("bench_select");
  bench::L2Flusher flusher;
  g_flusher = &flusher;
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  int points = 0;
  for (const std::string &mode : o.modes) points += (int)(o.n.size() * o.keep.size());
  bench::Progress progress("bench_select", points);
  for (const std::string &mode : o.modes)
    for (int n : o.n)
      for (double keep : o.keep) {
        progress.step("%s n=%d keep=%.2f", mode.c_str(), n, keep);
        bench_point(ctx, o, stream, mode, n, keep);
      }
  cudaStreamDestroy(stream);
  kvc_context_destroy(ctx);
  return 0;
}
