/*
 * test_score_emu.c - kvc_score on the CUDA backend (its kernels run by the SIMT emulator) against
 * the CPU backend (double precision, kernels/score_cpu.c) on the same caches and queries, through
 * the public API: every method x dtype x head_dim (64, 128, 256 and a generic 40) with the layout,
 * page table kind and GQA group (1, 4) rotating; span-local domains, pooling at domain borders,
 * window > n, accumulate, and the selection made from either backend's scores. The second half
 * (gemm_*) forces the large-observation-set path (tiled GEMM logits, kernels/score_gemm.h).
 *
 * Tolerance: |cuda - cpu| <= kRelTol * |cpu| + kAbsTol, infinities equal. The CUDA kernels
 * accumulate in fp32 what the CPU does in double. An attention probability exp(s - lse) carries
 * the absolute error of its logit as a relative error: the fp32 dot product of head_dim <= 256
 * terms of |q_d k_d| scale ~ 10 in total on this data errs by ~sqrt(D) * 2^-24 * 10 ~ 1e-5 (bound
 * D * 2^-24 * 10 ~ 1.5e-4 only if every rounding aligned), lse by ~(keys per thread + log2 n)
 * * 2^-24 * |lse| ~ 1e-6, and the sums over queries, pooling and the group mean add positive terms
 * (relative error ~ terms * 2^-24 <= 1e-5 here). So 1e-4 relative is ~10x the typical error;
 * the absolute 1e-9 only covers probabilities that underflow (e^-20 of a 1/n share). KNORM:
 * sqrt of a sum of D squares, relative ~ D * 2^-24 < 2e-5. STREAMING is exact.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
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
} score_case_t;

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
                                                            c->dtype, c->seed + 1)
                                     : NULL;
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

/* The engine's normalisers (computed by the test in double) in place of the normaliser pass, for
 * the fused kernels and, with a lowered threshold, the GEMM path: the same scores as the CPU
 * computing its own, within the usual tolerance. */
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

/* kvc_plan_workspace_size's comment in kvcompress.h states the CUDA score workspace exactly. */
Test(score_emu, workspace_matches_the_documented_formula) {
  static const int32_t seq_lens[] = {100, 7000, 300};
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA, KVC_SCORE_KNORM,
                                               KVC_SCORE_STREAMING};
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  for (int m = 0; m < 5; ++m) {
    kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
    desc.num_kv_heads = 2;
    desc.num_q_heads = 6;
    desc.head_dim = 64;
    desc.batch = 3;
    desc.seq_lens = desc.budgets = seq_lens;
    desc.method = methods[m];
    desc.window = 50;
    kvc_plan_t plan = NULL;
    cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
    kvc_plan_info_t info;
    kvc_plan_get_info(plan, &info);
    size_t n_max = 7000, per_chunk = (n_max + 63) / 64 > 256 ? (n_max + 63) / 64 : 256;
    size_t chunks = (n_max + per_chunk - 1) / per_chunk, query_heads = (size_t)info.obs_total * 6, expect = 0;
    if (m <= KVC_SCORE_TOVA)
      expect = align256(query_heads * chunks * 8) + align256(query_heads * 4) + 6 * (size_t)info.total_tokens * 4;
    size_t bytes = 0;
    cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes), KVC_SUCCESS);
    cr_assert_eq(bytes, expect, "%s: workspace %zu, documented %zu", method_name(methods[m]), bytes, expect);
    kvc_plan_destroy(plan);
  }
  kvc_context_destroy(cuda);
}

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

