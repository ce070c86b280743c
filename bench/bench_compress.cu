/*
 * bench_compress - times the full pipeline, kvc_compress (score + select + compact in one call),
 * and its three stages called one by one, on the device, over a grid of models, lengths, batches,
 * compression ratios and methods. One JSON line per point on stdout (keys shared with the PyTorch
 * peer bench/peers/kvpress_torch.py, so bench/report.py can join them):
 *
 *   {"record":"result","op":"compress","impl":"kvc","model":"llama","method":"snapkv","n":32768,
 *    "batch":1,"q_heads":32,"kv_heads":8,"head_dim":128,"dtype":"bf16","ratio":0.5,"window":64,
 *    "layout":"paged","page_size":16,"kept":16384,"median_ms":..,"p10_ms":..,"p90_ms":..,"reps":..,
 *    "score_ms":..,"select_ms":..,"compact_ms":..,"bytes":..,"gbps":..,"pct_copy":..,
 *    "flops":..,"tflops":..,"extra_bytes":..,"stage_extra_bytes":..}
 *
 *   bytes       the least any implementation must move: K read once to score it, plus the kept K
 *               and V rows read and written once (2 * 2 * batch * kept * kv_heads * head_dim * elem)
 *   gbps        bytes / median time; pct_copy = gbps / the cudaMemcpy D2D bandwidth of this run
 *   flops       the QK^T products the method needs (2 * q_heads * head_dim per visible query-key
 *               pair); tflops = flops / median time (compare with bench_ceilings' cuBLAS GEMM)
 *   extra_bytes kvc_plan_workspace_size(KVC_OP_COMPRESS): all the device memory the call needs
 *               beyond the cache and the queries (scores and keep indices included)
 *   stage_extra_bytes  the same for the three separate calls (score ws + scores + keep + the
 *               select and compact workspaces)
 *   floor_us    cost_model.h's floor on an H200: the larger of the memory floor (K read once, the
 *               scores written and read, the keep indices written, the kept K/V rows moved) and
 *               the compute floor (flops at the bf16 GEMM ceiling); pct_floor = floor / median
 *
 * Layers in one call: for every model and method, --layers L copies of the cache (one layer each,
 * one shared page table) at --layer-n tokens x --layer-batch sequences (ratio --layer-ratio) are
 * compressed by one kvc_compress_layers ("kvc_layers") and by L kvc_compress calls
 * ("kvc_per_layer_calls"); the same JSON keys with "layers":L, bytes and flops of all layers. The
 * layer arrays are device memory (kvc_layers_t): every stage is one launch per kernel for all
 * layers.
 *
 * Every repetition starts from a cold L2 (bench_util.cuh). kvc_compress compacts in place, so the
 * repetitions after the first run on an already compacted cache: the work is the same (same plan,
 * same counts, random data), only the values moved.
 *
 *   bench_compress [--models llama:32:8:128,qwen:40:8:128] [--n 4096,32768,131072] [--batch 1,8]
 *                  [--ratios 0.1,0.3,0.5,0.7,0.9] [--methods snapkv,h2o] [--window 64]
 *                  [--h2o-max-n 32768] [--layout paged|hf] [--page-size 16] [--dtype bf16]
 *                  [--iters 10] [--warmup 2] [--stages 1] [--max-seconds 0 (no limit)]
 *                  [--layers 32] [--layer-n 4096] [--layer-batch 1] [--layer-ratio 0.5]
 *   H2O runs with window = n (every query observes).
 */
#include <chrono>
#include <memory>

#include "bench_util.cuh"
#include "cost_model.h"

