/*
 * test_score_emu.c - kvc_score on the CUDA backend (its kernels run by the SIMT emulator) against
 * the CPU backend (double precision, kernels/score_cpu.c) on the same caches and queries, through
 * the public API: every method x dtype x head_dim (64, 128, 256 and a generic 40) with the layout,
 * page table kind and GQA group (1, 4) rotating; span-local domains, pooling at domain borders,
 * window > n, accumulate, the engine's normalisers, and the selection made from either backend's
 * scores. The tensor-core sweeps (tensor_core_*) run the f16/bf16 kernels over GQA 1/4/8 x head_dim
 * 64/128/256 x page size 1/16/13 (not dividing n) x n from 1 to ~3000 in batches, H2O over the whole
 * prompt included; the nonfinite_* tests check the non-finite rule of kvcompress.h against an
 * oracle written in this file. The fp8_* tests run FP8 (e4m3) keys with f16 / bf16 / f32 queries
 * and a per-tensor or per-KV-head k_scale through the same kernels, KNORM included, and a whole
 * kvc_compress on an fp8 cache.
 *
 * Tolerance: |cuda - cpu| <= kRelTol * |cpu| + kAbsTol, infinities equal. The CUDA kernels
 * accumulate in fp32 what the CPU does in double. An attention probability exp(s - lse) carries
 * the absolute error of its logit as a relative error: the fp32 dot product of head_dim <= 256
 * terms of |q_d k_d| scale ~ 10 in total on this data errs by ~sqrt(D) * 2^-24 * 10 ~ 1e-5 (bound
 * D * 2^-24 * 10 ~ 1.5e-4 only if every rounding aligned), lse by ~(keys per thread + log2 n)
 * * 2^-24 * |lse| ~ 1e-6, and the sums over queries, pooling and the group mean add positive terms
 * (relative error ~ terms * 2^-24 <= 1e-5 here). So 1e-4 relative is ~10x the typical error;
 * the absolute 1e-9 only covers probabilities that underflow (e^-20 of a 1/n share). On tensor
 * cores the f16 (11-bit) and bf16 (8-bit) products are exact in fp32 and both backends widen the
 * same values exactly, so the logits carry only the fp32 summation error above (the emulated mma
 * rounds once per 16 products; Hopper aligns and may truncate: ~D * 2^-23 relative at worst, the
 * same size). f32 runs plain fp32 FMAs, never TF32 (10-bit inputs would miss 1e-4 by an order of
 * magnitude). KNORM: sqrt of a sum of D squares, relative ~ D * 2^-24 < 2e-5. STREAMING is exact.
 */
#include <criterion/criterion.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "compact_oracle.h"
#include "test_util.h"

static const double kRelTol = 1e-4, kAbsTol = 1e-9;

typedef struct {
  kvc_score_method_t method;
  kvc_dtype_t dtype;
  int32_t head_dim, num_kv_heads, group, page_size;
  kvc_test_layout_t layout;
  kvc_test_table_t table;
  int32_t batch;
  const int32_t *seq_lens, *budgets; /* budgets NULL: keep everything */
  const int32_t *span_indptr;
  const kvc_span_t *spans;
  int32_t window, pool_kernel, span_local;
  kvc_pool_t pool;
  kvc_reduce_t reduce;
  uint64_t seed;
  int cuda_lse; /* 1: the CUDA run gets the test's own normalisers (kvc_score's `lse`), the CPU none */
  /* if set: changes the cache and queries after they are made (the non-finite tests) */
  void (*plant)(kvc_test_cache_t *cache, void *queries, int32_t num_q_heads);
  /* FP8 keys: the queries' dtype and the key scales, as in kvc_plan_desc_t */
  kvc_query_dtype_t query_dtype;
  float k_scale;
  const float *k_scales;
} score_case_t;

/* FP8 keys' scales: not powers of two, so a scale applied twice or not at all shows. */
static const float kFp8Scale = 1.7f, kFp8HeadScales[] = {0.55f, 2.3f};

/* Both backends' scores of one case. */
typedef struct {
  kvc_context_t cpu, cuda;
  kvc_plan_t cpu_plan, cuda_plan;
  kvc_plan_info_t info;
  kvc_test_cache_t *cache;
  void *queries;
  float *cpu_scores, *cuda_scores;
} score_run_t;

static const char *method_name(kvc_score_method_t m) {
  static const char *names[] = {"SNAPKV", "H2O", "TOVA", "KNORM", "STREAMING"};
  return names[m];
}

static kvc_plan_desc_t case_desc(const score_case_t *c, int32_t *budgets) {
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = c->num_kv_heads;
  desc.num_q_heads = c->num_kv_heads * c->group;
  desc.head_dim = c->head_dim;
  desc.dtype = c->dtype;
  desc.batch = c->batch;
  desc.seq_lens = c->seq_lens;
  for (int32_t b = 0; b < c->batch; ++b) budgets[b] = c->budgets ? c->budgets[b] : c->seq_lens[b];
  desc.budgets = budgets;
  desc.span_indptr = c->span_indptr;
  desc.spans = c->spans;
  desc.method = c->method;
  desc.window = c->window;
  desc.pool_kernel = c->pool_kernel;
  desc.pool = c->pool;
  desc.group_reduce = c->reduce;
  desc.span_local = c->span_local;
  desc.sink_tokens = c->method == KVC_SCORE_STREAMING ? 4 : 0;
  desc.query_dtype = c->query_dtype;
  if (c->dtype == KVC_DTYPE_FP8_E4M3) {
    desc.k_scale = c->k_scale;
    desc.k_scales = c->k_scales;
  }
  return desc;
}

static void run_score(kvc_context_t ctx, kvc_plan_t plan, const kvc_test_cache_t *cache, const void *queries,
                      const float *lse, float *scores, int accumulate) {
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = kvc_score(ctx, plan, &cache->desc, queries, lse, scores, accumulate, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_score: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  free(ws);
}

/* Builds the cache, queries and plans of `c` and scores on both backends; with `accumulate` the
 * score arrays start from the same random values and are added to. */
static void score_both(const score_case_t *c, int accumulate, score_run_t *r) {
  memset(r, 0, sizeof *r);
  int32_t budgets[16];
  cr_assert(c->batch <= 16);
  kvc_plan_desc_t desc = case_desc(c, budgets);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &r->cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &r->cuda), KVC_SUCCESS);
  kvc_status_t status = kvc_plan_create(r->cpu, &desc, &r->cpu_plan);
  cr_assert_eq(status, KVC_SUCCESS, "CPU plan: %s (%s)", kvc_status_name(status), kvc_last_error(r->cpu));
  status = kvc_plan_create(r->cuda, &desc, &r->cuda_plan);
  cr_assert_eq(status, KVC_SUCCESS, "CUDA plan: %s (%s)", kvc_status_name(status), kvc_last_error(r->cuda));
  cr_assert_eq(kvc_plan_get_info(r->cpu_plan, &r->info), KVC_SUCCESS);
  r->cache = kvc_test_cache_new(c->batch, c->seq_lens, c->num_kv_heads, c->head_dim, c->dtype, c->page_size,
                                c->layout, c->table, 3, c->seed);
  r->queries = r->info.obs_total > 0 ? kvc_test_queries_new(r->info.obs_total, desc.num_q_heads, c->head_dim,
                                                            kvc_test_query_dtype(&desc), c->seed + 1)
                                     : NULL;
  if (c->plant) c->plant(r->cache, r->queries, desc.num_q_heads);
  size_t score_bytes = sizeof(float) * (size_t)r->info.score_elems;
  r->cpu_scores = malloc(score_bytes);
  r->cuda_scores = malloc(score_bytes);
  kvc_rng_t rng = {c->seed + 2};
  for (int64_t i = 0; i < r->info.score_elems; ++i)
    r->cpu_scores[i] = r->cuda_scores[i] = accumulate ? (float)kvc_rng_uniform(&rng) : NAN;
  float *lse = c->cuda_lse && r->queries ? kvc_test_lse(&desc, r->cpu_plan, r->cache, r->queries) : NULL;
  run_score(r->cpu, r->cpu_plan, r->cache, r->queries, NULL, r->cpu_scores, accumulate);
  run_score(r->cuda, r->cuda_plan, r->cache, r->queries, lse, r->cuda_scores, accumulate);
  free(lse);
}