/* ---- the GEMM path (kernels/score_gemm.h): domains with many observation queries ---------------
 *
 * Domains with more than the plan's GEMM threshold (128 queries by default) get their logits from
 * a GEMM on tiles of keys gathered from the pages (cuBLAS on a GPU; under the emulator the host
 * GEMM of tests/simt/subst/score_gemm_emu.cpp), and our kernels reduce them. These tests lower the
 * threshold and the tile shape through the environment, which kvc_plan_create reads (each
 * Criterion test runs in its own process), so that tiles and query blocks split the domains at
 * borders that do not divide n: causality inside diagonal tiles, carried (max, sum) across tiles,
 * sums across query blocks.
 *
 * Tolerance: the same 1e-4 relative as above. Both backends read the same f16/bf16 values and
 * widen them exactly, so the inputs carry no rounding of their own; a tensor core's product of two
 * f16 (11-bit significands) or bf16 (8-bit) values is exact in fp32, and its sums are fp32 (Hopper
 * aligns the addends and may truncate rather than round: ~D * 2^-23 relative to sum |q_d k_d| in
 * the worst case, ~sqrt(D) * 2^-23 typically), the same size as the fused kernels' fp32 CUDA-core
 * dot products that the argument at the top of this file bounds. f32 inputs use a plain fp32 GEMM
 * (CUBLAS_COMPUTE_32F, never TF32, whose 10-bit inputs would miss 1e-4 by an order of magnitude,
 * which tests/gpu checks). */

static void force_gemm(int threshold, int keys, int rows) {
  char text[32];
  snprintf(text, sizeof text, "%d", threshold);
  setenv("KVC_SCORE_GEMM_THRESHOLD", text, 1);
  if (keys > 0) {
    snprintf(text, sizeof text, "%d", keys);
    setenv("KVC_SCORE_GEMM_KEYS", text, 1);
  }
  if (rows > 0) {
    snprintf(text, sizeof text, "%d", rows);
    setenv("KVC_SCORE_GEMM_ROWS", text, 1);
  }
}

/* Scores `c` on both backends and checks that the CUDA plan took the GEMM path (its workspace
 * holds cuBLAS's 4 MiB) and matches. */
static void check_gemm_case(const score_case_t *c) {
  score_run_t r;
  score_both(c, 0, &r);
  size_t bytes = 0;
  kvc_plan_workspace_size(r.cuda_plan, KVC_OP_SCORE, &bytes);
  cr_assert_geq(bytes, (size_t)4 << 20, "%s: the CUDA plan did not take the GEMM path (workspace %zu)",
                method_name(c->method), bytes);
  assert_scores_match(c, &r);
  score_run_free(&r);
}

static const int32_t kGemmLens[] = {301, 517};

/* H2O over the whole prompt (window >= n): every dtype, group 1 and 4, generic and specialised
 * head_dim, every layout and table kind; 96-key tiles and 128-row GEMMs (32 queries x 4 heads). */
Test(score_emu, gemm_h2o_whole_prompt_every_dtype) {
  force_gemm(0, 96, 128);
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};
  static const int32_t dims[] = {64, 128, 40};
  int index = 0;
  for (int di = 0; di < 3; ++di)
    for (int gi = 0; gi < 2; ++gi, ++index) {
      score_case_t c = {KVC_SCORE_H2O, dtypes[di], dims[(di + gi) % 3], 2, gi ? 4 : 1, 16,
                        (kvc_test_layout_t)(index % 2), (kvc_test_table_t)(index % 3), 2, kGemmLens, NULL, NULL,
                        NULL, 1000, 1, 0, KVC_POOL_AVG, index % 3 == 2 ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN,
                        (uint64_t)(300 + index)};
      check_gemm_case(&c);
    }
}

/* The engine's normalisers on the GEMM path: its row-statistics pass is skipped. */
Test(score_emu, gemm_engine_lse) {
  force_gemm(0, 96, 128);
  score_case_t c = {KVC_SCORE_H2O, KVC_DTYPE_BF16, 64, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, kGemmLens, NULL,
                    NULL, NULL, 1000, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 320, 1};
  check_gemm_case(&c);
}

/* The default tile shape: one tile of min(1024, n) keys and every query in one GEMM. */
Test(score_emu, gemm_h2o_default_tiles) {
  force_gemm(0, 0, 0);
  score_case_t c = {KVC_SCORE_H2O, KVC_DTYPE_BF16, 128, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_CSR, 2, kGemmLens, NULL,
                    NULL, NULL, 1000, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 320};
  check_gemm_case(&c);
}

