/*
 * fuzz_pipeline.c - libFuzzer target: plan -> score -> select -> compact (kvc_compress) on the CPU
 * backend, on small random caches whose descriptor the input controls too: page tables with ids
 * out of range, pages shared between sequences, short or negative CSR lists; strides from the usual
 * NHD / HND layouts to int64 extremes (up to INT64_MAX, byte offsets that wrap past 2^64); K and V
 * in separate allocations, as halves or interleaved pages of one, or at an arbitrary (even
 * misaligned) offset inside one; int32 extremes in every integer field; NaN / inf data.
 *
 * The harness decides on its own whether the descriptor obeys the header's layout rules (128-bit
 * arithmetic for the extent, sorted row offsets for the K/V overlap). One that breaks them must be
 * rejected with nothing touched. After any call the kept indices are valid and no byte outside the
 * rows of the pages the plan owns has changed (no byte at all after a rejected call). Then
 * kvc_gather_queries with a packed q and a qo_indptr from the input: on success every observation
 * row is its packed row, on failure the output is untouched. Then, after a successful compress of a
 * byte-checked cache, kvc_compact_into with a destination table from the input (ids out of range,
 * short or negative CSR lists, pages named twice or that are source pages): the harness decides on
 * its own whether the table is safe; a safe one must succeed and write exactly the oracle's rows
 * into its pages, an unsafe one be refused, and no other byte (no source page) may change.
 *
 * What the library cannot check is kept honest here: the tables it reads are as long as their
 * indptr / max_pages say (extremes there are only the negative or zero ones it must reject), and
 * pools really span the extent their descriptor claims (sparse mappings for large ones).
 */
#define _DEFAULT_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "fuzz_input.h"
#include "kvcompress.h"

enum { MAX_BATCH = 3, MAX_PAGES = 24, MAX_SPANS = 8, MAX_LEN = 64, TABLE = MAX_BATCH * MAX_LEN, MAX_ROWS = 4096 };
#define SMALL_BYTES ((int64_t)4 << 20)  /* malloc'd up to this, byte-exact checks            */
#define MAX_MAP_BYTES ((int64_t)1 << 36) /* sparse mappings up to this; larger valid layouts are skipped */

/* A violated property: says which, with the descriptor and the library's last word, and stops. */
static void fail(kvc_context_t ctx, const kvc_paged_kv_t *c, const char *what) {
  fprintf(stderr,
          "fuzz_pipeline: %s\n  dtype %d heads %d head_dim %d page_size %d num_pages %d strides (%lld, %lld, %lld) "
          "v - k = %lld bytes, table %s\n  last error: %s\n",
          what, (int)c->dtype, c->num_kv_heads, c->head_dim, c->page_size, c->num_pages, (long long)c->stride_page,
          (long long)c->stride_token, (long long)c->stride_head, (long long)((char *)c->v - (char *)c->k),
          !c->page_table ? "none" : c->page_indptr ? "csr" : "dense", kvc_last_error(ctx));
  abort();
}
#define FAIL(ctx, what) fail(ctx, &c, what)

typedef struct {
  int64_t stride[3], count[3]; /* page, slot, head */
  int64_t dim, elem;
} layout_t;

/* 1 + the largest element offset, in 128 bits; 0 if a count or stride is below 1. */
static __int128 extent_of(const layout_t *l) {
  __int128 e = l->dim;
  for (int i = 0; i < 3; ++i) {
    if (l->count[i] < 1 || l->stride[i] < 1) return 0;
    e += (__int128)(l->count[i] - 1) * l->stride[i];
  }
  return e;
}

/* The header's stride rule: by increasing stride, each axis with more than one position steps at
 * least past what the finer ones span. */
static int nested(const layout_t *l) {
  int order[3] = {0, 1, 2};
  for (int i = 1; i < 3; ++i)
    for (int j = i; j > 0 && l->stride[order[j]] < l->stride[order[j - 1]]; --j) {
      int t = order[j];
      order[j] = order[j - 1], order[j - 1] = t;
    }
  __int128 span = l->dim;
  for (int i = 0; i < 3; ++i) {
    const int a = order[i];
    if (l->count[a] < 2) continue;
    if (l->stride[a] < span) return 0;
    span += (__int128)(l->count[a] - 1) * l->stride[a];
  }
  return 1;
}

