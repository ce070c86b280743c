/*
 * fuzz_pipeline.c - libFuzzer target: plan -> score -> select -> compact on the CPU backend with
 * small random caches and page tables (ids out of range, pages shared between sequences, short
 * CSR lists, NaN/inf data). After each run: kept indices are valid (exactly k per row, ascending,
 * in range), pages the plan does not own are byte-identical, and a rejected compaction touched
 * nothing. Then kvc_gather_queries with a packed q and a qo_indptr from the input: on success
 * every observation row is its packed row, on failure the output is untouched.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz_input.h"
#include "kvcompress.h"

enum { MAX_BATCH = 3, MAX_PAGES = 24, MAX_SPANS = 8, MAX_LEN = 64 };

static int owned(const kvc_paged_kv_t *c, const int32_t *lens, int32_t batch, int32_t page) {
  for (int32_t b = 0; b < batch; ++b) {
    int32_t need = (lens[b] + c->page_size - 1) / c->page_size;
    for (int32_t i = 0; i < need; ++i) {
      int32_t id = !c->page_table ? b : c->page_indptr ? c->page_table[c->page_indptr[b] + i]
                                                     : c->page_table[b * c->max_pages + i];
      if (id == page) return 1;
    }
  }
  return 0;
}

/* kvc_gather_queries with packed rows and qo_indptr entries from the input (read last, so that
 * older inputs still drive the pipeline above the same way). */
