/*
 * bench_compact - times kvc_compact on the device against cudaMemcpy (device to device) of the same
 * bytes, the ceiling of any in-place move; one JSON line per point:
 *   {"record":"result","op":"compact","impl":"kvc","n":131072,"batch":1,"kv_heads":8,"layers":1,
 *    "head_dim":128,"dtype":"bf16","page_size":16,"keep":0.5,"k":65536,"moved_bytes":...,
 *    "median_ms":...,"p10_ms":...,"p90_ms":...,"reps":...,"gbps":...,"memcpy_ms":...,
 *    "pct_memcpy":...,"pct_copy":...,"floor_us":...,"pct_floor":...,"extra_bytes":...}
 * moved_bytes counts the K and V rows that actually move (keep[j] != j); gbps is bytes read plus
 * bytes written (2 * moved_bytes) over the median time, the convention of bench_util.cuh's copy
 * ceiling (pct_copy: against the 1 GiB cudaMemcpy measured at the start of the run); pct_memcpy is
 * memcpy_ms / median_ms, a cudaMemcpyAsync of moved_bytes timed the same way (cold L2). floor_us is
 * cost_model.h's compaction floor on an H200 and pct_floor = floor / median. The target on an H200
 * is pct_memcpy >= 85 at n >= 32k.
 *
 * The cache is an NHD paged pool (vLLM layout) with its pages in a shuffled order; keep rows are
 * uniformly random subsets. Repetitions after the first compact an already compacted cache: the
 * same plan and keep rows, so the same bytes move (the values differ, which costs nothing).
 * Shapes (--shapes batch:n,...): one long sequence, a batch of 64 x 2k, one short sequence (the
 * small-n case, where the grid must still fill the device). --layer-shapes run with --layers L
 * pools: kvc_compact_layers once ("kvc_layers") against L kvc_compact calls ("kvc_per_layer_calls").
 * --modes: "in_place" (impl "kvc") and "into", kvc_compact_into (impl "kvc_into") writing every
 * sequence's kept rows to ceil(k / page_size) other pages of the same pool (copy-on-write): there
 * every kept row moves, so moved_bytes counts all k rows, the memcpy ceiling copies those bytes and
 * the floor is cost_model.h's kvc_floor_compact_into. Every repetition writes the same bytes.
 *
 *   bench_compact [--shapes 1:131072,64:2048,1:4096,1:32768] [--layer-shapes 1:4096,8:4096]
 *                 [--layers 32] [--keep 0.1,0.3,0.5,0.7,0.9] [--heads 8] [--head-dim 128]
 *                 [--dtype bf16|f16|f32] [--page-size 16] [--iters 20] [--modes in_place,into]
 */
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench_util.cuh"
#include "cost_model.h"
#include "kvcompress.h"

