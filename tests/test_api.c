/*
 * test_api.c - the public API's contract outside the ops: status names, contexts, the plan's
 * read-outs (observation positions, quotas, new lengths) checked against hand-worked values, and
 * the bad-input table: every invalid argument returns the right status and a kvc_last_error
 * message naming the argument and the value.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

/* ---- a valid baseline every bad-input case perturbs ------------------------------------------ */

typedef struct {
  int32_t seq_lens[2], budgets[2], span_indptr[3];
  kvc_span_t spans[4];
  kvc_plan_desc_t desc;
} baseline_t;

static void baseline_init(baseline_t *f) {
  static const kvc_plan_desc_t init = KVC_PLAN_DESC_INIT;
  f->seq_lens[0] = 40, f->seq_lens[1] = 25;
  f->budgets[0] = 20, f->budgets[1] = 30;
  f->span_indptr[0] = 0, f->span_indptr[1] = 3, f->span_indptr[2] = 4;
  f->spans[0] = (kvc_span_t){0, 20, KVC_SPAN_FAIR, 1.0f};
  f->spans[1] = (kvc_span_t){5, 8, KVC_SPAN_PROTECT, 1.0f};
  f->spans[2] = (kvc_span_t){20, 40, KVC_SPAN_FAIR, 2.0f};
  f->spans[3] = (kvc_span_t){0, 25, KVC_SPAN_FAIR, 1.0f};
  f->desc = init;
  f->desc.num_q_heads = 8;
  f->desc.num_kv_heads = 2;
  f->desc.head_dim = 16;
  f->desc.dtype = KVC_DTYPE_F32;
  f->desc.batch = 2;
  f->desc.seq_lens = f->seq_lens;
  f->desc.budgets = f->budgets;
  f->desc.span_indptr = f->span_indptr;
  f->desc.spans = f->spans;
  f->desc.window = 8;
  f->desc.fairness = 0.5f;
}

static kvc_context_t cpu_context(void) {
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  return ctx;
}

/* ---- bad plan descriptions -------------------------------------------------------------------- */

/* Strings are stored inline: Criterion re-executes the binary per test, so parameters must not
 * hold pointers. */
typedef struct {
  char name[48];
  int which; /* selects the perturbation in perturb_plan() */
  kvc_status_t expect;
  char needle[96]; /* must appear in kvc_last_error */
} bad_case_t;

