/*
 * test_plan_sizes.c - plan sizes at the edge of 64 bits: plans whose layouts or workspaces cannot
 * be sized are rejected (KVC_ERROR_INVALID_VALUE, before any allocation), accepted plans report
 * exact, unwrapped sizes, and the workspace carver saturates instead of wrapping.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "ops.h"

static kvc_status_t try_plan(kvc_context_t ctx, int32_t heads, int32_t batch, int32_t len, kvc_score_method_t method,
                             kvc_plan_t *plan) {
  int32_t *lens = malloc(sizeof(int32_t) * (size_t)batch), *budgets = malloc(sizeof(int32_t) * (size_t)batch);
  for (int32_t b = 0; b < batch; ++b) lens[b] = len, budgets[b] = len / 2 + 1;
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = heads, d.num_kv_heads = heads, d.head_dim = 8, d.dtype = KVC_DTYPE_F32;
  d.batch = batch, d.seq_lens = lens, d.budgets = budgets, d.method = method;
  kvc_status_t status = kvc_plan_create(ctx, &d, plan);
  free(lens), free(budgets);
  return status;
}

/* 2^30 heads x 3 * 2^30 tokens: the score layout alone is 2^64 * 3/4 floats' worth of bytes, which
 * wrapped to "tens of GB" before; INT32_MAX heads overflowed int64 in the keep layout's product. */
Test(plan_sizes, layouts_past_64_bits_are_rejected) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  const int32_t heads[] = {1 << 30, INT32_MAX};
  const kvc_score_method_t methods[] = {KVC_SCORE_KNORM, KVC_SCORE_SNAPKV};
  for (int i = 0; i < 2; ++i)
    for (int m = 0; m < 2; ++m) {
      kvc_plan_t plan = (kvc_plan_t)1;
      kvc_status_t status = try_plan(ctx, heads[i], 3, 1 << 30, methods[m], &plan);
      cr_expect_eq(status, KVC_ERROR_INVALID_VALUE, "%d heads: %s (%s)", heads[i], kvc_status_name(status),
                   kvc_last_error(ctx));
      cr_expect_null(plan);
      cr_expect(strstr(kvc_last_error(ctx), "2^48") != NULL, "%s", kvc_last_error(ctx));
      if (status == KVC_SUCCESS) kvc_plan_destroy(plan);
    }
  kvc_context_destroy(ctx);
}

/* The bound is on num_q_heads x tokens: 2^48 passes, one more token does not. */
Test(plan_sizes, the_bound_is_exact) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  kvc_plan_t plan = NULL;
  /* 2^27 heads x 2 sequences of 2^20 tokens = 2^48 pairs (the plan arrays are a few MiB) */
  cr_assert_eq(try_plan(ctx, 1 << 27, 2, 1 << 20, KVC_SCORE_STREAMING, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  cr_expect_eq(info.score_elems, (int64_t)1 << 48);
  const int64_t kept = 2 * ((1 << 19) + 1);
  cr_expect_eq(info.keep_elems, ((int64_t)1 << 27) * kept);
  /* compress = keep layout + score layout + the largest stage, each piece 256-aligned: here the
   * stages' workspaces are small (STREAMING scores nothing; selection and the page check need
   * O(tokens)), so the layouts dominate and the total must exceed them, unwrapped. */
  size_t compress = 0, stage = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &compress), KVC_SUCCESS);
  for (int op = KVC_OP_SCORE; op <= KVC_OP_COMPACT; ++op) {
    size_t bytes = 0;
    kvc_plan_workspace_size(plan, (kvc_op_t)op, &bytes);
    stage = bytes > stage ? bytes : stage;
  }
  const size_t keep_bytes = 4 * (size_t)info.keep_elems, score_bytes = 4 * (size_t)info.score_elems;
  const size_t aligned_keep = (keep_bytes + 255) / 256 * 256, aligned_scores = (score_bytes + 255) / 256 * 256;
  cr_expect_eq(compress, aligned_keep + aligned_scores + stage, "compress %zu, keep %zu, scores %zu, stage %zu",
               compress, keep_bytes, score_bytes, stage);
  kvc_plan_destroy(plan);
  plan = (kvc_plan_t)1;
  int32_t lens[2] = {1 << 20, (1 << 20) + 1}, budgets[2] = {1, 1};
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 1 << 27, d.num_kv_heads = 1 << 27, d.head_dim = 8, d.dtype = KVC_DTYPE_F32;
  d.batch = 2, d.seq_lens = lens, d.budgets = budgets, d.method = KVC_SCORE_STREAMING;
  cr_expect_eq(kvc_plan_create(ctx, &d, &plan), KVC_ERROR_INVALID_VALUE, "%s", kvc_last_error(ctx));
  cr_expect_null(plan);
  kvc_context_destroy(ctx);
}

/* The carver never wraps: a sum past SIZE_MAX saturates there and stays. */
Test(plan_sizes, carver_saturates) {
  kvc_carver_t ws = {NULL, 0};
  kvc_carve(&ws, SIZE_MAX - 300);
  cr_expect_eq(ws.used, SIZE_MAX - 300);
  kvc_carve(&ws, 300); /* SIZE_MAX - 300 rounds up to SIZE_MAX - 255, + 300 passes SIZE_MAX */
  cr_expect_eq(ws.used, SIZE_MAX);
  kvc_carve(&ws, 0);
  cr_expect_eq(ws.used, SIZE_MAX);
  kvc_carver_t top = {NULL, SIZE_MAX - 10};
  kvc_carve(&top, 0); /* rounding up alone passes SIZE_MAX */
  cr_expect_eq(top.used, SIZE_MAX);
  kvc_carver_t fine = {NULL, 0};
  kvc_carve(&fine, 1);
  kvc_carve(&fine, 1);
  cr_expect_eq(fine.used, 257);
}

/* TOVA, KNORM and STREAMING ignore `window`, so it is not validated for them: any int32 must
 * leave the plan's own bookkeeping of the window without overflow (INT32_MIN - 1 did). */
Test(plan_sizes, an_ignored_window_at_int32_extremes) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  const kvc_score_method_t methods[3] = {KVC_SCORE_TOVA, KVC_SCORE_KNORM, KVC_SCORE_STREAMING};
  const int32_t windows[3] = {INT32_MIN, -1, INT32_MAX};
  int32_t lens[2] = {20, 9}, budgets[2] = {5, 9}, indptr[3] = {0, 2, 3};
  kvc_span_t spans[3] = {{0, 10, KVC_SPAN_FAIR, 1.0f}, {10, 20, KVC_SPAN_FAIR, 1.0f}, {0, 9, KVC_SPAN_FAIR, 1.0f}};
  for (int m = 0; m < 3; ++m)
    for (int w = 0; w < 3; ++w)
      for (int local = 0; local < 2; ++local) {
        kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
        d.num_q_heads = 2, d.num_kv_heads = 1, d.head_dim = 8, d.dtype = KVC_DTYPE_F32;
        d.batch = 2, d.seq_lens = lens, d.budgets = budgets, d.span_indptr = indptr, d.spans = spans;
        d.method = methods[m], d.window = windows[w], d.span_local = local;
        kvc_plan_t plan = NULL;
        cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
        kvc_plan_info_t info;
        kvc_plan_get_info(plan, &info);
        /* TOVA: one query per domain (per sequence, or per FAIR span); the others none */
        cr_expect_eq(info.obs_total, methods[m] != KVC_SCORE_TOVA ? 0 : local ? 3 : 2);
        kvc_plan_destroy(plan);
      }
  kvc_context_destroy(ctx);
}
