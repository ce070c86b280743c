/*
 * test_score_layers_emu.c - the layer-batched score stage (kvc_score_layers, the first stage of
 * kvc_compress_layers) on the CUDA backend through the SIMT emulator, where every layer is scored
 * by one launch per kernel reading the pointer arrays of kvc_layers_t on the device.
 *
 * Oracle: the single-layer calls of the same backend, once per layer. The layer-batched kernels
 * run the same reductions in the same order as a single-layer call, so the results must be the
 * same bits. A layer whose pointers the kernels cannot read must score as if its K pool were all
 * NaN (kvcompress.h, kvc_layers_t): its oracle is a single-layer call on a copy of the layer
 * whose K pool holds only NaN, which the non-finite rule scores independently of the rule under
 * test. On the CPU backend, which reads the arrays on the host, such layers are refused.
 *
 * The arrays are malloc'd like the emulator's device memory; on CUDA the host never reads them
 * (the grid-limit test passes arrays of NULL pointers that the CPU would refuse).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "layer_util.h"
#include "test_util.h"

enum { L = 3, BATCH = 3 };
static const int32_t kSeqLens[BATCH] = {70, 700, 21}, kBudgets[BATCH] = {35, 300, 21}; /* 700: two key splits */

typedef struct {
  kvc_score_method_t method;
  kvc_dtype_t dtype;
  int32_t head_dim, group, window;
  unsigned lse_layers; /* bit l: layer l gets the engine's lse; 0: the lse array is NULL */
  kvc_query_dtype_t query_dtype; /* fp8 keys (k_scale 1.7): the queries' dtype */
} layer_case_t;

/* One case's plan, layers and per-layer queries / lse on one backend. */
typedef struct {
  kvc_context_t ctx;
  kvc_plan_t plan;
  kvc_plan_desc_t desc;
  kvc_plan_info_t info;
  kvc_test_cache_t *base;
  kvc_test_layers_t *layers;
  const void *queries[L];
  const float *lse[L];
} layer_run_t;

static const char *method_name(kvc_score_method_t m) {
  static const char *names[] = {"SNAPKV", "H2O", "TOVA", "KNORM", "STREAMING"};
  return names[m];
}

