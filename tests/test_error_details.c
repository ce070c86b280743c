/*
 * test_error_details.c - the reasons a caller gets back: a failed context creation explains itself
 * through kvc_context_create_with_detail (there is no context to hold it, and no global state),
 * and rejected float values are printed with enough digits to show why (1.0000001 is not "1").
 */
#include <criterion/criterion.h>
#include <string.h>

#include "kvcompress.h"

static void expect_detail(kvc_status_t got, kvc_status_t want, const char *detail, const char *needle) {
  cr_expect_eq(got, want, "status %s, want %s (%s)", kvc_status_name(got), kvc_status_name(want), detail);
  cr_expect(strstr(detail, needle) != NULL, "detail '%s' does not contain '%s'", detail, needle);
}

Test(error_details, failed_context_creation_says_why) {
  char detail[256];
  kvc_context_t ctx = (kvc_context_t)1;
  expect_detail(kvc_context_create_with_detail((kvc_backend_t)7, 0, &ctx, detail, sizeof detail),
                KVC_ERROR_INVALID_VALUE, detail, "backend is 7");
  cr_expect_null(ctx);
  expect_detail(kvc_context_create_with_detail(KVC_BACKEND_CPU, -3, &ctx, detail, sizeof detail),
                KVC_ERROR_INVALID_VALUE, detail, "device is -3");
  expect_detail(kvc_context_create_with_detail(KVC_BACKEND_CPU, 0, NULL, detail, sizeof detail),
                KVC_ERROR_INVALID_VALUE, detail, "out is NULL");
  /* CUDA: this binary links the library with the emulated device (one device) or without CUDA */
  kvc_status_t status = kvc_context_create_with_detail(KVC_BACKEND_CUDA, 0, &ctx, detail, sizeof detail);
  if (status == KVC_SUCCESS) {
    cr_expect_str_eq(detail, "");
    kvc_context_destroy(ctx);
    expect_detail(kvc_context_create_with_detail(KVC_BACKEND_CUDA, 5, &ctx, detail, sizeof detail),
                  KVC_ERROR_INVALID_VALUE, detail, "device 5: there are 1 devices");
  } else {
    expect_detail(status, KVC_ERROR_NO_DEVICE, detail, "no usable device");
  }
  cr_expect_null(ctx);
  /* a short buffer gets a truncated, terminated sentence; a NULL one is allowed */
  char tiny[8];
  memset(tiny, 'x', sizeof tiny);
  cr_expect_eq(kvc_context_create_with_detail((kvc_backend_t)7, 0, &ctx, tiny, sizeof tiny), KVC_ERROR_INVALID_VALUE);
  cr_expect_str_eq(tiny, "kvc_con");
  cr_expect_eq(kvc_context_create_with_detail((kvc_backend_t)7, 0, &ctx, NULL, 0), KVC_ERROR_INVALID_VALUE);
  /* success clears the buffer */
  memset(detail, 'x', sizeof detail);
  cr_assert_eq(kvc_context_create_with_detail(KVC_BACKEND_CPU, 0, &ctx, detail, sizeof detail), KVC_SUCCESS);
  cr_expect_str_eq(detail, "");
  kvc_context_destroy(ctx);
  cr_expect(strstr(kvc_last_error(NULL), "kvc_context_create_with_detail") != NULL, "%s", kvc_last_error(NULL));
}

static kvc_status_t plan_with(kvc_context_t ctx, float fairness, float scale, float weight) {
  int32_t len = 16, budget = 8, indptr[2] = {0, 1};
  kvc_span_t span = {0, 8, KVC_SPAN_FAIR, weight};
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 1, d.num_kv_heads = 1, d.head_dim = 8, d.dtype = KVC_DTYPE_F32;
  d.batch = 1, d.seq_lens = &len, d.budgets = &budget, d.span_indptr = indptr, d.spans = &span;
  d.method = KVC_SCORE_KNORM, d.fairness = fairness, d.scale = scale;
  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, &d, &plan);
  kvc_plan_destroy(plan);
  return status;
}

/* %.9g shows every float exactly enough to round-trip: 1.0000001f is 1.00000012 */
Test(error_details, rejected_floats_show_their_value) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  cr_assert_eq(plan_with(ctx, 1.0f, 0.0f, 1.0f), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  expect_detail(plan_with(ctx, 1.0000001f, 0.0f, 1.0f), KVC_ERROR_INVALID_VALUE, kvc_last_error(ctx),
                "fairness is 1.00000012");
  expect_detail(plan_with(ctx, -1e-7f, 0.0f, 1.0f), KVC_ERROR_INVALID_VALUE, kvc_last_error(ctx),
                "fairness is -1.00000001e-07");
  expect_detail(plan_with(ctx, 0.5f, -1.0000001f, 1.0f), KVC_ERROR_INVALID_VALUE, kvc_last_error(ctx),
                "scale is -1.00000012");
  expect_detail(plan_with(ctx, 0.5f, 0.0f, -0.99999994f), KVC_ERROR_INVALID_VALUE, kvc_last_error(ctx),
                "weight is -0.99999994");
  kvc_context_destroy(ctx);
}

/* span_local scores each FAIR span with its own queries: SNAPKV and H2O need a window of at least
 * one query per FAIR span, and the detail says so with the numbers. */
Test(error_details, span_local_window_below_the_fair_spans) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  int32_t len = 30, budget = 20, indptr[2] = {0, 3};
  kvc_span_t spans[3] = {{0, 10, KVC_SPAN_FAIR, 1.0f}, {10, 20, KVC_SPAN_FAIR, 1.0f}, {20, 30, KVC_SPAN_FAIR, 1.0f}};
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 1, d.num_kv_heads = 1, d.head_dim = 8, d.dtype = KVC_DTYPE_F32;
  d.batch = 1, d.seq_lens = &len, d.budgets = &budget, d.span_indptr = indptr, d.spans = spans;
  d.span_local = 1, d.window = 2, d.pool_kernel = 1;
  kvc_plan_t plan = NULL;
  const kvc_score_method_t methods[2] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O};
  for (int m = 0; m < 2; ++m) {
    d.method = methods[m], d.window = 2;
    expect_detail(kvc_plan_create(ctx, &d, &plan), KVC_ERROR_INVALID_VALUE, kvc_last_error(ctx),
                  "window is 2 but sequence 0 has 3 FAIR spans");
    d.window = 3;
    cr_expect_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
    kvc_plan_destroy(plan);
  }
  kvc_context_destroy(ctx);
}