static void perturb_plan(baseline_t *f, int which) {
  kvc_plan_desc_t *d = &f->desc;
  switch (which) {
    case 0: d->struct_size = sizeof *d - 8; break;
    case 1: d->num_kv_heads = 0; break;
    case 2: d->num_q_heads = 7; break;
    case 3: d->num_q_heads = 0; break;
    case 4: d->head_dim = 0; break;
    case 5: d->head_dim = 300; break;
    case 6: d->dtype = (kvc_dtype_t)9; break;
    case 7: d->method = (kvc_score_method_t)7; break;
    case 8: d->dtype = KVC_DTYPE_FP8_E4M3; break;
    case 9: d->batch = 0; break;
    case 10: d->seq_lens = NULL; break;
    case 11: d->budgets = NULL; break;
    case 12: f->seq_lens[1] = 0; break;
    case 13: f->seq_lens[0] = -5; break;
    case 14: f->budgets[1] = 0; break;
    case 15: d->window = 0; break;
    case 16: d->pool_kernel = 4; break;
    case 17: d->pool_kernel = 0; break;
    case 18: d->pool = (kvc_pool_t)5; break;
    case 19: d->group_reduce = (kvc_reduce_t)3; break;
    case 20: d->scale = NAN; break;
    case 21: d->scale = -1.0f; break;
    case 22: d->span_local = 2; break;
    case 23: d->sink_tokens = -1; break;
    case 24: d->recent_tokens = -3; break;
    case 25: d->fairness = 1.5f; break;
    case 26: d->fairness = NAN; break;
    case 27: f->spans[2].end = 41; break;
    case 28: f->spans[1].start = 8; break;       /* empty span [8, 8) */
    case 29: f->spans[0].start = -1; break;
    case 30: f->spans[1].start = 0, f->spans[0].start = 1; break; /* unsorted */
    case 31: f->spans[2].start = 19; break;                       /* FAIR spans overlap */
    case 32: f->spans[2] = (kvc_span_t){6, 9, KVC_SPAN_PROTECT, 1.0f}; break; /* PROTECT spans overlap */
    case 33: f->spans[0].weight = 0.0f; break;
    case 34: f->spans[2].weight = NAN; break;
    case 35: f->spans[3].weight = -1.0f; break;
    case 36: f->spans[1].kind = 5; break;
    case 37: f->span_indptr[0] = 1; break;
    case 38: f->span_indptr[1] = 5; break; /* sequence 1 would have 4 - 5 spans */
    case 39: d->spans = NULL; break;
    case 40: d->sink_tokens = 21; break;   /* protects more than sequence 0 keeps */
    case 41: d->span_local = 1, f->span_indptr[1] = 2, f->span_indptr[2] = 3, f->spans[2] = f->spans[3]; break;
    case 42: d->span_local = 1, d->window = 1; break;
    case 43: d->method = KVC_SCORE_TOVA, f->budgets[0] = 3, d->recent_tokens = 3; break;
    case 44: d->query_dtype = (kvc_query_dtype_t)7; break;
    case 45: d->query_dtype = KVC_QUERY_DTYPE_BF16; break; /* f32 cache: queries of another dtype */
    case 46: d->dtype = KVC_DTYPE_FP8_E4M3, d->query_dtype = KVC_QUERY_DTYPE_F16, d->k_scale = 0.0f; break;
    case 47: d->dtype = KVC_DTYPE_FP8_E4M3, d->query_dtype = KVC_QUERY_DTYPE_F16, d->k_scale = -2.0f; break;
    case 48: d->dtype = KVC_DTYPE_FP8_E4M3, d->query_dtype = KVC_QUERY_DTYPE_F16, d->k_scale = INFINITY; break;
    case 49: {
      static const float scales[2] = {0.5f, NAN};
      d->dtype = KVC_DTYPE_FP8_E4M3, d->query_dtype = KVC_QUERY_DTYPE_BF16, d->k_scales = scales;
      break;
    }
    case 50: d->k_scale = 2.0f; break; /* f32 cache */
    case 51: {
      static const float scales[2] = {1.0f, 1.0f};
      d->k_scales = scales; /* f32 cache */
      break;
    }
    case 52: d->dtype = KVC_DTYPE_FP8_E4M3, d->method = KVC_SCORE_H2O; break; /* no query_dtype */
  }
}

