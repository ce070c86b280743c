/*
 * kv_fixture.h - one small paged cache for the tests of K and V sharing memory and of offsets that
 * wrap (tests/test_kv_overlap.c, tests/test_cache_bounds.c, tests/emu/test_cache_bounds_emu.c):
 * two sequences of 8 tokens on pages of 4 (sequence 0 on pages 2 and 0, sequence 1 on 3 and 1), 2 KV
 * heads of head_dim 8, f32, KNORM keeping 3 and 5 tokens. The pools may be anywhere: the descriptor
 * is built from two pointers and three strides.
 */
#ifndef KVC_KV_FIXTURE_H
#define KVC_KV_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
  KVC_FIX_HEADS = 2,
  KVC_FIX_DIM = 8,
  KVC_FIX_PAGE = 4,
  KVC_FIX_PAGES = 4,
  KVC_FIX_PAGE_ELEMS = KVC_FIX_PAGE * KVC_FIX_HEADS * KVC_FIX_DIM, /* one NHD page */
  KVC_FIX_KEEP_ELEMS = KVC_FIX_HEADS * (3 + 5)
};

/* The descriptor (its page table is static storage). */
kvc_paged_kv_t kvc_fix_cache(void *k, void *v, int64_t stride_page, int64_t stride_token, int64_t stride_head);
/* Row (page p, slot s, head h) of `pool` (c->k or c->v) through the fixture's own arithmetic. */
float *kvc_fix_row(const kvc_paged_kv_t *c, void *pool, int32_t p, int32_t s, int32_t h);
/* K rows get norms that differ per token, V rows their own identity 1000 p + 100 s + 10 h + d. */
void kvc_fix_fill(const kvc_paged_kv_t *c);
/* Whether V row (p, s, h) still holds its identity. */
int kvc_fix_v_in_place(const kvc_paged_kv_t *c, int32_t p, int32_t s, int32_t h);
/* kvc_compress with the fixture's plan on a fresh context of `backend`; keep_out (may be NULL)
 * gets the KVC_FIX_KEEP_ELEMS kept indices, detail (cap bytes) the context's last error. */
kvc_status_t kvc_fix_compress(kvc_backend_t backend, const kvc_paged_kv_t *c, int32_t *keep_out, char *detail,
                              size_t cap);
/* 0 if every row of both pools of a and b is equal, else 1 with the first difference in `where`. */
int kvc_fix_differ(const kvc_paged_kv_t *a, const kvc_paged_kv_t *b, char *where, size_t cap);
/* Fills `shared` (K and V in one allocation) and the same rows in two separate pools, compresses
 * the first on `backend` and the second on the CPU backend, and compares keep indices and every row
 * of both pools. 0 when they agree (and some row moved); else 1 with the reason in `why`. */
int kvc_fix_shared_differs(kvc_backend_t backend, const kvc_paged_kv_t *shared, char *why, size_t cap);

#ifdef __cplusplus
}
#endif

#endif /* KVC_KV_FIXTURE_H */