/* Tiles of one key and GEMMs of one row: every border is a tile border. */
Test(score_emu, gemm_h2o_degenerate_tiles) {
  force_gemm(0, 1, 1);
  static const int32_t lens[] = {37, 20};
  score_case_t c = {KVC_SCORE_H2O, KVC_DTYPE_F16, 64, 1, 2, 8, KVC_TEST_HND, KVC_TEST_DENSE, 2, lens, NULL, NULL,
                    NULL, 64, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 321};
  check_gemm_case(&c);
}

/* SnapKV with a window over the default threshold (200 queries > 128) takes the path by default;
 * pooled, both pool kinds and reductions. */
Test(score_emu, gemm_snapkv_large_window) {
  force_gemm(128, 80, 48);
  for (int i = 0; i < 2; ++i) {
    score_case_t c = {KVC_SCORE_SNAPKV, i ? KVC_DTYPE_F16 : KVC_DTYPE_BF16, i ? 64 : 128, 2, i ? 4 : 2, 16,
                      (kvc_test_layout_t)i, i ? KVC_TEST_CONTIG : KVC_TEST_DENSE, 2, kGemmLens, NULL, NULL, NULL,
                      200, 5, 0, i ? KVC_POOL_MAX : KVC_POOL_AVG, i ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN,
                      (uint64_t)(330 + i)};
    check_gemm_case(&c);
  }
}

/* TOVA (one query per domain) through the path when forced: the degenerate one-row GEMM. */
Test(score_emu, gemm_tova_forced) {
  force_gemm(0, 128, 0);
  score_case_t c = {KVC_SCORE_TOVA, KVC_DTYPE_F32, 64, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, kGemmLens, NULL,
                    NULL, NULL, 1, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 340};
  check_gemm_case(&c);
}

/* span_local: every FAIR span is its own domain (a whole-span window for H2O); with threshold 0
 * all go through the GEMM path; with 120, the 141- and 150-query spans do and the 100- and
 * 49-query spans take the fused kernels in the same call (the normaliser pass then skips the
 * GEMM rows). Keys in the PROTECT gap get +inf. */
Test(score_emu, gemm_span_local_domains) {
  static const int thresholds[] = {0, 120};
  for (int i = 0; i < 2; ++i) {
    force_gemm(thresholds[i], 40, 24);
    score_case_t c = {KVC_SCORE_H2O, i ? KVC_DTYPE_F16 : KVC_DTYPE_BF16, 64, 2, 4, 16, KVC_TEST_NHD,
                      KVC_TEST_DENSE, 2, kSpanLens, NULL, kSpanIndptr, kSpans, 1000, 1, 1, KVC_POOL_AVG,
                      KVC_REDUCE_MEAN, (uint64_t)(350 + i)};
    check_gemm_case(&c);
    score_case_t s = {KVC_SCORE_SNAPKV, KVC_DTYPE_F32, 72, 2, 4, 16, KVC_TEST_HND, KVC_TEST_CSR, 2, kSpanLens, NULL,
                      kSpanIndptr, kSpans, 250, 5, 1, KVC_POOL_AVG, KVC_REDUCE_MAX, (uint64_t)(360 + i)};
    check_gemm_case(&s);
  }
}

/* A batch whose short sequence (90 queries) stays on the fused kernels at the default threshold
 * while the long one (517 queries) takes the GEMM path: both in one call. */
Test(score_emu, gemm_and_fused_domains_in_one_batch) {
  force_gemm(128, 200, 0);
  static const int32_t lens[] = {90, 517};
  score_case_t c = {KVC_SCORE_H2O, KVC_DTYPE_F16, 128, 2, 4, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, lens, NULL, NULL,
                    NULL, 1000, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 370};
  check_gemm_case(&c);
}

