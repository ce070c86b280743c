/*
 * test_cache_bounds.c - cache descriptors whose offset arithmetic would wrap, and page tables whose
 * values would overflow the validation's own arithmetic, on the CPU backend.
 *
 * The attack: with stride_page = 2^62 + 1 (f32) the byte offset of page 1 is 2^64 + 4, which wraps
 * to one element past page 0, so compacting sequence 1 would write into sequence 0's page. Such a
 * descriptor must be rejected (naming the field and value) before a byte moves, as must any whose
 * element or byte extent passes int64 or whose pools run past the end of the address space; one
 * just inside every bound must pass. Arbitrary CSR offsets (INT_MIN, INT_MAX) and page sizes up
 * to INT_MAX must be handled without signed overflow (the ASan+UBSan build aborts on any).
 */
#define _DEFAULT_SOURCE
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kv_fixture.h"
#include "kvcompress.h"
#include "test_util.h"

static kvc_context_t cpu_context(void) {
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  return ctx;
}

static kvc_plan_t make_plan(kvc_context_t ctx, int32_t heads, int32_t dim, int32_t batch, const int32_t *lens,
                            const int32_t *budgets, kvc_score_method_t method) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = heads, d.num_kv_heads = heads, d.head_dim = dim, d.dtype = KVC_DTYPE_F32;
  d.batch = batch, d.seq_lens = lens, d.budgets = budgets, d.method = method;
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  return plan;
}

/* A context and a STREAMING plan of one sequence of `len` tokens kept whole: calls on it validate
 * the descriptor and move nothing. */
typedef struct {
  kvc_context_t ctx;
  kvc_plan_t plan;
} probe_t;

static probe_t probe_new(int32_t heads, int32_t dim, int32_t len) {
  probe_t p;
  p.ctx = cpu_context();
  p.plan = make_plan(p.ctx, heads, dim, 1, &len, &len, KVC_SCORE_STREAMING);
  return p;
}

static void probe_free(probe_t *p) {
  kvc_plan_destroy(p->plan);
  kvc_context_destroy(p->ctx);
}

/* An f32 descriptor of one page of one slot and `heads` heads (tests then change what they probe). */
static kvc_paged_kv_t one_slot_cache(void *k, void *v, int32_t heads, int32_t dim) {
  kvc_paged_kv_t c;
  memset(&c, 0, sizeof c);
  c.k = k, c.v = v, c.dtype = KVC_DTYPE_F32, c.num_kv_heads = heads, c.head_dim = dim, c.page_size = 1;
  c.num_pages = 1, c.stride_page = (int64_t)heads * dim, c.stride_token = (int64_t)heads * dim, c.stride_head = dim;
  return c;
}

static kvc_status_t compress(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache) {
  size_t bytes = 0;
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = kvc_compress(ctx, plan, cache, NULL, NULL, ws, bytes, NULL);
  free(ws);
  return status;
}

/* kvc_score (STREAMING: reads no key) and kvc_compact of a plan that moves nothing, plus
 * kvc_compress: all three validate the descriptor; none may touch the pools here. */
static void expect_all(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache, kvc_status_t want,
                       const char *needle) {
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  float *scores = calloc((size_t)info.score_elems + 1, sizeof(float));
  int32_t *keep = calloc((size_t)info.keep_elems + 1, sizeof(int32_t));
  for (int64_t i = 0; i < info.keep_elems; ++i) keep[i] = (int32_t)i; /* one row: 0..k-1 */
  size_t bytes[3];
  kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes[0]);
  kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes[1]);
  void *ws0 = kvc_test_workspace_new(bytes[0]), *ws1 = kvc_test_workspace_new(bytes[1]);
  const char *names[] = {"kvc_score", "kvc_compact", "kvc_compress"};
  kvc_status_t got[3] = {kvc_score(ctx, plan, cache, NULL, NULL, scores, 0, ws0, bytes[0], NULL), KVC_SUCCESS,
                         KVC_SUCCESS};
  char detail[3][512];
  snprintf(detail[0], sizeof detail[0], "%s", kvc_last_error(ctx));
  got[1] = kvc_compact(ctx, plan, cache, keep, NULL, 0, ws1, bytes[1], NULL);
  snprintf(detail[1], sizeof detail[1], "%s", kvc_last_error(ctx));
  got[2] = compress(ctx, plan, cache);
  snprintf(detail[2], sizeof detail[2], "%s", kvc_last_error(ctx));
  for (int i = 0; i < 3; ++i) {
    cr_expect_eq(got[i], want, "%s: status %s, want %s (%s)", names[i], kvc_status_name(got[i]),
                 kvc_status_name(want), detail[i]);
    if (needle) cr_expect(strstr(detail[i], needle) != NULL, "%s: detail '%s' does not name '%s'", names[i], detail[i], needle);
  }
  free(scores), free(keep), free(ws0), free(ws1);
}

