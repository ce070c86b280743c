/*
 * bench_compact - times kvc_compact on the device against cudaMemcpy (device to device) of the same
 * bytes, the ceiling of any in-place move; one JSON line per point:
 *   {"record":"result","op":"compact","n":131072,"batch":1,"kv_heads":8,"head_dim":128,"dtype":"bf16",
 *    "page_size":16,"keep":0.5,"k":65536,"moved_bytes":...,"median_ms":...,"p10_ms":...,"p90_ms":...,
 *    "reps":...,"gbps":...,"memcpy_ms":...,"pct_memcpy":...,"pct_copy":...,"extra_bytes":...}
 * moved_bytes counts the K and V rows that actually move (keep[j] != j); gbps is bytes read plus
 * bytes written (2 * moved_bytes) over the median time, the convention of bench_util.cuh's copy
 * ceiling (pct_copy: against the 1 GiB cudaMemcpy measured at the start of the run); pct_memcpy is
 * memcpy_ms / median_ms, a cudaMemcpyAsync of moved_bytes timed the same way (cold L2). The target
 * on an H200 is pct_memcpy >= 80.
 *
 * The cache is an NHD paged pool (vLLM layout) with its pages in a shuffled order; keep rows are
 * uniformly random subsets. Repetitions after the first compact an already compacted cache: the
 * same plan and keep rows, so the same bytes move (the values differ, which costs nothing).
 *
 *   bench_compact [--n 4096,32768,131072] [--keep 0.1,0.3,0.5,0.7,0.9] [--batch 1] [--heads 8]
 *                 [--head-dim 128] [--dtype bf16|f16|f32] [--page-size 16] [--iters 20]
 */
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "kvcompress.h"

namespace {

struct Options {
  std::vector<int> n = {4096, 32768, 131072};
  std::vector<double> keep = {0.1, 0.3, 0.5, 0.7, 0.9};
  int batch = 1, heads = 8, head_dim = 128, page_size = 16, iters = 20;
  std::string dtype = "bf16";
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char *value = argv[i + 1];
    if (key == "--n") o.n = bench::parse_ints(value);
    else if (key == "--keep") o.keep = bench::parse_doubles(value);
    else if (key == "--batch") o.batch = atoi(value);
    else if (key == "--heads") o.heads = atoi(value);
    else if (key == "--head-dim") o.head_dim = atoi(value);
    else if (key == "--dtype") o.dtype = value;
    else if (key == "--page-size") o.page_size = atoi(value);
    else if (key == "--iters") o.iters = atoi(value);
    else {
      fprintf(stderr, "bench_compact: unknown option %s\n", key.c_str());
      exit(2);
    }
  }
  if (argc % 2 == 0) {
    fprintf(stderr, "bench_compact: %s needs a value\n", argv[argc - 1]);
    exit(2);
  }
  return o;
}

void check(kvc_status_t status, kvc_context_t ctx, const char *what) {
  if (status == KVC_SUCCESS) return;
  fprintf(stderr, "bench_compact: %s: %s (%s)\n", what, kvc_status_name(status), kvc_last_error(ctx));
  exit(1);
}

template <class T>
T *upload(const std::vector<T> &host) {
  T *dev = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&dev, std::max<size_t>(1, host.size() * sizeof(T))));
  KVC_BENCH_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

