/*
 * test_compact_into_emu.c - out-of-place compaction (kvc_compact_into, kvc_compact_layers_into,
 * kvc_compress_into) on the CUDA backend (kernels/compact.cu in the SIMT emulator) and on the CPU
 * backend, against two oracles: the destination rows gathered from an untouched copy through
 * test_util's own address arithmetic (tests/support/compact_into.c), compared byte for byte over the
 * whole K and V pools, and the in-place oracle's result read through the destination table.
 *
 * The canaries are the whole pools: every source page (the cache before, never written), every
 * other sequence's pages, the unused pool pages and the tails of the last destination pages (the
 * sentinel 0xCD) must be unchanged; destination lists are padded with other sequences' pages, so
 * a read past a list's first ceil(k / page_size) entries writes where it shows. The run with
 * SIMT_SEED / SIMT_INTERLEAVE shuffles blocks, which matters for the extras (still in place).
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact_into.h"
#include "compact_oracle.h"
#include "kvcompress.h"
#include "layer_util.h"
#include "test_util.h"

#define MAX_BATCH 8

typedef struct {
  kvc_test_layout_t layout;
  kvc_test_table_t source, dst; /* source any, destination KVC_TEST_DENSE or KVC_TEST_CSR */
  kvc_dtype_t dtype;
  int32_t page_size;
} into_combo_t;

typedef struct {
  into_combo_t combo;
  int32_t head_dim, heads, batch;
  int32_t seq_lens[MAX_BATCH], budgets[MAX_BATCH];
  int32_t num_extras;
  uint64_t seed;
} into_case_t;

/* One case: both backends' contexts and plans (0 CPU, 1 CUDA), the cache before, its destination
 * table, keep and extras. */
typedef struct {
  const into_case_t *c;
  kvc_context_t ctx[2];
  kvc_plan_t plan[2];
  kvc_plan_info_t info;
  kvc_test_cache_t *before;
  kvc_test_dst_t *dst;
  int32_t *keep;
  float **extras;
} into_run_t;

static const char *backend_name(int backend) { return backend ? "CUDA (emulated)" : "CPU"; }

/* Appends `extra` pages owned by no sequence (holding the sentinel) to c's pools. */
static void add_pages(kvc_test_cache_t *c, int32_t extra) {
  const size_t page_bytes = c->pool_bytes / (size_t)c->desc.num_pages, bytes = c->pool_bytes + (size_t)extra * page_bytes;
  c->k = realloc(c->k, bytes);
  c->v = realloc(c->v, bytes);
  memset(c->k + c->pool_bytes, 0xCD, bytes - c->pool_bytes);
  memset(c->v + c->pool_bytes, 0xCD, bytes - c->pool_bytes);
  c->owner = realloc(c->owner, sizeof(int32_t) * (size_t)(c->desc.num_pages + extra));
  for (int32_t p = c->desc.num_pages; p < c->desc.num_pages + extra; ++p) c->owner[p] = -1;
  c->desc.num_pages += extra;
  c->pool_bytes = bytes;
  c->desc.k = c->k;
  c->desc.v = c->v;
}

static void setup(const into_case_t *c, into_run_t *r) {
  memset(r, 0, sizeof *r);
  r->c = c;
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = d.num_kv_heads = c->heads;
  d.head_dim = c->head_dim;
  d.dtype = c->combo.dtype;
  d.batch = c->batch;
  d.seq_lens = c->seq_lens;
  d.budgets = c->budgets;
  d.method = KVC_SCORE_STREAMING; /* the one method every dtype (fp8 too) allows */
  for (int backend = 0; backend < 2; ++backend) {
    cr_assert_eq(kvc_context_create(backend ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, 0, &r->ctx[backend]), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_create(r->ctx[backend], &d, &r->plan[backend]), KVC_SUCCESS, "%s",
                 kvc_last_error(r->ctx[backend]));
  }
  cr_assert_eq(kvc_plan_get_info(r->plan[0], &r->info), KVC_SUCCESS);
  /* 3 pool pages more than the destinations take: they stay unused, holding the sentinel */
  int32_t page_size = c->combo.page_size;
  for (int32_t b = 0; c->combo.source == KVC_TEST_CONTIG && b < c->batch; ++b)
    page_size = c->seq_lens[b] > page_size ? c->seq_lens[b] : page_size; /* one page per sequence */
  const int32_t guards = kvc_test_dst_pages(c->batch, c->seq_lens, c->budgets, page_size) + 3;
  r->before = kvc_test_cache_new(c->batch, c->seq_lens, c->heads, c->head_dim, c->combo.dtype, page_size,
                                 c->combo.layout, c->combo.source, guards, c->seed);
  if (c->combo.source == KVC_TEST_CONTIG) add_pages(r->before, guards); /* it makes none of its own */
  r->dst = kvc_test_dst_new(r->before, c->budgets, c->combo.dst, c->seed + 3);
  int64_t keep_elems = 0;
  r->keep = kvc_test_keep_new(c->batch, c->seq_lens, c->budgets, c->heads, (int32_t)(c->seed % KVC_KEEP_PATTERNS),
                              c->seed + 1, &keep_elems);
  cr_assert_eq(keep_elems, r->info.keep_elems);
  r->extras = kvc_test_extras_new(c->num_extras, r->info.score_elems, c->seed + 2);
}

