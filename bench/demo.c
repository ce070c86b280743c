/*
 * kvc-demo - eviction bias and its fixes on a synthetic two-instruction prompt.
 *
 * The cache holds one sequence: a "defense" instruction [0, 192) followed by a "directive"
 * [192, 384). Keys carry a component along the observation queries' direction that grows with
 * position, so attention favours recent tokens (as in real prompts), and key norms grow with
 * position too. Every method runs plain, with the defense's key phrase whitelisted, and fair
 * (span-local scoring, fairness 1); the table shows the share of each span that survives.
 *
 *   kvc-demo [--backend cpu|cuda|auto] [--ratio R]     (R = fraction evicted, default 0.5)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#ifdef KVC_DEMO_CUDA
#include <cuda_runtime_api.h>
#endif

enum { N = 384, SPLIT = 192, KV_HEADS = 2, Q_HEADS = 8, HEAD_DIM = 64, PHRASE_START = 120, PHRASE_END = 150 };

typedef struct {
  float k[KV_HEADS][N][HEAD_DIM], v[KV_HEADS][N][HEAD_DIM];
} demo_cache_t; /* HF-style [heads][n][head_dim]: one page per sequence */

static double gaussian(unsigned *state) {
  double u = 0;
  for (int i = 0; i < 12; ++i) u += (*state = *state * 1664525u + 1013904223u) / 4294967296.0;
  return u - 6.0;
}

static void build_cache(demo_cache_t *c) {
  unsigned state = 12345u;
  for (int h = 0; h < KV_HEADS; ++h)
    for (int t = 0; t < N; ++t)
      for (int d = 0; d < HEAD_DIM; ++d) {
        double recency = 3.0 * t / N; /* along dimension 0, the queries' direction */
        c->k[h][t][d] = (float)(gaussian(&state) * 0.5 + (d == 0 ? recency : 0.0));
        c->v[h][t][d] = (float)gaussian(&state);
      }
}

static int check(kvc_status_t status, kvc_context_t ctx, const char *what) {
  if (status == KVC_SUCCESS) return 0;
  fprintf(stderr, "kvc-demo: %s: %s (%s)\n", what, kvc_status_name(status), kvc_last_error(ctx));
  return 1;
}

/* Device copies of host buffers when the context runs on CUDA; the host buffers otherwise. */
static void *to_backend(kvc_backend_t backend, const void *host, size_t bytes) {
#ifdef KVC_DEMO_CUDA
  if (backend == KVC_BACKEND_CUDA) {
    void *dev = NULL;
    if (cudaMalloc(&dev, bytes) != cudaSuccess) return NULL;
    cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice);
    return dev;
  }
#endif
  void *copy = NULL; /* 256-byte aligned: the alignment the API asks of workspaces */
  if (posix_memalign(&copy, 256, bytes ? bytes : 1) == 0) memcpy(copy, host, bytes);
  return copy;
}

static void to_host(kvc_backend_t backend, void *host, const void *buffer, size_t bytes) {
#ifdef KVC_DEMO_CUDA
  if (backend == KVC_BACKEND_CUDA) {
    cudaMemcpy(host, buffer, bytes, cudaMemcpyDeviceToHost);
    return;
  }
#endif
  memcpy(host, buffer, bytes);
}

static void release(kvc_backend_t backend, void *buffer) {
#ifdef KVC_DEMO_CUDA
  if (backend == KVC_BACKEND_CUDA) {
    cudaFree(buffer);
    return;
  }
#endif
  free(buffer);
}

/* Observation queries point along dimension 0 (plus noise): recent keys get more attention. */
static float *build_queries(int64_t rows) {
  float *q = (float *)malloc(sizeof(float) * (size_t)(rows * Q_HEADS * HEAD_DIM));
  unsigned state = 777u;
  for (int64_t i = 0; i < rows * Q_HEADS * HEAD_DIM; ++i) q[i] = (float)(gaussian(&state) * 0.3 + (i % HEAD_DIM == 0 ? 4.0 : 0.0));
  return q;
}

typedef struct {
  const char *name;
  int whitelist, fair;
} variant_t;