static bad_case_t bad_plan_cases[] = {
    {"struct_size", 0, KVC_ERROR_INVALID_VALUE, "struct_size is"},
    {"num_kv_heads 0", 1, KVC_ERROR_INVALID_VALUE, "num_kv_heads is 0"},
    {"num_q_heads not a multiple", 2, KVC_ERROR_INVALID_VALUE, "num_q_heads is 7"},
    {"num_q_heads 0", 3, KVC_ERROR_INVALID_VALUE, "num_q_heads is 0"},
    {"head_dim 0", 4, KVC_ERROR_INVALID_VALUE, "head_dim is 0"},
    {"head_dim 300", 5, KVC_ERROR_NOT_SUPPORTED, "head_dim 300"},
    {"dtype 9", 6, KVC_ERROR_INVALID_VALUE, "dtype is 9"},
    {"method 7", 7, KVC_ERROR_INVALID_VALUE, "method is 7"},
    {"fp8 scored", 8, KVC_ERROR_NOT_SUPPORTED, "FP8"},
    {"batch 0", 9, KVC_ERROR_INVALID_VALUE, "batch is 0"},
    {"seq_lens NULL", 10, KVC_ERROR_INVALID_VALUE, "seq_lens is NULL"},
    {"budgets NULL", 11, KVC_ERROR_INVALID_VALUE, "budgets is NULL"},
    {"seq_len 0", 12, KVC_ERROR_INVALID_VALUE, "seq_lens[1] is 0"},
    {"seq_len negative", 13, KVC_ERROR_INVALID_VALUE, "seq_lens[0] is -5"},
    {"budget 0", 14, KVC_ERROR_INVALID_VALUE, "budgets[1] is 0"},
    {"window 0", 15, KVC_ERROR_INVALID_VALUE, "window is 0"},
    {"pool_kernel even", 16, KVC_ERROR_INVALID_VALUE, "pool_kernel is 4"},
    {"pool_kernel 0", 17, KVC_ERROR_INVALID_VALUE, "pool_kernel is 0"},
    {"pool 5", 18, KVC_ERROR_INVALID_VALUE, "pool is 5"},
    {"group_reduce 3", 19, KVC_ERROR_INVALID_VALUE, "group_reduce is 3"},
    {"scale NaN", 20, KVC_ERROR_INVALID_VALUE, "scale is nan"},
    {"scale negative", 21, KVC_ERROR_INVALID_VALUE, "scale is -1"},
    {"span_local 2", 22, KVC_ERROR_INVALID_VALUE, "span_local is 2"},
    {"sink_tokens negative", 23, KVC_ERROR_INVALID_VALUE, "sink_tokens is -1"},
    {"recent_tokens negative", 24, KVC_ERROR_INVALID_VALUE, "recent_tokens is -3"},
    {"fairness 1.5", 25, KVC_ERROR_INVALID_VALUE, "fairness is 1.5"},
    {"fairness NaN", 26, KVC_ERROR_INVALID_VALUE, "fairness is nan"},
    {"span past the end", 27, KVC_ERROR_INVALID_VALUE, "spans[2] (sequence 0): range [20, 41)"},
    {"empty span", 28, KVC_ERROR_INVALID_VALUE, "spans[1] (sequence 0): range [8, 8)"},
    {"span start negative", 29, KVC_ERROR_INVALID_VALUE, "spans[0] (sequence 0): range [-1, 20)"},
    {"spans unsorted", 30, KVC_ERROR_INVALID_VALUE, "must be sorted"},
    {"FAIR spans overlap", 31, KVC_ERROR_INVALID_VALUE, "overlaps an earlier FAIR span"},
    {"PROTECT spans overlap", 32, KVC_ERROR_INVALID_VALUE, "overlaps an earlier PROTECT span"},
    {"weight 0", 33, KVC_ERROR_INVALID_VALUE, "weight is 0"},
    {"weight NaN", 34, KVC_ERROR_INVALID_VALUE, "weight is nan"},
    {"weight negative", 35, KVC_ERROR_INVALID_VALUE, "spans[3] (sequence 1): weight is -1"},
    {"span kind 5", 36, KVC_ERROR_INVALID_VALUE, "kind is 5"},
    {"span_indptr[0] not 0", 37, KVC_ERROR_INVALID_VALUE, "span_indptr[0] is 1"},
    {"span_indptr decreasing", 38, KVC_ERROR_INVALID_VALUE, "span_indptr[2] = 4 is below span_indptr[1] = 5"},
    {"spans NULL", 39, KVC_ERROR_INVALID_VALUE, "spans is NULL"},
    {"protected exceed budget", 40, KVC_ERROR_BUDGET, "sequence 0 protects 29 tokens"},
    {"span_local gap unprotected", 41, KVC_ERROR_INVALID_VALUE, "tokens [20, 40) of sequence 0 are in no FAIR span"},
    {"span_local window below spans", 42, KVC_ERROR_INVALID_VALUE, "window is 1 but sequence 0 has 2 FAIR spans"},
    {"TOVA last token over budget", 43, KVC_ERROR_BUDGET, "sequence 0 protects 6 tokens"},
    {"query_dtype 7", 44, KVC_ERROR_INVALID_VALUE, "query_dtype is 7"},
    {"bf16 queries on f32 keys", 45, KVC_ERROR_NOT_SUPPORTED, "query_dtype KVC_DTYPE_BF16 with dtype KVC_DTYPE_F32"},
    {"fp8 k_scale 0", 46, KVC_ERROR_INVALID_VALUE, "k_scale is 0, must be finite and > 0"},
    {"fp8 k_scale negative", 47, KVC_ERROR_INVALID_VALUE, "k_scale is -2"},
    {"fp8 k_scale inf", 48, KVC_ERROR_INVALID_VALUE, "k_scale is inf"},
    {"fp8 k_scales NaN", 49, KVC_ERROR_INVALID_VALUE, "k_scales[1] is nan"},
    {"k_scale on f32", 50, KVC_ERROR_INVALID_VALUE, "k_scale is 2 but dtype is KVC_DTYPE_F32"},
    {"k_scales on f32", 51, KVC_ERROR_INVALID_VALUE, "k_scales is set but dtype is KVC_DTYPE_F32"},
    {"fp8 H2O without query_dtype", 52, KVC_ERROR_NOT_SUPPORTED, "no fp8 queries"},
};