static void teardown(into_run_t *r) {
  for (int backend = 0; backend < 2; ++backend) {
    kvc_plan_destroy(r->plan[backend]);
    kvc_context_destroy(r->ctx[backend]);
  }
  kvc_test_cache_free(r->before);
  kvc_test_dst_free(r->dst);
  free(r->keep);
  kvc_test_extras_free(r->extras, r->c->num_extras);
}

/* kvc_compact_into on a fresh workspace (filled with garbage); flags gets the status array. */
static kvc_status_t compact_into(const into_run_t *r, int backend, const kvc_paged_kv_t *cache,
                                 const kvc_page_table_t *dst, float **extras, int32_t *flags) {
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(r->plan[backend], KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  memset(ws, 0x5A, bytes);
  kvc_status_t status = kvc_compact_into(r->ctx[backend], r->plan[backend], cache, dst, r->keep, extras,
                                         r->c->num_extras, ws, bytes, NULL);
  if (status == KVC_SUCCESS) memcpy(flags, (char *)ws + r->info.compact_status_offset_bytes, sizeof(int32_t) * (size_t)r->c->batch);
  free(ws);
  return status;
}

static void assert_same_bytes(const void *got, const void *want, size_t bytes, const char *what, const char *who,
                              const kvc_test_cache_t *layout) {
  char why[192];
  if (kvc_test_describe_difference(got, want, bytes, layout, why, sizeof why)) cr_assert(0, "%s: %s %s", who, what, why);
}

static void assert_pools(const kvc_test_cache_t *got, const kvc_test_cache_t *want, const char *who) {
  assert_same_bytes(got->k, want->k, want->pool_bytes, "K pool", who, want);
  assert_same_bytes(got->v, want->v, want->pool_bytes, "V pool", who, want);
}

static void assert_extras(float *const *got, float *const *want, int32_t count, int64_t elems, const char *who) {
  for (int32_t e = 0; e < count; ++e)
    assert_same_bytes(got[e], want[e], sizeof(float) * (size_t)elems, "an extra", who, NULL);
}

/* Every kept row of `got` read through the destination table equals the in-place result's row. */
static void assert_reads_as_in_place(const kvc_test_cache_t *got, const kvc_test_dst_t *dst,
                                     const kvc_test_cache_t *in_place, const int32_t *budgets, const char *who) {
  const kvc_test_cache_t view = kvc_test_dst_view(got, dst);
  const size_t row = kvc_test_row_bytes(got);
  for (int32_t b = 0; b < got->batch; ++b)
    for (int32_t h = 0; h < got->desc.num_kv_heads; ++h)
      for (int32_t j = 0; j < kvc_test_kept(budgets[b], got->seq_lens[b]); ++j) {
        cr_assert_eq(memcmp(kvc_test_k_ptr(&view, b, j, h), kvc_test_k_ptr(in_place, b, j, h), row), 0,
                     "%s: K of sequence %d, head %d, kept token %d differs from the in-place result", who, b, h, j);
        cr_assert_eq(memcmp(kvc_test_v_ptr(&view, b, j, h), kvc_test_v_ptr(in_place, b, j, h), row), 0,
                     "%s: V of sequence %d, head %d, kept token %d differs from the in-place result", who, b, h, j);
      }
}

/* Compacts the case out of place on both backends, each on its own copy. */
static void check_case(const into_case_t *c) {
  into_run_t r;
  setup(c, &r);
  const int64_t elems = r.info.score_elems;
  kvc_test_cache_t *expected = kvc_test_cache_clone(r.before), *in_place = kvc_test_cache_clone(r.before);
  float **extras_expected = kvc_test_extras_clone(r.extras, c->num_extras, elems);
  kvc_test_compact_oracle(r.before, in_place, c->budgets, r.keep, r.extras, extras_expected, c->num_extras, NULL);
  kvc_test_compact_into_oracle(r.before, expected, r.dst, c->budgets, r.keep, NULL);
  for (int backend = 0; backend < 2; ++backend) {
    kvc_test_cache_t *got = kvc_test_cache_clone(r.before);
    float **extras = kvc_test_extras_clone(r.extras, c->num_extras, elems);
    int32_t flags[MAX_BATCH];
    kvc_status_t status = compact_into(&r, backend, &got->desc, &r.dst->desc, extras, flags);
    char who[128];
    snprintf(who, sizeof who, "%s, %s source %s, %s destination, dtype %d, page %d, head_dim %d", backend_name(backend),
             c->combo.layout == KVC_TEST_NHD ? "NHD" : "HND", (const char *[]){"dense", "CSR", "none"}[c->combo.source],
             c->combo.dst == KVC_TEST_CSR ? "CSR" : "dense", (int)c->combo.dtype, c->combo.page_size, c->head_dim);
    cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", who, kvc_status_name(status), kvc_last_error(r.ctx[backend]));
    for (int32_t b = 0; b < c->batch; ++b) cr_assert_eq(flags[b], 0, "%s: status[%d] is %d", who, b, flags[b]);
    assert_pools(got, expected, who);
    assert_extras(extras, extras_expected, c->num_extras, elems, who);
    assert_reads_as_in_place(got, r.dst, in_place, c->budgets, who);
    kvc_test_cache_free(got);
    kvc_test_extras_free(extras, c->num_extras);
  }
  kvc_test_cache_free(expected);
  kvc_test_cache_free(in_place);
  kvc_test_extras_free(extras_expected, c->num_extras);
  teardown(&r);
}

/* The mixed batch (compact_oracle.h), two extras; its sequences that keep all are copied whole. */
static into_case_t mixed_batch(const into_combo_t *combo, uint64_t seed) {
  into_case_t c = {*combo, kvc_test_compact_head_dim(combo->dtype), 2, KVC_TEST_MIXED_BATCH, {0}, {0}, 2, seed};
  memcpy(c.seq_lens, kvc_test_mixed_lens, sizeof kvc_test_mixed_lens);
  memcpy(c.budgets, kvc_test_mixed_budgets, sizeof kvc_test_mixed_budgets);
  return c;
}

ParameterizedTestParameters(compact_into_emu, every_layout_dtype_table) {
  static into_combo_t combos[2 * 4 * 3];
  size_t n = 0;
  for (int layout = 0; layout < 2; ++layout)
    for (int dtype = 0; dtype < 4; ++dtype) {
      for (int p = 0; p < 2; ++p) {
        const int tables = (int)(n % 4); /* source x destination: dense/CSR each, in turn */
        combos[n++] = (into_combo_t){(kvc_test_layout_t)layout, (kvc_test_table_t)(tables & 1),
                                     (kvc_test_table_t)(tables >> 1), (kvc_dtype_t)dtype, p ? 16 : 1};
      }
      /* no source table (sequence b is page b), destination pages past the batch's */
      combos[n++] = (into_combo_t){(kvc_test_layout_t)layout, KVC_TEST_CONTIG, (kvc_test_table_t)(dtype % 2),
                                   (kvc_dtype_t)dtype, 0};
    }
  return cr_make_param_array(into_combo_t, combos, n);
}

ParameterizedTest(into_combo_t *combo, compact_into_emu, every_layout_dtype_table) {
  into_case_t c = mixed_batch(combo, 31 + combo->dtype * 5 + combo->layout * 3 + (uint64_t)combo->page_size);
  check_case(&c);
}

/* More extras than one CUDA pass carries (8), long rows over many chunks. */
Test(compact_into_emu, many_extras_long_rows) {
  const into_combo_t combo = {KVC_TEST_HND, KVC_TEST_CSR, KVC_TEST_DENSE, KVC_DTYPE_F16, 64};
  into_case_t c = {combo, 64, 4, 3, {4000, 3000, 2000}, {3999, 1000, 250}, 11, 7};
  check_case(&c);
}

/* Prefix caching: sequences 1 and 2 read sequence 0's first pages as their own (a shared prefix).
 * In place that table is refused (CPU) or every sharer is skipped (CUDA); out of place the shared
 * pages are only read and every sequence compacts into its destination. */
Test(compact_into_emu, shared_prefix_pages_are_read_not_written) {
  const kvc_test_table_t tables[] = {KVC_TEST_DENSE, KVC_TEST_CSR};
  for (int t = 0; t < 2; ++t) {
    const into_combo_t combo = {KVC_TEST_NHD, tables[t], tables[1 - t], KVC_DTYPE_BF16, 16};
    into_case_t c = {combo, 64, 2, 4, {200, 180, 300, 90}, {50, 120, 40, 90}, 1, 50 + t};
    into_run_t r;
    setup(&c, &r);
    kvc_test_cache_t *shared = kvc_test_cache_clone(r.before);
    int32_t *table = shared->table;
    for (int32_t b = 1; b <= 2; ++b)
      for (int32_t i = 0; i < 5; ++i) { /* 80 tokens of prefix */
        const int32_t *from = tables[t] == KVC_TEST_CSR ? &table[shared->indptr[0] + i] : &table[i];
        int32_t *to = tables[t] == KVC_TEST_CSR ? &table[shared->indptr[b] + i] : &table[(int64_t)b * shared->desc.max_pages + i];
        *to = *from;
      }
    /* the oracle reads through the shared table too (an in-place result has no meaning here: the
     * sharers would overwrite each other's rows); the extras are not in pages */
    kvc_test_cache_t *expected = kvc_test_cache_clone(shared), *in_place = kvc_test_cache_clone(shared);
    float **extras_expected = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    kvc_test_compact_oracle(shared, in_place, c.budgets, r.keep, r.extras, extras_expected, c.num_extras, NULL);
    kvc_test_compact_into_oracle(shared, expected, r.dst, c.budgets, r.keep, NULL);
    for (int backend = 0; backend < 2; ++backend) {
      /* in place: refused on the CPU, skipped (SHARED_PAGE) on CUDA, the cache unchanged either way */
      kvc_test_cache_t *got = kvc_test_cache_clone(shared);
      size_t bytes = 0;
      cr_assert_eq(kvc_plan_workspace_size(r.plan[backend], KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
      void *ws = kvc_test_workspace_new(bytes);
      kvc_status_t status = kvc_compact(r.ctx[backend], r.plan[backend], &got->desc, r.keep, NULL, 0, ws, bytes, NULL);
      cr_assert_eq(status, backend ? KVC_SUCCESS : KVC_ERROR_INVALID_VALUE, "%s in place: %s", backend_name(backend),
                   kvc_status_name(status));
      if (backend) {
        const int32_t *flags = (const int32_t *)((char *)ws + r.info.compact_status_offset_bytes);
        for (int32_t b = 0; b < 3; ++b) cr_assert_eq(flags[b], KVC_COMPACT_SHARED_PAGE, "in place status[%d] %d", b, flags[b]);
      }
      free(ws);
      kvc_test_cache_free(got);
      /* out of place */
      got = kvc_test_cache_clone(shared);
      float **extras = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
      int32_t flags[MAX_BATCH];
      status = compact_into(&r, backend, &got->desc, &r.dst->desc, extras, flags);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend_name(backend), kvc_status_name(status),
                   kvc_last_error(r.ctx[backend]));
      for (int32_t b = 0; b < c.batch; ++b) cr_assert_eq(flags[b], 0, "%s: status[%d] is %d", backend_name(backend), b, flags[b]);
      assert_pools(got, expected, backend_name(backend));
      assert_extras(extras, extras_expected, c.num_extras, r.info.score_elems, backend_name(backend));
      kvc_test_cache_free(got);
      kvc_test_extras_free(extras, c.num_extras);
    }
    kvc_test_cache_free(shared);
    kvc_test_cache_free(expected);
    kvc_test_cache_free(in_place);
    kvc_test_extras_free(extras_expected, c.num_extras);
    teardown(&r);
  }
}

/* A corrupt destination table on CUDA: every sequence it makes unsafe is left untouched (no
 * destination page written, extras unchanged) with its flag, the others compact, and no other
 * byte changes. The CPU backend refuses the same table without touching anything. */
Test(compact_into_emu, corrupt_destination_tables_touch_nothing_else) {
  const kvc_test_table_t tables[] = {KVC_TEST_DENSE, KVC_TEST_CSR};
  for (int t = 0; t < 2; ++t) {
    const into_combo_t combo = {KVC_TEST_NHD, tables[1 - t], tables[t], KVC_DTYPE_F32, 16};
    into_case_t c = mixed_batch(&combo, 70 + t);
    into_run_t r;
    setup(&c, &r);
    kvc_test_dst_t *dst = r.dst;
    int32_t want[MAX_BATCH] = {0};
    unsigned char skip[MAX_BATCH] = {0};
    *kvc_test_dst_entry(dst, 0, 0) = -1; /* sequence 0 (k 1): a negative id */
    want[0] = KVC_COMPACT_DST_BAD_PAGE_ID;
    *kvc_test_dst_entry(dst, 1, 18) = r.before->desc.num_pages; /* sequence 1 (k 299, 19 pages): past the pool */
    want[1] = KVC_COMPACT_DST_BAD_PAGE_ID;
    /* sequence 2 writes into a page sequence 4 still reads: only sequence 2 is unsafe */
    *kvc_test_dst_entry(dst, 2, 30) = r.before->indptr ? r.before->table[r.before->indptr[4] + 3]
                                                       : r.before->table[4 * r.before->desc.max_pages + 3];
    want[2] = KVC_COMPACT_DST_OVERLAP;
    /* sequences 3 and 5 name one destination page */
    *kvc_test_dst_entry(dst, 5, 1) = *kvc_test_dst_entry(dst, 3, 7);
    want[3] = want[5] = KVC_COMPACT_DST_OVERLAP;
    if (t == 1) { /* CSR: sequence 6 (k = n = 129, 9 pages) one entry short */
      dst->indptr[7] = dst->indptr[6] + 8;
      want[6] = KVC_COMPACT_DST_SHORT_PAGE_LIST;
    } else { /* dense: sequence 6 twice names one destination page */
      *kvc_test_dst_entry(dst, 6, 8) = *kvc_test_dst_entry(dst, 6, 2);
      want[6] = KVC_COMPACT_DST_OVERLAP;
    }
    for (int32_t b = 0; b < c.batch; ++b) skip[b] = want[b] != 0;
    kvc_test_cache_t *expected = kvc_test_cache_clone(r.before), *in_place = kvc_test_cache_clone(r.before);
    float **extras_expected = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    kvc_test_compact_oracle(r.before, in_place, c.budgets, r.keep, r.extras, extras_expected, c.num_extras, skip);
    kvc_test_compact_into_oracle(r.before, expected, dst, c.budgets, r.keep, skip);

    kvc_test_cache_t *got = kvc_test_cache_clone(r.before);
    float **extras = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    int32_t flags[MAX_BATCH];
    kvc_status_t status = compact_into(&r, 1, &got->desc, &dst->desc, extras, flags);
    cr_assert_eq(status, KVC_SUCCESS, "%s", kvc_last_error(r.ctx[1]));
    for (int32_t b = 0; b < c.batch; ++b)
      cr_assert_eq(flags[b], want[b], "%s destination: status[%d] is %d, expected %d", t ? "CSR" : "dense", b, flags[b],
                   want[b]);
    assert_pools(got, expected, "CUDA with a corrupt destination table");
    assert_extras(extras, extras_expected, c.num_extras, r.info.score_elems, "CUDA with a corrupt destination table");
    kvc_test_cache_free(got);

    got = kvc_test_cache_clone(r.before);
    status = compact_into(&r, 0, &got->desc, &dst->desc, extras, flags);
    cr_assert_eq(status, KVC_ERROR_INVALID_VALUE, "CPU: %s", kvc_status_name(status));
    assert_pools(got, r.before, "CPU refusing a corrupt destination table");
    kvc_test_cache_free(got);
    kvc_test_cache_free(expected);
    kvc_test_cache_free(in_place);
    kvc_test_extras_free(extras, c.num_extras);
    kvc_test_extras_free(extras_expected, c.num_extras);
    teardown(&r);
  }
}

/* A bad source list out of place: flagged as in place (BAD_PAGE_ID, SHORT_PAGE_LIST) on CUDA. */
Test(compact_into_emu, corrupt_source_list_is_flagged) {
  const into_combo_t combo = {KVC_TEST_HND, KVC_TEST_CSR, KVC_TEST_DENSE, KVC_DTYPE_F16, 16};
  into_case_t c = mixed_batch(&combo, 80);
  into_run_t r;
  setup(&c, &r);
  kvc_test_cache_t *got = kvc_test_cache_clone(r.before), *expected = kvc_test_cache_clone(r.before);
  got->table[got->indptr[1] + 4] = -3;                           /* sequence 1: a bad source id */
  got->indptr[5] = got->indptr[4] + (c.seq_lens[4] + 15) / 16 - 1; /* sequence 4: a short source list */
  kvc_test_cache_t *source_view = kvc_test_cache_clone(got);     /* what the oracle reads through */
  unsigned char skip[MAX_BATCH] = {0, 1, 0, 0, 1, 0, 0, 0};
  kvc_test_compact_into_oracle(source_view, expected, r.dst, c.budgets, r.keep, skip);
  float **extras = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
  int32_t flags[MAX_BATCH];
  cr_assert_eq(compact_into(&r, 1, &got->desc, &r.dst->desc, extras, flags), KVC_SUCCESS, "%s", kvc_last_error(r.ctx[1]));
  for (int32_t b = 0; b < c.batch; ++b)
    cr_assert_eq(flags[b], b == 1 ? KVC_COMPACT_BAD_PAGE_ID : b == 4 ? KVC_COMPACT_SHORT_PAGE_LIST : 0,
                 "status[%d] is %d", b, flags[b]);
  assert_pools(got, expected, "CUDA with a corrupt source list");
  kvc_test_cache_free(got);
  kvc_test_cache_free(expected);
  kvc_test_cache_free(source_view);
  kvc_test_extras_free(extras, c.num_extras);
  teardown(&r);
}

/* kvc_compact_layers_into over 3 layers, both backends: each layer's pools equal the single-layer
 * oracle's through the one destination table, extras stacked; a corrupt destination flags the
 * sequence in every layer on CUDA. */
Test(compact_into_emu, layers_in_one_call_match_the_oracle) {
  enum { L = 3 };
  const into_combo_t combo = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_TEST_CSR, KVC_DTYPE_BF16, 16};
  into_case_t c = mixed_batch(&combo, 90);
  into_run_t r;
  setup(&c, &r);
  const int64_t elems = r.info.score_elems;
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_layers_new(L, c.batch, c.seq_lens, c.budgets, c.heads, 1, c.seed + 10, &keep_elems);
  float **extras = kvc_test_extras_new(c.num_extras, L * elems, c.seed + 20);
  kvc_test_layers_t *before = kvc_test_layers_new(r.before, L), *expected = kvc_test_layers_clone(before);
  float **extras_expected = kvc_test_extras_clone(extras, c.num_extras, L * elems);
  unsigned char skip[MAX_BATCH] = {0};
  for (int round = 0; round < 2; ++round) {
    if (round == 1) { /* sequence 4's destination names one of sequence 2's source pages */
      *kvc_test_dst_entry(r.dst, 4, 2) = r.before->table[2 * r.before->desc.max_pages + 1];
      skip[4] = 1;
      kvc_test_layers_free(expected);
      kvc_test_extras_free(extras_expected, c.num_extras);
      expected = kvc_test_layers_clone(before);
      extras_expected = kvc_test_extras_clone(extras, c.num_extras, L * elems);
    }
    for (int32_t l = 0; l < L; ++l) {
      float *before_l[2], *expected_l[2];
      for (int32_t e = 0; e < c.num_extras; ++e) {
        before_l[e] = extras[e] + l * elems;
        expected_l[e] = extras_expected[e] + l * elems;
      }
      kvc_test_cache_t *scratch = kvc_test_cache_clone(before->cache[l]);
      kvc_test_compact_oracle(before->cache[l], scratch, c.budgets, keep + l * keep_elems, before_l, expected_l,
                              c.num_extras, skip);
      kvc_test_cache_free(scratch);
      kvc_test_compact_into_oracle(before->cache[l], expected->cache[l], r.dst, c.budgets, keep + l * keep_elems, skip);
    }
    for (int backend = round; backend < 2; ++backend) { /* round 1: CUDA only (the CPU refuses it) */
      kvc_test_layers_t *got = kvc_test_layers_clone(before);
      float **got_extras = kvc_test_extras_clone(extras, c.num_extras, L * elems);
      kvc_workspace_layout_t layout;
      cr_assert_eq(kvc_plan_workspace_layout(r.plan[backend], KVC_OP_COMPACT, L, &layout), KVC_SUCCESS);
      void *ws = kvc_test_workspace_new(layout.workspace_bytes);
      memset(ws, 0x5A, layout.workspace_bytes);
      kvc_layers_t view = kvc_test_layers_view(got);
      kvc_status_t status = kvc_compact_layers_into(r.ctx[backend], r.plan[backend], &got->desc, &view, &r.dst->desc,
                                                    keep, got_extras, c.num_extras, ws, layout.workspace_bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend_name(backend), kvc_status_name(status),
                   kvc_last_error(r.ctx[backend]));
      const int32_t *flags = (const int32_t *)((char *)ws + layout.status_offset_bytes);
      for (int32_t i = 0; i < L * c.batch; ++i)
        cr_assert_eq(flags[i], skip[i % c.batch] ? KVC_COMPACT_DST_OVERLAP : 0, "%s: status[%d] is %d",
                     backend_name(backend), i, flags[i]);
      free(ws);
      for (int32_t l = 0; l < L; ++l) {
        char who[64];
        snprintf(who, sizeof who, "%s kvc_compact_layers_into, layer %d", backend_name(backend), l);
        assert_pools(got->cache[l], expected->cache[l], who);
      }
      assert_extras(got_extras, extras_expected, c.num_extras, L * elems, backend_name(backend));
      kvc_test_layers_free(got);
      kvc_test_extras_free(got_extras, c.num_extras);
    }
  }
  kvc_test_layers_free(before);
  kvc_test_layers_free(expected);
  kvc_test_extras_free(extras, c.num_extras);
  kvc_test_extras_free(extras_expected, c.num_extras);
  free(keep);
  teardown(&r);
}

/* kvc_compress_into (KNORM: scores exact on both backends) == kvc_compress in place on the CPU,
 * read through the destination table, with the same keep layout left in the workspace; and the
 * layer-batched kvc_compress_layers_into == kvc_compress_into per layer. */
Test(compact_into_emu, compress_into_matches_compress_in_place) {
  enum { L = 2 };
  const into_combo_t combo = {KVC_TEST_HND, KVC_TEST_CSR, KVC_TEST_DENSE, KVC_DTYPE_F16, 16};
  into_case_t c = {combo, 64, 2, 4, {300, 1110, 700, 50}, {120, 1000, 70, 64}, 0, 95};
  into_run_t r;
  setup(&c, &r);
  size_t bytes = 0;
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = d.num_kv_heads = c.heads;
  d.head_dim = c.head_dim;
  d.dtype = c.combo.dtype;
  d.batch = c.batch;
  d.seq_lens = c.seq_lens;
  d.budgets = c.budgets;
  d.method = KVC_SCORE_KNORM;
  d.sink_tokens = 4;
  kvc_plan_t plan[2];
  for (int backend = 0; backend < 2; ++backend)
    cr_assert_eq(kvc_plan_create(r.ctx[backend], &d, &plan[backend]), KVC_SUCCESS, "%s", kvc_last_error(r.ctx[backend]));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan[0], &info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(plan[0], KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
  kvc_test_layers_t *before = kvc_test_layers_new(r.before, L);
  kvc_test_layers_t *in_place = kvc_test_layers_clone(before);
  int32_t *want_keep = malloc(sizeof(int32_t) * (size_t)(L * info.keep_elems));
  void *ws = kvc_test_workspace_new(bytes);
  for (int32_t l = 0; l < L; ++l) {
    cr_assert_eq(kvc_compress(r.ctx[0], plan[0], &in_place->cache[l]->desc, NULL, NULL, ws, bytes, NULL), KVC_SUCCESS,
                 "%s", kvc_last_error(r.ctx[0]));
    memcpy(want_keep + l * info.keep_elems, (char *)ws + info.keep_offset_bytes, sizeof(int32_t) * (size_t)info.keep_elems);
  }
  free(ws);
  for (int backend = 0; backend < 2; ++backend) {
    /* single layer, layer by layer */
    for (int32_t l = 0; l < L; ++l) {
      kvc_test_cache_t *got = kvc_test_cache_clone(before->cache[l]);
      cr_assert_eq(kvc_plan_workspace_size(plan[backend], KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
      ws = kvc_test_workspace_new(bytes);
      kvc_status_t status = kvc_compress_into(r.ctx[backend], plan[backend], &got->desc, &r.dst->desc, NULL, NULL, ws,
                                              bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend_name(backend), kvc_status_name(status),
                   kvc_last_error(r.ctx[backend]));
      cr_assert_eq(memcmp((char *)ws + info.keep_offset_bytes, want_keep + l * info.keep_elems,
                          sizeof(int32_t) * (size_t)info.keep_elems), 0, "%s: keep layout differs", backend_name(backend));
      kvc_test_cache_t *want = kvc_test_cache_clone(before->cache[l]);
      kvc_test_compact_into_oracle(before->cache[l], want, r.dst, c.budgets, want_keep + l * info.keep_elems, NULL);
      assert_pools(got, want, backend_name(backend));
      assert_reads_as_in_place(got, r.dst, in_place->cache[l], c.budgets, backend_name(backend));
      free(ws);
      kvc_test_cache_free(got);
      kvc_test_cache_free(want);
    }
    /* all layers in one call: the layer-batched score stage on CUDA reads the arrays on the host,
     * which the emulator's memory is */
    kvc_test_layers_t *got = kvc_test_layers_clone(before);
    kvc_workspace_layout_t layout;
    cr_assert_eq(kvc_plan_workspace_layout(plan[backend], KVC_OP_COMPRESS, L, &layout), KVC_SUCCESS);
    ws = kvc_test_workspace_new(layout.workspace_bytes);
    kvc_layers_t view = kvc_test_layers_view(got);
    kvc_status_t status = kvc_compress_layers_into(r.ctx[backend], plan[backend], &got->desc, &view, &r.dst->desc, ws,
                                                   layout.workspace_bytes, NULL);
    cr_assert_eq(status, KVC_SUCCESS, "%s layers: %s (%s)", backend_name(backend), kvc_status_name(status),
                 kvc_last_error(r.ctx[backend]));
    for (int32_t l = 0; l < L; ++l)
      assert_reads_as_in_place(got->cache[l], r.dst, in_place->cache[l], c.budgets, backend_name(backend));
    free(ws);
    kvc_test_layers_free(got);
  }
  free(want_keep);
  kvc_test_layers_free(before);
  kvc_test_layers_free(in_place);
  for (int backend = 0; backend < 2; ++backend) kvc_plan_destroy(plan[backend]);
  teardown(&r);
}

/* The destination descriptor's own fields, on both backends: refused before anything is enqueued. */
Test(compact_into_emu, bad_destination_descriptors_are_refused) {
  const into_combo_t combo = {KVC_TEST_NHD, KVC_TEST_CSR, KVC_TEST_DENSE, KVC_DTYPE_F32, 16};
  into_case_t c = mixed_batch(&combo, 99);
  into_run_t r;
  setup(&c, &r);
  int32_t flags[MAX_BATCH];
  for (int backend = 0; backend < 2; ++backend) {
    kvc_test_cache_t *got = kvc_test_cache_clone(r.before);
    cr_assert_eq(compact_into(&r, backend, &got->desc, NULL, NULL, flags), KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(r.ctx[backend]), "kvc_compact_into: dst is NULL"), "%s", kvc_last_error(r.ctx[backend]));
    kvc_page_table_t bad = r.dst->desc;
    bad.page_table = NULL;
    cr_assert_eq(compact_into(&r, backend, &got->desc, &bad, NULL, flags), KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(r.ctx[backend]), "dst->page_table is NULL"), "%s", kvc_last_error(r.ctx[backend]));
    bad = r.dst->desc;
    bad.max_pages = 67; /* sequence 2 keeps 1080 tokens: 68 pages */
    cr_assert_eq(compact_into(&r, backend, &got->desc, &bad, NULL, flags), KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(r.ctx[backend]), "dst->max_pages is 67"), "%s", kvc_last_error(r.ctx[backend]));
    bad.page_indptr = bad.page_table;
    cr_assert_eq(compact_into(&r, backend, &got->desc, &bad, NULL, flags), KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(r.ctx[backend]), "aliases"), "%s", kvc_last_error(r.ctx[backend]));
    assert_pools(got, r.before, backend_name(backend));
    kvc_test_cache_free(got);
  }
  teardown(&r);
}