static void setup(layer_run_t *r, kvc_backend_t backend, const layer_case_t *c, uint64_t seed) {
  memset(r, 0, sizeof *r);
  cr_assert_eq(kvc_context_create(backend, 0, &r->ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = 2;
  d.num_q_heads = 2 * c->group;
  d.head_dim = c->head_dim;
  d.dtype = c->dtype;
  d.batch = BATCH;
  d.seq_lens = kSeqLens;
  d.budgets = kBudgets;
  d.method = c->method;
  d.window = c->window;
  d.sink_tokens = c->method == KVC_SCORE_STREAMING ? 4 : 0;
  d.query_dtype = c->query_dtype;
  if (c->dtype == KVC_DTYPE_FP8_E4M3) d.k_scale = 1.7f;
  r->desc = d;
  kvc_status_t status = kvc_plan_create(r->ctx, &d, &r->plan);
  cr_assert_eq(status, KVC_SUCCESS, "plan: %s (%s)", kvc_status_name(status), kvc_last_error(r->ctx));
  cr_assert_eq(kvc_plan_get_info(r->plan, &r->info), KVC_SUCCESS);
  r->base = kvc_test_cache_new(BATCH, kSeqLens, 2, c->head_dim, c->dtype, 16, seed % 2 ? KVC_TEST_HND : KVC_TEST_NHD,
                               seed % 3 ? KVC_TEST_DENSE : KVC_TEST_CSR, 2, seed);
  r->layers = kvc_test_layers_new(r->base, L);
  for (int32_t l = 0; l < L; ++l) {
    r->queries[l] = r->info.obs_total > 0 ? kvc_test_queries_new(r->info.obs_total, d.num_q_heads, c->head_dim,
                                                                 kvc_test_query_dtype(&d), seed + 10 + (uint64_t)l)
                                          : NULL;
    r->lse[l] = (c->lse_layers >> l) & 1u && r->queries[l]
                    ? kvc_test_lse(&r->desc, r->plan, r->layers->cache[l], r->queries[l])
                    : NULL;
  }
}

static void teardown(layer_run_t *r) {
  for (int32_t l = 0; l < L; ++l) free((void *)r->queries[l]), free((void *)r->lse[l]);
  kvc_test_layers_free(r->layers);
  kvc_test_cache_free(r->base);
  kvc_plan_destroy(r->plan);
  kvc_context_destroy(r->ctx);
}

/* The call's layer arrays, in memory of their own (the emulator's device memory is host memory). */
typedef struct {
  void **k, **v;
  const void **queries;
  const float **lse;
  kvc_layers_t view;
} layer_arrays_t;

static layer_arrays_t arrays_of(const layer_run_t *r, int with_lse) {
  layer_arrays_t a;
  a.k = malloc(sizeof(void *) * L);
  a.v = malloc(sizeof(void *) * L);
  a.queries = malloc(sizeof(void *) * L);
  a.lse = malloc(sizeof(float *) * L);
  for (int32_t l = 0; l < L; ++l) {
    a.k[l] = r->layers->k[l];
    a.v[l] = r->layers->v[l];
    a.queries[l] = r->queries[l];
    a.lse[l] = r->lse[l];
  }
  kvc_layers_t view = {L, a.k, a.v, r->info.obs_total > 0 ? a.queries : NULL, with_lse ? a.lse : NULL};
  a.view = view;
  return a;
}

static void arrays_free(layer_arrays_t *a) { free(a->k), free(a->v), free(a->queries), free(a->lse); }

/* Score arrays of every layer: random values to add to (accumulate), else NaN, which a written
 * score replaces. */
static float *initial_scores(const layer_run_t *r, int accumulate, uint64_t seed) {
  const int64_t elems = L * r->info.score_elems;
  float *s = malloc(sizeof(float) * (size_t)elems);
  kvc_rng_t rng = {seed};
  for (int64_t i = 0; i < elems; ++i) s[i] = accumulate ? (float)kvc_rng_uniform(&rng) : NAN;
  return s;
}

static void *score_workspace(const layer_run_t *r, kvc_op_t op, int32_t num_layers, size_t *bytes) {
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(r->plan, op, num_layers, &layout), KVC_SUCCESS);
  *bytes = layout.workspace_bytes;
  return kvc_test_workspace_new(layout.workspace_bytes);
}

/* Layer l's single-layer kvc_score from `init`'s layer l into want (score_elems floats). */
static void single_layer_scores(const layer_run_t *r, const kvc_test_cache_t *cache, const void *queries,
                                const float *lse, const float *init, int accumulate, float *want) {
  size_t bytes = 0;
  void *ws = score_workspace(r, KVC_OP_SCORE, 1, &bytes);
  memcpy(want, init, sizeof(float) * (size_t)r->info.score_elems);
  kvc_status_t status = kvc_score(r->ctx, r->plan, &cache->desc, queries, lse, want, accumulate, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_score: %s (%s)", kvc_status_name(status), kvc_last_error(r->ctx));
  free(ws);
}

/* Same bits, or NaN in both (a NaN's payload and sign are not specified). */
static void assert_same_scores(const float *got, const float *want, int64_t elems, const char *what, int32_t layer) {
  for (int64_t i = 0; i < elems; ++i) {
    if (isnan(want[i]) && isnan(got[i])) continue;
    cr_assert(memcmp(&got[i], &want[i], sizeof(float)) == 0, "%s, layer %d: score %lld is %.9g, the single call's %.9g",
              what, layer, (long long)i, got[i], want[i]);
  }
}

/* kvc_score_layers == L single-layer kvc_score calls, on `backend`. */
static void check_score_layers(kvc_backend_t backend, const layer_case_t *c, int accumulate, uint64_t seed) {
  layer_run_t r;
  setup(&r, backend, c, seed);
  layer_arrays_t a = arrays_of(&r, c->lse_layers != 0);
  size_t bytes = 0;
  void *ws = score_workspace(&r, KVC_OP_SCORE, L, &bytes);
  float *init = initial_scores(&r, accumulate, seed + 1);
  float *got = malloc(sizeof(float) * (size_t)(L * r.info.score_elems));
  memcpy(got, init, sizeof(float) * (size_t)(L * r.info.score_elems));
  kvc_status_t status = kvc_score_layers(r.ctx, r.plan, &r.layers->desc, &a.view, got, accumulate, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_score_layers: %s (%s)", kvc_status_name(status), kvc_last_error(r.ctx));
  float *want = malloc(sizeof(float) * (size_t)r.info.score_elems);
  char what[128];
  snprintf(what, sizeof what, "%s %s dtype %d D %d G %d accumulate %d lse 0x%x", backend ? "CUDA" : "CPU",
           method_name(c->method), (int)c->dtype, c->head_dim, c->group, accumulate, c->lse_layers);
  for (int32_t l = 0; l < L; ++l) {
    single_layer_scores(&r, r.layers->cache[l], r.queries[l], c->lse_layers ? r.lse[l] : NULL,
                        init + l * r.info.score_elems, accumulate, want);
    for (int64_t i = 0; i < r.info.score_elems; ++i) /* every score written (NaN only where the data has it) */
      cr_assert(!isnan(want[i]), "%s: the single call left NaN at %lld", what, (long long)i);
    assert_same_scores(got + l * r.info.score_elems, want, r.info.score_elems, what, l);
  }
  free(want), free(got), free(init), free(ws);
  arrays_free(&a);
  teardown(&r);
}

static const layer_case_t kCases[] = {
    {KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 64, 2, 16, 0x5},   /* layers 0, 2 with the engine's lse */
    {KVC_SCORE_SNAPKV, KVC_DTYPE_BF16, 40, 4, 16, 0},    /* no lse array                      */
    {KVC_SCORE_SNAPKV, KVC_DTYPE_F32, 32, 1, 16, 0x2},
    {KVC_SCORE_H2O, KVC_DTYPE_BF16, 64, 2, 1000, 0x2},    /* window >= n: every prompt query   */
    {KVC_SCORE_H2O, KVC_DTYPE_F16, 32, 1, 1000, 0},
    {KVC_SCORE_H2O, KVC_DTYPE_F32, 32, 2, 1000, 0x7},     /* every layer with lse              */
    {KVC_SCORE_TOVA, KVC_DTYPE_F16, 32, 4, 1, 0x1},
    {KVC_SCORE_TOVA, KVC_DTYPE_BF16, 64, 2, 1, 0},
    {KVC_SCORE_TOVA, KVC_DTYPE_F32, 32, 2, 1, 0},
    {KVC_SCORE_KNORM, KVC_DTYPE_F16, 64, 2, 1, 0},
    {KVC_SCORE_KNORM, KVC_DTYPE_BF16, 32, 1, 1, 0},
    {KVC_SCORE_KNORM, KVC_DTYPE_F32, 40, 2, 1, 0},
    {KVC_SCORE_STREAMING, KVC_DTYPE_F16, 32, 2, 1, 0},
    {KVC_SCORE_STREAMING, KVC_DTYPE_BF16, 32, 2, 1, 0},
    {KVC_SCORE_STREAMING, KVC_DTYPE_F32, 32, 2, 1, 0},
    {KVC_SCORE_SNAPKV, KVC_DTYPE_FP8_E4M3, 64, 2, 16, 0x5, KVC_QUERY_DTYPE_F16}, /* fp8 keys */
    {KVC_SCORE_H2O, KVC_DTYPE_FP8_E4M3, 32, 2, 1000, 0, KVC_QUERY_DTYPE_BF16},
    {KVC_SCORE_KNORM, KVC_DTYPE_FP8_E4M3, 64, 2, 1, 0},
};
enum { NUM_CASES = sizeof kCases / sizeof kCases[0] };

/* Every method x f16/bf16/f32 (and fp8 keys for SNAPKV, H2O, KNORM), written and accumulated, with and without the engine's lse (some
 * entries NULL), GQA 1/2/4, a batch of different lengths, on both backends. */
Test(score_layers_emu, score_layers_equal_single_layer_calls, .timeout = 1200) {
  for (int i = 0; i < NUM_CASES; ++i)
    for (int backend = 0; backend < 2; ++backend)
      check_score_layers(backend ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, &kCases[i], i % 2, 100 + (uint64_t)i);
}

/* kvc_compress_layers on CUDA == L single-layer kvc_compress calls on CUDA: the keep layouts and
 * status array left in the workspace, and every layer's pools afterwards. */
Test(score_layers_emu, compress_layers_equal_single_layer_calls, .timeout = 1200) {
  for (int i = 0; i < NUM_CASES; i += 2) {
    const layer_case_t *c = &kCases[i];
    layer_run_t r;
    setup(&r, KVC_BACKEND_CUDA, c, 200 + (uint64_t)i);
    kvc_test_layers_t *batched = kvc_test_layers_clone(r.layers);
    layer_run_t view_of_batched = r;
    view_of_batched.layers = batched;
    layer_arrays_t a = arrays_of(&view_of_batched, c->lse_layers != 0);
    kvc_workspace_layout_t layout;
    cr_assert_eq(kvc_plan_workspace_layout(r.plan, KVC_OP_COMPRESS, L, &layout), KVC_SUCCESS);
    void *ws = kvc_test_workspace_new(layout.workspace_bytes);
    kvc_status_t status =
        kvc_compress_layers(r.ctx, r.plan, &batched->desc, &a.view, ws, layout.workspace_bytes, NULL);
    cr_assert_eq(status, KVC_SUCCESS, "kvc_compress_layers: %s (%s)", kvc_status_name(status), kvc_last_error(r.ctx));
    size_t single_bytes = 0;
    cr_assert_eq(kvc_plan_workspace_size(r.plan, KVC_OP_COMPRESS, &single_bytes), KVC_SUCCESS);
    void *single_ws = kvc_test_workspace_new(single_bytes);
    for (int32_t l = 0; l < L; ++l) {
      kvc_test_cache_t *single = kvc_test_cache_clone(r.layers->cache[l]);
      status = kvc_compress(r.ctx, r.plan, &single->desc, r.queries[l], c->lse_layers ? r.lse[l] : NULL, single_ws,
                            single_bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "kvc_compress: %s (%s)", kvc_status_name(status), kvc_last_error(r.ctx));
      const int32_t *want = (const int32_t *)((const char *)single_ws + r.info.keep_offset_bytes);
      const int32_t *got = (const int32_t *)((const char *)ws + layout.keep_offset_bytes) + l * r.info.keep_elems;
      for (int64_t e = 0; e < r.info.keep_elems; ++e)
        cr_assert_eq(got[e], want[e], "%s dtype %d layer %d: keep element %lld is %d, the single call's %d",
                     method_name(c->method), (int)c->dtype, l, (long long)e, got[e], want[e]);
      const int32_t *flags = (const int32_t *)((const char *)ws + layout.status_offset_bytes);
      for (int32_t b = 0; b < BATCH; ++b) cr_assert_eq(flags[l * BATCH + b], 0, "layer %d sequence %d", l, b);
      cr_assert(memcmp(batched->cache[l]->k, single->k, single->pool_bytes) == 0, "%s layer %d: K pool differs",
                method_name(c->method), l);
      cr_assert(memcmp(batched->cache[l]->v, single->v, single->pool_bytes) == 0, "%s layer %d: V pool differs",
                method_name(c->method), l);
      kvc_test_cache_free(single);
    }
    free(single_ws), free(ws);
    arrays_free(&a);
    kvc_test_layers_free(batched);
    teardown(&r);
  }
}

/* ---- layers the kernels cannot read --------------------------------------------------------- */

typedef enum { K_NULL, K_MISALIGNED, QUERIES_NULL, QUERIES_MISALIGNED, LSE_MISALIGNED } bad_t;
static const char *const kBadNames[] = {"k NULL", "k misaligned", "queries NULL", "queries misaligned",
                                        "lse misaligned"};

/* A copy of `cache` whose K pool is NaN in every element (f32, f16, bf16 quiet NaN). */
static kvc_test_cache_t *nan_keys(const kvc_test_cache_t *cache, kvc_dtype_t dtype) {
  kvc_test_cache_t *c = kvc_test_cache_clone(cache);
  const uint32_t f32 = 0x7fc00000u;
  const uint16_t f16 = 0x7e00u, bf16 = 0x7fc0u;
  const size_t elem = dtype == KVC_DTYPE_F32 ? 4 : 2;
  for (size_t at = 0; at + elem <= c->pool_bytes; at += elem)
    memcpy(c->k + at, dtype == KVC_DTYPE_F32 ? (const void *)&f32 : dtype == KVC_DTYPE_F16 ? (const void *)&f16
                                                                                              : (const void *)&bf16,
           elem);
  return c;
}

/* Whether `method` reads what `bad` spoils (STREAMING reads nothing; KNORM no queries or lse). */
static int reads(kvc_score_method_t method, bad_t bad) {
  if (method == KVC_SCORE_STREAMING) return 0;
  return method != KVC_SCORE_KNORM || bad == K_NULL || bad == K_MISALIGNED;
}

/* Layer 1 of a CUDA kvc_score_layers call spoilt by `bad` (accumulating onto random scores): the
 * other layers are the single calls' bits; layer 1 is a single call on a NaN K pool where the
 * method reads the spoilt pointer, the untouched layer's single call where it does not. */
static void check_bad_layer(const layer_case_t *c, bad_t bad, uint64_t seed) {
  layer_run_t r;
  setup(&r, KVC_BACKEND_CUDA, c, seed);
  layer_arrays_t a = arrays_of(&r, 1);
  switch (bad) {
    case K_NULL: a.k[1] = NULL; break;
    case K_MISALIGNED: a.k[1] = (char *)a.k[1] + 8; break; /* element-aligned, not 16-byte aligned */
    case QUERIES_NULL: a.queries[1] = NULL; break;
    case QUERIES_MISALIGNED: a.queries[1] = (const char *)a.queries[1] + 4; break;
    case LSE_MISALIGNED: a.lse[1] = (const float *)((const char *)a.lse[1] + 2); break;
  }
  size_t bytes = 0;
  void *ws = score_workspace(&r, KVC_OP_SCORE, L, &bytes);
  float *init = initial_scores(&r, 1, seed + 1);
  float *got = malloc(sizeof(float) * (size_t)(L * r.info.score_elems));
  memcpy(got, init, sizeof(float) * (size_t)(L * r.info.score_elems));
  kvc_status_t status = kvc_score_layers(r.ctx, r.plan, &r.layers->desc, &a.view, got, 1, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_score_layers: %s (%s)", kvc_status_name(status), kvc_last_error(r.ctx));
  float *want = malloc(sizeof(float) * (size_t)r.info.score_elems);
  char what[128];
  snprintf(what, sizeof what, "%s, layer 1 %s", method_name(c->method), kBadNames[bad]);
  int64_t nans = 0;
  for (int32_t l = 0; l < L; ++l) {
    const int spoilt = l == 1 && reads(c->method, bad);
    kvc_test_cache_t *oracle = spoilt ? nan_keys(r.layers->cache[l], c->dtype) : NULL;
    single_layer_scores(&r, oracle ? oracle : r.layers->cache[l], r.queries[l], spoilt ? NULL : r.lse[l],
                        init + l * r.info.score_elems, 1, want);
    assert_same_scores(got + l * r.info.score_elems, want, r.info.score_elems, what, l);
    for (int64_t i = 0; i < r.info.score_elems; ++i) nans += isnan(got[l * r.info.score_elems + i]);
    kvc_test_cache_free(oracle);
  }
  if (reads(c->method, bad))
    cr_assert_gt(nans, 0, "%s: the spoilt layer has NaN scores", what);
  else
    cr_assert_eq(nans, 0, "%s: a method that does not read the pointer is unaffected", what);
  free(want), free(got), free(init), free(ws);
  arrays_free(&a);
  teardown(&r);
}

Test(score_layers_emu, unreadable_layer_scores_as_nan_keys, .timeout = 1200) {
  static const layer_case_t cases[] = {
      {KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 32, 2, 16, 0x7}, {KVC_SCORE_H2O, KVC_DTYPE_BF16, 32, 2, 1000, 0x7},
      {KVC_SCORE_TOVA, KVC_DTYPE_F32, 32, 2, 1, 0x7},    {KVC_SCORE_KNORM, KVC_DTYPE_BF16, 32, 2, 1, 0},
      {KVC_SCORE_STREAMING, KVC_DTYPE_F16, 32, 2, 1, 0},
  };
  for (int i = 0; i < 5; ++i)
    for (int bad = K_NULL; bad <= LSE_MISALIGNED; ++bad) {
      const int has_queries = cases[i].method <= KVC_SCORE_TOVA; /* the others' plans observe nothing */
      if ((bad >= QUERIES_NULL && !has_queries) || (bad == LSE_MISALIGNED && cases[i].lse_layers == 0)) continue;
      check_bad_layer(&cases[i], (bad_t)bad, 300 + (uint64_t)(8 * i + bad));
    }
}

/* kvc_compress_layers with layer 1's K pool NULL: compaction's pool check leaves that layer's pools
 * untouched and flags every sequence of it. With its queries NULL instead (good pools), the layer
 * is compacted by its NaN scores: the keep layout a single kvc_compress makes of a NaN K pool, and
 * the pools kvc_compact makes of that keep layout. The other layers are compressed as single calls
 * do either way. */
Test(score_layers_emu, compress_layers_with_an_unreadable_layer, .timeout = 600) {
  const layer_case_t c = {KVC_SCORE_SNAPKV, KVC_DTYPE_BF16, 32, 2, 16, 0};
  static const bad_t bads[] = {K_NULL, QUERIES_NULL};
  for (int i = 0; i < 2; ++i) {
    layer_run_t r;
    setup(&r, KVC_BACKEND_CUDA, &c, 400 + (uint64_t)i);
    kvc_test_layers_t *batched = kvc_test_layers_clone(r.layers);
    layer_run_t view_of_batched = r;
    view_of_batched.layers = batched;
    layer_arrays_t a = arrays_of(&view_of_batched, 0);
    if (bads[i] == K_NULL) a.k[1] = NULL;
    else a.queries[1] = NULL;
    kvc_workspace_layout_t layout;
    cr_assert_eq(kvc_plan_workspace_layout(r.plan, KVC_OP_COMPRESS, L, &layout), KVC_SUCCESS);
    void *ws = kvc_test_workspace_new(layout.workspace_bytes);
    cr_assert_eq(kvc_compress_layers(r.ctx, r.plan, &batched->desc, &a.view, ws, layout.workspace_bytes, NULL),
                 KVC_SUCCESS, "%s", kvc_last_error(r.ctx));
    const int32_t *flags = (const int32_t *)((const char *)ws + layout.status_offset_bytes);
    size_t single_bytes = 0, compact_bytes = 0;
    cr_assert_eq(kvc_plan_workspace_size(r.plan, KVC_OP_COMPRESS, &single_bytes), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_workspace_size(r.plan, KVC_OP_COMPACT, &compact_bytes), KVC_SUCCESS);
    void *single_ws = kvc_test_workspace_new(single_bytes), *compact_ws = kvc_test_workspace_new(compact_bytes);
    for (int32_t l = 0; l < L; ++l) {
      kvc_test_cache_t *single = kvc_test_cache_clone(r.layers->cache[l]);
      const int32_t *want = (const int32_t *)((const char *)single_ws + r.info.keep_offset_bytes);
      if (l != 1) {
        cr_assert_eq(kvc_compress(r.ctx, r.plan, &single->desc, r.queries[l], NULL, single_ws, single_bytes, NULL),
                     KVC_SUCCESS, "%s", kvc_last_error(r.ctx));
      } else if (bads[i] == QUERIES_NULL) {
        kvc_test_cache_t *oracle = nan_keys(single, c.dtype);
        cr_assert_eq(kvc_compress(r.ctx, r.plan, &oracle->desc, r.queries[l], NULL, single_ws, single_bytes, NULL),
                     KVC_SUCCESS, "%s", kvc_last_error(r.ctx));
        cr_assert_eq(kvc_compact(r.ctx, r.plan, &single->desc, want, NULL, 0, compact_ws, compact_bytes, NULL),
                     KVC_SUCCESS, "%s", kvc_last_error(r.ctx));
        kvc_test_cache_free(oracle);
      }
      const int32_t *got = (const int32_t *)((const char *)ws + layout.keep_offset_bytes) + l * r.info.keep_elems;
      const int compacted = l != 1 || bads[i] == QUERIES_NULL;
      for (int64_t e = 0; compacted && e < r.info.keep_elems; ++e)
        cr_assert_eq(got[e], want[e], "%s, layer %d: keep element %lld is %d, the single call's %d",
                     kBadNames[bads[i]], l, (long long)e, got[e], want[e]);
      const int32_t flag = l == 1 && bads[i] == K_NULL ? KVC_COMPACT_BAD_POOL : 0;
      for (int32_t b = 0; b < BATCH; ++b)
        cr_assert_eq(flags[l * BATCH + b], flag, "%s, layer %d sequence %d", kBadNames[bads[i]], l, b);
      cr_assert(memcmp(batched->cache[l]->k, single->k, single->pool_bytes) == 0, "%s, layer %d: K pool",
                kBadNames[bads[i]], l);
      cr_assert(memcmp(batched->cache[l]->v, single->v, single->pool_bytes) == 0, "%s, layer %d: V pool",
                kBadNames[bads[i]], l);
      kvc_test_cache_free(single);
    }
    free(compact_ws), free(single_ws), free(ws);
    arrays_free(&a);
    kvc_test_layers_free(batched);
    teardown(&r);
  }
}

/* The CPU backend reads the arrays on the host: a NULL pool or query pointer is refused, naming the
 * layer, before any score is written. */
Test(score_layers_emu, cpu_refuses_null_layer_pointers) {
  const layer_case_t c = {KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 32, 2, 16, 0};
  layer_run_t r;
  setup(&r, KVC_BACKEND_CPU, &c, 500);
  size_t bytes = 0;
  void *ws = score_workspace(&r, KVC_OP_SCORE, L, &bytes);
  float *scores = initial_scores(&r, 1, 501), *before = initial_scores(&r, 1, 501);
  static const bad_t bads[] = {K_NULL, QUERIES_NULL};
  for (int i = 0; i < 2; ++i) {
    const bad_t bad = bads[i];
    layer_arrays_t a = arrays_of(&r, 0);
    if (bad == K_NULL) a.k[1] = NULL;
    else a.queries[1] = NULL;
    cr_assert_eq(kvc_score_layers(r.ctx, r.plan, &r.layers->desc, &a.view, scores, 1, ws, bytes, NULL),
                 KVC_ERROR_INVALID_VALUE);
    const char *want = bad == K_NULL ? "layers->k[1] is NULL" : "layers->queries[1] is NULL";
    cr_assert(strstr(kvc_last_error(r.ctx), want) != NULL, "%s", kvc_last_error(r.ctx));
    cr_assert(memcmp(scores, before, sizeof(float) * (size_t)(L * r.info.score_elems)) == 0, "nothing written");
    arrays_free(&a);
  }
  free(scores), free(before), free(ws);
  teardown(&r);
}

/* The score kernels put (layer, KV head) on grid axis y: num_layers * num_kv_heads <= 65535 on
 * CUDA, refused beyond by the layout query and the calls; the CPU has no such limit and no score
 * workspace that grows with the layers. */
Test(score_layers_emu, layers_times_kv_heads_beyond_the_grid_is_not_supported) {
  static const int32_t seq_lens[1] = {64};
  enum { HEADS = 8, MOST = 65535 / HEADS };
  for (int backend = 0; backend < 2; ++backend) {
    kvc_context_t ctx;
    cr_assert_eq(kvc_context_create(backend ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
    kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
    d.num_kv_heads = HEADS;
    d.num_q_heads = HEADS;
    d.head_dim = 32;
    d.batch = 1;
    d.seq_lens = d.budgets = seq_lens;
    d.method = KVC_SCORE_SNAPKV;
    d.window = 8;
    kvc_plan_t plan;
    cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
    kvc_workspace_layout_t layout;
    size_t single = 0;
    cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &single), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_workspace_layout(plan, KVC_OP_SCORE, MOST, &layout), KVC_SUCCESS);
    if (!backend) cr_assert_eq(layout.workspace_bytes, single, "CPU: the score workspace does not scale");
    static const kvc_op_t ops[] = {KVC_OP_SCORE, KVC_OP_COMPRESS};
    for (int i = 0; i < 2; ++i)
      cr_assert_eq(kvc_plan_workspace_layout(plan, ops[i], MOST + 1, &layout),
                   backend ? KVC_ERROR_NOT_SUPPORTED : KVC_SUCCESS, "backend %d op %d", backend, (int)ops[i]);
    if (backend) { /* the call refuses it too, without reading the (all NULL) arrays */
      void **none = calloc(MOST + 1, sizeof(void *));
      const kvc_layers_t layers = {MOST + 1, none, none, (const void *const *)none, NULL};
      kvc_paged_kv_t cache = {0};
      cache.dtype = KVC_DTYPE_F16;
      cache.num_kv_heads = HEADS;
      cache.head_dim = 32;
      cache.page_size = 64;
      cache.num_pages = 1;
      cache.stride_token = HEADS * 32;
      cache.stride_head = 32;
      cache.stride_page = 64 * HEADS * 32;
      float score = 0.0f;
      cr_assert_eq(kvc_score_layers(ctx, plan, &cache, &layers, &score, 0, NULL, 0, NULL), KVC_ERROR_NOT_SUPPORTED);
      cr_assert(strstr(kvc_last_error(ctx), "8192 layers x 8 KV heads") != NULL, "%s", kvc_last_error(ctx));
      free(none);
    }
    kvc_plan_destroy(plan);
    kvc_context_destroy(ctx);
  }
}

/* On CUDA the keys are copied 16 bytes at a time: K strides that are not multiples of 16 bytes are
 * NOT_SUPPORTED, the layered call's detail naming it and the strides (its pools are device
 * pointers that only the kernels read: none is printed). */
Test(score_layers_emu, strides_off_16_bytes_are_not_supported) {
  static const int32_t seq_lens[1] = {64};
  enum { HEADS = 2, DIM = 32, PADDED = 36 }; /* f16: a head 72 bytes apart */
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = d.num_q_heads = HEADS;
  d.head_dim = DIM;
  d.batch = 1;
  d.seq_lens = d.budgets = seq_lens;
  d.method = KVC_SCORE_KNORM;
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_paged_kv_t cache = {0};
  cache.dtype = KVC_DTYPE_F16;
  cache.num_kv_heads = HEADS;
  cache.head_dim = DIM;
  cache.page_size = 64;
  cache.num_pages = 1;
  cache.stride_head = PADDED;
  cache.stride_token = HEADS * PADDED;
  cache.stride_page = 64 * HEADS * PADDED;
  void *none[2] = {NULL, NULL};
  const kvc_layers_t layers = {2, none, none, NULL, NULL};
  float *scores = calloc(2 * 64 * HEADS, sizeof(float));
  cr_assert_eq(kvc_score_layers(ctx, plan, &cache, &layers, scores, 0, ws, bytes, NULL), KVC_ERROR_NOT_SUPPORTED);
  cr_assert_str_eq(kvc_last_error(ctx),
                   "kvc_score_layers: on CUDA the K strides in bytes (page 9216, token 144, head 72) must be "
                   "multiples of 16 bytes");
  uint16_t *pool = kvc_test_workspace_new(2 * 64 * HEADS * PADDED * sizeof(uint16_t));
  cache.k = pool;
  cache.v = pool + 64 * HEADS * PADDED;
  const kvc_status_t single = kvc_score(ctx, plan, &cache, NULL, NULL, scores, 0, ws, bytes, NULL);
  cr_assert_eq(single, KVC_ERROR_NOT_SUPPORTED, "%s: %s", kvc_status_name(single), kvc_last_error(ctx));
  cr_assert(strstr(kvc_last_error(ctx), "(page 9216, token 144, head 72) and the queries") != NULL, "%s",
            kvc_last_error(ctx));
  free(pool);
  free(scores);
  free(ws);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