static int compare_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Whether a K row meets a V row `dist` elements later (rows at the sorted offsets `rows`). */
static int kv_overlap(const int64_t *rows, int64_t n, int64_t dist, int64_t dim) {
  for (int64_t i = 0; i < n; ++i) {
    /* the first V row start b + dist > rows[i] - dim */
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      int64_t mid = (lo + hi) / 2;
      if (rows[mid] + dist > rows[i] - dim) hi = mid;
      else lo = mid + 1;
    }
    if (lo < n && rows[lo] + dist < rows[i] + dim) return 1;
  }
  return 0;
}

typedef struct {
  unsigned char *base; /* what was allocated (NULL: nothing) */
  int64_t bytes;
  int mapped;
} region_t;

static int region_alloc(region_t *r, int64_t bytes) {
  r->bytes = bytes + 64, r->mapped = r->bytes > SMALL_BYTES;
  if (r->mapped) {
    void *p = mmap(NULL, (size_t)r->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    r->base = p == MAP_FAILED ? NULL : p;
  } else {
    void *p = NULL;
    r->base = posix_memalign(&p, 64, (size_t)r->bytes) ? NULL : p;
    if (r->base) memset(r->base, 0xA5, (size_t)r->bytes);
  }
  return r->base != NULL;
}

static void region_free(region_t *r) {
  if (!r->base) return;
  if (r->mapped) munmap(r->base, (size_t)r->bytes);
  else free(r->base);
  r->base = NULL;
}

/* Page id i of sequence b, for a table the library accepted. */
static int32_t page_id(const kvc_paged_kv_t *c, int32_t b, int32_t i) {
  return !c->page_table ? b : c->page_indptr ? c->page_table[c->page_indptr[b] + i] : c->page_table[b * c->max_pages + i];
}

static int owned(const kvc_paged_kv_t *c, const int32_t *lens, int32_t batch, int64_t page) {
  for (int32_t b = 0; b < batch; ++b)
    for (int32_t i = 0; i < ((int64_t)lens[b] + c->page_size - 1) / c->page_size; ++i)
      if (page_id(c, b, i) == page) return 1;
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

/* Byte offset of row (page, slot of token t, head h) in a pool. */
static int64_t row_at(const kvc_paged_kv_t *c, int64_t page, int64_t t, int64_t h, int64_t elem) {
  return (page * c->stride_page + t % c->page_size * c->stride_token + h * c->stride_head) * elem;
}

/* kvc_compact_into after a successful kvc_compress of `c` (whose table is therefore sound) with the
 * keep layout it left; the pools lie in k_region (and v_region when separate), malloc'd. */
static void check_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_plan_desc_t *d, const kvc_paged_kv_t *c,
                       const int32_t *keep, region_t *k_region, region_t *v_region, fuzz_input_t *in, int64_t elem) {
  int32_t table[TABLE], indptr[MAX_BATCH + 1] = {0}, kept[MAX_BATCH], need[MAX_BATCH], most = 0;
  kvc_page_table_t dst = {table, fuzz_u8(in) % 2 ? indptr : NULL, MAX_LEN};
  kvc_plan_new_lengths(plan, kept);
  for (int32_t b = 0; b < d->batch; ++b) {
    need[b] = (int32_t)(((int64_t)kept[b] + c->page_size - 1) / c->page_size);
    most = need[b] > most ? need[b] : most;
  }
  for (int i = 0; i < TABLE; ++i) table[i] = (int32_t)(fuzz_u8(in) % (MAX_PAGES + 2)) - 1;
  /* rows too short for the longest list (the table must hold what max_pages claims) */
  if (fuzz_u8(in) % 8 == 7) dst.max_pages = (int32_t[]){INT32_MIN, -1, 0, most - 1}[fuzz_u8(in) % 4];
  for (int32_t b = 0; dst.page_indptr && b < d->batch; ++b)
    indptr[b + 1] = indptr[b] + (fuzz_u8(in) % 2 ? fuzz_u8(in) % (MAX_LEN / 2) : need[b]);
  unsigned char *used = calloc((size_t)c->num_pages + 1, 1); /* 1 source, 2 destination */
  for (int32_t b = 0; b < d->batch; ++b)
    for (int32_t i = 0; i < ((int64_t)d->seq_lens[b] + c->page_size - 1) / c->page_size; ++i)
      used[c->page_table ? page_id(c, b, i) : b] = 1;
  /* a zero byte (also past the input's end) picks the mostly sound table: the pages no sequence
   * reads, from an offset, in order */
  if (fuzz_u8(in) % 2 == 0) {
    int32_t next = fuzz_u8(in) % (c->num_pages + 1);
    for (int32_t b = 0; b < d->batch; ++b)
      for (int32_t i = 0; i < need[b] && (dst.page_indptr ? indptr[b] + i < indptr[b + 1] : i < MAX_LEN); ++i) {
        for (int32_t tries = 0; tries < c->num_pages && used[next % c->num_pages]; ++tries) ++next;
        (dst.page_indptr ? table + indptr[b] : table + b * MAX_LEN)[i] = next++ % c->num_pages;
      }
  }
  if (fuzz_u8(in) % 4 == 1) table[fuzz_u8(in) % TABLE] = (int32_t)(fuzz_u8(in) % (MAX_PAGES + 2)) - 1; /* a stray id */
  if (dst.page_indptr && fuzz_u8(in) % 8 == 7) indptr[fuzz_u8(in) % d->batch] = -1;

  /* the harness's verdict: ids in range, lists long enough, no page twice, no source page */
  int safe = dst.page_indptr || dst.max_pages >= most;
  for (int32_t b = 0; safe && b < d->batch; ++b) {
    if (dst.page_indptr && (indptr[b] < 0 || indptr[b + 1] - indptr[b] < need[b])) safe = 0;
    for (int32_t i = 0; safe && i < need[b]; ++i) {
      const int32_t page = dst.page_indptr ? table[indptr[b] + i] : table[b * dst.max_pages + i];
      if (page < 0 || page >= c->num_pages || used[page]) safe = 0;
      else used[page] = 2;
    }
  }
  free(used);

  region_t *regions[2] = {k_region, v_region->base ? v_region : NULL};
  unsigned char *before[2] = {NULL, NULL}, *want[2] = {NULL, NULL};
  for (int r = 0; r < 2 && regions[r]; ++r) {
    before[r] = malloc((size_t)regions[r]->bytes), want[r] = malloc((size_t)regions[r]->bytes);
    memcpy(before[r], regions[r]->base, (size_t)regions[r]->bytes);
    memcpy(want[r], regions[r]->base, (size_t)regions[r]->bytes);
  }
  /* the oracle: destination row j <- source row keep[j] (j when the sequence keeps all) */
  unsigned char *pools[2] = {c->k, c->v};
  const int64_t row_bytes = (int64_t)d->head_dim * elem;
  for (int32_t b = 0, row = 0; safe && b < d->batch; ++b) {
    const int32_t n = d->seq_lens[b], k = kept[b];
    const int32_t *dpages = dst.page_indptr ? table + indptr[b] : table + b * dst.max_pages;
    for (int32_t h = 0; h < d->num_kv_heads; ++h, row += k)
      for (int32_t j = 0; j < k; ++j) {
        const int32_t t = k < n ? keep[row + j] : j, from_page = c->page_table ? page_id(c, b, t / c->page_size) : b;
        for (int p = 0; p < 2; ++p) {
          const int r = p && regions[1] ? 1 : 0;
          const int64_t pool = (unsigned char *)pools[p] - regions[r]->base;
          memcpy(want[r] + pool + row_at(c, dpages[j / c->page_size], j, h, elem),
                 before[r] + pool + row_at(c, from_page, t, h, elem), (size_t)row_bytes);
        }
      }
  }
  size_t bytes = 0;
  kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes);
  void *ws = NULL;
  if (posix_memalign(&ws, 256, bytes + 1)) abort();
  const kvc_status_t status = kvc_compact_into(ctx, plan, c, &dst, keep, NULL, 0, ws, bytes, NULL);
  if (safe && status != KVC_SUCCESS) fail(ctx, c, "kvc_compact_into refused a safe destination table");
  if (!safe && status != KVC_ERROR_INVALID_VALUE) fail(ctx, c, "kvc_compact_into took an unsafe destination table");
  for (int r = 0; r < 2 && regions[r]; ++r) {
    if (memcmp(regions[r]->base, status == KVC_SUCCESS ? want[r] : before[r], (size_t)regions[r]->bytes))
      fail(ctx, c, status == KVC_SUCCESS ? "kvc_compact_into differs from the oracle (or wrote outside its pages)"
                                         : "a refused kvc_compact_into changed a byte");
    free(before[r]), free(want[r]);
  }
  free(ws);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_input_t in = {data, size, 0};
  static kvc_context_t ctx;
  if (!ctx && kvc_context_create(KVC_BACKEND_CPU, 0, &ctx) != KVC_SUCCESS) abort();

  /* ---- the plan: small and mostly valid, with int32 extremes now and then ---- */
  int32_t lens[MAX_BATCH], budgets[MAX_BATCH], span_indptr[MAX_BATCH + 1] = {0};
  kvc_span_t spans[MAX_SPANS];
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = 1 + fuzz_u8(&in) % 2;
  d.num_q_heads = d.num_kv_heads * (1 + fuzz_u8(&in) % 3);
  d.head_dim = 1 + fuzz_u8(&in) % 16;
  d.dtype = (kvc_dtype_t)(fuzz_u8(&in) % 4);
  d.batch = 1 + fuzz_u8(&in) % MAX_BATCH;
  d.method = (kvc_score_method_t)(fuzz_u8(&in) % 5);
  d.window = fuzz_i32_extreme(&in, 1 + fuzz_u8(&in) % 20);
  d.pool_kernel = 1 + 2 * (fuzz_u8(&in) % 3);
  d.pool = (kvc_pool_t)(fuzz_u8(&in) % 2);
  d.group_reduce = (kvc_reduce_t)(fuzz_u8(&in) % 2);
  d.span_local = fuzz_u8(&in) % 2;
  d.sink_tokens = fuzz_i32_extreme(&in, fuzz_u8(&in) % 5);
  d.recent_tokens = fuzz_i32_extreme(&in, fuzz_u8(&in) % 5);
  d.fairness = (float)(fuzz_u8(&in) % 5) / 4.0f;
  /* fp8 keys are scored with f32 / f16 / bf16 queries (from what was read: older inputs keep their
   * meaning) and a key scale */
  if (d.dtype == KVC_DTYPE_FP8_E4M3) d.query_dtype = (kvc_query_dtype_t)(1 + d.head_dim % 3), d.k_scale = 0.75f;
  int total = 0;
  for (int32_t b = 0; b < d.batch; ++b) {
    lens[b] = 1 + fuzz_u8(&in) % MAX_LEN; /* the caches below hold MAX_LEN tokens per sequence */
    budgets[b] = fuzz_i32_extreme(&in, 1 + fuzz_u8(&in) % MAX_LEN);
    for (int i = fuzz_u8(&in) % 4; i > 0 && total < MAX_SPANS; --i, ++total) {
      const int32_t start = fuzz_u8(&in) % lens[b];
      spans[total].start = fuzz_i32_extreme(&in, start);
      spans[total].end = fuzz_i32_extreme(&in, start + 1 + fuzz_u8(&in) % MAX_LEN);
      spans[total].kind = fuzz_u8(&in) % 2;
      spans[total].weight = 0.25f * (1 + fuzz_u8(&in) % 8);
    }
    span_indptr[b + 1] = total;
  }
  d.seq_lens = lens, d.budgets = budgets, d.span_indptr = span_indptr, d.spans = spans;
  kvc_plan_t plan;
  if (kvc_plan_create(ctx, &d, &plan) != KVC_SUCCESS) return 0;

  /* ---- the descriptor ---- */
  kvc_paged_kv_t c;
  memset(&c, 0, sizeof c);
  const int table_kind = fuzz_u8(&in) % 3; /* dense, CSR, none (page b = sequence b) */
  c.dtype = (kvc_dtype_t)fuzz_i32_extreme(&in, (int32_t)d.dtype);
  c.num_kv_heads = fuzz_i32_extreme(&in, d.num_kv_heads);
  c.head_dim = fuzz_i32_extreme(&in, d.head_dim);
  c.page_size = fuzz_i32_extreme(&in, table_kind == 2 ? MAX_LEN : 1 + fuzz_u8(&in) % 8);
  c.num_pages = fuzz_i32_extreme(&in, table_kind == 2 ? MAX_BATCH : 1 + fuzz_u8(&in) % MAX_PAGES);
  const int64_t ps = c.page_size > 0 ? c.page_size : 1, heads = d.num_kv_heads, dim = d.head_dim;
  const int hnd = fuzz_u8(&in) % 2, stride_mode = fuzz_u8(&in) % 4;
  c.stride_token = hnd ? dim : heads * dim;
  c.stride_head = hnd ? ps * dim : dim;
  c.stride_page = ps * heads * dim * (stride_mode == 1 ? 2 : 1); /* 1: room for interleaved V pages */
  if (stride_mode == 2) {                                          /* slack on every axis */
    c.stride_head += hnd ? (ps - 1) * (fuzz_u8(&in) % 3) : 0;
    c.stride_token += hnd ? fuzz_u8(&in) % 3 : (heads - 1) * (fuzz_u8(&in) % 3);
    c.stride_page += (int64_t)(fuzz_u8(&in) % 3) * ps * heads * dim;
  }
  if (stride_mode == 3) { /* any of them extreme */
    c.stride_page = fuzz_i64_extreme(&in, c.stride_page);
    c.stride_token = fuzz_i64_extreme(&in, c.stride_token);
    c.stride_head = fuzz_i64_extreme(&in, c.stride_head);
  }
  int32_t table[TABLE], indptr[MAX_BATCH + 1] = {0};
  if (table_kind != 2) {
    c.page_table = table;
    c.max_pages = MAX_LEN;
    if (fuzz_u8(&in) % 8 == 0) c.max_pages = (int32_t[]){INT32_MIN, -1, 0, 1}[fuzz_u8(&in) % 4];
    for (int i = 0; i < TABLE; ++i) table[i] = fuzz_i32_extreme(&in, (int32_t)(fuzz_u8(&in) % (MAX_PAGES + 2)) - 1);
    if (table_kind == 1) {
      c.page_indptr = indptr;
      for (int32_t b = 0; b < d.batch; ++b) indptr[b + 1] = indptr[b] + fuzz_u8(&in) % (MAX_LEN / 2);
      /* where a list starts only extremes the library must refuse; the end of the last any */
      const int32_t b = fuzz_u8(&in) % (d.batch + 1);
      if (fuzz_u8(&in) % 4 == 0)
        indptr[b] = b < d.batch ? (int32_t[]){INT32_MIN, INT32_MIN + 1, -1}[fuzz_u8(&in) % 3]
                                : fuzz_i32_extreme(&in, indptr[b]);
    }
  }

  /* ---- the harness's verdict on the layout, and memory for it ---- */
  layout_t l = {{c.stride_page, c.stride_token, c.stride_head}, {c.num_pages, c.page_size, heads}, dim, 1};
  const int dtype_ok = c.dtype == d.dtype && c.num_kv_heads == d.num_kv_heads && c.head_dim == d.head_dim;
  l.elem = d.dtype == KVC_DTYPE_F32 ? 4 : d.dtype == KVC_DTYPE_FP8_E4M3 ? 1 : 2;
  const __int128 extent128 = extent_of(&l);
  int valid = dtype_ok && extent128 > 0 && extent128 * l.elem <= INT64_MAX && nested(&l);
  const int64_t extent = valid ? (int64_t)extent128 : 0, extent_bytes = extent * l.elem;
  /* rows the harness fills and checks: pages and slots past what any sequence can use never move */
  const int64_t pages_seen = c.num_pages < MAX_PAGES + 2 ? c.num_pages : MAX_PAGES + 2;
  const int64_t slots_seen = c.page_size < MAX_LEN ? c.page_size : MAX_LEN;
  const int64_t rows = valid ? pages_seen * slots_seen * heads : 0, row_bytes = dim * l.elem;
  int placement = fuzz_u8(&in) % 4; /* separate, halves, interleaved, arbitrary */
  const int64_t all_rows = valid ? (int64_t)c.num_pages * slots_seen * heads : 0;
  if (placement && (!valid || extent_bytes > SMALL_BYTES / 4 || all_rows > MAX_ROWS || slots_seen < c.page_size))
    placement = 0; /* one allocation only where the harness can decide the overlap exactly */
  int64_t v_offset = 0; /* bytes from k to v inside one allocation */
  if (placement == 1) v_offset = extent_bytes + (int64_t)(fuzz_u8(&in) % 3) * l.elem;
  if (placement == 2) v_offset = ps * heads * dim * l.elem;
  if (placement == 3) {
    const int64_t pick = (int64_t)(int8_t)fuzz_u8(&in);
    const int64_t page = c.num_pages > 1 ? c.stride_page : extent; /* a single page's stride may be anything */
    v_offset = (fuzz_u8(&in) % 2 ? pick * page : pick) * l.elem + (fuzz_u8(&in) % 4 == 0 ? 1 : 0);
    if (v_offset > 2 * extent_bytes || v_offset < -2 * extent_bytes) v_offset %= 2 * extent_bytes + 1;
  }
  int64_t *offsets = NULL;
  if (placement && valid) {
    offsets = malloc(sizeof(int64_t) * (size_t)(all_rows + 1));
    int64_t n = 0;
    for (int64_t p = 0; p < c.num_pages; ++p)
      for (int64_t s = 0; s < c.page_size; ++s)
        for (int64_t h = 0; h < heads; ++h) offsets[n++] = p * c.stride_page + s * c.stride_token + h * c.stride_head;
    qsort(offsets, (size_t)n, sizeof(int64_t), compare_i64);
    valid = v_offset != 0 && v_offset % l.elem == 0 && !kv_overlap(offsets, n, v_offset / l.elem, dim);
  }
  free(offsets);

  region_t k_region = {0}, v_region = {0};
  const int64_t lead = v_offset < 0 ? (-v_offset + 63) / 64 * 64 : 0;
  if (valid && extent_bytes + lead + (v_offset > 0 ? v_offset : 0) > MAX_MAP_BYTES) {
    kvc_plan_destroy(plan); /* valid, but more than the harness can map */
    return 0;
  }
  int ok = placement ? region_alloc(&k_region, lead + extent_bytes + (v_offset > 0 ? v_offset : 0))
                     : region_alloc(&k_region, valid ? extent_bytes : 4096) && region_alloc(&v_region, valid ? extent_bytes : 4096);
  if (!ok) abort();
  c.k = k_region.base + lead;
  c.v = placement ? (unsigned char *)c.k + v_offset : v_region.base + (fuzz_u8(&in) % 16 == 0 ? 1 : 0);
  if (!placement && c.v != v_region.base && l.elem > 1) valid = 0; /* V not aligned to its elements */
  unsigned char *pools[2] = {c.k, c.v};

  /* rows: K from the input (any bits: NaN, inf), V its own pattern; kept copies for the checks */
  unsigned char *before = malloc((size_t)(2 * rows * row_bytes + 1));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = r / (slots_seen * heads), s = r / heads % slots_seen, h = r % heads;
    const int64_t at = (p * c.stride_page + s * c.stride_token + h * c.stride_head) * l.elem;
    for (int64_t i = 0; i < row_bytes; ++i) pools[0][at + i] = fuzz_u8(&in), pools[1][at + i] = (unsigned char)(r * 131 + i);
  }
  for (int64_t r = 0; r < rows; ++r) { /* after all of them: overlapping rows overwrite each other */
    const int64_t p = r / (slots_seen * heads), s = r / heads % slots_seen, h = r % heads;
    const int64_t at = (p * c.stride_page + s * c.stride_token + h * c.stride_head) * l.elem;
    memcpy(before + 2 * r * row_bytes, pools[0] + at, (size_t)row_bytes);
    memcpy(before + (2 * r + 1) * row_bytes, pools[1] + at, (size_t)row_bytes);
  }
  unsigned char *k_copy = NULL, *v_copy = NULL;
  if (!k_region.mapped) {
    k_copy = malloc((size_t)k_region.bytes), memcpy(k_copy, k_region.base, (size_t)k_region.bytes);
    if (v_region.base) v_copy = malloc((size_t)v_region.bytes), memcpy(v_copy, v_region.base, (size_t)v_region.bytes);
  }

  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
  void *ws = NULL;
  if (posix_memalign(&ws, 256, bytes + 1)) abort();
  const int query_elem = d.dtype == KVC_DTYPE_FP8_E4M3 ? (d.query_dtype == KVC_QUERY_DTYPE_F32 ? 4 : 2) : l.elem;
  size_t qbytes = (size_t)info.obs_total * (size_t)d.num_q_heads * (size_t)d.head_dim * (size_t)query_elem;
  uint8_t *queries = malloc(qbytes + 1);
  for (size_t i = 0; i < qbytes; ++i) queries[i] = fuzz_u8(&in);

  const kvc_status_t status = kvc_compress(ctx, plan, &c, queries, NULL, ws, bytes, NULL);
  if (!valid && status != KVC_ERROR_INVALID_VALUE) FAIL(ctx, "a layout breaking the rules got through");
  if (valid && status != KVC_SUCCESS && strstr(kvc_last_error(ctx), "overlap")) FAIL(ctx, "a sound layout was refused");
  if (status == KVC_SUCCESS) {
    const int32_t *keep = (const int32_t *)ws;
    int64_t row = 0;
    for (int32_t b = 0; b < d.batch; ++b) {
      int32_t n = lens[b], kk = budgets[b] < n ? budgets[b] : n;
      for (int32_t h = 0; h < d.num_kv_heads; ++h, row += kk)
        for (int32_t j = 0; j < kk; ++j)
          if (keep[row + j] < 0 || keep[row + j] >= n || (j > 0 && keep[row + j] <= keep[row + j - 1]))
            FAIL(ctx, "a keep row is not strictly ascending inside its sequence");
    }
  }
  /* rows of pages no sequence owns (all rows, after a rejected call) are unchanged */
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = r / (slots_seen * heads), s = r / heads % slots_seen, h = r % heads;
    if (status == KVC_SUCCESS && owned(&c, lens, d.batch, p)) continue;
    const int64_t at = (p * c.stride_page + s * c.stride_token + h * c.stride_head) * l.elem;
    if (memcmp(before + 2 * r * row_bytes, pools[0] + at, (size_t)row_bytes) ||
        memcmp(before + (2 * r + 1) * row_bytes, pools[1] + at, (size_t)row_bytes))
      FAIL(ctx, status == KVC_SUCCESS ? "a row of a page no sequence owns changed" : "a rejected call changed a row");
  }
  /* and, byte for byte, nothing outside the rows of owned pages (malloc'd regions) */
  if (k_copy) {
    for (int64_t r = 0; status == KVC_SUCCESS && r < rows; ++r) {
      const int64_t p = r / (slots_seen * heads), s = r / heads % slots_seen, h = r % heads;
      if (!owned(&c, lens, d.batch, p)) continue;
      const int64_t at = (p * c.stride_page + s * c.stride_token + h * c.stride_head) * l.elem;
      for (int pool = 0; pool < 2; ++pool) { /* owned rows may change: copy them over */
        region_t *reg = pool && !placement ? &v_region : &k_region;
        unsigned char *copy = pool && !placement ? v_copy : k_copy;
        memcpy(copy + (pools[pool] + at - reg->base), pools[pool] + at, (size_t)row_bytes);
      }
    }
    if (memcmp(k_copy, k_region.base, (size_t)k_region.bytes) ||
        (v_copy && memcmp(v_copy, v_region.base, (size_t)v_region.bytes)))
      FAIL(ctx, "a byte outside the rows of owned pages changed");
  }
  check_gather(ctx, plan, &d, &in, query_elem);
  if (status == KVC_SUCCESS && k_copy) check_into(ctx, plan, &d, &c, (const int32_t *)ws, &k_region, &v_region, &in, l.elem);
  free(k_copy), free(v_copy), free(before), free(ws), free(queries);
  region_free(&k_region), region_free(&v_region);
  kvc_plan_destroy(plan);
  return 0;
}