/* Without a source table sequence b reads page b: a destination naming page 5 is flagged on CUDA
 * (only its sequence) and refused on the CPU. */
Test(compact_into_emu, one_page_per_sequence_source_page_as_destination) {
  const into_combo_t combo = {KVC_TEST_NHD, KVC_TEST_CONTIG, KVC_TEST_CSR, KVC_DTYPE_BF16, 0};
  into_case_t c = mixed_batch(&combo, 85);
  into_run_t r;
  setup(&c, &r);
  *kvc_test_dst_entry(r.dst, 2, 0) = 5;
  unsigned char skip[MAX_BATCH] = {0, 0, 1, 0, 0, 0, 0, 0};
  kvc_test_cache_t *got = kvc_test_cache_clone(r.before), *expected = kvc_test_cache_clone(r.before);
  kvc_test_compact_into_oracle(r.before, expected, r.dst, c.budgets, r.keep, skip);
  float **extras = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
  int32_t flags[MAX_BATCH];
  cr_assert_eq(compact_into(&r, 1, &got->desc, &r.dst->desc, extras, flags), KVC_SUCCESS, "%s", kvc_last_error(r.ctx[1]));
  for (int32_t b = 0; b < c.batch; ++b)
    cr_assert_eq(flags[b], b == 2 ? KVC_COMPACT_DST_OVERLAP : 0, "status[%d] is %d", b, flags[b]);
  assert_pools(got, expected, "CUDA, page 5 as a destination");
  kvc_test_cache_free(got);
  got = kvc_test_cache_clone(r.before);
  cr_assert_eq(compact_into(&r, 0, &got->desc, &r.dst->desc, extras, flags), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(r.ctx[0]), "is also a source page (sequence 5, page 0 of its table)"), "%s",
            kvc_last_error(r.ctx[0]));
  assert_pools(got, r.before, "CPU refusing page 5 as a destination");
  kvc_test_cache_free(got);
  kvc_test_cache_free(expected);
  kvc_test_extras_free(extras, c.num_extras);
  teardown(&r);
}