namespace {

struct Shape {
  int batch, n;
};

std::vector<Shape> parse_shapes(const char *value) {
  std::vector<Shape> shapes;
  for (const std::string &s : bench::split(value)) {
    Shape shape;
    if (sscanf(s.c_str(), "%d:%d", &shape.batch, &shape.n) != 2 || shape.batch < 1 || shape.n < 1) {
      fprintf(stderr, "bench_compact: shapes are batch:n,..., got %s\n", s.c_str());
      exit(2);
    }
    shapes.push_back(shape);
  }
  return shapes;
}

struct Options {
  std::vector<Shape> shapes = {{1, 131072}, {64, 2048}, {1, 4096}, {1, 32768}}, layer_shapes = {{1, 4096}, {8, 4096}};
  std::vector<double> keep = {0.1, 0.3, 0.5, 0.7, 0.9};
  int heads = 8, head_dim = 128, page_size = 16, iters = 20, layers = 32;
  std::string dtype = "bf16";
  bool in_place = true, into = true;
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char *value = argv[i + 1];
    if (key == "--shapes") o.shapes = parse_shapes(value);
    else if (key == "--layer-shapes") o.layer_shapes = parse_shapes(value);
    else if (key == "--layers") o.layers = atoi(value);
    else if (key == "--keep") o.keep = bench::parse_doubles(value);
    else if (key == "--heads") o.heads = atoi(value);
    else if (key == "--head-dim") o.head_dim = atoi(value);
    else if (key == "--dtype") o.dtype = value;
    else if (key == "--page-size") o.page_size = atoi(value);
    else if (key == "--iters") o.iters = atoi(value);
    else if (key == "--modes") {
      o.in_place = o.into = false;
      for (const std::string &m : bench::split(value)) {
        if (m == "in_place") o.in_place = true;
        else if (m == "into") o.into = true;
        else {
          fprintf(stderr, "bench_compact: --modes takes in_place,into, got %s\n", m.c_str());
          exit(2);
        }
      }
    } else {
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

/* One point: `layers` pools of batch sequences of n tokens, each (sequence, head) keeping k; with
 * layers > 1 the layer-batched call against one call per layer. */
void run_point(const Options &o, kvc_context_t ctx, const Shape &shape, int layers, double keep_fraction,
               double copy_gbps, bench::L2Flusher &flusher, cudaStream_t stream) {
  const kvc_dtype_t dtype = bench::dtype_of(o.dtype);
  const int n = shape.n, batch = shape.batch, k = std::max(1, (int)(n * keep_fraction));
  std::vector<int32_t> seq_lens(batch, n), budgets(batch, k);
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = desc.num_kv_heads = o.heads;
  desc.head_dim = o.head_dim;
  desc.dtype = dtype;
  desc.batch = batch;
  desc.seq_lens = seq_lens.data();
  desc.budgets = budgets.data();
  desc.method = KVC_SCORE_STREAMING;
  kvc_plan_t plan = nullptr;
  check(kvc_plan_create(ctx, &desc, &plan), ctx, "kvc_plan_create");

  /* pools (one K and one V per layer) and a dense block table over shuffled pages; the out-of-place
   * destination pages follow the sources' in the same pools */
  const int pages_per_seq = (n + o.page_size - 1) / o.page_size, kept_pages = (k + o.page_size - 1) / o.page_size;
  const int source_pages = batch * pages_per_seq, num_pages = source_pages + (layers == 1 && o.into ? batch * kept_pages : 0);
  const size_t elem = bench::dtype_bytes(dtype), row_bytes = (size_t)o.head_dim * elem;
  const size_t pool_elems = (size_t)num_pages * o.page_size * o.heads * o.head_dim;
  std::mt19937_64 rng(1234 + n);
  std::vector<int32_t> table(source_pages), dst_table(batch * kept_pages);
  for (int p = 0; p < source_pages; ++p) table[p] = p;
  std::shuffle(table.begin(), table.end(), rng);
  for (int p = 0; p < batch * kept_pages; ++p) dst_table[p] = source_pages + p;
  std::shuffle(dst_table.begin(), dst_table.end(), rng);
  std::vector<void *> k_pools(layers), v_pools(layers);
  for (int l = 0; l < layers; ++l) {
    KVC_BENCH_CHECK(cudaMalloc(&k_pools[l], pool_elems * elem));
    KVC_BENCH_CHECK(cudaMalloc(&v_pools[l], pool_elems * elem));
    bench::fill_random(k_pools[l], pool_elems, dtype, 1u + 2u * l);
    bench::fill_random(v_pools[l], pool_elems, dtype, 2u + 2u * l);
  }
  kvc_paged_kv_t cache = {};
  cache.k = k_pools[0];
  cache.v = v_pools[0];
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

  /* keep rows: uniform random k-subsets (the same for every layer); count the rows that move */
  std::vector<int32_t> keep;
  keep.reserve((size_t)batch * o.heads * k * layers);
  size_t moved_rows = 0;
  std::vector<int32_t> tokens(n);
  for (int row = 0; row < batch * o.heads; ++row) {
    for (int t = 0; t < n; ++t) tokens[t] = t;
    for (int j = 0; j < k; ++j) std::swap(tokens[j], tokens[j + rng() % (n - j)]);
    std::sort(tokens.begin(), tokens.begin() + k);
    for (int j = 0; j < k; ++j) {
      keep.push_back(tokens[j]);
      moved_rows += k < n && tokens[j] != j;
    }
  }
  const size_t layer_keep = keep.size();
  for (int l = 1; l < layers; ++l) keep.insert(keep.end(), keep.begin(), keep.begin() + (long)layer_keep);
  const int32_t *dev_keep = upload(keep);
  const size_t moved_bytes = 2 * moved_rows * row_bytes * layers; /* K and V of every layer */
  size_t ws_bytes = 0;
  check(kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &ws_bytes), ctx, "kvc_plan_workspace_size");
  kvc_workspace_layout_t layout;
  check(kvc_plan_workspace_layout(plan, KVC_OP_COMPACT, layers, &layout), ctx, "kvc_plan_workspace_layout");
  void *ws = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&ws, std::max<size_t>(layout.workspace_bytes, 1)));
  void **dev_k = upload(k_pools), **dev_v = upload(v_pools);
  kvc_paged_kv_t shared = cache;
  shared.k = shared.v = nullptr;
  const kvc_layers_t layer_arrays = {layers, dev_k, dev_v, nullptr, nullptr};