ParameterizedTestParameters(bad_input, plan) {
  return cr_make_param_array(bad_case_t, bad_plan_cases, sizeof bad_plan_cases / sizeof bad_plan_cases[0]);
}

ParameterizedTest(bad_case_t *c, bad_input, plan) {
  baseline_t f;
  baseline_init(&f);
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "baseline: %s", kvc_last_error(ctx));
  kvc_plan_destroy(plan);
  perturb_plan(&f, c->which);
  kvc_status_t status = kvc_plan_create(ctx, &f.desc, &plan);
  cr_expect_eq(status, c->expect, "%s: got %s (%s)", c->name, kvc_status_name(status), kvc_last_error(ctx));
  cr_expect_null(plan, "%s: a failed create must leave *out NULL", c->name);
  cr_expect(strstr(kvc_last_error(ctx), c->needle) != NULL, "%s: detail '%s' lacks '%s'", c->name,
            kvc_last_error(ctx), c->needle);
  kvc_context_destroy(ctx);
}

Test(bad_input, plan_null_arguments) {
  baseline_t f;
  baseline_init(&f);
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan = (kvc_plan_t)&f; /* must be reset to NULL */
  cr_expect_eq(kvc_plan_create(ctx, NULL, &plan), KVC_ERROR_INVALID_VALUE);
  cr_expect_null(plan);
  cr_expect(strstr(kvc_last_error(ctx), "desc is NULL"));
  cr_expect_eq(kvc_plan_create(ctx, &f.desc, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(ctx), "out is NULL"));
  cr_expect_eq(kvc_plan_create(NULL, &f.desc, &plan), KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(NULL), "NULL"));
  kvc_context_destroy(ctx);
}

/* ---- bad execute-call arguments ------------------------------------------------------------- */

typedef struct {
  baseline_t base;
  kvc_context_t ctx;
  kvc_plan_t plan;
  kvc_test_cache_t *cache;
  kvc_paged_kv_t desc;
  void *queries, *workspace;
  size_t workspace_bytes;
  float *scores;
  int32_t *keep;
} exec_fixture_t;

static void exec_fixture_init(exec_fixture_t *x, kvc_op_t op) {
  baseline_init(&x->base);
  x->ctx = cpu_context();
  cr_assert_eq(kvc_plan_create(x->ctx, &x->base.desc, &x->plan), KVC_SUCCESS, "%s", kvc_last_error(x->ctx));
  x->cache = kvc_test_cache_new(2, x->base.seq_lens, 2, 16, KVC_DTYPE_F32, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, 7);
  x->desc = x->cache->desc;
  kvc_plan_info_t info;
  kvc_plan_get_info(x->plan, &info);
  x->queries = kvc_test_queries_new(info.obs_total, 8, 16, KVC_DTYPE_F32, 3);
  kvc_plan_workspace_size(x->plan, op, &x->workspace_bytes);
  x->workspace = kvc_test_workspace_new(x->workspace_bytes + 256);
  x->scores = (float *)calloc((size_t)info.score_elems, sizeof(float));
  x->keep = (int32_t *)calloc((size_t)info.keep_elems, sizeof(int32_t));
}

static void exec_fixture_fini(exec_fixture_t *x) {
  free(x->queries), free(x->workspace), free(x->scores), free(x->keep);
  kvc_test_cache_free(x->cache);
  kvc_plan_destroy(x->plan);
  kvc_context_destroy(x->ctx);
}

