/*
 * test_plan_upload.c - the graph-reuse calls on the CPU backend: kvc_plan_compatible against the
 * table of events in plan_events.c (what a captured graph freezes and what it does not), the CPU
 * semantics of kvc_plan_device_bytes / kvc_plan_upload (no device memory: 0 bytes, upload does
 * nothing, a CALLER plan runs as an OWNED one), and bad arguments.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "kvcompress.h"
#include "plan_events.h"
#include "test_util.h"

static kvc_context_t cpu_context(void) {
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  return ctx;
}

static kvc_plan_t event_plan(kvc_context_t ctx, int which, kvc_plan_memory_t memory) {
  kvc_test_event_t e;
  kvc_test_event(&e, which, KVC_DTYPE_F32, memory);
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &e.desc, &plan), KVC_SUCCESS, "event %d: %s", which, kvc_last_error(ctx));
  return plan;
}

Test(plan_upload, compatible_follows_what_a_graph_freezes) {
  kvc_context_t ctx = cpu_context();
  kvc_plan_t base = event_plan(ctx, 0, KVC_PLAN_MEMORY_OWNED);
  for (int which = 0; which < KVC_TEST_EVENTS; ++which) {
    kvc_plan_t other = event_plan(ctx, which, which % 2 ? KVC_PLAN_MEMORY_CALLER : KVC_PLAN_MEMORY_OWNED);
    int ab = -1, ba = -1;
    cr_assert_eq(kvc_plan_compatible(base, other, &ab), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_compatible(other, base, &ba), KVC_SUCCESS);
    cr_expect_eq(ab, kvc_test_event_replays(which), "event %d (%s): compatible %d", which, kvc_test_event_name(which), ab);
    cr_expect_eq(ba, ab, "event %d: not symmetric", which);
    kvc_plan_destroy(other);
  }
  kvc_plan_destroy(base);
  kvc_context_destroy(ctx);
}

/* CPU: no device memory. A CALLER plan needs no upload and gives the OWNED plan's result. */
Test(plan_upload, cpu_has_no_device_copy) {
  kvc_context_t ctx = cpu_context();
  kvc_plan_t owned = event_plan(ctx, 1, KVC_PLAN_MEMORY_OWNED), caller = event_plan(ctx, 1, KVC_PLAN_MEMORY_CALLER);
  size_t bytes = 1, image_bytes = 0;
  const void *image = NULL;
  cr_assert_eq(kvc_plan_device_bytes(caller, &bytes), KVC_SUCCESS);
  cr_expect_eq(bytes, 0);
  cr_assert_eq(kvc_plan_host_image(caller, &image, &image_bytes), KVC_SUCCESS);
  cr_expect(image != NULL && image_bytes > 0);
  cr_expect_eq((uintptr_t)image % 4096, 0, "the image is page-aligned, so it can be page-locked alone");
  cr_expect_eq(kvc_plan_upload(ctx, caller, NULL, 0, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));

  kvc_test_event_t e;
  kvc_test_event(&e, 1, KVC_DTYPE_F32, KVC_PLAN_MEMORY_OWNED);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(owned, &info), KVC_SUCCESS);
  kvc_test_cache_t *before = kvc_test_cache_new(KVC_TEST_EVENT_BATCH, e.seq_lens, KVC_TEST_EVENT_HEADS,
                                                KVC_TEST_EVENT_DIM, KVC_DTYPE_F32, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 2, 5);
  kvc_test_cache_t *a = kvc_test_cache_clone(before), *b = kvc_test_cache_clone(before);
  void *queries = kvc_test_queries_new(info.obs_total, 4 * KVC_TEST_EVENT_HEADS, KVC_TEST_EVENT_DIM, KVC_DTYPE_F32, 6);
  size_t ws_bytes;
  cr_assert_eq(kvc_plan_workspace_size(owned, KVC_OP_COMPRESS, &ws_bytes), KVC_SUCCESS);
  void *ws_a = kvc_test_workspace_new(ws_bytes), *ws_b = kvc_test_workspace_new(ws_bytes);
  cr_assert_eq(kvc_compress(ctx, owned, &a->desc, queries, NULL, ws_a, ws_bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_compress(ctx, caller, &b->desc, queries, NULL, ws_b, ws_bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  cr_expect_eq(memcmp(ws_a, ws_b, sizeof(int32_t) * (size_t)info.keep_elems), 0, "keep layouts differ");
  cr_expect_eq(kvc_test_first_difference(a->k, b->k, before->pool_bytes), -1);
  cr_expect_eq(kvc_test_first_difference(a->v, b->v, before->pool_bytes), -1);
  cr_expect_neq(kvc_test_first_difference(a->k, before->k, before->pool_bytes), -1, "nothing was compressed");
  free(ws_a), free(ws_b), free(queries);
  kvc_test_cache_free(before), kvc_test_cache_free(a), kvc_test_cache_free(b);
  kvc_plan_destroy(owned), kvc_plan_destroy(caller);
  kvc_context_destroy(ctx);
}

Test(plan_upload, bad_arguments) {
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan = event_plan(ctx, 0, KVC_PLAN_MEMORY_CALLER);
  size_t bytes;
  const void *image;
  int compatible;
  cr_expect_eq(kvc_plan_device_bytes(NULL, &bytes), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_device_bytes(plan, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_host_image(NULL, &image, &bytes), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_host_image(plan, NULL, &bytes), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_host_image(plan, &image, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_compatible(NULL, plan, &compatible), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_compatible(plan, NULL, &compatible), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_compatible(plan, plan, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_upload(NULL, plan, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_upload(ctx, NULL, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(ctx), "plan is NULL"), "%s", kvc_last_error(ctx));

  kvc_test_event_t e;
  kvc_test_event(&e, 0, KVC_DTYPE_F32, (kvc_plan_memory_t)2);
  kvc_plan_t bad = NULL;
  cr_expect_eq(kvc_plan_create(ctx, &e.desc, &bad), KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(ctx), "device_memory is 2"), "%s", kvc_last_error(ctx));
  cr_expect_null(bad);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