static void score_run_free(score_run_t *r) {
  kvc_plan_destroy(r->cpu_plan);
  kvc_plan_destroy(r->cuda_plan);
  kvc_context_destroy(r->cpu);
  kvc_context_destroy(r->cuda);
  kvc_test_cache_free(r->cache);
  free(r->queries);
  free(r->cpu_scores);
  free(r->cuda_scores);
}

static int close_enough(double cuda, double cpu) {
  if (isinf(cpu) || isinf(cuda)) return cpu == cuda;
  return fabs(cuda - cpu) <= kRelTol * fabs(cpu) + kAbsTol;
}

/* Asserts every score of the run within tolerance; names the first mismatch. */
static void assert_scores_match(const score_case_t *c, const score_run_t *r) {
  double worst = 0.0;
  int64_t row_start = 0;
  for (int32_t b = 0; b < c->batch; ++b) {
    int32_t n = c->seq_lens[b];
    for (int32_t h = 0; h < c->num_kv_heads; ++h)
      for (int32_t j = 0; j < n; ++j) {
        int64_t i = row_start + (int64_t)h * n + j;
        double cpu = r->cpu_scores[i], cuda = r->cuda_scores[i];
        cr_assert(close_enough(cuda, cpu),
                  "%s dtype %d head_dim %d group %d layout %d table %d: sequence %d head %d token %d: "
                  "CUDA %.9g vs CPU %.9g",
                  method_name(c->method), (int)c->dtype, c->head_dim, c->group, (int)c->layout, (int)c->table, b, h,
                  j, cuda, cpu);
        if (isfinite(cpu) && cpu != 0.0) worst = fmax(worst, fabs(cuda - cpu) / fabs(cpu));
      }
    row_start += (int64_t)c->num_kv_heads * n;
  }
  cr_log_info("%s dtype %d head_dim %d group %d: max relative difference %.3g", method_name(c->method),
              (int)c->dtype, c->head_dim, c->group, worst);
}

/* The same with NaN allowed where both backends have it (the cases that plant NaN). */
static void assert_scores_match_or_nan(const score_case_t *c, const score_run_t *r) {
  for (int64_t i = 0; i < r->info.score_elems; ++i) {
    const double cpu = r->cpu_scores[i], cuda = r->cuda_scores[i];
    cr_assert(isnan(cpu) ? isnan(cuda) : close_enough(cuda, cpu), "%s: score %lld: CUDA %.9g vs CPU %.9g",
              method_name(c->method), (long long)i, cuda, cpu);
  }
}

static void check_case(const score_case_t *c) {
  score_run_t r;
  score_both(c, 0, &r);
  assert_scores_match(c, &r);
  score_run_free(&r);
}

/* Every dtype x head_dim for one method; layout, table kind and GQA group rotate with the case. */
static void sweep_method(kvc_score_method_t method, int32_t window) {
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};
  static const int32_t dims[] = {64, 128, 256, 40};
  static const int32_t seq_lens[] = {301, 517};
  int index = 0;
  for (int di = 0; di < 3; ++di)
    for (int hi = 0; hi < 4; ++hi, ++index) {
      score_case_t c = {0};
      c.method = method;
      c.dtype = dtypes[di];
      c.head_dim = dims[hi];
      c.num_kv_heads = 2;
      c.group = index % 2 ? 4 : 1;
      c.layout = (kvc_test_layout_t)(index % 2);
      c.table = (kvc_test_table_t)(index % 3);
      c.page_size = 16;
      c.batch = 2;
      c.seq_lens = seq_lens;
      c.window = window;
      c.pool_kernel = method == KVC_SCORE_SNAPKV ? 5 : 1;
      c.pool = index % 4 == 3 ? KVC_POOL_MAX : KVC_POOL_AVG;
      c.reduce = index % 3 == 2 ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN;
      c.seed = 1000 + (uint64_t)index * 17 + (uint64_t)method * 1000;
      check_case(&c);
    }
}

Test(score_emu, snapkv_every_dtype_and_head_dim) { sweep_method(KVC_SCORE_SNAPKV, 24); }
Test(score_emu, h2o_every_dtype_and_head_dim) { sweep_method(KVC_SCORE_H2O, 20); }
Test(score_emu, tova_every_dtype_and_head_dim) { sweep_method(KVC_SCORE_TOVA, 1); }
Test(score_emu, knorm_every_dtype_and_head_dim) { sweep_method(KVC_SCORE_KNORM, 1); }
Test(score_emu, streaming_every_dtype_and_head_dim) { sweep_method(KVC_SCORE_STREAMING, 1); }

Test(score_emu, every_layout_and_page_table) {
  static const int32_t seq_lens[] = {133, 250};
  for (int layout = 0; layout < 2; ++layout)
    for (int table = 0; table < 3; ++table) {
      score_case_t c = {KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 64, 2, 4, 8, (kvc_test_layout_t)layout,
                        (kvc_test_table_t)table, 2, seq_lens, NULL, NULL, NULL, 16, 5, 0, KVC_POOL_AVG,
                        KVC_REDUCE_MEAN, (uint64_t)(20 + 3 * layout + table)};
      check_case(&c);
    }
}

/* A long sequence: several pass-1 key chunks per query, several 64-key tiles per domain. */
Test(score_emu, h2o_long_sequence_spans_many_chunks) {
  static const int32_t seq_lens[] = {1537};
  score_case_t c = {KVC_SCORE_H2O, KVC_DTYPE_BF16, 128, 2, 4, 32, KVC_TEST_HND, KVC_TEST_CSR, 1, seq_lens, NULL,
                    NULL, NULL, 48, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 77};
  check_case(&c);
}

/* Sequence 0 has three FAIR spans around a PROTECT gap, sequence 1 one FAIR span after protected
 * sinks: scoring domains start mid-page, pooling clips at every domain border, keys in the gaps
 * get +inf. */
static const int32_t kSpanLens[] = {300, 157};
static const int32_t kSpanIndptr[] = {0, 4, 6};
static const kvc_span_t kSpans[] = {
    {0, 100, KVC_SPAN_FAIR, 1.0f},   {100, 110, KVC_SPAN_PROTECT, 1.0f}, {110, 251, KVC_SPAN_FAIR, 2.0f},
    {251, 300, KVC_SPAN_FAIR, 1.0f}, {0, 7, KVC_SPAN_PROTECT, 1.0f},     {7, 157, KVC_SPAN_FAIR, 1.0f},
};

static void span_local_case(kvc_score_method_t method, kvc_dtype_t dtype, int32_t head_dim, int32_t pool_kernel,
                            kvc_pool_t pool, kvc_reduce_t reduce, uint64_t seed) {
  score_case_t c = {method, dtype, head_dim, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, kSpanLens, NULL,
                    kSpanIndptr, kSpans, 25, pool_kernel, 1, pool, reduce, seed};
  check_case(&c);
}