  /* the ceiling: one cudaMemcpy of the same bytes between two buffers */
  const auto memcpy_ceiling = [&](size_t bytes) {
    void *src = nullptr, *dst = nullptr;
    KVC_BENCH_CHECK(cudaMalloc(&src, std::max<size_t>(bytes, 1)));
    KVC_BENCH_CHECK(cudaMalloc(&dst, std::max<size_t>(bytes, 1)));
    const bench::Stats st = bench::time_gpu(
        [&](cudaStream_t s) { KVC_BENCH_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s)); }, stream,
        2, o.iters, &flusher);
    cudaFree(src);
    cudaFree(dst);
    return st;
  };
  const bench::Stats mc = memcpy_ceiling(moved_bytes);

  const double floor_us = 1e6 * kvc_floor_compact((double)moved_rows * layers, (double)row_bytes, (double)keep.size()).floor_s;
  const auto print = [&](const char *impl, const bench::Stats &st, size_t extra, size_t bytes,
                         const bench::Stats &ceiling, double floor_time_us) {
    const double gbps = 2.0 * (double)bytes / (st.median_ms * 1e-3) / 1e9;
    bench::Json()
        .add("record", "result").add("op", "compact").add("impl", impl).add("n", n).add("batch", batch)
        .add("kv_heads", o.heads).add("layers", layers).add("head_dim", o.head_dim).add("dtype", o.dtype)
        .add("page_size", o.page_size).add("keep", keep_fraction).add("k", k)
        .add("moved_bytes", (long long)bytes).add_stats(st).add("gbps", gbps).add("memcpy_ms", ceiling.median_ms)
        .add("pct_memcpy", 100.0 * ceiling.median_ms / st.median_ms).add("pct_copy", 100.0 * gbps / copy_gbps)
        .add("floor_us", floor_time_us).add("pct_floor", 100.0 * floor_time_us / (1e3 * st.median_ms))
        .add("extra_bytes", (long long)extra)
        .print();
  };
  if (layers == 1 && o.in_place)
    print("kvc", bench::time_gpu([&](cudaStream_t s) {
            check(kvc_compact(ctx, plan, &cache, dev_keep, nullptr, 0, ws, ws_bytes, (kvc_stream_t)s), ctx,
                  "kvc_compact");
          }, stream, 2, o.iters, &flusher), ws_bytes, moved_bytes, mc, floor_us);
  if (layers == 1 && o.into) {
    const size_t kept_bytes = 2 * keep.size() * row_bytes; /* every kept K and V row */
    const bench::Stats kept_mc = memcpy_ceiling(kept_bytes);
    const kvc_page_table_t dst_pages = {upload(dst_table), nullptr, kept_pages};
    const double into_floor_us =
        1e6 * kvc_floor_compact_into((double)keep.size(), (double)row_bytes, (double)keep.size()).floor_s;
    print("kvc_into", bench::time_gpu([&](cudaStream_t s) {
            check(kvc_compact_into(ctx, plan, &cache, &dst_pages, dev_keep, nullptr, 0, ws, ws_bytes, (kvc_stream_t)s), ctx,
                  "kvc_compact_into");
          }, stream, 2, o.iters, &flusher), ws_bytes, kept_bytes, kept_mc, into_floor_us);
    cudaFree((void *)dst_pages.page_table);
  }
  if (layers > 1) {
    print("kvc_layers", bench::time_gpu([&](cudaStream_t s) {
            check(kvc_compact_layers(ctx, plan, &shared, &layer_arrays, dev_keep, nullptr, 0, ws,
                                     layout.workspace_bytes, (kvc_stream_t)s),
                  ctx, "kvc_compact_layers");
          }, stream, 2, o.iters, &flusher), layout.workspace_bytes, moved_bytes, mc, floor_us);
    print("kvc_per_layer_calls", bench::time_gpu([&](cudaStream_t s) {
            for (int l = 0; l < layers; ++l) {
              kvc_paged_kv_t one = cache;
              one.k = k_pools[l];
              one.v = v_pools[l];
              check(kvc_compact(ctx, plan, &one, dev_keep + (size_t)l * layer_keep, nullptr, 0, ws, ws_bytes,
                                (kvc_stream_t)s),
                    ctx, "kvc_compact");
            }
          }, stream, 2, o.iters, &flusher), ws_bytes, moved_bytes, mc, floor_us);
  }

  cudaFree(ws);
  cudaFree((void *)dev_keep);
  cudaFree((void *)cache.page_table);
  cudaFree(dev_k);
  cudaFree(dev_v);
  for (int l = 0; l < layers; ++l) cudaFree(k_pools[l]), cudaFree(v_pools[l]);
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
  const int layered = o.layers > 1 ? (int)o.layer_shapes.size() : 0;
  bench::Progress progress("bench_compact", (int)((o.shapes.size() + layered) * o.keep.size()));
  for (const Shape &shape : o.shapes)
    for (double keep : o.keep) {
      progress.step("%dx%d keep %.2f", shape.batch, shape.n, keep);
      run_point(o, ctx, shape, 1, keep, copy_gbps, flusher, stream);
    }
  for (int i = 0; i < layered; ++i)
    for (double keep : o.keep) {
      progress.step("%d layers of %dx%d keep %.2f", o.layers, o.layer_shapes[i].batch, o.layer_shapes[i].n, keep);
      run_point(o, ctx, o.layer_shapes[i], o.layers, keep, copy_gbps, flusher, stream);
    }
  cudaStreamDestroy(stream);
  kvc_context_destroy(ctx);
  return 0;
}
