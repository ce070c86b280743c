/*
 * test_csr_extremes_emu.c - CSR offsets at the int32 extremes on the CUDA backend (SIMT emulator).
 * The CUDA backend cannot read the table on the host, so its kernels must handle indptr values
 * like INT32_MIN and INT32_MAX without signed overflow (the ASan+UBSan build aborts on any): the
 * sequence whose list they make invalid is left untouched, the other compacts exactly as the CPU
 * backend compacts it with a valid table. The cache is tests/support/kv_fixture.h's, with its
 * pages listed as CSR: sequence 0 on pages 2, 0 and sequence 1 on pages 3, 1.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kv_fixture.h"
#include "kvcompress.h"

enum { PAGE_ELEMS = KVC_FIX_PAGE_ELEMS, POOL_ELEMS = KVC_FIX_PAGES * KVC_FIX_PAGE_ELEMS, TOKEN = KVC_FIX_HEADS * KVC_FIX_DIM };

Test(csr_extremes_emu, invalid_lists_leave_their_sequence_untouched) {
  static const int32_t pages[4] = {2, 0, 3, 1};
  const struct {
    int32_t indptr[3];
    int bad; /* the sequence whose list is invalid */
  } cases[] = {{{INT32_MIN, 2, 4}, 0}, {{-1, 2, 4}, 0}, {{0, 2, INT32_MIN}, 1}, {{0, INT32_MAX, 4}, 1},
               {{0, 2, 3}, 1}};
  float *k = calloc(POOL_ELEMS, sizeof(float)), *v = calloc(POOL_ELEMS, sizeof(float));
  float *ref_k = calloc(POOL_ELEMS, sizeof(float)), *ref_v = calloc(POOL_ELEMS, sizeof(float));
  /* the CPU backend on the valid table: what every valid sequence must become */
  int32_t good_indptr[3] = {0, 2, 4};
  kvc_paged_kv_t ref = kvc_fix_cache(ref_k, ref_v, PAGE_ELEMS, TOKEN, KVC_FIX_DIM);
  ref.page_table = pages, ref.page_indptr = good_indptr;
  kvc_fix_fill(&ref);
  char detail[512];
  cr_assert_eq(kvc_fix_compress(KVC_BACKEND_CPU, &ref, NULL, detail, sizeof detail), KVC_SUCCESS, "%s", detail);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    int32_t indptr[3];
    memcpy(indptr, cases[i].indptr, sizeof indptr);
    kvc_paged_kv_t c = kvc_fix_cache(k, v, PAGE_ELEMS, TOKEN, KVC_FIX_DIM);
    c.page_table = pages, c.page_indptr = indptr;
    kvc_fix_fill(&c);
    cr_assert_eq(kvc_fix_compress(KVC_BACKEND_CUDA, &c, NULL, detail, sizeof detail), KVC_SUCCESS, "case %zu: %s", i,
                 detail);
    for (int32_t b = 0; b < 2; ++b)
      for (int32_t p = 0; p < 2; ++p)
        for (int32_t s = 0; s < KVC_FIX_PAGE; ++s)
          for (int32_t h = 0; h < KVC_FIX_HEADS; ++h) {
            const int32_t page = pages[2 * b + p];
            if (b == cases[i].bad) {
              cr_assert(kvc_fix_v_in_place(&c, page, s, h), "case %zu: sequence %d (invalid list) moved", i, b);
            } else {
              cr_assert_arr_eq(kvc_fix_row(&c, c.k, page, s, h), kvc_fix_row(&ref, ref.k, page, s, h),
                               sizeof(float) * KVC_FIX_DIM, "case %zu: K of sequence %d page %d", i, b, page);
              cr_assert_arr_eq(kvc_fix_row(&c, c.v, page, s, h), kvc_fix_row(&ref, ref.v, page, s, h),
                               sizeof(float) * KVC_FIX_DIM, "case %zu: V of sequence %d page %d", i, b, page);
            }
          }
  }
  free(k), free(v), free(ref_k), free(ref_v);
}
