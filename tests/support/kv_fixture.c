/* kv_fixture.c - see kv_fixture.h. */
#include "kv_fixture.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

static const int32_t fix_table[2][2] = {{2, 0}, {3, 1}};
static const int32_t fix_lens[2] = {8, 8}, fix_budgets[2] = {3, 5};

kvc_paged_kv_t kvc_fix_cache(void *k, void *v, int64_t stride_page, int64_t stride_token, int64_t stride_head) {
  kvc_paged_kv_t c;
  memset(&c, 0, sizeof c);
  c.k = k, c.v = v, c.dtype = KVC_DTYPE_F32;
  c.num_kv_heads = KVC_FIX_HEADS, c.head_dim = KVC_FIX_DIM, c.page_size = KVC_FIX_PAGE, c.num_pages = KVC_FIX_PAGES;
  c.stride_page = stride_page, c.stride_token = stride_token, c.stride_head = stride_head;
  c.page_table = &fix_table[0][0], c.max_pages = 2;
  return c;
}

float *kvc_fix_row(const kvc_paged_kv_t *c, void *pool, int32_t p, int32_t s, int32_t h) {
  return (float *)pool + p * c->stride_page + s * c->stride_token + h * c->stride_head;
}

static float v_identity(int32_t p, int32_t s, int32_t h, int32_t d) { return (float)(1000 * p + 100 * s + 10 * h + d); }

void kvc_fix_fill(const kvc_paged_kv_t *c) {
  for (int32_t p = 0; p < KVC_FIX_PAGES; ++p)
    for (int32_t s = 0; s < KVC_FIX_PAGE; ++s)
      for (int32_t h = 0; h < KVC_FIX_HEADS; ++h)
        for (int32_t d = 0; d < KVC_FIX_DIM; ++d) {
          kvc_fix_row(c, c->k, p, s, h)[d] = (float)((p * 13 + s * 7 + h * 3) % 11 + 1) * (float)(d + 1);
          kvc_fix_row(c, c->v, p, s, h)[d] = v_identity(p, s, h, d);
        }
}

int kvc_fix_v_in_place(const kvc_paged_kv_t *c, int32_t p, int32_t s, int32_t h) {
  for (int32_t d = 0; d < KVC_FIX_DIM; ++d)
    if (kvc_fix_row(c, c->v, p, s, h)[d] != v_identity(p, s, h, d)) return 0;
  return 1;
}

kvc_status_t kvc_fix_compress(kvc_backend_t backend, const kvc_paged_kv_t *c, int32_t *keep_out, char *detail,
                              size_t cap) {
  kvc_context_t ctx = NULL;
  kvc_status_t status = kvc_context_create(backend, 0, &ctx);
  if (status != KVC_SUCCESS) {
    snprintf(detail, cap, "kvc_context_create: %s", kvc_status_name(status));
    return status;
  }
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = KVC_FIX_HEADS, d.num_kv_heads = KVC_FIX_HEADS, d.head_dim = KVC_FIX_DIM, d.dtype = KVC_DTYPE_F32;
  d.batch = 2, d.seq_lens = fix_lens, d.budgets = fix_budgets, d.method = KVC_SCORE_KNORM;
  kvc_plan_t plan = NULL;
  status = kvc_plan_create(ctx, &d, &plan);
  if (status == KVC_SUCCESS) {
    size_t bytes = 0;
    kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
    void *ws = kvc_test_workspace_new(bytes);
    status = kvc_compress(ctx, plan, c, NULL, NULL, ws, bytes, NULL);
    if (keep_out && status == KVC_SUCCESS) memcpy(keep_out, ws, sizeof(int32_t) * KVC_FIX_KEEP_ELEMS);
    free(ws);
  }
  snprintf(detail, cap, "%s", kvc_last_error(ctx));
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
  return status;
}

int kvc_fix_differ(const kvc_paged_kv_t *a, const kvc_paged_kv_t *b, char *where, size_t cap) {
  const size_t row = sizeof(float) * KVC_FIX_DIM;
  for (int32_t p = 0; p < KVC_FIX_PAGES; ++p)
    for (int32_t s = 0; s < KVC_FIX_PAGE; ++s)
      for (int32_t h = 0; h < KVC_FIX_HEADS; ++h)
        for (int pool = 0; pool < 2; ++pool)
          if (memcmp(kvc_fix_row(a, pool ? a->v : a->k, p, s, h), kvc_fix_row(b, pool ? b->v : b->k, p, s, h), row)) {
            snprintf(where, cap, "%s page %d slot %d head %d", pool ? "V" : "K", p, s, h);
            return 1;
          }
  return 0;
}

int kvc_fix_shared_differs(kvc_backend_t backend, const kvc_paged_kv_t *shared, char *why, size_t cap) {
  const size_t pool = (size_t)KVC_FIX_PAGES * KVC_FIX_PAGE_ELEMS;
  float *k = calloc(pool, sizeof(float)), *v = calloc(pool, sizeof(float));
  kvc_paged_kv_t separate = kvc_fix_cache(k, v, KVC_FIX_PAGE_ELEMS, shared->stride_token, shared->stride_head);
  kvc_fix_fill(shared);
  kvc_fix_fill(&separate);
  int32_t keep_shared[KVC_FIX_KEEP_ELEMS], keep_separate[KVC_FIX_KEEP_ELEMS];
  char where[64];
  int differs = 1, moved = 0;
  if (kvc_fix_compress(backend, shared, keep_shared, why, cap) != KVC_SUCCESS) goto done;
  if (kvc_fix_compress(KVC_BACKEND_CPU, &separate, keep_separate, why, cap) != KVC_SUCCESS) goto done;
  if (memcmp(keep_shared, keep_separate, sizeof keep_shared)) {
    snprintf(why, cap, "the keep indices differ");
    goto done;
  }
  if (kvc_fix_differ(shared, &separate, where, sizeof where)) {
    snprintf(why, cap, "%s differs", where);
    goto done;
  }
  for (int32_t p = 0; p < KVC_FIX_PAGES; ++p)
    for (int32_t s = 0; s < KVC_FIX_PAGE; ++s) moved += !kvc_fix_v_in_place(&separate, p, s, 1);
  differs = moved == 0;
  if (differs) snprintf(why, cap, "the plan moved nothing: the comparison proves nothing");
done:
  free(k), free(v);
  return differs;
}
