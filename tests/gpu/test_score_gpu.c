/*
 * test_score_gpu.c - kvc_score on a real device against the CPU backend at long context, through
 * the tensor-core kernels of kernels/score.cu (f16/bf16) and their fp32 path (f32): SnapKV
 * (window 64; GQA 4 and GQA 8 at head_dim 256; with the engine's normalisers), TOVA and KNORM at
 * n = 32k and 128k, H2O with a 4096-query window at 32k, and H2O over the whole prompt (window = n)
 * at 4096 and 32k. Same tolerance and argument as tests/emu/test_score_emu.c (fp32 on the device,
 * double on the CPU): 1e-4 relative + 1e-9 absolute; the emulated tests see ~1e-6. f16/bf16
 * products on tensor cores are exact in fp32 and summed in fp32 (Hopper may truncate the sums'
 * alignment: within the tolerance); the f32 case checks that f32 never goes through TF32 (10-bit
 * significands: ~1e-3 relative errors in the logits). The dynamic shared memory of head_dim 256
 * (over 48 KiB) is opted in per kernel. kvc_score_layers with device pointer arrays in a CUDA graph
 * against single-layer calls. Skips without a device.
 */
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "gpu_util.h"
#include "test_util.h"

static const double kRelTol = 1e-4, kAbsTol = 1e-9;

typedef struct {
  kvc_score_method_t method;
  int32_t n, window, num_kv_heads, group, head_dim;
  kvc_dtype_t dtype;
  int engine_lse; /* the CUDA run gets the test's own double normalisers (kvc_score's `lse`) */
  kvc_query_dtype_t query_dtype; /* FP8 keys: the queries' dtype (the keys get k_scale 0.8) */
} gpu_case_t;