typedef struct {
  char name[48];
  int which;
  kvc_op_t op;
  kvc_status_t expect;
  char needle[96];
} bad_exec_t;

static kvc_status_t run_exec_case(exec_fixture_t *x, const bad_exec_t *c) {
  const kvc_paged_kv_t *cache = &x->desc;
  const void *queries = x->queries;
  float *scores = x->scores;
  int32_t *keep = x->keep;
  void *ws = x->workspace;
  size_t ws_bytes = x->workspace_bytes;
  int32_t num_extras = 0;
  kvc_plan_t plan = x->plan;
  int32_t csr_indptr[3] = {0, 3, 4};
  switch (c->which) {
    case 0: cache = NULL; break;
    case 1: x->desc.dtype = KVC_DTYPE_BF16; break;
    case 2: x->desc.num_kv_heads = 4; break;
    case 3: x->desc.head_dim = 32; break;
    case 4: x->desc.page_size = 0; break;
    case 5: x->desc.num_pages = 0; break;
    case 6: x->desc.stride_token = 0; break;
    case 7: x->cache->table[1] = 999; break; /* sequence 0's second page */
    case 8: x->cache->table[x->desc.max_pages] = x->cache->table[0]; break; /* shared by both sequences */
    case 9: x->desc.page_table = x->cache->table, x->desc.page_indptr = csr_indptr; break; /* sequence 1 needs 2 */
    case 10: ws_bytes = x->workspace_bytes - 1; break;
    case 11: ws = NULL; break;
    case 12: queries = NULL; break;
    case 13: scores = NULL; break;
    case 14: keep = NULL; break;
    case 15: plan = NULL; break;
    case 16: num_extras = -1; break;
    case 17: x->desc.page_table = NULL; break; /* one page per sequence, but pages hold 16 of 40 tokens */
    case 18: x->desc.max_pages = 2; break;    /* sequence 0 needs 3 pages of 16 */
    case 19: x->desc.k = NULL; break;
    case 20: ws = (char *)x->workspace + 8; break;
    case 21: x->desc.stride_page = x->desc.stride_token * 4; break; /* pages of 16 slots, 4 slots apart */
    case 22: x->desc.v = x->desc.k; break;
  }
  switch (c->op) {
    case KVC_OP_SCORE: return kvc_score(x->ctx, plan, cache, queries, NULL, scores, 0, ws, ws_bytes, NULL);
    case KVC_OP_SELECT: return kvc_select(x->ctx, plan, scores, keep, ws, ws_bytes, NULL);
    case KVC_OP_COMPACT: return kvc_compact(x->ctx, plan, cache, keep, NULL, num_extras, ws, ws_bytes, NULL);
    default: return kvc_compress(x->ctx, plan, cache, queries, NULL, ws, ws_bytes, NULL);
  }
}

static bad_exec_t bad_exec_cases[] = {
    {"cache NULL", 0, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "kvc_score: cache is NULL"},
    {"cache dtype", 1, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "cache->dtype is 2"},
    {"cache heads", 2, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "cache->num_kv_heads is 4"},
    {"cache head_dim", 3, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "cache->head_dim is 32"},
    {"page_size 0", 4, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "cache->page_size is 0"},
    {"num_pages 0", 5, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "cache->num_pages is 0"},
    {"stride 0", 6, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "token 0"},
    {"page id out of range", 7, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "page id 999 (sequence 0, page 1"},
    {"page shared by two sequences", 8, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "used twice"},
    {"CSR too few pages", 9, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "gives sequence 1 1 pages"},
    {"workspace too small", 10, KVC_OP_COMPRESS, KVC_ERROR_WORKSPACE_TOO_SMALL, "workspace_bytes is"},
    {"workspace NULL", 11, KVC_OP_COMPRESS, KVC_ERROR_INVALID_VALUE, "workspace is NULL"},
    {"queries NULL", 12, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "queries is NULL"},
    {"scores NULL", 13, KVC_OP_SELECT, KVC_ERROR_INVALID_VALUE, "scores is NULL"},
    {"keep NULL", 14, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "keep is NULL"},
    {"plan NULL", 15, KVC_OP_SELECT, KVC_ERROR_INVALID_VALUE, "plan is NULL"},
    {"num_extras negative", 16, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "num_extras is -1"},
    {"one page per sequence too short", 17, KVC_OP_SCORE, KVC_ERROR_INVALID_VALUE, "page_size 16 is below"},
    {"max_pages too small", 18, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "cache->max_pages is 2"},
    {"k pool NULL", 19, KVC_OP_COMPRESS, KVC_ERROR_INVALID_VALUE, "cache->k is NULL"},
    {"workspace misaligned", 20, KVC_OP_COMPRESS, KVC_ERROR_INVALID_VALUE, "aligned"},
    {"pages overlap", 21, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "overlap: a stride of 128 is below the 512"},
    {"k and v one pool", 22, KVC_OP_COMPACT, KVC_ERROR_INVALID_VALUE, "are the same pool"},
};