static void check_gather(kvc_context_t ctx, kvc_plan_t plan, const kvc_plan_desc_t *d, fuzz_input_t *in, int elem) {
  enum { MAX_TOKENS = 3 * MAX_LEN };
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  const int64_t row = (int64_t)d->num_q_heads * d->head_dim, stride = row + fuzz_u8(in) % 3;
  const int64_t tokens = fuzz_u8(in) % (MAX_TOKENS + 1);
  int32_t qo[MAX_BATCH + 1], indptr[MAX_BATCH + 1], positions[MAX_BATCH * MAX_LEN];
  for (int32_t b = 0; b <= d->batch; ++b) qo[b] = (int32_t)(fuzz_u8(in) % (MAX_TOKENS + 8)) - 4;
  const size_t packed_bytes = (size_t)(tokens * stride) * (size_t)elem, out_bytes = (size_t)(info.obs_total * row) * (size_t)elem;
  uint8_t *packed = malloc(packed_bytes + 1), *out = malloc(out_bytes + 1);
  for (size_t i = 0; i < packed_bytes; ++i) packed[i] = (uint8_t)(i * 7u + 1u);
  memset(out, 0xEE, out_bytes + 1);
  kvc_status_t status = kvc_gather_queries(ctx, plan, packed, tokens, stride, qo, out, NULL);
  kvc_plan_obs_positions(plan, indptr, positions);
  for (int32_t b = 0; b < d->batch && info.obs_total > 0; ++b)
    for (int32_t r = indptr[b]; r < indptr[b + 1]; ++r) {
      const int64_t first = d->seq_lens[b] - (qo[b + 1] - qo[b]), token = qo[b] + positions[r] - first;
      const uint8_t *want = status == KVC_SUCCESS ? packed + (size_t)(token * stride) * (size_t)elem : NULL;
      for (size_t e = 0; e < (size_t)row * (size_t)elem; ++e)
        if (out[(size_t)r * (size_t)row * (size_t)elem + e] != (want ? want[e] : 0xEE)) abort();
    }
  if (out[out_bytes] != 0xEE) abort(); /* wrote past the last observation row */
  free(packed), free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_input_t in = {data, size, 0};
  static kvc_context_t ctx;
  if (!ctx && kvc_context_create(KVC_BACKEND_CPU, 0, &ctx) != KVC_SUCCESS) abort();

  int32_t lens[MAX_BATCH], budgets[MAX_BATCH], span_indptr[MAX_BATCH + 1] = {0};
  kvc_span_t spans[MAX_SPANS];
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = 1 + fuzz_u8(&in) % 2;
  d.num_q_heads = d.num_kv_heads * (1 + fuzz_u8(&in) % 3);
  d.head_dim = 1 + fuzz_u8(&in) % 16;
  d.dtype = (kvc_dtype_t)(fuzz_u8(&in) % 4);
  d.batch = 1 + fuzz_u8(&in) % MAX_BATCH;
  d.method = (kvc_score_method_t)(fuzz_u8(&in) % 5);
  d.window = 1 + fuzz_u8(&in) % 20;
  d.pool_kernel = 1 + 2 * (fuzz_u8(&in) % 3);
  d.pool = (kvc_pool_t)(fuzz_u8(&in) % 2);
  d.group_reduce = (kvc_reduce_t)(fuzz_u8(&in) % 2);
  d.span_local = fuzz_u8(&in) % 2;
  d.sink_tokens = fuzz_u8(&in) % 5;
  d.recent_tokens = fuzz_u8(&in) % 5;
  d.fairness = (float)(fuzz_u8(&in) % 5) / 4.0f;
  int total = 0;
  for (int32_t b = 0; b < d.batch; ++b) {
    lens[b] = 1 + fuzz_u8(&in) % MAX_LEN;
    budgets[b] = 1 + fuzz_u8(&in) % MAX_LEN;
    for (int i = fuzz_u8(&in) % 4; i > 0 && total < MAX_SPANS; --i, ++total) {
      spans[total].start = fuzz_u8(&in) % lens[b];
      spans[total].end = spans[total].start + 1 + fuzz_u8(&in) % (lens[b] - spans[total].start);
      spans[total].kind = fuzz_u8(&in) % 2;
      spans[total].weight = 0.25f * (1 + fuzz_u8(&in) % 8);
    }
    span_indptr[b + 1] = total;
  }
  d.seq_lens = lens, d.budgets = budgets, d.span_indptr = span_indptr, d.spans = spans;
  kvc_plan_t plan;
  if (kvc_plan_create(ctx, &d, &plan) != KVC_SUCCESS) return 0;

  /* the cache: NHD or HND pages, a dense, CSR or NULL table whose ids come from the input */
  int elem = d.dtype == KVC_DTYPE_F32 ? 4 : d.dtype == KVC_DTYPE_FP8_E4M3 ? 1 : 2;
  kvc_paged_kv_t c;
  memset(&c, 0, sizeof c);
  int table_kind = fuzz_u8(&in) % 3;
  c.dtype = d.dtype, c.num_kv_heads = d.num_kv_heads, c.head_dim = d.head_dim;
  c.page_size = table_kind == 2 ? MAX_LEN : 1 + fuzz_u8(&in) % 8;
  c.num_pages = table_kind == 2 ? MAX_BATCH : 1 + fuzz_u8(&in) % MAX_PAGES;
  int hnd = fuzz_u8(&in) % 2;
  c.stride_page = (int64_t)c.page_size * c.num_kv_heads * c.head_dim;
  c.stride_token = hnd ? c.head_dim : (int64_t)c.num_kv_heads * c.head_dim;
  c.stride_head = hnd ? (int64_t)c.page_size * c.head_dim : c.head_dim;
  size_t pool_bytes = (size_t)c.num_pages * (size_t)c.stride_page * (size_t)elem;
  uint8_t *k = malloc(pool_bytes), *v = malloc(pool_bytes), *k0 = malloc(pool_bytes), *v0 = malloc(pool_bytes);
  for (size_t i = 0; i < pool_bytes; ++i) k[i] = fuzz_u8(&in), v[i] = (uint8_t)(i * 131u);
  memcpy(k0, k, pool_bytes);
  memcpy(v0, v, pool_bytes);
  c.k = k, c.v = v;
  int32_t table[MAX_BATCH * MAX_LEN], indptr[MAX_BATCH + 1] = {0};
  if (table_kind != 2) {
    c.page_table = table;
    c.max_pages = MAX_LEN;
    for (int i = 0; i < MAX_BATCH * MAX_LEN; ++i) table[i] = (int32_t)(fuzz_u8(&in) % (MAX_PAGES + 2)) - 1;
    if (table_kind == 1) {
      c.page_indptr = indptr;
      for (int32_t b = 0; b < d.batch; ++b) indptr[b + 1] = indptr[b] + fuzz_u8(&in) % (MAX_LEN / 2);
    }
  }

  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
  void *ws = NULL;
  if (posix_memalign(&ws, 256, bytes + 1)) abort();
  size_t qbytes = (size_t)info.obs_total * (size_t)d.num_q_heads * (size_t)d.head_dim * (size_t)elem;
  uint8_t *queries = malloc(qbytes + 1);
  for (size_t i = 0; i < qbytes; ++i) queries[i] = fuzz_u8(&in);

  kvc_status_t status = kvc_compress(ctx, plan, &c, queries, NULL, ws, bytes, NULL);
  if (status == KVC_SUCCESS) {
    const int32_t *keep = (const int32_t *)ws;
    int64_t row = 0;
    for (int32_t b = 0; b < d.batch; ++b) {
      int32_t n = lens[b], kk = budgets[b] < n ? budgets[b] : n;
      for (int32_t h = 0; h < d.num_kv_heads; ++h, row += kk)
        for (int32_t j = 0; j < kk; ++j)
          if (keep[row + j] < 0 || keep[row + j] >= n || (j > 0 && keep[row + j] <= keep[row + j - 1])) abort();
    }
    size_t page_bytes = (size_t)c.stride_page * (size_t)elem;
    for (int32_t p = 0; p < c.num_pages; ++p)
      if (!owned(&c, lens, d.batch, p) &&
          (memcmp(k + p * page_bytes, k0 + p * page_bytes, page_bytes) || memcmp(v + p * page_bytes, v0 + p * page_bytes, page_bytes)))
        abort(); /* a page no sequence owns was written */
  } else if (memcmp(k, k0, pool_bytes) || memcmp(v, v0, pool_bytes)) {
    abort(); /* a rejected call must not have touched the cache */
  }
  free(ws), free(queries), free(k), free(v), free(k0), free(v0);
  check_gather(ctx, plan, &d, &in, elem);
  kvc_plan_destroy(plan);
  return 0;
}