static void check_long_context(const gpu_case_t *c) {
  kvc_gpu_require_device();
  kvc_context_t cpu = NULL, cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  const int32_t seq_lens[] = {c->n}, budgets[] = {c->n / 4};
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = c->num_kv_heads;
  desc.num_q_heads = c->num_kv_heads * c->group;
  desc.head_dim = c->head_dim;
  desc.dtype = c->dtype;
  desc.batch = 1;
  desc.seq_lens = seq_lens;
  desc.budgets = budgets;
  desc.method = c->method;
  desc.window = c->window;
  desc.pool_kernel = c->method == KVC_SCORE_SNAPKV ? 5 : 1;
  desc.query_dtype = c->query_dtype;
  if (c->dtype == KVC_DTYPE_FP8_E4M3) desc.k_scale = 0.8f;
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  cr_assert_eq(kvc_plan_create(cpu, &desc, &cpu_plan), KVC_SUCCESS, "%s", kvc_last_error(cpu));
  cr_assert_eq(kvc_plan_create(cuda, &desc, &cuda_plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
  kvc_plan_info_t info;
  kvc_plan_get_info(cpu_plan, &info);

  kvc_test_cache_t *cache = kvc_test_cache_new(1, seq_lens, c->num_kv_heads, c->head_dim, c->dtype, 16,
                                               KVC_TEST_NHD, KVC_TEST_DENSE, 5, 99);
  const kvc_dtype_t query_dtype = kvc_test_query_dtype(&desc);
  size_t elem = query_dtype == KVC_DTYPE_F32 ? 4 : 2;
  size_t query_bytes = (size_t)info.obs_total * (size_t)desc.num_q_heads * (size_t)c->head_dim * elem;
  void *queries = info.obs_total ? kvc_test_queries_new(info.obs_total, desc.num_q_heads, c->head_dim, query_dtype, 7)
                                 : NULL;
  size_t score_bytes = sizeof(float) * (size_t)info.score_elems;
  float *cpu_scores = malloc(score_bytes), *cuda_scores = malloc(score_bytes);

  size_t bytes = 0;
  kvc_plan_workspace_size(cpu_plan, KVC_OP_SCORE, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  cr_assert_eq(kvc_score(cpu, cpu_plan, &cache->desc, queries, NULL, cpu_scores, 0, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(cpu));
  free(ws);

  kvc_paged_kv_t dev = cache->desc;
  dev.k = kvc_gpu_upload(cache->k, cache->pool_bytes);
  dev.v = kvc_gpu_upload(cache->v, cache->pool_bytes);
  dev.page_table = kvc_gpu_upload(cache->table, sizeof(int32_t) * (size_t)dev.max_pages);
  void *dev_queries = kvc_gpu_upload(queries, query_bytes);
  float *lse = c->engine_lse ? kvc_test_lse(&desc, cpu_plan, cache, queries) : NULL;
  float *dev_lse = lse ? kvc_gpu_upload(lse, sizeof(float) * (size_t)info.obs_total * (size_t)desc.num_q_heads) : NULL;
  float *dev_scores = kvc_gpu_upload(NULL, score_bytes);
  kvc_plan_workspace_size(cuda_plan, KVC_OP_SCORE, &bytes);
  void *dev_ws = kvc_gpu_upload(NULL, bytes);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, NULL);
  kvc_status_t status = kvc_score(cuda, cuda_plan, &dev, dev_queries, dev_lse, dev_scores, 0, dev_ws, bytes, NULL);
  cudaEventRecord(stop, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s", kvc_last_error(cuda));
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, start, stop);
  cr_assert_eq(cudaMemcpy(cuda_scores, dev_scores, score_bytes, cudaMemcpyDeviceToHost), cudaSuccess);

  double worst = 0.0;
  for (int64_t i = 0; i < info.score_elems; ++i) {
    double ref = cpu_scores[i], got = cuda_scores[i];
    int ok = isinf(ref) || isinf(got) ? ref == got : fabs(got - ref) <= kRelTol * fabs(ref) + kAbsTol;
    cr_assert(ok, "method %d n %d: score %lld: CUDA %.9g vs CPU %.9g", (int)c->method, c->n, (long long)i, got, ref);
    if (isfinite(ref) && ref != 0.0) worst = fmax(worst, fabs(got - ref) / fabs(ref));
  }
  cr_log_info("method %d n %d window %d: %.3f ms on the device (first call), max relative difference %.3g",
              (int)c->method, c->n, c->window, ms, worst);

  cudaFree(dev.k), cudaFree(dev.v), cudaFree((void *)dev.page_table), cudaFree(dev_queries), cudaFree(dev_scores);
  cudaFree(dev_ws), cudaFree(dev_lse);
  free(lse);
  cudaEventDestroy(start), cudaEventDestroy(stop);
  free(queries), free(cpu_scores), free(cuda_scores);
  kvc_test_cache_free(cache);
  kvc_plan_destroy(cpu_plan), kvc_plan_destroy(cuda_plan);
  kvc_context_destroy(cpu), kvc_context_destroy(cuda);
}

Test(score_gpu, snapkv_32k) { check_long_context(&(gpu_case_t){KVC_SCORE_SNAPKV, 32768, 64, 2, 4, 128, KVC_DTYPE_BF16}); }
Test(score_gpu, snapkv_128k) { check_long_context(&(gpu_case_t){KVC_SCORE_SNAPKV, 131072, 64, 2, 4, 128, KVC_DTYPE_F16}); }
Test(score_gpu, snapkv_32k_gqa8_head_dim_256) {
  check_long_context(&(gpu_case_t){KVC_SCORE_SNAPKV, 32768, 64, 1, 8, 256, KVC_DTYPE_BF16});
}
Test(score_gpu, snapkv_32k_engine_lse) {
  check_long_context(&(gpu_case_t){KVC_SCORE_SNAPKV, 32768, 64, 2, 4, 128, KVC_DTYPE_BF16, 1});
}
Test(score_gpu, tova_32k) { check_long_context(&(gpu_case_t){KVC_SCORE_TOVA, 32768, 1, 2, 4, 128, KVC_DTYPE_BF16}); }
Test(score_gpu, tova_128k) { check_long_context(&(gpu_case_t){KVC_SCORE_TOVA, 131072, 1, 8, 4, 128, KVC_DTYPE_BF16}); }
/* FP8 keys (e4m3, k_scale 0.8) with bf16 / f16 queries on tensor cores, and KNORM on fp8. */
Test(score_gpu, fp8_snapkv_32k) {
  check_long_context(&(gpu_case_t){KVC_SCORE_SNAPKV, 32768, 64, 2, 4, 128, KVC_DTYPE_FP8_E4M3, 0, KVC_QUERY_DTYPE_BF16});
}
Test(score_gpu, fp8_h2o_4k_whole_prompt) {
  check_long_context(&(gpu_case_t){KVC_SCORE_H2O, 4096, 4096, 2, 4, 128, KVC_DTYPE_FP8_E4M3, 0, KVC_QUERY_DTYPE_F16});
}
Test(score_gpu, fp8_knorm_32k) { check_long_context(&(gpu_case_t){KVC_SCORE_KNORM, 32768, 1, 8, 1, 128, KVC_DTYPE_FP8_E4M3}); }
Test(score_gpu, knorm_32k) { check_long_context(&(gpu_case_t){KVC_SCORE_KNORM, 32768, 1, 8, 1, 128, KVC_DTYPE_F16}); }
Test(score_gpu, knorm_128k) { check_long_context(&(gpu_case_t){KVC_SCORE_KNORM, 131072, 1, 8, 1, 256, KVC_DTYPE_F32}); }
/* Quadratic on the CPU reference: one KV head, a group of 2, head_dim 64 keep it to seconds. */
Test(score_gpu, h2o_window_4096_32k, .timeout = 600) {
  check_long_context(&(gpu_case_t){KVC_SCORE_H2O, 32768, 4096, 1, 2, 64, KVC_DTYPE_BF16});
}
/* H2O over the whole prompt: every token is a row. The CPU reference is O(n^2 * head_dim *
 * num_q_heads) in double: ~1e10 multiply-adds at 4096 with 8 q heads of 128, ~7e10 at 32k with 2
 * q heads of 64 (a minute or two on one core). */
Test(score_gpu, h2o_whole_prompt_4096_f16, .timeout = 600) {
  check_long_context(&(gpu_case_t){KVC_SCORE_H2O, 4096, 4096, 2, 4, 128, KVC_DTYPE_F16});
}
Test(score_gpu, h2o_whole_prompt_4096_f32_is_not_tf32, .timeout = 600) {
  check_long_context(&(gpu_case_t){KVC_SCORE_H2O, 4096, 4096, 2, 2, 128, KVC_DTYPE_F32});
}
Test(score_gpu, h2o_whole_prompt_32k, .timeout = 900) {
  check_long_context(&(gpu_case_t){KVC_SCORE_H2O, 32768, 32768, 1, 2, 64, KVC_DTYPE_BF16});
}

/* kvc_score_layers over 4 layers at n = 4096 (SnapKV, bf16, GQA 4, layers 0 and 2 with the engine's
 * normalisers), the pointer arrays in device memory, captured in a CUDA graph: each replay equals 4
 * single-layer kvc_score calls bit for bit. Between replays the device array is changed without a
 * new capture: layer 3's K pool becomes NULL, and that layer then scores NaN wherever it scores
 * (kvc_layers_t), the others as before. */
Test(score_gpu, score_layers_in_a_cuda_graph) {
  kvc_gpu_require_device();
  enum { L = 4 };
  const int32_t seq_lens[] = {4096, 1000}, budgets[] = {1024, 250};
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = 8;
  desc.num_q_heads = 32;
  desc.head_dim = 128;
  desc.dtype = KVC_DTYPE_BF16;
  desc.batch = 2;
  desc.seq_lens = seq_lens;
  desc.budgets = budgets;
  desc.method = KVC_SCORE_SNAPKV;
  desc.window = 64;
  desc.pool_kernel = 5;
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  const size_t query_bytes = (size_t)info.obs_total * 32 * 128 * 2, lse_bytes = sizeof(float) * (size_t)info.obs_total * 32;
  const size_t score_bytes = sizeof(float) * (size_t)info.score_elems;
  kvc_test_cache_t *cache[L];
  kvc_paged_kv_t dev[L];
  void *k[L], *v[L];
  const void *queries[L];
  const float *lse[L];
  for (int l = 0; l < L; ++l) {
    cache[l] = kvc_test_cache_new(2, seq_lens, 8, 128, desc.dtype, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 5, 99);
    for (size_t i = 0; i < cache[l]->pool_bytes; i += 97) cache[l]->k[i] ^= (unsigned char)(l + 1); /* per layer */
    dev[l] = cache[l]->desc;
    dev[l].k = k[l] = kvc_gpu_upload(cache[l]->k, cache[l]->pool_bytes);
    dev[l].v = v[l] = kvc_gpu_upload(cache[l]->v, cache[l]->pool_bytes);
    void *host_queries = kvc_test_queries_new(info.obs_total, 32, 128, desc.dtype, 7 + (uint64_t)l);
    queries[l] = kvc_gpu_upload(host_queries, query_bytes);
    float *host_lse = l % 2 == 0 ? kvc_test_lse(&desc, plan, cache[l], host_queries) : NULL;
    lse[l] = host_lse ? kvc_gpu_upload(host_lse, lse_bytes) : NULL;
    free(host_lse), free(host_queries);
  }
  /* one page table for every layer (the caches were made with the same seed: the same table) */
  const int32_t *table = kvc_gpu_upload(cache[0]->table, sizeof(int32_t) * 2 * (size_t)dev[0].max_pages);
  for (int l = 0; l < L; ++l) dev[l].page_table = table;
  void **dev_k = kvc_gpu_upload(k, sizeof k), **dev_v = kvc_gpu_upload(v, sizeof v);
  const void **dev_queries = kvc_gpu_upload(queries, sizeof queries);
  const float **dev_lse = kvc_gpu_upload(lse, sizeof lse);
  kvc_paged_kv_t shared = dev[0];
  shared.k = shared.v = NULL;
  const kvc_layers_t layers = {L, dev_k, dev_v, (const void *const *)dev_queries, (const float *const *)dev_lse};
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(plan, KVC_OP_SCORE, L, &layout), KVC_SUCCESS);
  void *ws = kvc_gpu_upload(NULL, layout.workspace_bytes);
  float *dev_scores = kvc_gpu_upload(NULL, score_bytes * L);

  float *want = malloc(score_bytes * L), *got = malloc(score_bytes * L);
  for (int l = 0; l < L; ++l) {
    cr_assert_eq(kvc_score(cuda, plan, &dev[l], queries[l], lse[l], dev_scores, 0, ws, layout.workspace_bytes, NULL),
                 KVC_SUCCESS, "%s", kvc_last_error(cuda));
    kvc_gpu_download(want + (size_t)l * info.score_elems, dev_scores, score_bytes);
  }
  cudaStream_t stream;
  cr_assert_eq(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  kvc_status_t status = kvc_score_layers(cuda, plan, &shared, &layers, dev_scores, 0, ws, layout.workspace_bytes,
                                         (kvc_stream_t)stream);
  cr_assert_eq(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cr_assert_eq(status, KVC_SUCCESS, "captured kvc_score_layers: %s (%s)", kvc_status_name(status), kvc_last_error(cuda));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    if (replay == 1) { /* layer 3's K pool NULL in the device array: no new capture */
      void *none = NULL;
      cr_assert_eq(cudaMemcpy(dev_k + 3, &none, sizeof none, cudaMemcpyHostToDevice), cudaSuccess);
    }
    cr_assert_eq(cudaMemset(dev_scores, 0, score_bytes * L), cudaSuccess);
    cr_assert_eq(cudaGraphLaunch(exec, stream), cudaSuccess);
    cr_assert_eq(cudaStreamSynchronize(stream), cudaSuccess, "%s", cudaGetErrorString(cudaGetLastError()));
    kvc_gpu_download(got, dev_scores, score_bytes * L);
    for (int64_t i = 0; i < L * info.score_elems; ++i) {
      const int nulled = replay == 1 && i >= 3 * info.score_elems;
      if (nulled && !isinf(want[i]))
        cr_assert(isnan(got[i]), "replay %d, layer 3 without a K pool: score %lld is %.9g, not NaN", replay,
                  (long long)(i - 3 * info.score_elems), got[i]);
      else
        cr_assert(memcmp(&got[i], &want[i], sizeof(float)) == 0, "replay %d: layer %lld score %lld is %.9g, the "
                  "single call's %.9g", replay, (long long)(i / info.score_elems), (long long)(i % info.score_elems),
                  got[i], want[i]);
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  for (int l = 0; l < L; ++l) {
    cudaFree(k[l]), cudaFree(v[l]), cudaFree((void *)queries[l]), cudaFree((void *)lse[l]);
    kvc_test_cache_free(cache[l]);
  }
  cudaFree((void *)table), cudaFree(dev_k), cudaFree(dev_v), cudaFree(dev_queries), cudaFree(dev_lse);
  cudaFree(ws), cudaFree(dev_scores);
  free(want), free(got);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cuda);
}
