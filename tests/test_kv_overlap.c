/*
 * test_kv_overlap.c - K and V pools that share memory, on the CPU backend.
 *
 * The rule (kvcompress.h, kvc_paged_kv_t): no byte of any K row (page, slot, head) may be a byte of
 * any V row. vLLM's (2, blocks, ...) halves and FlashInfer's (pages, 2, ...) interleaved pages
 * must pass and compress exactly like separate pools; v = k + one page or a few elements must be
 * rejected before anything moves, and so must a v not aligned to its elements. The library decides without enumerating rows; here a brute
 * force over every (K row, V row) pair of thousands of small random layouts is the oracle.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kv_fixture.h"
#include "kvcompress.h"
#include "test_util.h"

typedef struct {
  int64_t stride[3], count[3]; /* page, slot, head */
  int32_t head_dim, elem;
} layout_t;

static int64_t row_offset(const layout_t *l, int64_t p, int64_t s, int64_t h) {
  return p * l->stride[0] + s * l->stride[1] + h * l->stride[2];
}

static int64_t extent_elems(const layout_t *l) {
  int64_t e = l->head_dim;
  for (int i = 0; i < 3; ++i) e += (l->count[i] - 1) * l->stride[i];
  return e;
}

/* The oracle: some K row's bytes meet some V row's bytes, V starting `dist` bytes after K. */
static int brute_overlap(const layout_t *l, int64_t dist) {
  const int64_t row = (int64_t)l->head_dim * l->elem;
  for (int64_t p = 0; p < l->count[0]; ++p)
    for (int64_t s = 0; s < l->count[1]; ++s)
      for (int64_t h = 0; h < l->count[2]; ++h) {
        const int64_t k0 = row_offset(l, p, s, h) * l->elem;
        for (int64_t q = 0; q < l->count[0]; ++q)
          for (int64_t t = 0; t < l->count[1]; ++t)
            for (int64_t g = 0; g < l->count[2]; ++g) {
              const int64_t v0 = dist + row_offset(l, q, t, g) * l->elem;
              if (k0 < v0 + row && v0 < k0 + row) return 1;
            }
      }
  return 0;
}

/* A layout that passes the documented stride rule: axes nested in a random order, each with more
 * than one position stepping at least past what the finer ones span (tight, or with slack, or
 * doubled to leave room for interleaved V rows); single-position axes get arbitrary strides. */
static layout_t random_layout(kvc_rng_t *rng) {
  static const int32_t elems[3] = {4, 2, 1};
  layout_t l;
  l.head_dim = kvc_rng_range(rng, 1, 4);
  l.elem = elems[kvc_rng_range(rng, 0, 2)];
  l.count[0] = kvc_rng_range(rng, 1, 4), l.count[1] = kvc_rng_range(rng, 1, 4), l.count[2] = kvc_rng_range(rng, 1, 3);
  int order[3] = {0, 1, 2};
  for (int i = 2; i > 0; --i) {
    int j = kvc_rng_range(rng, 0, i), t = order[i];
    order[i] = order[j], order[j] = t;
  }
  int64_t span = l.head_dim;
  for (int i = 0; i < 3; ++i) {
    const int axis = order[i];
    if (l.count[axis] == 1) {
      l.stride[axis] = kvc_rng_range(rng, 1, 9);
      continue;
    }
    switch (kvc_rng_range(rng, 0, 3)) {
      case 0: l.stride[axis] = span; break;
      case 1: l.stride[axis] = 2 * span; break;
      default: l.stride[axis] = span + kvc_rng_range(rng, 1, 5); break;
    }
    span += (l.count[axis] - 1) * l.stride[axis];
  }
  return l;
}

static kvc_dtype_t dtype_of(int32_t elem) {
  return elem == 4 ? KVC_DTYPE_F32 : elem == 2 ? KVC_DTYPE_F16 : KVC_DTYPE_FP8_E4M3;
}

/* A STREAMING plan of one token kept whole: the call validates the descriptor and moves nothing. */
static kvc_plan_t still_plan(kvc_context_t ctx, int32_t heads, int32_t dim, kvc_dtype_t dtype) {
  static int32_t one = 1;
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = heads, d.num_kv_heads = heads, d.head_dim = dim, d.dtype = dtype;
  d.batch = 1, d.seq_lens = &one, d.budgets = &one, d.method = KVC_SCORE_STREAMING;
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  return plan;
}

