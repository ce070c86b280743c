/*
 * test_offsets64.c - element offsets past 2^31: page ids times a large page stride, and a head
 * stride of 3 * 2^30 elements. The pools are sparse mappings (MAP_NORESERVE): only the few slots
 * the sequences own are ever touched, so this runs in a few MiB of real memory. A 32-bit offset
 * anywhere in the mapping code would read or write the wrong slot (or fault).
 */
#define _DEFAULT_SOURCE
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kvcompress.h"
#include "test_util.h"

enum { KV_HEADS = 2, HEAD_DIM = 64, PAGE = 16, LEN = 40, BUDGET = 17 };

typedef struct {
  kvc_paged_kv_t desc;
  size_t map_bytes;
  int32_t table[3];
} sparse_cache_t;

static float *element(const sparse_cache_t *c, void *pool, int32_t t, int32_t h) {
  int64_t page = c->table[t / PAGE];
  return (float *)pool + page * c->desc.stride_page + (int64_t)(t % PAGE) * c->desc.stride_token +
         (int64_t)h * c->desc.stride_head;
}

static void sparse_cache_init(sparse_cache_t *c, int64_t stride_page, int64_t stride_head, int32_t num_pages) {
  memset(c, 0, sizeof *c);
  c->table[0] = num_pages - 1, c->table[1] = num_pages / 2 - 1, c->table[2] = num_pages - 2;
  c->desc.dtype = KVC_DTYPE_F32;
  c->desc.num_kv_heads = KV_HEADS, c->desc.head_dim = HEAD_DIM, c->desc.page_size = PAGE;
  c->desc.num_pages = num_pages;
  c->desc.stride_page = stride_page, c->desc.stride_token = HEAD_DIM * 2, c->desc.stride_head = stride_head;
  c->desc.page_table = c->table, c->desc.max_pages = 3;
  int64_t last = (int64_t)(num_pages - 1) * stride_page + (PAGE - 1) * c->desc.stride_token + stride_head * (KV_HEADS - 1);
  c->map_bytes = (size_t)(last + HEAD_DIM) * sizeof(float);
  c->desc.k = mmap(NULL, c->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  c->desc.v = mmap(NULL, c->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  cr_assert_neq(c->desc.k, MAP_FAILED, "cannot map %zu bytes", c->map_bytes);
  cr_assert_neq(c->desc.v, MAP_FAILED, "cannot map %zu bytes", c->map_bytes);
  /* token t of head h: K has norm growing with a hash of (t, h); V holds its own identity */
  for (int32_t t = 0; t < LEN; ++t)
    for (int32_t h = 0; h < KV_HEADS; ++h)
      for (int32_t d = 0; d < HEAD_DIM; ++d) {
        element(c, c->desc.k, t, h)[d] = (float)(((t * 37 + h * 11) % LEN) + 1) / (d + 1);
        element(c, c->desc.v, t, h)[d] = (float)(t * 1000 + h * 100 + d);
      }
}

static void check_knorm_compaction(sparse_cache_t *c) {
  int32_t len = LEN, budget = BUDGET;
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = KV_HEADS, desc.num_kv_heads = KV_HEADS, desc.head_dim = HEAD_DIM, desc.dtype = KVC_DTYPE_F32;
  desc.batch = 1, desc.seq_lens = &len, desc.budgets = &budget, desc.method = KVC_SCORE_KNORM;
  kvc_context_t ctx;
  kvc_plan_t plan;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(ctx, &desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  /* the oracle: norms are ((t*37 + h*11) % LEN + 1) * ||1/(d+1)||, so KNORM keeps the BUDGET
   * tokens with the smallest hash value, per head */
  cr_assert_eq(kvc_compress(ctx, plan, &c->desc, NULL, NULL, ws, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  const int32_t *keep = (const int32_t *)ws;
  for (int32_t h = 0; h < KV_HEADS; ++h) {
    int32_t j = 0;
    for (int32_t t = 0; t < LEN; ++t) {
      if ((t * 37 + h * 11) % LEN >= BUDGET) continue;
      cr_assert_eq(keep[h * BUDGET + j], t, "head %d slot %d", h, j);
      for (int32_t d = 0; d < HEAD_DIM; ++d)
        cr_assert_eq(element(c, c->desc.v, j, h)[d], (float)(t * 1000 + h * 100 + d), "head %d slot %d dim %d", h, j, d);
      j++;
    }
    cr_assert_eq(j, BUDGET);
  }
  free(ws);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
  munmap(c->desc.k, c->map_bytes);
  munmap(c->desc.v, c->map_bytes);
}

Test(offsets64, page_ids_times_page_stride) {
  sparse_cache_t c; /* page 63 * 2^26 elements = 4.2e9 > 2^31 */
  sparse_cache_init(&c, (int64_t)1 << 26, HEAD_DIM, 64);
  cr_assert_gt((int64_t)c.table[0] * c.desc.stride_page, (int64_t)1 << 31);
  check_knorm_compaction(&c);
}

Test(offsets64, head_stride_past_2_31) {
  sparse_cache_t c; /* head 1 starts 3 * 2^30 elements in */
  sparse_cache_init(&c, (int64_t)PAGE * HEAD_DIM * 2, (int64_t)3 << 30, 4);
  check_knorm_compaction(&c);
}