namespace {

struct Model {
  std::string name;
  int q_heads, kv_heads, head_dim;
};

struct Options {
  std::vector<Model> models{{"llama", 32, 8, 128}, {"qwen", 40, 8, 128}};
  std::vector<int> lengths{4096, 32768, 131072}, batches{1, 8};
  std::vector<double> ratios{0.1, 0.3, 0.5, 0.7, 0.9};
  std::vector<std::string> methods{"snapkv", "h2o"};
  int window = 64, h2o_max_n = 32768, page_size = 16, iters = 10, warmup = 2, stages = 1;
  int layers = 32, layer_n = 4096, layer_batch = 1;
  double max_seconds = 0, layer_ratio = 0.5;
  std::string layout = "paged", dtype = "bf16";
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {
    std::string key = argv[i];
    if (i + 1 >= argc) {
      fprintf(stderr, "bench_compress: %s needs a value\n", key.c_str());
      exit(2);
    }
    const char *value = argv[i + 1];
    if (key == "--models") {
      o.models.clear();
      for (const std::string &m : bench::split(value)) {
        char name[64];
        Model model;
        if (sscanf(m.c_str(), "%63[^:]:%d:%d:%d", name, &model.q_heads, &model.kv_heads, &model.head_dim) != 4) {
          fprintf(stderr, "bench_compress: --models wants name:q_heads:kv_heads:head_dim, got %s\n", m.c_str());
          exit(2);
        }
        model.name = name;
        o.models.push_back(model);
      }
    } else if (key == "--n") o.lengths = bench::parse_ints(value);
    else if (key == "--batch") o.batches = bench::parse_ints(value);
    else if (key == "--ratios") o.ratios = bench::parse_doubles(value);
    else if (key == "--methods") o.methods = bench::split(value);
    else if (key == "--window") o.window = atoi(value);
    else if (key == "--h2o-max-n") o.h2o_max_n = atoi(value);
    else if (key == "--layout") o.layout = value;
    else if (key == "--page-size") o.page_size = atoi(value);
    else if (key == "--dtype") o.dtype = value;
    else if (key == "--iters") o.iters = atoi(value);
    else if (key == "--warmup") o.warmup = atoi(value);
    else if (key == "--stages") o.stages = atoi(value);
    else if (key == "--max-seconds") o.max_seconds = atof(value);
    else if (key == "--layers") o.layers = atoi(value);
    else if (key == "--layer-n") o.layer_n = atoi(value);
    else if (key == "--layer-batch") o.layer_batch = atoi(value);
    else if (key == "--layer-ratio") o.layer_ratio = atof(value);
    else {
      fprintf(stderr, "bench_compress: unknown option %s\n", key.c_str());
      exit(2);
    }
  }
  return o;
}

/* QK^T flops of one sequence: SnapKV/H2O observation queries at the last `obs` positions of n,
 * each seeing the keys up to itself. */
double qk_flops(const Model &m, int n, int obs) {
  double pairs = 0;
  for (int i = 0; i < obs; ++i) pairs += (double)(n - obs + i + 1);
  return 2.0 * m.q_heads * m.head_dim * pairs;
}

struct Point {
  const Model *model;
  std::string method;
  int n, batch;
  double ratio;
};

/* The plan of a point. */
kvc_plan_t plan_of(kvc_context_t ctx, const Options &o, const Point &pt, std::vector<int32_t> &seq_lens,
                   std::vector<int32_t> &budgets) {
  const Model &m = *pt.model;
  const kvc_score_method_t method = bench::method_of(pt.method);
  seq_lens.assign(pt.batch, pt.n);
  budgets.assign(pt.batch, bench::kept_of(pt.n, pt.ratio));
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = m.q_heads;
  desc.num_kv_heads = m.kv_heads;
  desc.head_dim = m.head_dim;
  desc.dtype = bench::dtype_of(o.dtype);
  desc.batch = pt.batch;
  desc.seq_lens = seq_lens.data();
  desc.budgets = budgets.data();
  desc.method = method;
  desc.window = method == KVC_SCORE_H2O ? pt.n : o.window;
  desc.pool_kernel = method == KVC_SCORE_SNAPKV ? 5 : 1;
  kvc_plan_t plan = nullptr;
  bench::check_kvc(kvc_plan_create(ctx, &desc, &plan), ctx, "kvc_plan_create");
  return plan;
}

/* The common keys of a point's JSON line, for `layers` layers: shape, stats, bytes, flops, floor. */
bench::Json &describe(bench::Json &j, const Options &o, const Point &pt, int layers, const bench::Stats &total,
                      const kvc_plan_info_t &info, double copy_gbps) {
  const Model &m = *pt.model;
  const size_t elem = bench::dtype_bytes(bench::dtype_of(o.dtype));
  const int window = bench::method_of(pt.method) == KVC_SCORE_H2O ? pt.n : o.window;
  const int kept = bench::kept_of(pt.n, pt.ratio);
  const double row_bytes = (double)m.head_dim * elem;
  const double k_bytes = (double)layers * pt.batch * pt.n * m.kv_heads * row_bytes;
  const double kept_bytes = (double)layers * pt.batch * kept * m.kv_heads * row_bytes;
  const double bytes = k_bytes + 2.0 * 2.0 * kept_bytes;
  const double flops = layers * pt.batch * qk_flops(m, pt.n, (int)std::min<int64_t>(window, pt.n));
  const double floor_s = kvc_floor_compress(k_bytes, (double)layers * info.score_elems,
                                            (double)layers * info.keep_elems,
                                            (double)layers * pt.batch * kept * m.kv_heads, row_bytes, flops, 0.0)
                             .floor_s;
  const double sec = total.median_ms * 1e-3;
  j.add("record", "result").add("op", "compress").add("model", m.name).add("method", pt.method);
  j.add("n", pt.n).add("batch", pt.batch).add("layers", layers).add("q_heads", m.q_heads).add("kv_heads", m.kv_heads);
  j.add("head_dim", m.head_dim).add("dtype", o.dtype).add("ratio", pt.ratio).add("window", window);
  j.add("layout", o.layout).add("page_size", o.layout == "hf" ? pt.n : o.page_size).add("kept", kept);
  j.add_stats(total);
  j.add("bytes", bytes).add("gbps", bytes / sec / 1e9).add("copy_gbps", copy_gbps);
  j.add("pct_copy", 100.0 * bytes / sec / 1e9 / copy_gbps);
  j.add("flops", flops).add("tflops", flops / sec / 1e12);
  j.add("floor_us", 1e6 * floor_s).add("pct_floor", 100.0 * floor_s / sec);
  return j;
}

/* One point over o.layers layers: kvc_compress_layers once against one kvc_compress per layer. */
void run_layers_point(kvc_context_t ctx, const Options &o, const Point &pt, double copy_gbps,
                      bench::L2Flusher &flusher, cudaStream_t stream) {
  const Model &m = *pt.model;
  const kvc_dtype_t dtype = bench::dtype_of(o.dtype);
  const size_t elem = bench::dtype_bytes(dtype);
  const int layers = o.layers;
  std::vector<int32_t> seq_lens, budgets;
  kvc_plan_t plan = plan_of(ctx, o, pt, seq_lens, budgets);
  kvc_plan_info_t info;
  bench::check_kvc(kvc_plan_get_info(plan, &info), ctx, "kvc_plan_get_info");
  std::vector<std::unique_ptr<bench::DeviceCache>> caches;
  const size_t query_elems = (size_t)info.obs_total * m.q_heads * m.head_dim;
  /* the layers' pools and queries; their pointer arrays go to the device (kvc_layers_t on CUDA) */
  std::vector<void *> k(layers), v(layers), queries(layers);
  for (int l = 0; l < layers; ++l) {
    caches.emplace_back(new bench::DeviceCache(o.layout, pt.batch, pt.n, m.kv_heads, m.head_dim, dtype, o.page_size,
                                               true, 21u + 2u * l, stream));
    k[l] = caches[l]->k;
    v[l] = caches[l]->v;
    KVC_BENCH_CHECK(cudaMalloc(&queries[l], std::max<size_t>(query_elems * elem, 256)));
    bench::fill_random(queries[l], query_elems, dtype, 22u + 2u * l, stream);
  }
  void **device_arrays = nullptr; /* k, v, queries: layers pointers each */
  KVC_BENCH_CHECK(cudaMalloc((void **)&device_arrays, 3 * sizeof(void *) * layers));
  const std::vector<void *> *host_arrays[3] = {&k, &v, &queries};
  for (int a = 0; a < 3; ++a)
    KVC_BENCH_CHECK(cudaMemcpy(device_arrays + a * layers, host_arrays[a]->data(), sizeof(void *) * layers,
                               cudaMemcpyHostToDevice));
  kvc_paged_kv_t shared = caches[0]->desc;
  shared.k = shared.v = nullptr;
  const kvc_layers_t arrays = {layers, device_arrays, device_arrays + layers,
                               (const void *const *)(device_arrays + 2 * layers), nullptr};
  kvc_workspace_layout_t layout;
  bench::check_kvc(kvc_plan_workspace_layout(plan, KVC_OP_COMPRESS, layers, &layout), ctx, "workspace layout");
  size_t ws_single = 0;
  bench::check_kvc(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &ws_single), ctx, "workspace size");
  void *workspace = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&workspace, std::max<size_t>(layout.workspace_bytes, 256)));
  KVC_BENCH_CHECK(cudaStreamSynchronize(stream));

  const bench::Stats batched = bench::time_gpu(
      [&](cudaStream_t s) {
        bench::check_kvc(kvc_compress_layers(ctx, plan, &shared, &arrays, workspace, layout.workspace_bytes,
                                             (kvc_stream_t)s),
                         ctx, "kvc_compress_layers");
      },
      stream, o.warmup, o.iters, &flusher);
  const bench::Stats per_layer = bench::time_gpu(
      [&](cudaStream_t s) {
        for (int l = 0; l < layers; ++l)
          bench::check_kvc(kvc_compress(ctx, plan, &caches[l]->desc, queries[l], NULL, workspace, ws_single,
                                        (kvc_stream_t)s),
                           ctx, "kvc_compress");
      },
      stream, o.warmup, o.iters, &flusher);
  bench::Json a, b;
  describe(a, o, pt, layers, batched, info, copy_gbps).add("impl", "kvc_layers")
      .add("speedup_vs_per_layer_calls", per_layer.median_ms / batched.median_ms)
      .add("extra_bytes", (long long)layout.workspace_bytes).print();
  describe(b, o, pt, layers, per_layer, info, copy_gbps).add("impl", "kvc_per_layer_calls")
      .add("extra_bytes", (long long)ws_single).print();

  for (int l = 0; l < layers; ++l) cudaFree(queries[l]);
  cudaFree(device_arrays);
  cudaFree(workspace);
  kvc_plan_destroy(plan);
}

