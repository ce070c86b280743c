/*
 * bench_score - times kvc_score on the device with CUDA events over a grid of sequence lengths,
 * methods and head counts; one JSON line per point:
 *   {"op":"score","method":"snapkv","n":32768,"batch":1,"kv_heads":8,"q_heads":32,"head_dim":128,
 *    "dtype":"bf16","window":64,"engine_lse":0,"median_ms":...,"p10_ms":...,"p90_ms":...,
 *    "k_gbps":...,"tflops":...,"floor_bytes":...,"floor_flops":...,"floor_exps":...,"floor_ms":...,
 *    "pct_of_floor":...,"floor_h200_ms":...,"floor_bound":"tensor"}
 * Every line also carries the analytic floor of the point: its counts from bench/cost_model.h
 * (kvc_floor_score: bytes, tensor flops, exponentials), floor_ms against this run's measured copy
 * and GEMM ceilings (bench_util.cuh's add_floor; pct_of_floor = floor / median), and
 * floor_h200_ms / floor_bound, the same counts against the H200 ceilings of cost_model.h.
 * k_gbps is the K bytes of the batch (batch * n * kv_heads * head_dim * element size) over the
 * median time: the floor on what any scorer must read (KNORM and STREAMING aside, the attention
 * methods are arithmetic-bound, so this is a rate, not an efficiency); pct_copy sets it against the
 * cudaMemcpy D2D bandwidth measured at the start of the same run. Timing (cold L2 per repetition),
 * statistics and JSON: bench_util.cuh; lines also carry "record":"result", "impl":"kvc" and
 * "extra_bytes" (the score workspace).
 * tflops (SNAPKV, H2O, TOVA) counts the causal logits the two passes must compute (the softmax
 * normaliser pass, then the accumulation pass recomputes them), 2 * head_dim flops each, per q
 * head and sequence, exactly as the cost model counts them (kvc_floor_score); with --engine-lse the
 * normaliser pass is skipped and not counted. Masked logits that a tile computes anyway and the
 * reductions are not counted.
 *
 *   bench_score [--n 4096,32768,131072] [--method snapkv,h2o,tova,knorm,streaming]
 *               [--heads 8:32,...] (kv:q) [--batch 1] [--head-dim 128] [--dtype bf16|f16|f32|fp8]
 *               [--query-dtype bf16|f16|f32] (fp8 keys' queries; default bf16)
 *               [--window 64|n] [--page-size 16] [--iters 20] [--engine-lse 0|1]
 *   e.g. H2O over the whole prompt:
 *       bench_score --method h2o --window n --n 4096,32768 --heads 8:32
 * --engine-lse 1 passes a log-sum-exp array (each entry ln n: timing only, the values are not the
 * real normalisers) so the normaliser kernel is skipped, as with an engine's softmax_lse.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "cost_model.h"
#include "kvcompress.h"

namespace {

#define CHECK_CUDA KVC_BENCH_CHECK
using bench::split;

int method_of(const std::string &name) {
  static const char *names[] = {"snapkv", "h2o", "tova", "knorm", "streaming"};
  for (int m = 0; m < 5; ++m)
    if (name == names[m]) return m;
  fprintf(stderr, "bench_score: unknown method %s\n", name.c_str());
  exit(2);
}

struct Options {
  std::vector<std::string> lengths{"4096", "32768", "131072"}, methods{"snapkv", "h2o", "tova", "knorm"},
      heads{"8:32"};
  int batch = 1, head_dim = 128, window = 64, page_size = 16, iters = 20;
  bool window_is_n = false;     /* --window n: every token is an observation query */
  int engine_lse = 0;           /* --engine-lse 1: pass an lse array (the normaliser kernel is skipped) */
  std::string dtype = "bf16";
  std::string query_dtype = "bf16"; /* --query-dtype: the queries of fp8 keys */
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string key = argv[i];
    const char *value = argv[i + 1];
    if (key == "--n") o.lengths = split(value);
    else if (key == "--method") o.methods = split(value);
    else if (key == "--heads") o.heads = split(value);
    else if (key == "--batch") o.batch = atoi(value);
    else if (key == "--head-dim") o.head_dim = atoi(value);
    else if (key == "--dtype") o.dtype = value;
    else if (key == "--query-dtype") o.query_dtype = value;
    else if (key == "--window") {
      o.window_is_n = std::string(value) == "n";
      o.window = o.window_is_n ? 0 : atoi(value);
    }
    else if (key == "--engine-lse") o.engine_lse = atoi(value);
    else if (key == "--page-size") o.page_size = atoi(value);
    else if (key == "--iters") o.iters = atoi(value);
    else {
      fprintf(stderr, "bench_score: unknown option %s\n", key.c_str());
      exit(2);
    }
  }
  return o;
}

