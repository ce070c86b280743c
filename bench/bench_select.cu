/*
 * bench_select - times kvc_select on the device (plain top-k, and with FAIR-span quotas) and the
 * CUB baseline (kernels/select_cub.h: segmented radix sort) with CUDA events; one JSON line per
 * point:
 *   {"op":"select","impl":"kvc","mode":"plain","n":131072,"batch":4,"kv_heads":8,"layers":1,
 *    "k":13107,"median_ms":...,"p10_ms":...,"p90_ms":...,"score_gbps":...,"floor_us":...,
 *    "pct_floor":...}
 * score_gbps is the batch's scores (layers * rows * n * 4 bytes) over the median time: what any
 * selection must read once, so it compares directly with the device's copy bandwidth (pct_copy:
 * against the cudaMemcpy D2D bandwidth measured at the start of the same run). floor_us is
 * cost_model.h's select floor on an H200 (scores read once, kept indices written once) and
 * pct_floor = floor / median. Timing, L2 flush between repetitions, statistics and JSON:
 * bench_util.cuh. Every line also has "record":"result" and "extra_bytes" (the implementation's
 * workspace); the first lines are the device and the copy ceiling.
 * Rows = batch * kv_heads, every row n tokens; 4 sinks and 64 recent tokens are protected; the
 * quota mode adds 4 equal FAIR spans and fairness 1. The CUB baseline has no quotas (plain only).
 *
 * Shapes (--shapes batch:n,..., default the issue's): one long sequence (1:131072: 8 rows, which
 * the selection splits across blocks), a batch of 64 x 2k (512 staged rows), 4 x 32k. With
 * --layers L > 1 every shape also runs as L layers: kvc_select_layers once ("kvc_layers") against
 * L kvc_select calls ("kvc_per_layer_calls"), same scores.
 *
 *   bench_select [--shapes 1:131072,64:2048,4:32768] [--keep 0.1,0.5,0.9] [--mode plain,quota]
 *                [--heads 8] [--layers 32] [--iters 20] [--no-cub]
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
#include "cost_model.h"
#include "kvcompress.h"
#include "select_cub.h"

namespace {

#define CHECK_CUDA KVC_BENCH_CHECK

using bench::split;

struct Shape {
  int batch, n;
};

struct Options {
  std::vector<Shape> shapes = {{1, 131072}, {64, 2048}, {4, 32768}};
  std::vector<double> keep = {0.1, 0.5, 0.9};
  std::vector<std::string> modes = {"plain", "quota"};
  int heads = 8, layers = 32, iters = 20;
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
    if (key == "--shapes") {
      o.shapes.clear();
      for (const std::string &s : split(value)) {
        Shape shape;
        if (sscanf(s.c_str(), "%d:%d", &shape.batch, &shape.n) != 2 || shape.batch < 1 || shape.n < 1) {
          fprintf(stderr, "bench_select: --shapes wants batch:n,..., got %s\n", s.c_str());
          exit(2);
        }
        o.shapes.push_back(shape);
      }
    } else if (key == "--keep") {
      o.keep.clear();
      for (const std::string &s : split(value)) o.keep.push_back(atof(s.c_str()));
    } else if (key == "--mode") {
      o.modes = split(value);
    } else if (key == "--heads") {
      o.heads = atoi(value);
    } else if (key == "--layers") {
      o.layers = atoi(value);
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
void time_and_print(const Options &o, cudaStream_t stream, const char *impl, const std::string &mode, const Shape &shape,
                    int layers, int k, size_t extra_bytes, const std::function<void()> &launch) {
  const bench::Stats s = bench::time_gpu([&](cudaStream_t) { launch(); }, stream, 1, o.iters, g_flusher);
  const double rows = (double)layers * shape.batch * o.heads;
  const double score_bytes = 4.0 * rows * shape.n, gbps = score_bytes / (s.median_ms * 1e-3) / 1e9;
  const double floor_us = 1e6 * kvc_floor_select(rows, shape.n, k).floor_s;
  bench::Json()
      .add("record", "result").add("op", "select").add("impl", impl).add("mode", mode).add("n", shape.n)
      .add("batch", shape.batch).add("kv_heads", o.heads).add("layers", layers).add("k", k).add_stats(s)
      .add("score_gbps", gbps).add("pct_copy", g_copy_gbps > 0 ? 100.0 * gbps / g_copy_gbps : 0.0)
      .add("floor_us", floor_us).add("pct_floor", 100.0 * floor_us / (1e3 * s.median_ms))
      .add("extra_bytes", (long long)extra_bytes)
      .print();
}

void bench_point(kvc_context_t ctx, const Options &o, cudaStream_t stream, const std::string &mode, const Shape &shape,
                 double keep_fraction) {
  const int n = shape.n, batch = shape.batch;
  const int k = std::max(68, (int)(keep_fraction * n)), sink = 4, recent = 64;
  std::vector<int32_t> seq_lens(batch, n), budgets(batch, k), span_indptr(batch + 1);
  std::vector<kvc_span_t> spans;
  for (int b = 0; b < batch; ++b) {
    span_indptr[b] = (int32_t)spans.size();
    if (mode == "quota")
      for (int s = 0; s < 4; ++s) spans.push_back({s * (n / 4), (s + 1) * (n / 4), KVC_SPAN_FAIR, 1.0f});
  }
  span_indptr[batch] = (int32_t)spans.size();
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = o.heads;
  desc.num_q_heads = o.heads;
  desc.head_dim = 128;
  desc.batch = batch;
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

  const int layers = std::max(1, o.layers);
  float *scores = nullptr;
  int32_t *keep = nullptr;
  void *workspace = nullptr;
  size_t ws_bytes = 0;
  kvc_workspace_layout_t layout;
  check(kvc_plan_workspace_layout(plan, KVC_OP_SELECT, layers, &layout), ctx, "kvc_plan_workspace_layout");
  kvc_plan_workspace_size(plan, KVC_OP_SELECT, &ws_bytes);
  CHECK_CUDA(cudaMalloc(&scores, sizeof(float) * (size_t)info.score_elems * layers));
  CHECK_CUDA(cudaMalloc(&keep, sizeof(int32_t) * (size_t)info.keep_elems * layers));
  CHECK_CUDA(cudaMalloc(&workspace, std::max<size_t>(layout.workspace_bytes, 1)));
  bench::fill_random(scores, (size_t)info.score_elems * layers, KVC_DTYPE_F32, 7u + (unsigned)n, stream);

  time_and_print(o, stream, "kvc", mode, shape, 1, k, ws_bytes, [&] {
    check(kvc_select(ctx, plan, scores, keep, workspace, ws_bytes, (kvc_stream_t)stream), ctx, "kvc_select");
  });
  if (layers > 1) {
    time_and_print(o, stream, "kvc_layers", mode, shape, layers, k, layout.workspace_bytes, [&] {
      check(kvc_select_layers(ctx, plan, layers, scores, keep, workspace, layout.workspace_bytes, (kvc_stream_t)stream),
            ctx, "kvc_select_layers");
    });
    time_and_print(o, stream, "kvc_per_layer_calls", mode, shape, layers, k, ws_bytes, [&] {
      for (int l = 0; l < layers; ++l)
        check(kvc_select(ctx, plan, scores + (size_t)l * info.score_elems, keep + (size_t)l * info.keep_elems,
                         workspace, ws_bytes, (kvc_stream_t)stream),
              ctx, "kvc_select");
    });
  }

  if (o.cub && mode == "plain") {
    const int words = (n + 31) / 32;
    std::vector<uint32_t> bits(words, 0u);
    for (int t = 0; t < n; ++t)
      if (t < sink || t >= n - recent) bits[t / 32] |= 1u << (t % 32);
    uint32_t *dev_bits = nullptr;
    void *cub_ws = nullptr;
    size_t cub_bytes = 0;
    const int rows = batch * o.heads;
    CHECK_CUDA(cudaMalloc(&dev_bits, sizeof(uint32_t) * words));
    CHECK_CUDA(cudaMemcpy(dev_bits, bits.data(), sizeof(uint32_t) * words, cudaMemcpyHostToDevice));
    CHECK_CUDA(kvc_select_cub_baseline(nullptr, &cub_bytes, scores, dev_bits, rows, n, k, keep, stream));
    CHECK_CUDA(cudaMalloc(&cub_ws, cub_bytes));
    time_and_print(o, stream, "cub_segmented_sort", mode, shape, 1, k, cub_bytes, [&] {
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
  const int points = (int)(o.modes.size() * o.shapes.size() * o.keep.size());
  bench::Progress progress("bench_select", points);
  for (const std::string &mode : o.modes)
    for (const Shape &shape : o.shapes)
      for (double keep : o.keep) {
        progress.step("%s %dx%d keep=%.2f", mode.c_str(), shape.batch, shape.n, keep);
        bench_point(ctx, o, stream, mode, shape, keep);
      }
  cudaStreamDestroy(stream);
  kvc_context_destroy(ctx);
  return 0;
}