Test(score_emu, span_local_every_method) {
  span_local_case(KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 64, 7, KVC_POOL_AVG, KVC_REDUCE_MEAN, 5);
  span_local_case(KVC_SCORE_SNAPKV, KVC_DTYPE_BF16, 128, 5, KVC_POOL_MAX, KVC_REDUCE_MAX, 6);
  span_local_case(KVC_SCORE_SNAPKV, KVC_DTYPE_F32, 72, 3, KVC_POOL_AVG, KVC_REDUCE_MAX, 7);
  span_local_case(KVC_SCORE_H2O, KVC_DTYPE_F16, 128, 1, KVC_POOL_AVG, KVC_REDUCE_MEAN, 8);
  span_local_case(KVC_SCORE_TOVA, KVC_DTYPE_F32, 64, 1, KVC_POOL_AVG, KVC_REDUCE_MEAN, 9);
  span_local_case(KVC_SCORE_KNORM, KVC_DTYPE_BF16, 256, 1, KVC_POOL_AVG, KVC_REDUCE_MEAN, 10);
  span_local_case(KVC_SCORE_STREAMING, KVC_DTYPE_F16, 64, 1, KVC_POOL_AVG, KVC_REDUCE_MEAN, 11);
}

/* window > n: the short sequence is all queries (nothing scored for SNAPKV, all seen for H2O). */
Test(score_emu, window_longer_than_sequence) {
  static const int32_t seq_lens[] = {37, 203};
  for (int m = 0; m < 2; ++m) {
    score_case_t c = {m ? KVC_SCORE_H2O : KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 64, 1, 4, 8, KVC_TEST_NHD,
                      KVC_TEST_CONTIG, 2, seq_lens, NULL, NULL, NULL, 64, 5, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN,
                      (uint64_t)(40 + m)};
    check_case(&c);
  }
}

/* The engine's normalisers (computed by the test in double) in place of the normaliser kernel: the
 * same scores as the CPU computing its own, within the usual tolerance. */
Test(score_emu, engine_lse_matches_cpu_scores) {
  static const int32_t seq_lens[] = {301, 96};
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m) {
    score_case_t c = {(kvc_score_method_t)m, m == KVC_SCORE_TOVA ? KVC_DTYPE_F32 : KVC_DTYPE_BF16, 64, 2, 4, 16,
                      KVC_TEST_HND, KVC_TEST_CSR, 2, seq_lens, NULL, NULL, NULL, m == KVC_SCORE_H2O ? 400 : 24, 5, 0,
                      KVC_POOL_AVG, KVC_REDUCE_MEAN, (uint64_t)(60 + m), 1};
    check_case(&c);
  }
  score_case_t c = {KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 64, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, kSpanLens, NULL,
                    kSpanIndptr, kSpans, 25, 5, 1, KVC_POOL_AVG, KVC_REDUCE_MEAN, 64, 1};
  check_case(&c);
}

Test(score_emu, accumulate_adds_to_the_scores) {
  static const int32_t seq_lens[] = {211, 96};
  static const kvc_score_method_t methods[] = {KVC_SCORE_H2O, KVC_SCORE_SNAPKV, KVC_SCORE_KNORM};
  for (int m = 0; m < 3; ++m) {
    score_case_t c = {methods[m], KVC_DTYPE_BF16, 64, 2, 2, 16, KVC_TEST_HND, KVC_TEST_DENSE, 2, seq_lens, NULL,
                      NULL, NULL, 16, 3, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, (uint64_t)(50 + m)};
    score_run_t r;
    score_both(&c, 1, &r);
    assert_scores_match(&c, &r);
    score_run_free(&r);
  }
}

static size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

/* C of kvc_plan_workspace_size's formula for sequences with `obs` observation queries each. */
static size_t documented_splits(int32_t batch, const size_t *obs, size_t kv_heads, size_t group, size_t n_max) {
  size_t blocks = 0;
  for (int32_t b = 0; b < batch; ++b) blocks += kv_heads * ((group * obs[b] + 63) / 64);
  size_t c0 = (1024 + blocks - 1) / blocks, by_keys = (n_max + 511) / 512;
  c0 = c0 < by_keys ? c0 : by_keys;
  c0 = c0 < 1 ? 1 : c0;
  size_t keys = ((n_max + c0 - 1) / c0 + 63) / 64 * 64;
  return (n_max + keys - 1) / keys;
}

/* kvc_plan_workspace_size's comment in kvcompress.h states the CUDA score workspace exactly: every
 * method, for windows that give one split (H2O over long prompts) and many (short windows); over
 * L layers (kvc_plan_workspace_layout) each term L times. */
Test(score_emu, workspace_matches_the_documented_formula) {
  static const int32_t seq_lens[] = {100, 20000, 300};
  static const int32_t windows[] = {50, 20000};
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA, KVC_SCORE_KNORM,
                                               KVC_SCORE_STREAMING};
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  int multi_split = 0, single_split = 0;
  for (int w = 0; w < 2; ++w)
    for (int m = 0; m < 5; ++m) {
      kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
      desc.num_kv_heads = 2;
      desc.num_q_heads = 6;
      desc.head_dim = 64;
      desc.batch = 3;
      desc.seq_lens = desc.budgets = seq_lens;
      desc.method = methods[m];
      desc.window = windows[w];
      kvc_plan_t plan = NULL;
      cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
      kvc_plan_info_t info;
      kvc_plan_get_info(plan, &info);
      size_t obs[3], expect = 0;
      for (int b = 0; b < 3; ++b)
        obs[b] = m == KVC_SCORE_TOVA ? 1 : (size_t)(windows[w] < seq_lens[b] ? windows[w] : seq_lens[b]);
      const size_t rows = (size_t)info.obs_total * 6, splits = documented_splits(3, obs, 2, 3, 20000);
      multi_split += m <= KVC_SCORE_TOVA && splits > 1;
      single_split += m <= KVC_SCORE_TOVA && splits == 1;
      for (size_t layers = 1; layers <= 5; layers += 4) {
        expect = 0;
        if (m <= KVC_SCORE_TOVA) {
          if (splits > 1) expect += align256(layers * rows * splits * 8);
          expect += align256(layers * rows * 4) + layers * 6 * (size_t)info.total_tokens * 4;
        }
        size_t bytes = 0;
        kvc_workspace_layout_t layout;
        cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes), KVC_SUCCESS);
        cr_assert_eq(kvc_plan_workspace_layout(plan, KVC_OP_SCORE, (int32_t)layers, &layout), KVC_SUCCESS);
        if (layers == 1)
          cr_assert_eq(bytes, expect, "%s window %d: workspace %zu, documented %zu", method_name(methods[m]),
                       windows[w], bytes, expect);
        cr_assert_eq(layout.workspace_bytes, expect, "%s window %d, %zu layers: workspace %zu, documented %zu",
                     method_name(methods[m]), windows[w], layers, layout.workspace_bytes, expect);
      }
      kvc_plan_destroy(plan);
    }
  cr_assert(multi_split > 0 && single_split > 0, "both forms of the formula are covered");
  kvc_context_destroy(cuda);
}

/* The CUDA kernels copy rows 16 bytes at a time: head_dim 12 is refused, and with fp8 keys head_dim
 * 24 too for the methods that read K (STREAMING reads none and stays allowed), naming head_dim. */
