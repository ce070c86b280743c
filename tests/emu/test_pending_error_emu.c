/*
 * test_pending_error_emu.c - an error the caller's own earlier CUDA work left pending is reported as
 * the caller's, not as a failed launch of ours: on the CUDA backend (SIMT emulator) an execute call
 * finding one enqueues nothing, returns KVC_ERROR_CUDA with a detail saying so, and leaves the error
 * pending for the caller to read; with none pending the same call succeeds.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

/* tests/simt/subst/device_pending_emu.cpp: an emulated launch with a zero-sized block (what a
 * caller's failed launch leaves), and cudaGetLastError of the emulated runtime. */
int kvc_emu_leave_pending_error(void);
int kvc_emu_take_last_error(void);

Test(pending_error_emu, a_pending_error_is_the_callers) {
  enum { H = 2, D = 8, N = 40 };
  int32_t len = N, budget = 10;
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = H, d.num_kv_heads = H, d.head_dim = D, d.dtype = KVC_DTYPE_F32;
  d.batch = 1, d.seq_lens = &len, d.budgets = &budget, d.method = KVC_SCORE_KNORM;
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_test_cache_t *cache = kvc_test_cache_new(1, &len, H, D, KVC_DTYPE_F32, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 1, 7);
  kvc_test_cache_t *before = kvc_test_cache_clone(cache);
  float scores[H * N];
  for (int i = 0; i < H * N; ++i) scores[i] = -7.0f;
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
  void *ws = kvc_test_workspace_new(bytes);

  const int pending = kvc_emu_leave_pending_error();
  cr_assert_neq(pending, 0, "the hook left no error pending");
  cr_assert_eq(kvc_score(ctx, plan, &cache->desc, NULL, NULL, scores, 0, ws, bytes, NULL), KVC_ERROR_CUDA);
  cr_expect(strstr(kvc_last_error(ctx), "kvc_score: a CUDA error was already pending") != NULL, "%s",
            kvc_last_error(ctx));
  cr_expect(strstr(kvc_last_error(ctx), "not ours") != NULL, "%s", kvc_last_error(ctx));
  for (int i = 0; i < H * N; ++i) cr_assert_eq(scores[i], -7.0f, "kvc_score ran: scores[%d] = %g", i, scores[i]);
  /* kvc_compress stops at its first stage and touches no byte of the cache */
  cr_assert_eq(kvc_compress(ctx, plan, &cache->desc, NULL, NULL, ws, bytes, NULL), KVC_ERROR_CUDA);
  cr_expect(memcmp(cache->k, before->k, cache->pool_bytes) == 0 && memcmp(cache->v, before->v, cache->pool_bytes) == 0,
            "the cache changed");
  /* still pending, for the caller: reading it clears it */
  cr_expect_eq(kvc_emu_take_last_error(), pending);
  cr_expect_eq(kvc_emu_take_last_error(), 0);
  cr_assert_eq(kvc_score(ctx, plan, &cache->desc, NULL, NULL, scores, 0, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  cr_expect_neq(scores[0], -7.0f);
  cr_assert_eq(kvc_compress(ctx, plan, &cache->desc, NULL, NULL, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  free(ws);
  kvc_test_cache_free(cache);
  kvc_test_cache_free(before);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
