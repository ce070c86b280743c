/* layer_util.c - see layer_util.h. */
#include "layer_util.h"

#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"

/* Rotates the rows of every (sequence, head) of one pool by `shift` tokens, through the test's own
 * address arithmetic. */
static void rotate_rows(kvc_test_cache_t *c, int is_v, int32_t layer, int32_t num_layers) {
  const size_t row = kvc_test_row_bytes(c);
  for (int32_t b = 0; b < c->batch; ++b) {
    const int32_t n = c->seq_lens[b], shift = (int32_t)(((int64_t)layer * n / num_layers + layer) % n);
    if (shift == 0) continue;
    unsigned char *copy = (unsigned char *)malloc(row * (size_t)n);
    for (int32_t h = 0; h < c->desc.num_kv_heads; ++h) {
      for (int32_t t = 0; t < n; ++t)
        memcpy(copy + row * (size_t)t, is_v ? kvc_test_v_ptr(c, b, t, h) : kvc_test_k_ptr(c, b, t, h), row);
      for (int32_t t = 0; t < n; ++t)
        memcpy(is_v ? kvc_test_v_ptr(c, b, t, h) : kvc_test_k_ptr(c, b, t, h), copy + row * (size_t)((t + shift) % n),
               row);
    }
    free(copy);
  }
}

static void point(kvc_test_layers_t *l) {
  for (int32_t i = 0; i < l->num_layers; ++i) {
    l->k[i] = l->cache[i]->k;
    l->v[i] = l->cache[i]->v;
  }
  l->desc = l->cache[0]->desc;
  l->desc.k = l->desc.v = NULL;
}

kvc_test_layers_t *kvc_test_layers_new(const kvc_test_cache_t *base, int32_t num_layers) {
  kvc_test_layers_t *l = (kvc_test_layers_t *)calloc(1, sizeof *l);
  l->num_layers = num_layers;
  for (int32_t i = 0; i < num_layers; ++i) {
    l->cache[i] = kvc_test_cache_clone(base);
    rotate_rows(l->cache[i], 0, i, num_layers);
    rotate_rows(l->cache[i], 1, i, num_layers);
  }
  point(l);
  return l;
}

kvc_test_layers_t *kvc_test_layers_clone(const kvc_test_layers_t *src) {
  kvc_test_layers_t *l = (kvc_test_layers_t *)calloc(1, sizeof *l);
  l->num_layers = src->num_layers;
  for (int32_t i = 0; i < src->num_layers; ++i) l->cache[i] = kvc_test_cache_clone(src->cache[i]);
  point(l);
  return l;
}

void kvc_test_layers_free(kvc_test_layers_t *l) {
  if (!l) return;
  for (int32_t i = 0; i < l->num_layers; ++i) kvc_test_cache_free(l->cache[i]);
  free(l);
}

kvc_layers_t kvc_test_layers_view(kvc_test_layers_t *l) {
  kvc_layers_t view = {l->num_layers, l->k, l->v, NULL, NULL};
  return view;
}

int32_t *kvc_test_keep_layers_new(int32_t num_layers, int32_t batch, const int32_t *seq_lens, const int32_t *budgets,
                                  int32_t heads, int32_t pattern_shift, uint64_t seed, int64_t *elems) {
  int32_t *stacked = NULL;
  for (int32_t i = 0; i < num_layers; ++i) {
    int32_t *keep = kvc_test_keep_new(batch, seq_lens, budgets, heads, pattern_shift + i, seed + (uint64_t)i, elems);
    if (!stacked) stacked = (int32_t *)malloc(sizeof(int32_t) * (size_t)(*elems) * (size_t)num_layers);
    memcpy(stacked + (size_t)i * (size_t)*elems, keep, sizeof(int32_t) * (size_t)*elems);
    free(keep);
  }
  return stacked;
}

#include <criterion/criterion.h>

void kvc_test_score_layers_match_single_calls(kvc_backend_t backend) {
  enum { L = 3 };
  const int32_t seq_lens[3] = {70, 300, 20}, budgets[3] = {30, 100, 20};
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(backend, 0, &ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 4;
  d.num_kv_heads = 2;
  d.head_dim = 16;
  d.dtype = KVC_DTYPE_F16;
  d.batch = 3;
  d.seq_lens = seq_lens;
  d.budgets = budgets;
  d.method = KVC_SCORE_SNAPKV;
  d.window = 8;
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  kvc_test_cache_t *base = kvc_test_cache_new(3, seq_lens, 2, 16, d.dtype, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, 5);
  kvc_test_layers_t *layers = kvc_test_layers_new(base, L);
  const void *queries[L];
  const float *lse[L];
  for (int32_t l = 0; l < L; ++l) {
    queries[l] = kvc_test_queries_new(info.obs_total, d.num_q_heads, d.head_dim, d.dtype, 50 + (uint64_t)l);
    lse[l] = l == 1 ? NULL : kvc_test_lse(&d, plan, layers->cache[l], queries[l]); /* layer 1: computed */
  }
  kvc_layers_t view = kvc_test_layers_view(layers);
  view.queries = queries;
  view.lse = lse;
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(plan, KVC_OP_SCORE, L, &layout), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(layout.workspace_bytes);
  float *scores = (float *)malloc(sizeof(float) * (size_t)(L * info.score_elems));
  float *want = (float *)malloc(sizeof(float) * (size_t)info.score_elems);
  cr_assert_eq(kvc_score_layers(ctx, plan, &layers->desc, &view, scores, 0, ws, layout.workspace_bytes, NULL),
               KVC_SUCCESS, "%s", kvc_last_error(ctx));
  for (int32_t l = 0; l < L; ++l) {
    cr_assert_eq(kvc_score(ctx, plan, &layers->cache[l]->desc, queries[l], lse[l], want, 0, ws, layout.workspace_bytes,
                           NULL),
                 KVC_SUCCESS, "%s", kvc_last_error(ctx));
    cr_assert_eq(memcmp(scores + l * info.score_elems, want, sizeof(float) * (size_t)info.score_elems), 0,
                 "backend %d layer %d: kvc_score_layers differs from kvc_score", (int)backend, l);
  }
  view.queries = NULL;
  cr_assert_eq(kvc_score_layers(ctx, plan, &layers->desc, &view, scores, 0, ws, layout.workspace_bytes, NULL),
               KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "layers->queries is NULL") != NULL, "%s", kvc_last_error(ctx));
  for (int32_t l = 0; l < L; ++l) free((void *)queries[l]), free((void *)lse[l]);
  free(scores), free(want), free(ws);
  kvc_test_layers_free(layers);
  kvc_test_cache_free(base);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