Test(kv_overlap, matches_brute_force_on_random_layouts) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  kvc_plan_t plans[4][5][3] = {{{0}}}; /* [heads][head_dim][dtype] */
  kvc_rng_t rng = {20260501};
  int32_t keep = 0;
  const size_t ws_bytes = 4096; /* the CPU page check's scratch: 4 bytes per token */
  void *ws = kvc_test_workspace_new(ws_bytes);
  int cases = 0, overlapping = 0, near_misses = 0;
  for (; cases < 20000; ++cases) {
    const layout_t l = random_layout(&rng);
    const int64_t extent = extent_elems(&l) * l.elem;
    int64_t dist;
    if (kvc_rng_range(&rng, 0, 1)) {
      /* near a difference of two row offsets: the cases an extent comparison gets wrong */
      int64_t a = row_offset(&l, kvc_rng_range(&rng, 0, (int32_t)l.count[0] - 1), kvc_rng_range(&rng, 0, (int32_t)l.count[1] - 1),
                             kvc_rng_range(&rng, 0, (int32_t)l.count[2] - 1));
      int64_t b = row_offset(&l, kvc_rng_range(&rng, 0, (int32_t)l.count[0] - 1), kvc_rng_range(&rng, 0, (int32_t)l.count[1] - 1),
                             kvc_rng_range(&rng, 0, (int32_t)l.count[2] - 1));
      dist = (a - b) * l.elem + kvc_rng_range(&rng, -(l.head_dim + 1) * l.elem, (l.head_dim + 1) * l.elem);
    } else {
      dist = kvc_rng_range(&rng, -(int32_t)extent - 2 * l.elem, (int32_t)extent + 2 * l.elem);
    }
    const int32_t heads = (int32_t)l.count[2], dim = l.head_dim, kind = l.elem == 4 ? 0 : l.elem == 2 ? 1 : 2;
    if (!plans[heads][dim][kind]) plans[heads][dim][kind] = still_plan(ctx, heads, dim, dtype_of(l.elem));
    const int64_t lead = dist < 0 ? -dist : 0;
    unsigned char *memory = calloc((size_t)(2 * extent + (dist < 0 ? -dist : dist) + 64), 1);
    kvc_paged_kv_t c;
    memset(&c, 0, sizeof c);
    c.k = memory + 16 + lead, c.v = memory + 16 + lead + dist;
    c.dtype = dtype_of(l.elem), c.num_kv_heads = heads, c.head_dim = dim;
    c.num_pages = (int32_t)l.count[0], c.page_size = (int32_t)l.count[1];
    c.stride_page = l.stride[0], c.stride_token = l.stride[1], c.stride_head = l.stride[2];
    const int misaligned = dist % l.elem != 0, want = misaligned || brute_overlap(&l, dist);
    kvc_status_t got = kvc_compact(ctx, plans[heads][dim][kind], &c, &keep, NULL, 0, ws, ws_bytes, NULL);
    cr_assert_eq(got, want ? KVC_ERROR_INVALID_VALUE : KVC_SUCCESS,
                 "case %d: strides (page %lld, token %lld, head %lld) counts (%lld, %lld, %lld) head_dim %d, %d-byte "
                 "elements, v = k %+lld bytes: oracle says %s, library %s (%s)", cases, (long long)l.stride[0],
                 (long long)l.stride[1], (long long)l.stride[2], (long long)l.count[0], (long long)l.count[1],
                 (long long)l.count[2], dim, l.elem, (long long)dist, want ? "overlap" : "disjoint",
                 kvc_status_name(got), kvc_last_error(ctx));
    if (want) {
      const char *detail = kvc_last_error(ctx);
      cr_assert(strstr(detail, misaligned ? "aligned" : dist ? "overlap" : "same pool"), "case %d: %s", cases, detail);
    }
    overlapping += want && !misaligned;
    near_misses += !want && (dist > -extent && dist < extent);
    free(memory);
  }
  /* both answers, and disjoint pools inside each other's extent, are well represented */
  cr_assert_gt(overlapping, cases / 10, "%d of %d overlap", overlapping, cases);
  cr_assert_gt(cases - overlapping, cases / 10, "%d of %d overlap", overlapping, cases);
  cr_assert_gt(near_misses, cases / 50, "%d interleaved disjoint layouts", near_misses);
  for (int h = 0; h < 4; ++h)
    for (int d = 0; d < 5; ++d)
      for (int t = 0; t < 3; ++t) kvc_plan_destroy(plans[h][d][t]);
  free(ws);
  kvc_context_destroy(ctx);
}

/* ---- real compression: tests/support/kv_fixture.h -------------------------------------------- */