ParameterizedTestParameters(bad_input, execute) {
  return cr_make_param_array(bad_exec_t, bad_exec_cases, sizeof bad_exec_cases / sizeof bad_exec_cases[0]);
}

ParameterizedTest(bad_exec_t *c, bad_input, execute) {
  exec_fixture_t x;
  exec_fixture_init(&x, c->op);
  unsigned char *before = (unsigned char *)malloc(x.cache->pool_bytes);
  memcpy(before, x.cache->k, x.cache->pool_bytes);
  kvc_status_t status = run_exec_case(&x, c);
  cr_expect_eq(status, c->expect, "%s: got %s (%s)", c->name, kvc_status_name(status), kvc_last_error(x.ctx));
  cr_expect(strstr(kvc_last_error(x.ctx), c->needle) != NULL, "%s: detail '%s' lacks '%s'", c->name,
            kvc_last_error(x.ctx), c->needle);
  cr_expect_eq(memcmp(before, x.cache->k, x.cache->pool_bytes), 0, "%s: a rejected call modified the cache", c->name);
  free(before);
  exec_fixture_fini(&x);
}

Test(bad_input, execute_without_context) {
  exec_fixture_t x;
  exec_fixture_init(&x, KVC_OP_SELECT);
  cr_expect_eq(kvc_select(NULL, x.plan, x.scores, x.keep, x.workspace, x.workspace_bytes, NULL), KVC_ERROR_INVALID_VALUE);
  exec_fixture_fini(&x);
}

/* ---- contexts and status -------------------------------------------------------------------- */