/* The attack on the fixture's cache (tests/support/kv_fixture.h): page p starts 4 p (2^62 + 1) bytes
 * in, i.e. 4 p bytes once wrapped, so every page would land inside page 0. */
Test(cache_bounds, page_stride_that_wraps_is_rejected_before_any_write) {
  enum { FLOATS = 4 * KVC_FIX_PAGE_ELEMS };
  float *k = calloc(FLOATS, sizeof(float)), *v = calloc(FLOATS, sizeof(float));
  for (int i = 0; i < FLOATS; ++i) k[i] = (float)(i % 7 + 1), v[i] = (float)(100 + i);
  float *k0 = malloc(FLOATS * sizeof(float)), *v0 = malloc(FLOATS * sizeof(float));
  memcpy(k0, k, FLOATS * sizeof(float)), memcpy(v0, v, FLOATS * sizeof(float));
  kvc_paged_kv_t c = kvc_fix_cache(k, v, ((int64_t)1 << 62) + 1, KVC_FIX_HEADS * KVC_FIX_DIM, KVC_FIX_DIM);
  char detail[512];
  cr_assert_eq(kvc_fix_compress(KVC_BACKEND_CPU, &c, NULL, detail, sizeof detail), KVC_ERROR_INVALID_VALUE, "%s", detail);
  cr_expect(strstr(detail, "stride_page is 4611686018427387905") != NULL, "%s", detail);
  cr_expect(memcmp(k, k0, FLOATS * sizeof(float)) == 0, "K changed by a rejected call");
  cr_expect(memcmp(v, v0, FLOATS * sizeof(float)) == 0, "V changed by a rejected call");
  free(k), free(v), free(k0), free(v0);
}

/* Element extents past INT64_MAX, one axis at a time; the detail names that field and value. */
Test(cache_bounds, element_extent_overflow_names_the_field) {
  probe_t probe = probe_new(2, 4, 1);
  kvc_context_t ctx = probe.ctx;
  kvc_plan_t plan = probe.plan;
  float *pool = calloc(64, sizeof(float));
  const kvc_paged_kv_t base = one_slot_cache(pool, pool + 32, 2, 4);
  kvc_paged_kv_t c = base;
  c.num_pages = 3, c.stride_page = INT64_MAX / 2 + 1; /* 2 * (2^62) passes int64 */
  expect_all(ctx, plan, &c, KVC_ERROR_INVALID_VALUE, "cache->stride_page is 4611686018427387904");
  c = base;
  c.page_size = 2, c.stride_token = INT64_MAX; /* INT64_MAX + head_dim */
  expect_all(ctx, plan, &c, KVC_ERROR_INVALID_VALUE, "cache->stride_token is 9223372036854775807");
  c = base;
  c.stride_head = INT64_MAX - 3; /* + head_dim 4 = INT64_MAX + 1 */
  expect_all(ctx, plan, &c, KVC_ERROR_INVALID_VALUE, "cache->stride_head is 9223372036854775804");
  c = base;
  c.stride_head = INT64_MAX - 4; /* the extent is exactly INT64_MAX elements, whose bytes do not fit */
  expect_all(ctx, plan, &c, KVC_ERROR_INVALID_VALUE, "cache->stride_head is 9223372036854775803");
  free(pool);
  probe_free(&probe);
}

/* f32, head_dim 1, two pages: the byte extent 4 * (1 + stride_page) fits int64 up to
 * stride_page = 2^61 - 2 and not one element more. V sits one element after K (interleaved rows),
 * so no row overlaps and the pools stay inside the address space. */