enum { PAGE_ELEMS = KVC_FIX_PAGE_ELEMS, POOL_ELEMS = KVC_FIX_PAGES * KVC_FIX_PAGE_ELEMS };

/* K at the start of one allocation of `elems` floats, V `v_bytes` bytes later, NHD strides: the
 * call must fail, naming the overlap, with every byte of the allocation unchanged. */
static void expect_rejected(int64_t elems, int64_t v_bytes, const char *needle) {
  float *pool = calloc((size_t)elems, sizeof(float)), *before = malloc(sizeof(float) * (size_t)elems);
  for (int64_t i = 0; i < elems; ++i) pool[i] = (float)(i % 17 + 1);
  memcpy(before, pool, sizeof(float) * (size_t)elems);
  kvc_paged_kv_t c = kvc_fix_cache(pool, (char *)pool + v_bytes, PAGE_ELEMS, KVC_FIX_HEADS * KVC_FIX_DIM, KVC_FIX_DIM);
  char detail[512];
  cr_assert_eq(kvc_fix_compress(KVC_BACKEND_CPU, &c, NULL, detail, sizeof detail), KVC_ERROR_INVALID_VALUE,
               "v = k + %lld bytes: %s", (long long)v_bytes, detail);
  cr_expect(strstr(detail, needle) != NULL, "'%s' does not name '%s'", detail, needle);
  cr_expect(memcmp(pool, before, sizeof(float) * (size_t)elems) == 0, "a rejected call changed the pools");
  free(pool), free(before);
}

Test(kv_overlap, v_one_page_after_k_is_rejected) {
  expect_rejected(POOL_ELEMS + PAGE_ELEMS, 4 * PAGE_ELEMS, "overlap");
}

Test(kv_overlap, v_a_few_elements_after_k_is_rejected) {
  expect_rejected(POOL_ELEMS + 3, 3 * 4, "overlap");
  /* not a whole number of elements away: V is not aligned to its elements */
  expect_rejected(POOL_ELEMS + KVC_FIX_DIM + 1, KVC_FIX_DIM * 4 + 2, "cache->v");
}

Test(kv_overlap, v_before_k_is_rejected_too) {
  float *pool = calloc(POOL_ELEMS + 2 * PAGE_ELEMS, sizeof(float));
  kvc_paged_kv_t c = kvc_fix_cache(pool + 2 * PAGE_ELEMS, pool + PAGE_ELEMS / 2, PAGE_ELEMS, KVC_FIX_HEADS * KVC_FIX_DIM,
                                   KVC_FIX_DIM);
  char detail[512];
  cr_assert_eq(kvc_fix_compress(KVC_BACKEND_CPU, &c, NULL, detail, sizeof detail), KVC_ERROR_INVALID_VALUE, "%s", detail);
  free(pool);
}

/* `shared` (K and V in one allocation) compresses exactly like the same rows in two pools. */
static void expect_same_as_separate(const kvc_paged_kv_t *shared) {
  char why[512];
  cr_assert(!kvc_fix_shared_differs(KVC_BACKEND_CPU, shared, why, sizeof why), "%s", why);
}

Test(kv_overlap, vllm_halves_compress_like_separate_pools) {
  float *kv = calloc(2 * POOL_ELEMS, sizeof(float)); /* (2, blocks, block_size, heads, head_dim) */
  kvc_paged_kv_t c = kvc_fix_cache(kv, kv + POOL_ELEMS, PAGE_ELEMS, KVC_FIX_HEADS * KVC_FIX_DIM, KVC_FIX_DIM);
  expect_same_as_separate(&c);
  free(kv);
}

Test(kv_overlap, flashinfer_interleaved_pages_compress_like_separate_pools) {
  float *kv = calloc(2 * POOL_ELEMS, sizeof(float));
  /* (pages, 2, page_size, heads, head_dim), then (pages, 2, heads, page_size, head_dim) */
  kvc_paged_kv_t nhd = kvc_fix_cache(kv, kv + PAGE_ELEMS, 2 * PAGE_ELEMS, KVC_FIX_HEADS * KVC_FIX_DIM, KVC_FIX_DIM);
  expect_same_as_separate(&nhd);
  kvc_paged_kv_t hnd = kvc_fix_cache(kv, kv + PAGE_ELEMS, 2 * PAGE_ELEMS, KVC_FIX_DIM, KVC_FIX_PAGE * KVC_FIX_DIM);
  expect_same_as_separate(&hnd);
  free(kv);
}