Test(score_emu, gemm_accumulate_adds_to_the_scores) {
  force_gemm(0, 64, 100);
  score_case_t c = {KVC_SCORE_H2O, KVC_DTYPE_BF16, 64, 2, 2, 16, KVC_TEST_HND, KVC_TEST_DENSE, 2, kGemmLens, NULL,
                    NULL, NULL, 1000, 1, 0, KVC_POOL_AVG, KVC_REDUCE_MEAN, 380};
  score_run_t r;
  score_both(&c, 1, &r);
  assert_scores_match(&c, &r);
  score_run_free(&r);
}

/* The selection made from GEMM-path scores equals the CPU's up to ties (fair eviction on spans). */
Test(score_emu, gemm_selection_from_cuda_scores_matches) {
  force_gemm(0, 48, 32);
  score_case_t c;
  selection_case(&c, KVC_SCORE_H2O, 390);
  c.window = 1000;
  score_run_t r;
  score_both(&c, 0, &r);
  int64_t elems = r.info.keep_elems;
  int32_t *keep_cpu = malloc(sizeof(int32_t) * (size_t)elems), *keep_cuda = malloc(sizeof(int32_t) * (size_t)elems);
  select_into(r.cpu, r.cpu_plan, r.cpu_scores, keep_cpu);
  select_into(r.cpu, r.cpu_plan, r.cuda_scores, keep_cuda);
  assert_same_selection(&c, &r, keep_cpu, keep_cuda, "H2O through the GEMM path");
  free(keep_cpu);
  free(keep_cuda);
  score_run_free(&r);
}

/* The bracketed GEMM terms of kvc_plan_workspace_size's formula, at the default threshold and
 * tile shape: all domains on the GEMM path (C = 1), and a mix (C as for the fused kernels). */
Test(score_emu, gemm_workspace_matches_the_documented_formula) {
  static const int32_t seq_lens[] = {100, 7000, 300};
  static const int32_t windows[] = {5000, 200, 100};
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  for (int w = 0; w < 3; ++w)
    for (int dtype = 0; dtype < 3; ++dtype) {
      kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
      desc.num_kv_heads = 2;
      desc.num_q_heads = 6;
      desc.head_dim = 64;
      desc.dtype = (kvc_dtype_t)dtype;
      desc.batch = 3;
      desc.seq_lens = desc.budgets = seq_lens;
      desc.method = KVC_SCORE_H2O;
      desc.window = windows[w];
      kvc_plan_t plan = NULL;
      cr_assert_eq(kvc_plan_create(cuda, &desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
      kvc_plan_info_t info;
      kvc_plan_get_info(plan, &info);
      /* queries per domain: min(window, n) for 100, 7000, 300 */
      size_t q[3], q_max = 0;
      int any_gemm = 0, all_gemm = 1;
      for (int b = 0; b < 3; ++b) {
        q[b] = (size_t)(windows[w] < seq_lens[b] ? windows[w] : seq_lens[b]);
        q_max = q[b] > q_max ? q[b] : q_max;
        any_gemm |= q[b] > 128;
        all_gemm &= q[b] > 128;
      }
      size_t n_max = 7000, per_chunk = (n_max + 63) / 64 > 256 ? (n_max + 63) / 64 : 256;
      size_t chunks = all_gemm ? 1 : (n_max + per_chunk - 1) / per_chunk, query_heads = (size_t)info.obs_total * 6;
      size_t elem = dtype == KVC_DTYPE_F32 ? 4 : 2, group = 3, tile_keys = 1024;
      size_t tile_queries = 4096 / group < q_max ? 4096 / group : q_max;
      size_t expect = align256(query_heads * chunks * 8) + align256(query_heads * 4);
      if (any_gemm)
        expect += align256((size_t)4 << 20) + align256(tile_keys * 64 * elem) +
                  align256(group * tile_queries * tile_keys * 4);
      expect += 6 * (size_t)info.total_tokens * 4;
      size_t bytes = 0;
      cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes), KVC_SUCCESS);
      cr_assert_eq(bytes, expect, "window %d dtype %d: workspace %zu, documented %zu", windows[w], dtype, bytes,
                   expect);
      kvc_plan_destroy(plan);
    }
  kvc_context_destroy(cuda);
}