Test(cache_bounds, byte_extent_boundary) {
  probe_t p = probe_new(1, 1, 1);
  float *pool = calloc(8, sizeof(float));
  kvc_paged_kv_t c = one_slot_cache(pool, pool + 1, 1, 1);
  c.num_pages = 2, c.stride_page = ((int64_t)1 << 61) - 2;
  expect_all(p.ctx, p.plan, &c, KVC_SUCCESS, NULL);
  c.stride_page = ((int64_t)1 << 61) - 1;
  expect_all(p.ctx, p.plan, &c, KVC_ERROR_INVALID_VALUE, "cache->stride_page is 2305843009213693951");
  /* strides of single-position axes are never multiplied: INT64_MAX is fine there */
  c.num_pages = 1, c.stride_page = INT64_MAX, c.stride_token = INT64_MAX, c.stride_head = INT64_MAX;
  c.v = pool + 4;
  expect_all(p.ctx, p.plan, &c, KVC_SUCCESS, NULL);
  free(pool);
  probe_free(&p);
}

/* Pools whose extent would run past the top of the address space (the pointers are never used). */
Test(cache_bounds, pool_past_the_address_space_is_rejected) {
  probe_t p = probe_new(1, 8, 1);
  float *pool = calloc(16, sizeof(float));
  kvc_paged_kv_t c = one_slot_cache(pool, (void *)(UINTPTR_MAX - 15), 1, 8); /* v: 32 bytes needed, 16 left */
  expect_all(p.ctx, p.plan, &c, KVC_ERROR_INVALID_VALUE, "cache->v");
  c.v = pool + 8, c.k = (void *)(UINTPTR_MAX - 31); /* 32 bytes would end exactly past the top */
  expect_all(p.ctx, p.plan, &c, KVC_ERROR_INVALID_VALUE, "address space");
  free(pool);
  probe_free(&p);
}

/* CSR offsets at the int32 extremes: the difference indptr[b+1] - indptr[b] overflows int32. */
Test(cache_bounds, csr_offsets_at_int32_extremes_are_rejected) {
  int32_t table[4] = {0, 0, 0, 0};
  const int32_t indptrs[][2] = {{INT32_MIN, 1}, {-1, INT32_MAX}, {INT32_MIN, INT32_MAX}, {0, INT32_MIN},
                                {INT32_MAX, INT32_MIN}, {2, 1}};
  probe_t p = probe_new(1, 4, 3);
  float *k = calloc(64, sizeof(float)), *v = calloc(64, sizeof(float));
  for (size_t i = 0; i < sizeof indptrs / sizeof indptrs[0]; ++i) {
    int32_t indptr[2] = {indptrs[i][0], indptrs[i][1]};
    kvc_paged_kv_t c = one_slot_cache(k, v, 1, 4);
    c.page_size = 4, c.stride_page = 16, c.page_table = table, c.page_indptr = indptr;
    expect_all(p.ctx, p.plan, &c, KVC_ERROR_INVALID_VALUE, "page_indptr");
  }
  free(k), free(v);
  probe_free(&p);
}

/* page_size INT32_MAX: tokens + page_size - 1 overflows int32 where pages per sequence are counted.
 * Dense and CSR tables, one page each; nothing moves (budget = length), so the sparse mapping of
 * 2 x 8 GiB is never touched. */
Test(cache_bounds, page_size_int32_max_counts_pages_without_overflow) {
  int32_t lens[2] = {5, 2}, budgets[2] = {5, 2}, table[2] = {0, 1}, indptr[3] = {0, 1, 2};
  kvc_context_t ctx = cpu_context();
  kvc_plan_t plan = make_plan(ctx, 1, 1, 2, lens, budgets, KVC_SCORE_STREAMING);
  /* extent: head_dim 1 + (page_size - 1) * stride_token + (num_pages - 1) * stride_page */
  const int64_t extent = 1 + ((int64_t)INT32_MAX - 1) + (int64_t)INT32_MAX;
  const size_t map = (size_t)(2 * extent) * sizeof(float);
  float *pools = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  cr_assert_neq(pools, MAP_FAILED);
  for (int csr = 0; csr < 2; ++csr) {
    kvc_paged_kv_t c;
    memset(&c, 0, sizeof c);
    c.k = pools, c.v = pools + extent, c.dtype = KVC_DTYPE_F32, c.num_kv_heads = 1, c.head_dim = 1;
    c.page_size = INT32_MAX, c.num_pages = 2, c.stride_page = INT32_MAX, c.stride_token = 1, c.stride_head = 1;
    c.page_table = table, c.max_pages = 1;
    if (csr) c.page_indptr = indptr;
    expect_all(ctx, plan, &c, KVC_SUCCESS, NULL);
    c.max_pages = 0; /* a dense table with no room: still counted right */
    if (!csr) expect_all(ctx, plan, &c, KVC_ERROR_INVALID_VALUE, "max_pages is 0");
  }
  munmap(pools, map);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