Test(context, create_and_errors) {
  kvc_context_t ctx = (kvc_context_t)1;
  cr_expect_eq(kvc_context_create((kvc_backend_t)7, 0, &ctx), KVC_ERROR_INVALID_VALUE);
  cr_expect_null(ctx);
  cr_expect_eq(kvc_context_create(KVC_BACKEND_CPU, -1, &ctx), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_context_create(KVC_BACKEND_CPU, 0, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_context_create(KVC_BACKEND_AUTO, 0, &ctx), KVC_SUCCESS);
  kvc_backend_t backend;
  cr_expect_eq(kvc_context_backend(ctx, &backend), KVC_SUCCESS);
  cr_expect(backend == KVC_BACKEND_CPU || backend == KVC_BACKEND_CUDA);
  cr_expect_str_eq(kvc_last_error(ctx), "");
  kvc_context_destroy(ctx);
  cr_expect_eq(kvc_context_destroy(NULL), KVC_SUCCESS);
  cr_expect_eq(kvc_plan_destroy(NULL), KVC_SUCCESS);
}

Test(status, names_and_strings) {
  for (int s = KVC_SUCCESS; s <= KVC_ERROR_INTERNAL; ++s) {
    cr_expect(strncmp(kvc_status_name((kvc_status_t)s), "KVC_", 4) == 0);
    cr_expect(strlen(kvc_status_string((kvc_status_t)s)) > 10);
  }
  cr_expect_str_eq(kvc_status_name(KVC_ERROR_BUDGET), "KVC_ERROR_BUDGET");
  cr_expect_str_eq(kvc_status_name((kvc_status_t)99), "KVC_UNKNOWN_STATUS");
  cr_expect_eq(kvc_version(), KVC_VERSION_NUMBER);
  cr_expect_str_eq(kvc_version_string(), KVC_VERSION_STRING);
}

/* ---- plan read-outs, hand-worked ------------------------------------------------------------ */

Test(plan, observation_positions_standard_and_span_local) {
  baseline_t f;
  baseline_init(&f);
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan;
  int32_t indptr[3], pos[32];
  /* standard: the last window = 8 positions of each sequence */
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_obs_positions(plan, indptr, pos);
  cr_expect_eq(indptr[1], 8);
  cr_expect_eq(indptr[2], 16);
  for (int i = 0; i < 8; ++i) {
    cr_expect_eq(pos[i], 32 + i);
    cr_expect_eq(pos[8 + i], 17 + i);
  }
  kvc_plan_destroy(plan);
  /* span_local, window 8 over sequence 0's FAIR spans [0,20) and [20,40): 4 each, their last tokens;
     sequence 1's single FAIR span [0,25) gets all 8 */
  f.desc.span_local = 1;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_obs_positions(plan, indptr, pos);
  int32_t expect0[] = {16, 17, 18, 19, 36, 37, 38, 39};
  cr_expect_eq(indptr[1], 8);
  for (int i = 0; i < 8; ++i) cr_expect_eq(pos[i], expect0[i]);
  for (int i = 0; i < 8; ++i) cr_expect_eq(pos[8 + i], 17 + i);
  kvc_plan_destroy(plan);
  /* a 3-token first span caps its share: window 8 -> 3 + 5 (the gap [3, 20) must be protected) */
  f.spans[0].end = 3, f.spans[1] = (kvc_span_t){3, 20, KVC_SPAN_PROTECT, 1.0f}, f.budgets[0] = 30;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_obs_positions(plan, indptr, pos);
  int32_t expect1[] = {0, 1, 2, 35, 36, 37, 38, 39};
  for (int i = 0; i < 8; ++i) cr_expect_eq(pos[i], expect1[i], "position %d: %d", i, pos[i]);
  kvc_plan_destroy(plan);
  /* TOVA: one query per sequence, its last token */
  f.desc.span_local = 0, f.desc.method = KVC_SCORE_TOVA;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_obs_positions(plan, indptr, pos);
  cr_expect_eq(indptr[2], 2);
  cr_expect_eq(pos[0], 39);
  cr_expect_eq(pos[1], 24);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

/* Quotas worked by hand. Sequence 0: n = 40, k = 20, SNAPKV window 8 protects [32, 40) and the
 * PROTECT span [5, 8). FAIR A = [0, 20) (w 1, L 20, lo 3), FAIR B = [20, 40) (w 2, L 20, lo 8).
 * fairness 0.5: F = max(11, floor(10 + 0.5)) = 11 = sum of the protected counts, so both partitions
 * sit at their floors: q = (3, 8), and the fill is 20 - 11 = 9.
 * fairness 1: F = 20: mu*20 + mu*40 = 20 -> 6.67 + 13.33, both inside bounds: floors 6 + 13 = 19,
 * the larger remainder (.67 for A vs .33 for B) gets the last token: q = (7, 13).
 * Sequence 1: n = 25, budget 30 -> k = 25 = n, one FAIR span [0,25) with lo = 8 (window): q = F. */
Test(plan, quotas_hand_worked) {
  baseline_t f;
  baseline_init(&f);
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan;
  int32_t quotas[4], implicit[2], lens[2];
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_span_quotas(plan, quotas, implicit);
  cr_expect_eq(quotas[0], 3);
  cr_expect_eq(quotas[1], 3); /* PROTECT span: its length */
  cr_expect_eq(quotas[2], 8);
  cr_expect_eq(quotas[3], 13); /* F = floor(12.5 + 0.5) = 13 */
  cr_expect_eq(implicit[0], -1);
  cr_expect_eq(implicit[1], -1);
  kvc_plan_new_lengths(plan, lens);
  cr_expect_eq(lens[0], 20);
  cr_expect_eq(lens[1], 25);
  kvc_plan_destroy(plan);

  f.desc.fairness = 1.0f;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_span_quotas(plan, quotas, implicit);
  cr_expect_eq(quotas[0], 7);
  cr_expect_eq(quotas[2], 13);
  cr_expect_eq(quotas[3], 25);
  kvc_plan_destroy(plan);

  /* equal remainders go to the later partition: two FAIR spans of 10 and an implicit partition of
   * 10 tokens ([20, 30)), k = 10 of n = 30 with no protection: 3.33 each -> 3 + 3 + 4. */
  f.seq_lens[0] = 30, f.budgets[0] = 10, f.desc.method = KVC_SCORE_KNORM;
  f.spans[0] = (kvc_span_t){0, 10, KVC_SPAN_FAIR, 1.0f};
  f.spans[1] = (kvc_span_t){10, 20, KVC_SPAN_FAIR, 1.0f};
  f.span_indptr[1] = 2, f.span_indptr[2] = 3, f.spans[2] = f.spans[3];
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_span_quotas(plan, quotas, implicit);
  cr_expect_eq(quotas[0], 3);
  cr_expect_eq(quotas[1], 3);
  cr_expect_eq(implicit[0], 4);
  kvc_plan_destroy(plan);
  /* weights 1 : 2 : (implicit 1) over lengths 10, 10, 10 and k = 10: 2.5, 5, 2.5 -> floors 2, 5, 2,
   * the tie between the first span and the implicit partition goes to the later (implicit). */
  f.spans[1].weight = 2.0f;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_span_quotas(plan, quotas, implicit);
  cr_expect_eq(quotas[0], 2);
  cr_expect_eq(quotas[1], 5);
  cr_expect_eq(implicit[0], 3);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

Test(plan, workspace_and_info) {
  baseline_t f;
  baseline_init(&f);
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &f.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  cr_expect_eq(info.total_tokens, 65);
  cr_expect_eq(info.total_kept, 45);
  cr_expect_eq(info.score_elems, 130);
  cr_expect_eq(info.keep_elems, 90);
  cr_expect_eq(info.total_spans, 4);
  cr_expect_eq(info.count_elems, 8);
  cr_expect_eq(info.obs_total, 16);
  size_t compress, keep_bytes = sizeof(int32_t) * 90, score_bytes = sizeof(float) * 130;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &compress), KVC_SUCCESS);
  cr_expect_geq(compress, keep_bytes + score_bytes, "compress holds the keep and score layouts");
  cr_expect_eq(kvc_plan_workspace_size(plan, (kvc_op_t)9, &compress), KVC_ERROR_INVALID_VALUE);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

/* The fields appended for fp8 keys keep older descs' meaning: KVC_PLAN_DESC_INIT and
 * kvc_plan_desc_init give query_dtype AS_CACHE, k_scale 1, k_scales NULL, and a desc written
 * field by field on zeroed memory (query_dtype 0, k_scale 0) still makes an f16 plan. */
Test(plan, appended_fp8_fields_keep_older_descs_meaning) {
  const kvc_plan_desc_t init = KVC_PLAN_DESC_INIT;
  kvc_plan_desc_t filled;
  memset(&filled, 0x5a, sizeof filled);
  kvc_plan_desc_init(&filled);
  cr_assert_eq(init.query_dtype, KVC_QUERY_DTYPE_AS_CACHE);
  cr_assert_eq(init.k_scale, 1.0f);
  cr_assert_null(init.k_scales);
  cr_assert_eq(filled.query_dtype, KVC_QUERY_DTYPE_AS_CACHE);
  cr_assert_eq(filled.k_scale, 1.0f);
  cr_assert_null(filled.k_scales);
  const int32_t lens[] = {40}, budgets[] = {10};
  kvc_plan_desc_t d;
  memset(&d, 0, sizeof d);
  d.struct_size = sizeof d;
  d.num_q_heads = 4, d.num_kv_heads = 2, d.head_dim = 16, d.dtype = KVC_DTYPE_F16;
  d.batch = 1, d.seq_lens = lens, d.budgets = budgets;
  d.method = KVC_SCORE_SNAPKV, d.window = 8, d.pool_kernel = 1;
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