Test(score_emu, head_dim_not_a_multiple_of_8_is_not_supported) {
  static const int32_t seq_lens[] = {10};
  kvc_context_t cuda = NULL;
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = desc.num_kv_heads = 1;
  desc.head_dim = 12;
  desc.batch = 1;
  desc.seq_lens = desc.budgets = seq_lens;
  cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_ERROR_NOT_SUPPORTED);
  desc.head_dim = 24;
  desc.dtype = KVC_DTYPE_FP8_E4M3;
  desc.query_dtype = KVC_QUERY_DTYPE_F16;
  cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_ERROR_NOT_SUPPORTED);
  cr_assert(strstr(kvc_last_error(cuda), "head_dim 24"), "%s", kvc_last_error(cuda));
  desc.method = KVC_SCORE_STREAMING;
  cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
  kvc_plan_destroy(plan);
  kvc_context_destroy(cuda);
}

/* ---- the selection made from each backend's scores ------------------------------------------- */

/* Rows of `keep_a` and `keep_b` (keep layout) may differ only in tokens whose reference scores
 * tie within tolerance: every token kept by one and not the other scores within the tolerance of
 * every other such token of its row. */
static void assert_same_selection(const score_case_t *c, const score_run_t *r, const int32_t *keep_a,
                                  const int32_t *keep_b, const char *what) {
  int64_t score_row = 0, keep_row = 0;
  int32_t differing = 0;
  for (int32_t b = 0; b < c->batch; ++b) {
    int32_t n = c->seq_lens[b], k = c->budgets[b] < n ? c->budgets[b] : n;
    for (int32_t h = 0; h < c->num_kv_heads; ++h) {
      const int32_t *a = keep_a + keep_row + (int64_t)h * k, *bb = keep_b + keep_row + (int64_t)h * k;
      const float *ref = r->cpu_scores + score_row + (int64_t)h * n;
      double lo = INFINITY, hi = -INFINITY;
      int32_t i = 0, j = 0;
      while (i < k || j < k) { /* both rows ascending: walk the symmetric difference */
        int32_t t;
        if (j >= k || (i < k && a[i] < bb[j])) t = a[i++];
        else if (i >= k || bb[j] < a[i]) t = bb[j++];
        else {
          i++, j++;
          continue;
        }
        lo = fmin(lo, ref[t]), hi = fmax(hi, ref[t]);
        differing++;
      }
      if (hi >= lo)
        cr_assert(hi - lo <= 2 * (kRelTol * fabs(hi) + kAbsTol),
                  "%s: sequence %d head %d: selections differ on tokens scoring %.9g .. %.9g (not a tie)", what, b,
                  h, lo, hi);
    }
    score_row += (int64_t)c->num_kv_heads * n;
    keep_row += (int64_t)c->num_kv_heads * k;
  }
  cr_log_info("%s: %d tokens differ, all within tolerance ties", what, differing);
}

static void select_into(kvc_context_t ctx, kvc_plan_t plan, const float *scores, int32_t *keep) {
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SELECT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = kvc_select(ctx, plan, scores, keep, ws, bytes, NULL);
  free(ws);
  kvc_backend_t backend = KVC_BACKEND_CPU;
  kvc_context_backend(ctx, &backend);
  if (status == KVC_ERROR_NOT_SUPPORTED)
    cr_skip("kvc_select on the %s backend is not there yet: %s", backend == KVC_BACKEND_CUDA ? "CUDA" : "CPU",
            kvc_last_error(ctx));
  cr_assert_eq(status, KVC_SUCCESS, "kvc_select: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
}

static const int32_t kSelectLens[] = {300, 157}, kSelectBudgets[] = {120, 80};

static void selection_case(score_case_t *c, kvc_score_method_t method, uint64_t seed) {
  score_case_t base = {method, KVC_DTYPE_F16, 64, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_CSR, 2, kSelectLens,
                       kSelectBudgets, kSpanIndptr, kSpans, 25, 5, 1, KVC_POOL_AVG, KVC_REDUCE_MEAN, seed};
  *c = base;
}

/* The CPU selection of the CUDA scores equals the CPU selection of the CPU scores up to ties. */
Test(score_emu, selection_from_cuda_scores_matches) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA, KVC_SCORE_KNORM};
  for (int m = 0; m < 4; ++m) {
    score_case_t c;
    selection_case(&c, methods[m], (uint64_t)(60 + m));
    score_run_t r;
    score_both(&c, 0, &r);
    int64_t elems = r.info.keep_elems;
    int32_t *keep_cpu = malloc(sizeof(int32_t) * (size_t)elems), *keep_cuda = malloc(sizeof(int32_t) * (size_t)elems);
    select_into(r.cpu, r.cpu_plan, r.cpu_scores, keep_cpu);
    select_into(r.cpu, r.cpu_plan, r.cuda_scores, keep_cuda);
    assert_same_selection(&c, &r, keep_cpu, keep_cuda, method_name(c.method));
    free(keep_cpu);
    free(keep_cuda);
    score_run_free(&r);
  }
}

/* End to end on the CUDA backend: its own select on its own scores. */
Test(score_emu, cuda_selection_matches_cpu_selection) {
  score_case_t c;
  selection_case(&c, KVC_SCORE_SNAPKV, 70);
  score_run_t r;
  score_both(&c, 0, &r);
  int64_t elems = r.info.keep_elems;
  int32_t *keep_cpu = malloc(sizeof(int32_t) * (size_t)elems), *keep_cuda = malloc(sizeof(int32_t) * (size_t)elems);
  select_into(r.cpu, r.cpu_plan, r.cpu_scores, keep_cpu);
  select_into(r.cuda, r.cuda_plan, r.cuda_scores, keep_cuda);
  assert_same_selection(&c, &r, keep_cpu, keep_cuda, "CUDA select");
  free(keep_cpu);
  free(keep_cuda);
  score_run_free(&r);
}


/* ---- the tensor-core kernels across shapes ----------------------------------------------------
 * f16 and bf16 x GQA 1/4/8 x head_dim 64/128/256, rotating page size 1/16/13 (13 divides none of the
 * lengths), layout, table kind, pooling and reduce; batches mix a one-token sequence with long ones.
 * GQA 8 has one KV head, the others two. */

typedef struct {
  int32_t batch;
  int32_t lens[3];
} lens_t;

/* fp8: the same with FP8 keys, f16 / bf16 queries (by di), head_dim 64 and 128, the scale per
 * tensor and per KV head in turn. */
static void tensor_core_sweep(kvc_score_method_t method, int32_t window, const lens_t *sets, int nsets,
                              uint64_t seed, int fp8) {
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F16, KVC_DTYPE_BF16};
  static const kvc_query_dtype_t query_dtypes[] = {KVC_QUERY_DTYPE_F16, KVC_QUERY_DTYPE_BF16};
  static const int32_t groups[] = {1, 4, 8}, dims[] = {64, 128, 256}, pages[] = {1, 16, 13};
  int index = 0;
  for (int di = 0; di < 2; ++di)
    for (int gi = 0; gi < 3; ++gi)
      for (int hi = 0; hi < (fp8 ? 2 : 3); ++hi, ++index) {
        score_case_t c = {0};
        c.method = method;
        c.dtype = fp8 ? KVC_DTYPE_FP8_E4M3 : dtypes[di];
        c.query_dtype = fp8 ? query_dtypes[di] : KVC_QUERY_DTYPE_AS_CACHE;
        c.k_scale = kFp8Scale;
        c.k_scales = fp8 && index % 2 ? kFp8HeadScales : NULL;
        c.head_dim = dims[hi];
        c.group = groups[gi];
        c.num_kv_heads = groups[gi] == 8 ? 1 : 2;
        c.page_size = pages[index % 3];
        c.table = (kvc_test_table_t)((index / 3) % 3);
        c.layout = (kvc_test_layout_t)(index % 2);
        c.batch = sets[index % nsets].batch;
        c.seq_lens = sets[index % nsets].lens;
        c.window = window;
        c.pool_kernel = method == KVC_SCORE_SNAPKV ? (index % 3 == 1 ? 1 : 5) : 1;
        c.pool = index % 4 == 3 ? KVC_POOL_MAX : KVC_POOL_AVG;
        c.reduce = index % 3 == 2 ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN;
        c.seed = seed + (uint64_t)index;
        check_case(&c);
      }
}