void run_point(kvc_context_t ctx, const Options &o, const Point &pt, double copy_gbps, bench::L2Flusher &flusher,
               cudaStream_t stream) {
  const Model &m = *pt.model;
  const kvc_dtype_t dtype = bench::dtype_of(o.dtype);
  const size_t elem = bench::dtype_bytes(dtype);
  std::vector<int32_t> seq_lens, budgets;
  kvc_plan_t plan = plan_of(ctx, o, pt, seq_lens, budgets);
  kvc_plan_info_t info;
  bench::check_kvc(kvc_plan_get_info(plan, &info), ctx, "kvc_plan_get_info");

  bench::DeviceCache cache(o.layout, pt.batch, pt.n, m.kv_heads, m.head_dim, dtype, o.page_size, true, 11u, stream);
  const size_t query_elems = (size_t)info.obs_total * m.q_heads * m.head_dim;
  void *queries = nullptr, *workspace = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&queries, std::max<size_t>(query_elems * elem, 256)));
  bench::fill_random(queries, query_elems, dtype, 12u, stream);
  size_t ws_compress = 0;
  bench::check_kvc(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &ws_compress), ctx, "workspace size");
  KVC_BENCH_CHECK(cudaMalloc(&workspace, std::max<size_t>(ws_compress, 256)));
  KVC_BENCH_CHECK(cudaStreamSynchronize(stream));

  bench::Stats total = bench::time_gpu(
      [&](cudaStream_t s) {
        bench::check_kvc(kvc_compress(ctx, plan, &cache.desc, queries, NULL, workspace, ws_compress, (kvc_stream_t)s), ctx,
                         "kvc_compress");
      },
      stream, o.warmup, o.iters, &flusher);

  /* the three stages one by one, on their own buffers */
  bench::Stats st_score, st_select, st_compact;
  size_t stage_extra = 0;
  if (o.stages) {
    size_t ws_score = 0, ws_select = 0, ws_compact = 0;
    kvc_plan_workspace_size(plan, KVC_OP_SCORE, &ws_score);
    kvc_plan_workspace_size(plan, KVC_OP_SELECT, &ws_select);
    kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &ws_compact);
    const size_t ws_stage = std::max(ws_score, std::max(ws_select, ws_compact));
    float *scores = nullptr;
    int32_t *keep = nullptr;
    void *ws = nullptr;
    KVC_BENCH_CHECK(cudaMalloc(&scores, sizeof(float) * std::max<int64_t>(info.score_elems, 1)));
    KVC_BENCH_CHECK(cudaMalloc(&keep, sizeof(int32_t) * std::max<int64_t>(info.keep_elems, 1)));
    KVC_BENCH_CHECK(cudaMalloc(&ws, std::max<size_t>(ws_stage, 256)));
    stage_extra = ws_stage + sizeof(float) * info.score_elems + sizeof(int32_t) * info.keep_elems;
    auto score = [&](cudaStream_t s) {
      bench::check_kvc(kvc_score(ctx, plan, &cache.desc, queries, NULL, scores, 0, ws, ws_score, (kvc_stream_t)s), ctx,
                       "kvc_score");
    };
    auto select = [&](cudaStream_t s) {
      bench::check_kvc(kvc_select(ctx, plan, scores, keep, ws, ws_select, (kvc_stream_t)s), ctx, "kvc_select");
    };
    auto compact = [&](cudaStream_t s) {
      bench::check_kvc(kvc_compact(ctx, plan, &cache.desc, keep, nullptr, 0, ws, ws_compact, (kvc_stream_t)s), ctx,
                       "kvc_compact");
    };
    st_score = bench::time_gpu(score, stream, o.warmup, o.iters, &flusher);
    st_select = bench::time_gpu(select, stream, o.warmup, o.iters, &flusher);
    st_compact = bench::time_gpu(compact, stream, o.warmup, o.iters, &flusher);
    KVC_BENCH_CHECK(cudaStreamSynchronize(stream));
    cudaFree(scores);
    cudaFree(keep);
    cudaFree(ws);
  }

  const double k_bytes = (double)pt.batch * pt.n * m.kv_heads * m.head_dim * elem;
  const double kept_bytes = (double)pt.batch * bench::kept_of(pt.n, pt.ratio) * m.kv_heads * m.head_dim * elem;
  bench::Json j;
  describe(j, o, pt, 1, total, info, copy_gbps).add("impl", "kvc");
  if (o.stages) {
    j.add("score_ms", st_score.median_ms).add("select_ms", st_select.median_ms).add("compact_ms", st_compact.median_ms);
    /* the stage rates against the copy ceiling: score over the K it reads, compact over the kept
       rows it reads and writes */
    j.add("score_k_gbps", k_bytes / (st_score.median_ms * 1e-3) / 1e9);
    j.add("compact_gbps", 4.0 * kept_bytes / (st_compact.median_ms * 1e-3) / 1e9);
  }
  j.add("extra_bytes", (long long)ws_compress);
  if (o.stages) j.add("stage_extra_bytes", (long long)stage_extra);
  j.print();

  cudaFree(queries);
  cudaFree(workspace);
  kvc_plan_destroy(plan);
}

}  // namespace