/* Runs one method/variant; returns 0 and the keep rates of [defense, directive, phrase]. */
static int run(kvc_context_t ctx, kvc_backend_t backend, const demo_cache_t *host_cache, kvc_score_method_t method,
               const variant_t *variant, double ratio, double rates[3]) {
  int32_t seq_len = N, budget = (int32_t)(N * (1.0 - ratio)), span_indptr[2] = {0, 0};
  kvc_span_t spans[3];
  int nspans = 0;
  if (variant->fair) spans[nspans++] = (kvc_span_t){0, SPLIT, KVC_SPAN_FAIR, 1.0f};
  if (variant->whitelist) spans[nspans++] = (kvc_span_t){PHRASE_START, PHRASE_END, KVC_SPAN_PROTECT, 1.0f};
  if (variant->fair) spans[nspans++] = (kvc_span_t){SPLIT, N, KVC_SPAN_FAIR, 1.0f};
  span_indptr[1] = nspans;

  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = Q_HEADS;
  desc.num_kv_heads = KV_HEADS;
  desc.head_dim = HEAD_DIM;
  desc.dtype = KVC_DTYPE_F32;
  desc.batch = 1;
  desc.seq_lens = &seq_len;
  desc.budgets = &budget;
  desc.span_indptr = span_indptr;
  desc.spans = spans;
  desc.method = method;
  desc.window = 16;
  desc.sink_tokens = method == KVC_SCORE_STREAMING ? 4 : 0;
  desc.span_local = variant->fair;
  desc.fairness = variant->fair ? 1.0f : 0.0f;
  kvc_plan_t plan;
  if (check(kvc_plan_create(ctx, &desc, &plan), ctx, "kvc_plan_create")) return 1;

  kvc_plan_info_t info;
  size_t ws_bytes;
  kvc_plan_get_info(plan, &info);
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &ws_bytes);
  float *host_queries = build_queries(info.obs_total);
  void *queries = to_backend(backend, host_queries, sizeof(float) * (size_t)(info.obs_total * Q_HEADS * HEAD_DIM));
  void *cache_k = to_backend(backend, host_cache->k, sizeof host_cache->k);
  void *cache_v = to_backend(backend, host_cache->v, sizeof host_cache->v);
  void *zeroed = calloc(1, ws_bytes + 1);
  void *workspace = to_backend(backend, zeroed, ws_bytes + 1);
  free(zeroed);
  kvc_paged_kv_t cache = {cache_k, cache_v, KVC_DTYPE_F32, KV_HEADS, HEAD_DIM, N, 1,
                          (int64_t)KV_HEADS * N * HEAD_DIM, HEAD_DIM, (int64_t)N * HEAD_DIM, NULL, NULL, 0};
  int status = check(kvc_compress(ctx, plan, &cache, queries, NULL, workspace, ws_bytes, NULL), ctx, "kvc_compress");
  int32_t keep[KV_HEADS * N];
  if (!status) to_host(backend, keep, (char *)workspace + info.keep_offset_bytes, sizeof(int32_t) * (size_t)info.keep_elems);
  if (!status) {
    int kept[3] = {0, 0, 0};
    for (int64_t i = 0; i < info.keep_elems; ++i) {
      kept[keep[i] < SPLIT ? 0 : 1]++;
      kept[2] += keep[i] >= PHRASE_START && keep[i] < PHRASE_END;
    }
    rates[0] = kept[0] / (double)(KV_HEADS * SPLIT);
    rates[1] = kept[1] / (double)(KV_HEADS * (N - SPLIT));
    rates[2] = kept[2] / (double)(KV_HEADS * (PHRASE_END - PHRASE_START));
  }
  free(host_queries);
  release(backend, queries), release(backend, cache_k), release(backend, cache_v), release(backend, workspace);
  kvc_plan_destroy(plan);
  return status;
}

int main(int argc, char **argv) {
  kvc_backend_t want = KVC_BACKEND_AUTO;
  double ratio = 0.5;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      ++i;
      want = !strcmp(argv[i], "cpu") ? KVC_BACKEND_CPU : !strcmp(argv[i], "cuda") ? KVC_BACKEND_CUDA : KVC_BACKEND_AUTO;
    } else if (!strcmp(argv[i], "--ratio") && i + 1 < argc) {
      ratio = atof(argv[++i]);
    } else {
      fprintf(stderr, "usage: %s [--backend cpu|cuda|auto] [--ratio R]\n", argv[0]);
      return 2;
    }
  }
  if (!(ratio >= 0.0 && ratio < 1.0)) {
    fprintf(stderr, "kvc-demo: --ratio %g must be in [0, 1)\n", ratio);
    return 2;
  }
  kvc_context_t ctx;
  kvc_status_t status = kvc_context_create(want, 0, &ctx);
  if (status != KVC_SUCCESS) {
    fprintf(stderr, "kvc-demo: kvc_context_create: %s\n", kvc_status_name(status));
    return 1;
  }
  kvc_backend_t backend;
  kvc_context_backend(ctx, &backend);
  demo_cache_t *cache = (demo_cache_t *)malloc(sizeof *cache);
  build_cache(cache);

  static const char *methods[] = {"SnapKV", "H2O", "TOVA", "K-Norm", "StreamingLLM"};
  static const variant_t variants[] = {{"plain", 0, 0}, {"whitelist", 1, 0}, {"fair", 0, 1}};
  printf("libkvcompress %s demo on the %s backend: %d tokens, defense [0, %d) then directive [%d, %d),\n",
         kvc_version_string(), backend == KVC_BACKEND_CUDA ? "CUDA" : "CPU", N, SPLIT, SPLIT, N);
  printf("whitelisted key phrase [%d, %d); %.0f%% of the cache evicted. Keep rate = share of a span's tokens kept.\n\n",
         PHRASE_START, PHRASE_END, 100 * ratio);
  printf("%-13s %-10s %8s %10s %8s %8s\n", "method", "variant", "defense", "directive", "phrase", "gap");
  int failures = 0;
  for (int m = 0; m <= KVC_SCORE_STREAMING; ++m)
    for (int v = 0; v < 3; ++v) {
      double rates[3];
      if (run(ctx, backend, cache, (kvc_score_method_t)m, &variants[v], ratio, rates)) {
        failures++;
        continue;
      }
      printf("%-13s %-10s %7.1f%% %9.1f%% %7.1f%% %+7.1f\n", methods[m], variants[v].name, 100 * rates[0], 100 * rates[1],
             100 * rates[2], 100 * (rates[1] - rates[0]));
    }
  printf("\ngap = directive - defense keep rate, in points: plain policies are biased; fair eviction closes the gap,\n"
         "whitelisting keeps the phrase whole.\n");
  free(cache);
  kvc_context_destroy(ctx);
  return failures ? 1 : 0;
}