/* SnapKV, window 64: up to ~3000 keys, several normaliser splits per row block. */
Test(score_emu, tensor_core_snapkv_sweep, .timeout = 600) {
  static const lens_t sets[] = {{3, {1, 517, 2900}}, {2, {64, 1500}}, {2, {200, 1031}}};
  tensor_core_sweep(KVC_SCORE_SNAPKV, 64, sets, 3, 7000, 0);
}

/* H2O over the whole prompt (every token observes): causal tiles on the diagonal, rows of many
 * blocks, key tiles seen by hundreds of rows. */
Test(score_emu, tensor_core_h2o_whole_prompt_sweep, .timeout = 600) {
  static const lens_t sets[] = {{3, {1, 200, 480}}, {2, {45, 400}}, {2, {129, 333}}};
  tensor_core_sweep(KVC_SCORE_H2O, 4096, sets, 3, 7100, 0);
}

/* H2O with a window shorter than the prompt: rows of one block see different key ranges; two
 * normaliser splits for the 900-token sequence. */
Test(score_emu, tensor_core_h2o_window_sweep, .timeout = 600) {
  static const lens_t sets[] = {{2, {1, 900}}, {3, {90, 555, 33}}};
  tensor_core_sweep(KVC_SCORE_H2O, 100, sets, 2, 7200, 0);
}

/* TOVA: one query, all q heads of a KV head in one row tile. */
Test(score_emu, tensor_core_tova_sweep, .timeout = 600) {
  static const lens_t sets[] = {{3, {1, 700, 3000}}, {2, {2, 1999}}};
  tensor_core_sweep(KVC_SCORE_TOVA, 1, sets, 2, 7300, 0);
}

/* span_local on the tensor-core kernels: domains that start mid-tile, key tiles that straddle two
 * domains, GQA 8 and page size 13. */
Test(score_emu, tensor_core_span_local) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA};
  for (int m = 0; m < 3; ++m)
    for (int i = 0; i < 2; ++i) {
      score_case_t c = {methods[m], i ? KVC_DTYPE_BF16 : KVC_DTYPE_F16, i ? 256 : 128, 1, 8, 13,
                        (kvc_test_layout_t)i, i ? KVC_TEST_CSR : KVC_TEST_DENSE, 2, kSpanLens, NULL, kSpanIndptr,
                        kSpans, methods[m] == KVC_SCORE_H2O ? 1000 : 25, 5, 1, i ? KVC_POOL_MAX : KVC_POOL_AVG,
                        i ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN, (uint64_t)(7400 + 2 * m + i)};
      check_case(&c);
    }
}

/* ---- non-finite data: the rule of kvcompress.h, against an oracle ------------------------------
 * The oracle scores SNAPKV, H2O and TOVA (no span_local: one domain [0, n) per sequence) in double
 * from the test's own page mapping, with the rule written out: a NaN or +-inf among a row's logits
 * makes that whole softmax row NaN (with the engine's normalisers: a non-finite logit makes its own
 * term NaN, a non-finite lse entry the row's); MAX pooling and MAX reduce keep NaN; pool_kernel 1 is
 * the identity. Written apart from kernels/score_cpu.c, so it does not depend on how the CPU
 * backend handles these inputs. */

static double max_keep_nan(double a, double b) { return isnan(a) || isnan(b) ? NAN : fmax(a, b); }

/* scores[score layout] for the case's cache and queries (lse: the engine's, or NULL). */
static void oracle_scores(const score_case_t *c, const kvc_test_cache_t *cache, const void *queries,
                          const float *lse, double *scores) {
  const int32_t H = c->num_kv_heads, G = c->group, Hq = H * G, D = c->head_dim;
  const double scale = 1.0 / sqrt((double)D);
  int32_t budgets[16];
  const kvc_plan_desc_t desc = case_desc(c, budgets);
  const kvc_dtype_t query_dtype = kvc_test_query_dtype(&desc);
  int64_t row0 = 0, out0 = 0;
  for (int32_t b = 0; b < c->batch; ++b) {
    const int32_t n = c->seq_lens[b];
    const int32_t w = c->method == KVC_SCORE_TOVA ? 1 : (c->window < n ? c->window : n), first = n - w;
    const int32_t scored = c->method == KVC_SCORE_SNAPKV ? first : c->method == KVC_SCORE_TOVA ? n - 1 : n;
    double *heads = calloc((size_t)Hq * (size_t)n, sizeof(double)), *probs = malloc(sizeof(double) * (size_t)n);
    for (int32_t i = 0; i < w; ++i)
      for (int32_t g = 0; g < Hq; ++g) {
        const int32_t p = first + i;
        const int64_t row = (row0 + i) * Hq + g;
        int poisoned = lse ? !isfinite(lse[row]) : 0;
        double max = -INFINITY, sum = 0.0;
        for (int32_t j = 0; j <= p; ++j) {
          double dot = 0.0;
          for (int32_t x = 0; x < D; ++x) dot += kvc_test_load(queries, query_dtype, row * D + x) * kvc_test_k(cache, b, j, g / G, x);
          probs[j] = scale * kvc_test_key_scale(&desc, g / G) * dot;
          if (!isfinite(probs[j])) poisoned |= !lse; /* with the engine's lse: only this term */
          if (isfinite(probs[j])) max = fmax(max, probs[j]);
        }
        for (int32_t j = 0; j <= p; ++j) {
          probs[j] = lse ? (isfinite(probs[j]) ? exp(probs[j] - lse[row]) : NAN) : exp(probs[j] - max);
          sum += probs[j];
        }
        for (int32_t j = 0; j <= p && j < scored; ++j)
          heads[(int64_t)g * n + j] += poisoned ? NAN : lse ? probs[j] : probs[j] / sum;
      }
    for (int32_t g = 0; g < Hq; ++g) /* the queries that see key j: positions max(first, j) .. n - 1 */
      for (int32_t j = 0; j < scored; ++j) heads[(int64_t)g * n + j] /= (double)(n - (j > first ? j : first));
    for (int32_t h = 0; h < H; ++h)
      for (int32_t j = 0; j < n; ++j) {
        double value = INFINITY;
        if (j < scored && c->method == KVC_SCORE_TOVA) {
          value = 0.0;
          for (int32_t g = 0; g < Hq; ++g) value += heads[(int64_t)g * n + j];
          value /= Hq;
        } else if (j < scored) {
          const int32_t half = c->method == KVC_SCORE_SNAPKV ? c->pool_kernel / 2 : 0;
          value = c->reduce == KVC_REDUCE_MAX ? -INFINITY : 0.0;
          for (int32_t g = h * G; g < (h + 1) * G; ++g) {
            double pooled = c->pool == KVC_POOL_MAX && half > 0 ? -INFINITY : 0.0;
            for (int32_t k = j - half; k <= j + half; ++k) {
              if (k < 0 || k >= scored) continue; /* zero padding */
              const double x = heads[(int64_t)g * n + k];
              pooled = c->pool == KVC_POOL_MAX && half > 0 ? max_keep_nan(pooled, x) : pooled + x;
            }
            if (c->pool == KVC_POOL_AVG) pooled /= 2 * half + 1;
            value = c->reduce == KVC_REDUCE_MAX ? max_keep_nan(value, pooled) : value + pooled;
          }
          if (c->reduce == KVC_REDUCE_MEAN) value /= G;
        }
        scores[out0 + (int64_t)h * n + j] = value;
      }
    free(heads), free(probs);
    row0 += w;
    out0 += (int64_t)H * n;
  }
}