int main(int argc, char **argv) {
  const Options o = parse(argc, argv);
  kvc_context_t ctx = nullptr;
  bench::check_kvc(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), ctx, "kvc_context_create");
  const double copy_gbps = bench::print_device_and_copy_ceiling("bench_compress");
  bench::L2Flusher flusher;
  cudaStream_t stream;
  KVC_BENCH_CHECK(cudaStreamCreate(&stream));

  std::vector<Point> points;
  for (const Model &m : o.models)
    for (const std::string &method : o.methods)
      for (int n : o.lengths) {
        if (method == "h2o" && n > o.h2o_max_n) continue;
        for (int batch : o.batches)
          for (double ratio : o.ratios) points.push_back({&m, method, n, batch, ratio});
      }
  bench::Progress progress("bench_compress", (int)points.size());
  const auto t0 = std::chrono::steady_clock::now();
  for (const Point &pt : points) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o.max_seconds > 0 && elapsed > o.max_seconds) {
      progress.step("SKIP %s %s n=%d batch=%d ratio=%.2f (time budget %.0f s spent)", pt.model->name.c_str(),
                    pt.method.c_str(), pt.n, pt.batch, pt.ratio, o.max_seconds);
      bench::Json()
          .add("record", "skipped").add("op", "compress").add("impl", "kvc").add("model", pt.model->name)
          .add("method", pt.method).add("n", pt.n).add("batch", pt.batch).add("ratio", pt.ratio)
          .add("reason", "time budget").print();
      continue;
    }
    progress.step("%s %s n=%d batch=%d ratio=%.2f", pt.model->name.c_str(), pt.method.c_str(), pt.n, pt.batch,
                  pt.ratio);
    run_point(ctx, o, pt, copy_gbps, flusher, stream);
  }
  for (const Model &m : o.models)
    for (const std::string &method : o.methods) {
      if (o.layers < 2) break;
      const Point pt{&m, method, o.layer_n, o.layer_batch, o.layer_ratio};
      progress.step("%s %s: %d layers of n=%d batch=%d in one call and in %d calls", m.name.c_str(), method.c_str(),
                    o.layers, pt.n, pt.batch, o.layers);
      run_layers_point(ctx, o, pt, copy_gbps, flusher, stream);
    }
  cudaStreamDestroy(stream);
  kvc_context_destroy(ctx);
  return 0;
}