void check(kvc_status_t status, kvc_context_t ctx, const char *what) {
  if (status == KVC_SUCCESS) return;
  fprintf(stderr, "bench_score: %s: %s (%s)\n", what, kvc_status_name(status), kvc_last_error(ctx));
  exit(1);
}

/* The copy ceiling of this run and the L2 flusher, shared by every point (bench_util.cuh). */
double g_copy_gbps = 0;
bench::L2Flusher *g_flusher = nullptr;

void bench_point(kvc_context_t ctx, const Options &o, const std::string &method, int n, int kv_heads, int q_heads) {
  const kvc_dtype_t dtype = bench::dtype_of(o.dtype);
  /* fp8 keys (e4m3, scale 1: the values are bench::fill_random's, already of fp8 range) are scored
   * with queries of --query-dtype */
  const kvc_dtype_t query_dtype = dtype == KVC_DTYPE_FP8_E4M3 ? bench::dtype_of(o.query_dtype) : dtype;
  const size_t elem = bench::dtype_bytes(dtype), query_elem = bench::dtype_bytes(query_dtype);
  std::vector<int32_t> seq_lens(o.batch, n), budgets(o.batch, n / 4);
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = kv_heads;
  desc.num_q_heads = q_heads;
  desc.head_dim = o.head_dim;
  desc.dtype = dtype;
  if (query_dtype != dtype)
    desc.query_dtype = query_dtype == KVC_DTYPE_F32 ? KVC_QUERY_DTYPE_F32
                       : query_dtype == KVC_DTYPE_F16 ? KVC_QUERY_DTYPE_F16
                                                      : KVC_QUERY_DTYPE_BF16;
  desc.batch = o.batch;
  desc.seq_lens = seq_lens.data();
  desc.budgets = budgets.data();
  desc.method = (kvc_score_method_t)method_of(method);
  const int window = o.window_is_n ? n : o.window;
  desc.window = window;
  desc.sink_tokens = desc.method == KVC_SCORE_STREAMING ? 4 : 0;
  kvc_plan_t plan = nullptr;
  check(kvc_plan_create(ctx, &desc, &plan), ctx, "kvc_plan_create");
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);

  /* NHD pages, identity block table */
  const int pages_per_seq = (n + o.page_size - 1) / o.page_size, num_pages = pages_per_seq * o.batch;
  const size_t pool_elems = (size_t)num_pages * o.page_size * kv_heads * o.head_dim;
  std::vector<int32_t> table(num_pages);
  for (int p = 0; p < num_pages; ++p) table[p] = p;
  void *k = nullptr, *v = nullptr, *queries = nullptr, *workspace = nullptr;
  int32_t *dev_table = nullptr;
  float *scores = nullptr, *lse = nullptr;
  const size_t query_elems = (size_t)info.obs_total * q_heads * o.head_dim;
  size_t ws_bytes = 0;
  kvc_plan_workspace_size(plan, KVC_OP_SCORE, &ws_bytes);
  CHECK_CUDA(cudaMalloc(&k, pool_elems * elem));
  CHECK_CUDA(cudaMalloc(&v, elem)); /* never read by scoring */
  CHECK_CUDA(cudaMalloc(&queries, std::max<size_t>(query_elems, 1) * query_elem));
  CHECK_CUDA(cudaMalloc(&dev_table, sizeof(int32_t) * num_pages));
  CHECK_CUDA(cudaMalloc(&scores, sizeof(float) * (size_t)info.score_elems));
  CHECK_CUDA(cudaMalloc(&workspace, std::max<size_t>(ws_bytes, 1)));
  CHECK_CUDA(cudaMemcpy(dev_table, table.data(), sizeof(int32_t) * num_pages, cudaMemcpyHostToDevice));
  bench::fill_random(k, pool_elems, dtype, 1u);
  bench::fill_random(queries, query_elems, query_dtype, 2u);
  if (o.engine_lse && info.obs_total > 0) {
    std::vector<float> host_lse((size_t)info.obs_total * q_heads, logf((float)n));
    CHECK_CUDA(cudaMalloc(&lse, sizeof(float) * host_lse.size()));
    CHECK_CUDA(cudaMemcpy(lse, host_lse.data(), sizeof(float) * host_lse.size(), cudaMemcpyHostToDevice));
  }

  kvc_paged_kv_t cache = {};
  cache.k = k;
  cache.v = v;
  cache.dtype = dtype;
  cache.num_kv_heads = kv_heads;
  cache.head_dim = o.head_dim;
  cache.page_size = o.page_size;
  cache.num_pages = num_pages;
  cache.stride_token = (int64_t)kv_heads * o.head_dim;
  cache.stride_head = o.head_dim;
  cache.stride_page = (int64_t)o.page_size * kv_heads * o.head_dim;
  cache.page_table = dev_table;
  cache.max_pages = pages_per_seq;

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  /* bench_util.cuh: one warm-up, then o.iters repetitions between events, each from a cold L2 */
  const bench::Stats st = bench::time_gpu(
      [&](cudaStream_t s) {
        check(kvc_score(ctx, plan, &cache, queries, lse, scores, 0, workspace, ws_bytes, (kvc_stream_t)s), ctx, "kvc_score");
      },
      stream, 1, o.iters, g_flusher);
  const double k_bytes = (double)o.batch * n * kv_heads * o.head_dim * elem, median = st.median_ms;
  /* the analytic floor of this point; its flop count is the tflops rate's (see the header comment) */
  const kvc_floor_t floor = kvc_floor_score(desc.method, n, window, o.batch, kv_heads, q_heads, o.head_dim,
                                            (int)elem, (int)query_elem, lse != nullptr);
  const double flops = query_elem == 2 ? floor.tensor_flops : 2.0 * o.head_dim * floor.exps;
  const double k_gbps = k_bytes / (median * 1e-3) / 1e9;
  bench::Json j;
  j.add("record", "result").add("op", "score").add("impl", "kvc").add("method", method).add("n", n)
      .add("batch", o.batch).add("kv_heads", kv_heads).add("q_heads", q_heads).add("head_dim", o.head_dim)
      .add("dtype", o.dtype).add("query_dtype", query_dtype == dtype ? o.dtype : o.query_dtype).add("window", window).add("engine_lse", lse != nullptr ? 1 : 0).add_stats(st)
      .add("k_gbps", k_gbps).add("pct_copy", g_copy_gbps > 0 ? 100.0 * k_gbps / g_copy_gbps : 0.0)
      .add("tflops", flops / (median * 1e-3) / 1e12).add("extra_bytes", (long long)ws_bytes);
  bench::Floor counts;
  counts.bytes = floor.bytes, counts.flops = floor.tensor_flops, counts.exps = floor.exps;
  bench::add_floor(j, counts, st);
  j.add("floor_h200_ms", floor.floor_s * 1e3).add("floor_bound", kvc_bound_name(floor.bound)).print();

  cudaStreamDestroy(stream);
  cudaFree(k), cudaFree(v), cudaFree(queries), cudaFree(dev_table), cudaFree(scores), cudaFree(workspace), cudaFree(lse);
  kvc_plan_destroy(plan);
}

}  // namespace

int main(int argc, char **argv) {
  Options o = parse(argc, argv);
  kvc_context_t ctx = nullptr;
  check(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), ctx, "kvc_context_create");
  g_copy_gbps = bench::print_device_and_copy_ceiling("bench_score");
  bench::L2Flusher flusher;
  g_flusher = &flusher;
  bench::Progress progress("bench_score", (int)(o.heads.size() * o.lengths.size() * o.methods.size()));
  for (const std::string &heads : o.heads) {
    int kv = 0, q = 0;
    if (sscanf(heads.c_str(), "%d:%d", &kv, &q) != 2) {
      fprintf(stderr, "bench_score: --heads wants kv:q pairs, got %s\n", heads.c_str());
      return 2;
    }
    for (const std::string &n : o.lengths)
      for (const std::string &method : o.methods) {
        progress.step("%s n=%s heads %s", method.c_str(), n.c_str(), heads.c_str());
        bench_point(ctx, o, method, atoi(n.c_str()), kv, q);
      }
  }
  kvc_context_destroy(ctx);
  return 0;
}