/* One point: n tokens per sequence, each (sequence, head) keeps k of them. */
void run_point(const Options &o, kvc_context_t ctx, int n, double keep_fraction, double copy_gbps,
               bench::L2Flusher &flusher, cudaStream_t stream) {
  const kvc_dtype_t dtype = bench::dtype_of(o.dtype);
  const int k = std::max(1, (int)(n * keep_fraction));
  std::vector<int32_t> seq_lens(o.batch, n), budgets(o.batch, k);
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = desc.num_kv_heads = o.heads;
  desc.head_dim = o.head_dim;
  desc.dtype = dtype;
  desc.batch = o.batch;
  desc.seq_lens = seq_lens.data();
  desc.budgets = budgets.data();
  desc.method = KVC_SCORE_STREAMING;
  kvc_plan_t plan = nullptr;
  check(kvc_plan_create(ctx, &desc, &plan), ctx, "kvc_plan_create");

  /* pools and a dense block table over shuffled pages */
  const int pages_per_seq = (n + o.page_size - 1) / o.page_size, num_pages = o.batch * pages_per_seq;
  const size_t elem = bench::dtype_bytes(dtype), row_bytes = (size_t)o.head_dim * elem;
  const size_t pool_elems = (size_t)num_pages * o.page_size * o.heads * o.head_dim;
  std::mt19937_64 rng(1234 + n);
  std::vector<int32_t> table(num_pages);
  for (int p = 0; p < num_pages; ++p) table[p] = p;
  std::shuffle(table.begin(), table.end(), rng);
  kvc_paged_kv_t cache = {};
  KVC_BENCH_CHECK(cudaMalloc(&cache.k, pool_elems * elem));
  KVC_BENCH_CHECK(cudaMalloc(&cache.v, pool_elems * elem));
  bench::fill_random(cache.k, pool_elems, dtype, 1u);
  bench::fill_random(cache.v, pool_elems, dtype, 2u);
  cache.dtype = dtype;
  cache.num_kv_heads = o.heads;
  cache.head_dim = o.head_dim;
  cache.page_size = o.page_size;
  cache.num_pages = num_pages;
  cache.stride_token = (int64_t)o.heads * o.head_dim;
  cache.stride_head = o.head_dim;
  cache.stride_page = (int64_t)o.page_size * cache.stride_token;
  cache.page_table = upload(table);
  cache.max_pages = pages_per_seq;

  /* keep rows: uniform random k-subsets; count the rows that actually move */
  std::vector<int32_t> keep;
  keep.reserve((size_t)o.batch * o.heads * k);
  size_t moved_rows = 0;
  std::vector<int32_t> tokens(n);
  for (int row = 0; row < o.batch * o.heads; ++row) {
    for (int t = 0; t < n; ++t) tokens[t] = t;
    for (int j = 0; j < k; ++j) std::swap(tokens[j], tokens[j + rng() % (n - j)]);
    std::sort(tokens.begin(), tokens.begin() + k);
    for (int j = 0; j < k; ++j) {
      keep.push_back(tokens[j]);
      moved_rows += k < n && tokens[j] != j;
    }
  }
  const int32_t *dev_keep = upload(keep);
  const size_t moved_bytes = 2 * moved_rows * row_bytes; /* K and V */
  size_t ws_bytes = 0;
  check(kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &ws_bytes), ctx, "kvc_plan_workspace_size");
  void *ws = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 1)));

  const bench::Stats st = bench::time_gpu(
      [&](cudaStream_t s) {
        check(kvc_compact(ctx, plan, &cache, dev_keep, nullptr, 0, ws, ws_bytes, (kvc_stream_t)s), ctx, "kvc_compact");
      },
      stream, 2, o.iters, &flusher);

  /* the ceiling: one cudaMemcpy of the same bytes between two buffers */
  void *src = nullptr, *dst = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&src, std::max<size_t>(moved_bytes, 1)));
  KVC_BENCH_CHECK(cudaMalloc(&dst, std::max<size_t>(moved_bytes, 1)));
  const bench::Stats mc = bench::time_gpu(
      [&](cudaStream_t s) { KVC_BENCH_CHECK(cudaMemcpyAsync(dst, src, moved_bytes, cudaMemcpyDeviceToDevice, s)); },
      stream, 2, o.iters, &flusher);

  const double gbps = 2.0 * (double)moved_bytes / (st.median_ms * 1e-3) / 1e9;
  bench::Json()
      .add("record", "result").add("op", "compact").add("n", n).add("batch", o.batch).add("kv_heads", o.heads)
      .add("head_dim", o.head_dim).add("dtype", o.dtype).add("page_size", o.page_size).add("keep", keep_fraction)
      .add("k", k).add("moved_bytes", (long long)moved_bytes).add_stats(st).add("gbps", gbps)
      .add("memcpy_ms", mc.median_ms).add("pct_memcpy", 100.0 * mc.median_ms / st.median_ms)
      .add("pct_copy", 100.0 * gbps / copy_gbps).add("extra_bytes", (long long)ws_bytes)
      .print();

  cudaFree(src);
  cudaFree(dst);
  cudaFree(ws);
  cudaFree((void *)dev_keep);
  cudaFree((void *)cache.page_table);
  cudaFree(cache.k);
  cudaFree(cache.v);
  kvc_plan_destroy(plan);
}

}  // namespace

int main(int argc, char **argv) {
  const Options o = parse(argc, argv);
  kvc_context_t ctx = nullptr;
  check(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), ctx, "kvc_context_create");
  const double copy_gbps = bench::print_device_and_copy_ceiling("bench_compact");
  bench::L2Flusher flusher;
  cudaStream_t stream;
  KVC_BENCH_CHECK(cudaStreamCreate(&stream));
  bench::Progress progress("bench_compact", (int)(o.n.size() * o.keep.size()));
  for (int n : o.n)
    for (double keep : o.keep) {
      progress.step("n %d keep %.2f", n, keep);
      run_point(o, ctx, n, keep, copy_gbps, flusher, stream);
    }
  cudaStreamDestroy(stream);
  kvc_context_destroy(ctx);
  return 0;
}