/* The CUDA scores of `r` against the oracle: NaN exactly where it has NaN, the rest within the
 * tolerance; returns how many NaN the oracle expects, and checks some scores stay finite. */
static int64_t assert_matches_oracle(const score_case_t *c, const score_run_t *r, const float *lse) {
  double *want = malloc(sizeof(double) * (size_t)r->info.score_elems);
  oracle_scores(c, r->cache, r->queries, lse, want);
  int64_t nans = 0, finite = 0;
  for (int64_t i = 0; i < r->info.score_elems; ++i) {
    const double got = r->cuda_scores[i];
    if (isnan(want[i])) {
      cr_assert(isnan(got), "%s: score %lld is %.9g, the rule gives NaN", method_name(c->method), (long long)i, got);
      ++nans;
    } else {
      cr_assert(close_enough(got, want[i]), "%s: score %lld is %.9g, the oracle %.9g", method_name(c->method),
                (long long)i, got, want[i]);
      finite += isfinite(want[i]);
    }
  }
  cr_assert_gt(finite, 0, "%s: the planted values poisoned everything: the case shows nothing", method_name(c->method));
  free(want);
  return nans;
}

/* Element x of (sequence b, token t, KV head h)'s key, or of query row r, q head g, set to v. */
static void set_element(void *base, kvc_dtype_t dtype, int64_t i, float v) {
  if (dtype == KVC_DTYPE_F32) ((float *)base)[i] = v;
  else if (dtype == KVC_DTYPE_F16) ((uint16_t *)base)[i] = kvc_test_f32_to_f16(v);
  else ((uint16_t *)base)[i] = kvc_test_f32_to_bf16(v);
}

/* Plants for the shapes below (2 sequences of 150 and 90 tokens, 2 KV heads, G = 2, head_dim 64):
 *   a NaN in q head 1 of an early observation row of sequence 0 (row 2: position 150 - w + 2; not
 *   for TOVA, whose one row would poison the whole sequence),
 *   -inf in element 7 of sequence 1's key at token 11, KV head 0, with element 7 of every query of
 *   q heads 0 and 1 set to 1: every row of KV head 0 that sees token 11 gets a -inf logit and no
 *   +inf (the case torch turns into NaN and a plain exp into a zero),
 *   +inf in element 0 of q head 3's last row of sequence 1 (logits of both signs). */
static int32_t g_rows0, g_rows1; /* observation rows of the two sequences */

static void plant_nonfinite(kvc_test_cache_t *cache, void *queries, int32_t Hq) {
  const kvc_dtype_t dtype = cache->desc.dtype;
  const int32_t D = cache->desc.head_dim, w0 = g_rows0, rows = g_rows0 + g_rows1;
  if (w0 > 2) set_element(queries, dtype, ((int64_t)2 * Hq + 1) * D + 5, NAN); /* not TOVA's only row */
  set_element(kvc_test_k_ptr(cache, 1, 11, 0), dtype, 7, -INFINITY);
  for (int32_t r = w0; r < rows; ++r)
    for (int32_t g = 0; g < 2; ++g) set_element(queries, dtype, ((int64_t)r * Hq + g) * D + 7, 1.0f);
  set_element(queries, dtype, ((int64_t)(rows - 1) * Hq + 3) * D, INFINITY);
}

static void nonfinite_case(score_case_t *c, kvc_score_method_t method, kvc_dtype_t dtype, int32_t window,
                           int32_t pool_kernel, kvc_pool_t pool, kvc_reduce_t reduce, uint64_t seed) {
  static const int32_t lens[] = {150, 90};
  score_case_t base = {method, dtype, 64, 2, 2, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, lens, NULL, NULL, NULL, window,
                       pool_kernel, 0, pool, reduce, seed};
  *c = base;
  c->plant = plant_nonfinite;
  g_rows0 = method == KVC_SCORE_TOVA ? 1 : window < lens[0] ? window : lens[0];
  g_rows1 = method == KVC_SCORE_TOVA ? 1 : window < lens[1] ? window : lens[1];
}

/* Each method, each dtype, MAX and AVG pooling (kernel 5 and the identity 1), MEAN and MAX reduce. */
Test(score_emu, nonfinite_logits_poison_their_rows) {
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F16, KVC_DTYPE_BF16, KVC_DTYPE_F32};
  int index = 0;
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m)
    for (int v = 0; v < 3; ++v, ++index) {
      score_case_t c;
      nonfinite_case(&c, (kvc_score_method_t)m, dtypes[index % 3], m == KVC_SCORE_H2O ? 60 : 24, v == 2 ? 1 : 5,
                     v == 0 ? KVC_POOL_AVG : KVC_POOL_MAX, v == 0 ? KVC_REDUCE_MEAN : KVC_REDUCE_MAX,
                     (uint64_t)(800 + index));
      score_run_t r;
      score_both(&c, 0, &r);
      const int64_t nans = assert_matches_oracle(&c, &r, NULL);
      cr_assert_gt(nans, 0, "%s: no NaN where the rule puts some", method_name(c.method));
      cr_log_info("%s dtype %d variant %d: %lld NaN scores, as the rule gives", method_name(c.method), (int)c.dtype, v,
                  (long long)nans);
      score_run_free(&r);
    }
}

/* The engine's normalisers with non-finite entries (NaN, +inf, -inf), on the planted data. */
Test(score_emu, nonfinite_engine_lse_poisons_its_rows) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_H2O; ++m) {
    score_case_t c;
    nonfinite_case(&c, (kvc_score_method_t)m, m ? KVC_DTYPE_BF16 : KVC_DTYPE_F16, 40, 5, KVC_POOL_MAX,
                   KVC_REDUCE_MEAN, (uint64_t)(850 + m));
    score_run_t r;
    score_both(&c, 0, &r); /* then the CUDA side again, with the test's lse, three entries non-finite */
    int32_t budgets[2];
    const kvc_plan_desc_t desc = case_desc(&c, budgets);
    float *lse = kvc_test_lse(&desc, r.cpu_plan, r.cache, r.queries);
    lse[0 * 4 + 2] = NAN;
    lse[5 * 4 + 0] = INFINITY;
    lse[41 * 4 + 3] = -INFINITY;
    run_score(r.cuda, r.cuda_plan, r.cache, r.queries, lse, r.cuda_scores, 0);
    assert_matches_oracle(&c, &r, lse);
    free(lse);
    score_run_free(&r);
  }
}

/* KNORM: keys far beyond sqrt(FLT_MAX) (whose squares overflow fp32) keep finite norms, and a norm
 * past FLT_MAX is stored as -FLT_MAX (finite for every finite key); an inf element gives -inf, a
 * NaN one NaN; the CPU (double) computes the same. */
