/*
 * test_cache_bounds_emu.c - the layout rules on the CUDA backend (kernels run by the SIMT emulator):
 * a page stride whose byte offsets wrap and K/V pools whose rows overlap are rejected before any
 * kernel runs, with the pools unchanged; vLLM halves and FlashInfer interleaved pages compress
 * exactly like the CPU backend on the same rows in two separate pools. The cache is the fixture of
 * tests/support/kv_fixture.h (device memory is host memory under the emulator).
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kv_fixture.h"
#include "kvcompress.h"

enum { PAGE_ELEMS = KVC_FIX_PAGE_ELEMS, POOL_ELEMS = KVC_FIX_PAGES * KVC_FIX_PAGE_ELEMS, TOKEN = KVC_FIX_HEADS * KVC_FIX_DIM };

/* One allocation of `elems` floats holding K at 0 and V `v_bytes` later, page stride given. */
static void expect_rejected(int64_t elems, int64_t stride_page, int64_t v_bytes, const char *needle) {
  float *pool = calloc((size_t)elems, sizeof(float)), *before = malloc(sizeof(float) * (size_t)elems);
  for (int64_t i = 0; i < elems; ++i) pool[i] = (float)(i % 17 + 1);
  memcpy(before, pool, sizeof(float) * (size_t)elems);
  kvc_paged_kv_t c = kvc_fix_cache(pool, (char *)pool + v_bytes, stride_page, TOKEN, KVC_FIX_DIM);
  char detail[512];
  cr_assert_eq(kvc_fix_compress(KVC_BACKEND_CUDA, &c, NULL, detail, sizeof detail), KVC_ERROR_INVALID_VALUE,
               "stride_page %lld, v = k + %lld bytes: %s", (long long)stride_page, (long long)v_bytes, detail);
  cr_expect(strstr(detail, needle) != NULL, "'%s' does not name '%s'", detail, needle);
  cr_expect(memcmp(pool, before, sizeof(float) * (size_t)elems) == 0, "a rejected call changed the pools");
  free(pool), free(before);
}

Test(cache_bounds_emu, wrapping_page_stride_is_rejected) {
  /* V well past K's real rows; the wrapped offsets would land every page inside page 0 */
  expect_rejected(8 * PAGE_ELEMS, ((int64_t)1 << 62) + 1, 4 * 4 * PAGE_ELEMS, "stride_page is 4611686018427387905");
}

Test(cache_bounds_emu, overlapping_k_and_v_are_rejected) {
  expect_rejected(POOL_ELEMS + PAGE_ELEMS, PAGE_ELEMS, 4 * PAGE_ELEMS, "overlap"); /* v = k + one page */
  expect_rejected(POOL_ELEMS + 3, PAGE_ELEMS, 3 * 4, "overlap");                  /* v = k + 3 elements */
}

/* The CUDA backend on `shared` against the CPU backend on the same rows in two pools. */
static void expect_like_cpu_on_separate_pools(const kvc_paged_kv_t *shared) {
  char why[512];
  cr_assert(!kvc_fix_shared_differs(KVC_BACKEND_CUDA, shared, why, sizeof why), "%s", why);
}

Test(cache_bounds_emu, shared_allocations_compress_like_separate_pools) {
  float *kv = calloc(2 * POOL_ELEMS, sizeof(float));
  kvc_paged_kv_t halves = kvc_fix_cache(kv, kv + POOL_ELEMS, PAGE_ELEMS, TOKEN, KVC_FIX_DIM); /* vLLM (2, blocks, ...) */
  expect_like_cpu_on_separate_pools(&halves);
  memset(kv, 0, sizeof(float) * 2 * POOL_ELEMS);
  kvc_paged_kv_t nhd = kvc_fix_cache(kv, kv + PAGE_ELEMS, 2 * PAGE_ELEMS, TOKEN, KVC_FIX_DIM); /* (pages, 2, ps, H, D) */
  expect_like_cpu_on_separate_pools(&nhd);
  memset(kv, 0, sizeof(float) * 2 * POOL_ELEMS);
  kvc_paged_kv_t hnd = kvc_fix_cache(kv, kv + PAGE_ELEMS, 2 * PAGE_ELEMS, KVC_FIX_DIM, KVC_FIX_PAGE * KVC_FIX_DIM);
  expect_like_cpu_on_separate_pools(&hnd); /* (pages, 2, H, ps, D) */
  free(kv);
}