static void plant_large_keys(kvc_test_cache_t *cache, void *queries, int32_t Hq) {
  (void)queries, (void)Hq;
  const kvc_dtype_t dtype = cache->desc.dtype;
  const float big = dtype == KVC_DTYPE_F16 ? 60000.0f : 3e30f; /* f16 tops out at 65504 */
  for (int32_t t = 3; t < 40; ++t)
    for (int32_t x = 0; x < cache->desc.head_dim; ++x)
      set_element(kvc_test_k_ptr(cache, 0, t, t % 2), dtype, x, (x % 3 ? big : -big) * (float)(t % 5 + 1) / 5.0f);
  set_element(kvc_test_k_ptr(cache, 1, 7, 0), dtype, 2, INFINITY);
  set_element(kvc_test_k_ptr(cache, 1, 8, 1), dtype, 5, NAN);
  set_element(kvc_test_k_ptr(cache, 1, 9, 0), dtype, 0, 1e-30f); /* tiny keys: no underflow to 0 either */
  if (dtype != KVC_DTYPE_F16) /* a finite key whose norm exceeds FLT_MAX: scored -FLT_MAX */
    for (int32_t x = 0; x < cache->desc.head_dim; ++x) set_element(kvc_test_k_ptr(cache, 1, 10, 1), dtype, x, 3e38f);
}

Test(score_emu, nonfinite_knorm_large_and_nonfinite_keys) {
  static const int32_t lens[] = {150, 90};
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F16, KVC_DTYPE_BF16, KVC_DTYPE_F32};
  for (int d = 0; d < 3; ++d) {
    score_case_t c = {KVC_SCORE_KNORM, dtypes[d], d == 1 ? 256 : 64, 2, 1, 16, KVC_TEST_HND, KVC_TEST_CSR, 2, lens,
                      NULL, NULL, NULL, 1, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, (uint64_t)(870 + d)};
    c.plant = plant_large_keys;
    score_run_t r;
    score_both(&c, 0, &r);
    int64_t nans = 0, infs = 0;
    for (int64_t i = 0; i < r.info.score_elems; ++i) {
      const double cpu = r.cpu_scores[i], cuda = r.cuda_scores[i];
      if (isnan(cpu)) {
        cr_assert(isnan(cuda), "dtype %d: score %lld: CUDA %.9g, CPU NaN", (int)c.dtype, (long long)i, cuda);
        ++nans;
        continue;
      }
      infs += isinf(cpu) != 0;
      cr_assert(close_enough(cuda, cpu), "dtype %d: score %lld: CUDA %.9g vs CPU %.9g", (int)c.dtype, (long long)i,
                cuda, cpu);
    }
    cr_assert_eq(nans, 1, "one NaN key");
    cr_assert_eq(infs, 1, "one inf key");
    const double big0 = r.cpu_scores[(int64_t)1 * 150 + 3]; /* sequence 0, head 1, token 3 */
    cr_assert(isfinite(big0) && big0 < -1e3, "a large key keeps a finite norm: %g", big0);
    if (c.dtype != KVC_DTYPE_F16) { /* sequence 1, head 1, token 10 */
      const float top = r.cuda_scores[(int64_t)2 * 150 + 90 + 10];
      cr_assert_eq(top, -FLT_MAX, "a finite key past FLT_MAX: CUDA %g, want -FLT_MAX", top);
    }
    score_run_free(&r);
  }
}

/* ---- FP8 keys (e4m3) with a per-tensor or per-KV-head k_scale ----------------------------------
 * The tensor-core sweeps above with fp8 keys, landed as bytes and widened in shared memory (f16 and
 * bf16 queries x GQA 1/4/8 x head_dim 64/128 x page size 1/16/13, the scale per tensor and per KV
 * head in turn), on shorter batches; the CPU backend they are compared with is itself checked
 * against a brute-force oracle in tests/test_score_cpu.c. Same tolerance: both backends widen the
 * same e4m3 values exactly and fold k_scale into the logit scale (kernels/score.cu). */

/* Makes c a case of fp8 keys with these queries, scaled per KV head or per tensor. */
static void use_fp8(score_case_t *c, kvc_query_dtype_t queries, int per_head) {
  c->dtype = KVC_DTYPE_FP8_E4M3;
  c->query_dtype = queries;
  c->k_scale = kFp8Scale;
  c->k_scales = per_head ? kFp8HeadScales : NULL;
}

Test(score_emu, fp8_snapkv_sweep, .timeout = 600) {
  static const lens_t sets[] = {{3, {1, 517, 1100}}, {2, {64, 700}}};
  tensor_core_sweep(KVC_SCORE_SNAPKV, 64, sets, 2, 9000, 1);
}

Test(score_emu, fp8_h2o_whole_prompt_sweep, .timeout = 600) {
  static const lens_t sets[] = {{2, {1, 300}}, {2, {45, 200}}};
  tensor_core_sweep(KVC_SCORE_H2O, 4096, sets, 2, 9100, 1);
}

Test(score_emu, fp8_tova_sweep, .timeout = 600) {
  static const lens_t sets[] = {{2, {1, 1300}}, {2, {2, 700}}};
  tensor_core_sweep(KVC_SCORE_TOVA, 1, sets, 2, 9200, 1);
}

/* f32 queries (the exact fp32 path on widened keys) for the attention methods, and KNORM, each
 * layout and table kind, head_dim 64 / 128 / 256 / 80 (the generic instantiation). */
Test(score_emu, fp8_f32_queries_and_knorm) {
  static const int32_t seq_lens[] = {301, 133};
  static const int32_t dims[] = {64, 128, 256, 80};
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA, KVC_SCORE_KNORM};
  int index = 0;
  for (int m = 0; m < 4; ++m)
    for (int i = 0; i < 2; ++i, ++index) {
      score_case_t c = {0};
      c.method = methods[m];
      c.dtype = KVC_DTYPE_FP8_E4M3;
      c.query_dtype = methods[m] == KVC_SCORE_KNORM ? KVC_QUERY_DTYPE_AS_CACHE
                      : i                           ? KVC_QUERY_DTYPE_F32
                                                    : KVC_QUERY_DTYPE_BF16;
      c.k_scale = kFp8Scale;
      c.k_scales = index % 2 ? NULL : kFp8HeadScales;
      c.head_dim = dims[index % 4];
      c.num_kv_heads = 2;
      c.group = index % 3 ? 4 : 1;
      c.layout = (kvc_test_layout_t)(index % 2);
      c.table = (kvc_test_table_t)(index % 3);
      c.page_size = index % 2 ? 16 : 13;
      c.batch = 2;
      c.seq_lens = seq_lens;
      c.window = methods[m] == KVC_SCORE_H2O ? 200 : 24;
      c.pool_kernel = methods[m] == KVC_SCORE_SNAPKV ? 5 : 1;
      c.seed = 9300 + (uint64_t)index;
      check_case(&c);
    }
}

/* FP8 NaN (S.1111.111; e4m3 has no inf) in a key, and a NaN query element: the rule, against this
 * file's oracle (which decodes fp8 by its definition and applies the scale itself). */
static void plant_fp8_nan(kvc_test_cache_t *cache, void *queries, int32_t Hq) {
  const int32_t D = cache->desc.head_dim;
  ((uint8_t *)kvc_test_k_ptr(cache, 1, 11, 0))[7] = 0x7f;
  if (g_rows0 <= 2) return; /* TOVA: one row per sequence, averaged over every q head: sequence 0 stays finite */
  ((uint8_t *)kvc_test_k_ptr(cache, 0, 30, 1))[0] = 0xff;
  ((uint16_t *)queries)[((int64_t)2 * Hq + 1) * D + 5] = 0xffffu; /* NaN in f16 and bf16 */
}

Test(score_emu, fp8_nan_keys_poison_their_rows) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m) {
    score_case_t c;
    nonfinite_case(&c, (kvc_score_method_t)m, KVC_DTYPE_FP8_E4M3, m == KVC_SCORE_H2O ? 60 : 24, m == 0 ? 5 : 1,
                   KVC_POOL_MAX, m == 1 ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN, (uint64_t)(9400 + m));
    c.plant = plant_fp8_nan;
    use_fp8(&c, m == 1 ? KVC_QUERY_DTYPE_BF16 : KVC_QUERY_DTYPE_F16, m == 2);
    score_run_t r;
    score_both(&c, 0, &r);
    const int64_t nans = assert_matches_oracle(&c, &r, NULL);
    cr_assert_gt(nans, 0, "%s: no NaN where the rule puts some", method_name(c.method));
    assert_scores_match_or_nan(&c, &r);
    score_run_free(&r);
  }
}

/* KNORM on fp8: -k_scale * ||k|| like the CPU's; a NaN element gives NaN; keys of 448s with a
 * huge per-head scale saturate at -FLT_MAX on both backends (finite for every finite key). */
static const float kHugeScales[] = {1.0f, 3e37f};

static void plant_fp8_large(kvc_test_cache_t *cache, void *queries, int32_t Hq) {
  (void)queries, (void)Hq;
  for (int32_t x = 0; x < cache->desc.head_dim; ++x) {
    ((uint8_t *)kvc_test_k_ptr(cache, 1, 10, 1))[x] = 0x7e; /* 448 */
    ((uint8_t *)kvc_test_k_ptr(cache, 1, 12, 0))[x] = x % 2 ? 0xfe : 0x01; /* -448 and the least subnormal */
  }
  ((uint8_t *)kvc_test_k_ptr(cache, 1, 8, 1))[5] = 0x7f;
}

Test(score_emu, fp8_knorm_nan_and_saturation) {
  static const int32_t lens[] = {150, 90};
  score_case_t c = {KVC_SCORE_KNORM, KVC_DTYPE_FP8_E4M3, 128, 2, 1, 16, KVC_TEST_HND, KVC_TEST_CSR, 2, lens,
                    NULL, NULL, NULL, 1, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 9500};
  c.plant = plant_fp8_large;
  c.k_scales = kHugeScales;
  score_run_t r;
  score_both(&c, 0, &r);
  assert_scores_match_or_nan(&c, &r);
  const float top = r.cuda_scores[(int64_t)2 * 150 + 90 + 10]; /* sequence 1, head 1, token 10 */
  cr_assert_eq(top, -FLT_MAX, "fp8 keys of 448 times 3e37: CUDA %g, want -FLT_MAX", top);
  cr_assert(isnan(r.cuda_scores[(int64_t)2 * 150 + 90 + 8]), "a NaN fp8 element scores NaN");
  const double want = -sqrt(64.0 * 448.0 * 448.0 + 64.0 * 0x1p-18); /* sequence 1, head 0, token 12: by hand */
  cr_assert(fabs(r.cuda_scores[(int64_t)2 * 150 + 12] - want) <= 1e-6 * -want, "%.9g vs %.9g",
            (double)r.cuda_scores[(int64_t)2 * 150 + 12], want);
  score_run_free(&r);
}

/* kvc_compress (score, select, compact) on an fp8 cache, both backends on copies of one cache:
 * the kept rows agree up to ties of the scores, and each backend's pools are exactly what
 * compaction of its own kept rows gives (tests/support/compact_oracle.c). */
Test(score_emu, fp8_compress_matches_cpu) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_KNORM};
  for (int m = 0; m < 3; ++m) {
    score_case_t c;
    selection_case(&c, methods[m], (uint64_t)(9600 + m));
    use_fp8(&c, m == 1 ? KVC_QUERY_DTYPE_BF16 : KVC_QUERY_DTYPE_F16, m == 0);
    score_run_t r;
    score_both(&c, 0, &r);
    int32_t *keep[2];
    for (int side = 0; side < 2; ++side) {
      kvc_context_t ctx = side ? r.cuda : r.cpu;
      kvc_plan_t plan = side ? r.cuda_plan : r.cpu_plan;
      kvc_test_cache_t *cache = kvc_test_cache_clone(r.cache), *expected = kvc_test_cache_clone(r.cache);
      size_t bytes = 0;
      cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
      char *ws = kvc_test_workspace_new(bytes);
      kvc_status_t status = kvc_compress(ctx, plan, &cache->desc, r.queries, NULL, ws, bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "kvc_compress: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
      keep[side] = malloc(sizeof(int32_t) * (size_t)r.info.keep_elems);
      memcpy(keep[side], ws + r.info.keep_offset_bytes, sizeof(int32_t) * (size_t)r.info.keep_elems);
      kvc_test_compact_oracle(r.cache, expected, c.budgets, keep[side], NULL, NULL, 0, NULL);
      cr_assert_eq(kvc_test_first_difference(expected->k, cache->k, cache->pool_bytes), -1, "%s: K pool (%s)",
                   method_name(c.method), side ? "CUDA" : "CPU");
      cr_assert_eq(kvc_test_first_difference(expected->v, cache->v, cache->pool_bytes), -1, "%s: V pool (%s)",
                   method_name(c.method), side ? "CUDA" : "CPU");
      free(ws);
      kvc_test_cache_free(cache);
      kvc_test_cache_free(expected);
    }
    assert_same_selection(&c, &r, keep[0], keep[1], "fp8 kvc_compress");
    free(keep[0]);
    free(keep[1]);
    score_run_free(&r);
  }
}

/* The key scales travel in the plan's metadata: two fp8 plans that differ only in k_scales are
 * kvc_plan_compatible, and the first one (as a graph captured with it would) scores the second
 * event once the second plan is uploaded into the first one's buffer; before that upload it scores
 * its own scales, which differ (so a scale frozen into the launch would show). */
Test(score_emu, fp8_scales_travel_with_the_uploaded_plan) {
  static const float first_scales[] = {1.3f, 0.4f};
  score_case_t c;
  selection_case(&c, KVC_SCORE_H2O, 9700);
  use_fp8(&c, KVC_QUERY_DTYPE_F16, 1);
  score_run_t r;
  score_both(&c, 0, &r); /* the second event (kFp8HeadScales): CPU scores in r.cpu_scores */
  int32_t budgets[16];
  kvc_plan_desc_t desc = case_desc(&c, budgets);
  desc.device_memory = KVC_PLAN_MEMORY_CALLER;
  kvc_plan_t second = NULL, first = NULL;
  cr_assert_eq(kvc_plan_create(r.cuda, &desc, &second), KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
  desc.k_scales = first_scales;
  cr_assert_eq(kvc_plan_create(r.cuda, &desc, &first), KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
  int compatible = 0;
  cr_assert_eq(kvc_plan_compatible(first, second, &compatible), KVC_SUCCESS);
  cr_assert_eq(compatible, 1, "plans differing only in k_scales must be compatible");
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_device_bytes(first, &bytes), KVC_SUCCESS);
  void *buffer = kvc_test_workspace_new(bytes);
  cr_assert_eq(kvc_plan_upload(r.cuda, first, buffer, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
  run_score(r.cuda, first, r.cache, r.queries, NULL, r.cuda_scores, 0);
  int64_t differing = 0;
  for (int64_t i = 0; i < r.info.score_elems; ++i) differing += !close_enough(r.cuda_scores[i], r.cpu_scores[i]);
  cr_assert_gt(differing, 0, "the first event's scales give the second event's scores: the case shows nothing");
  cr_assert_eq(kvc_plan_upload(r.cuda, second, buffer, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
  run_score(r.cuda, first, r.cache, r.queries, NULL, r.cuda_scores, 0); /* the "replay" */
  assert_scores_match(&c, &r);
  kvc_plan_destroy(first);
  kvc_plan_destroy(second);
  free(buffer);
  score_run_free(&r);
}
