/*
 * test_compact_into_cpu.c - kvc_compact_into on the CPU backend: every unsafe destination table is
 * refused before any byte moves, the detail naming the table, the sequence, the list entry and the
 * page; entries past a list's first ceil(k / page_size) are never read; and a good table compacts
 * exactly as the oracle says (tests/support/compact_into.c). The CUDA backend's flags for the same
 * tables: tests/emu/test_compact_into_emu.c.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact_into.h"
#include "compact_oracle.h"
#include "kvcompress.h"
#include "test_util.h"

enum { BATCH = 5, HEADS = 2, DIM = 16, PAGE = 4 };
static const int32_t seq_lens[BATCH] = {17, 40, 9, 33, 24};
static const int32_t budgets[BATCH] = {5, 21, 9, 12, 30}; /* sequences 2 and 4 keep all: copied */

typedef struct {
  kvc_context_t ctx;
  kvc_plan_t plan;
  kvc_test_cache_t *before;
  kvc_test_dst_t *dst;
  int32_t *keep;
  size_t ws_bytes;
  void *ws;
} fixture_t;

static void setup(fixture_t *f, kvc_test_table_t source, kvc_test_table_t dst, uint64_t seed) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &f->ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = d.num_kv_heads = HEADS;
  d.head_dim = DIM;
  d.dtype = KVC_DTYPE_F32;
  d.batch = BATCH;
  d.seq_lens = seq_lens;
  d.budgets = budgets;
  d.method = KVC_SCORE_STREAMING;
  cr_assert_eq(kvc_plan_create(f->ctx, &d, &f->plan), KVC_SUCCESS, "%s", kvc_last_error(f->ctx));
  f->before = kvc_test_cache_new(BATCH, seq_lens, HEADS, DIM, KVC_DTYPE_F32, PAGE, KVC_TEST_NHD, source,
                                 kvc_test_dst_pages(BATCH, seq_lens, budgets, PAGE) + 2, seed);
  f->dst = kvc_test_dst_new(f->before, budgets, dst, seed + 1);
  int64_t elems = 0;
  f->keep = kvc_test_keep_new(BATCH, seq_lens, budgets, HEADS, 0, seed + 2, &elems);
  cr_assert_eq(kvc_plan_workspace_size(f->plan, KVC_OP_COMPACT, &f->ws_bytes), KVC_SUCCESS);
  f->ws = kvc_test_workspace_new(f->ws_bytes);
}

static void teardown(fixture_t *f) {
  free(f->ws);
  free(f->keep);
  kvc_test_dst_free(f->dst);
  kvc_test_cache_free(f->before);
  kvc_plan_destroy(f->plan);
  kvc_context_destroy(f->ctx);
}

/* kvc_compact_into on a copy of the cache: the status, and whether the pools changed. */
static kvc_status_t run(fixture_t *f, const kvc_page_table_t *dst, int *changed) {
  kvc_test_cache_t *got = kvc_test_cache_clone(f->before);
  kvc_status_t status = kvc_compact_into(f->ctx, f->plan, &got->desc, dst, f->keep, NULL, 0, f->ws, f->ws_bytes, NULL);
  *changed = memcmp(got->k, f->before->k, got->pool_bytes) != 0 || memcmp(got->v, f->before->v, got->pool_bytes) != 0;
  kvc_test_cache_free(got);
  return status;
}

/* Refused, untouched, and the detail holds `want`. */
static void assert_refused(fixture_t *f, const char *what, const char *want) {
  int changed = 0;
  kvc_status_t status = run(f, &f->dst->desc, &changed);
  cr_assert_eq(status, KVC_ERROR_INVALID_VALUE, "%s: %s", what, kvc_status_name(status));
  cr_assert(!changed, "%s: the cache changed", what);
  cr_assert(strstr(kvc_last_error(f->ctx), want) != NULL, "%s: detail \"%s\" lacks \"%s\"", what,
            kvc_last_error(f->ctx), want);
}

static int32_t source_page(const kvc_test_cache_t *c, int32_t b, int32_t i) {
  return c->table_kind == KVC_TEST_CSR ? c->table[c->indptr[b] + i] : c->table[(int64_t)b * c->desc.max_pages + i];
}

Test(compact_into_cpu, good_tables_match_the_oracle) {
  for (int tables = 0; tables < 4; ++tables) {
    fixture_t f;
    setup(&f, (kvc_test_table_t)(tables & 1), (kvc_test_table_t)(tables >> 1), 10 + (uint64_t)tables);
    kvc_test_cache_t *got = kvc_test_cache_clone(f.before), *want = kvc_test_cache_clone(f.before);
    kvc_test_compact_into_oracle(f.before, want, f.dst, budgets, f.keep, NULL);
    cr_assert_eq(kvc_compact_into(f.ctx, f.plan, &got->desc, &f.dst->desc, f.keep, NULL, 0, f.ws, f.ws_bytes, NULL),
                 KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
    cr_assert_eq(kvc_test_first_difference(got->k, want->k, want->pool_bytes), -1, "tables %d: K", tables);
    cr_assert_eq(kvc_test_first_difference(got->v, want->v, want->pool_bytes), -1, "tables %d: V", tables);
    /* sequences 2 and 4 keep all and are copied: their destination rows equal their source rows */
    const kvc_test_cache_t view = kvc_test_dst_view(got, f.dst);
    for (int32_t t = 0; t < seq_lens[4]; ++t)
      cr_assert_eq(memcmp(kvc_test_k_ptr(&view, 4, t, 1), kvc_test_k_ptr(f.before, 4, t, 1), DIM * sizeof(float)), 0);
    const int32_t *flags = (const int32_t *)((char *)f.ws);
    for (int32_t b = 0; b < BATCH; ++b) cr_assert_eq(flags[b], 0);
    kvc_test_cache_free(got);
    kvc_test_cache_free(want);
    teardown(&f);
  }
}

/* Entries past ceil(k / page_size) are not read: invalid ids there are fine. */
Test(compact_into_cpu, entries_past_the_kept_pages_are_not_read) {
  for (int kind = 0; kind < 2; ++kind) {
    fixture_t f;
    setup(&f, KVC_TEST_DENSE, (kvc_test_table_t)kind, 20);
    for (int32_t b = 0; b < BATCH; ++b) *kvc_test_dst_entry(f.dst, b, f.dst->need[b]) = -5;
    int changed = 0;
    cr_assert_eq(run(&f, &f.dst->desc, &changed), KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
    cr_assert(changed);
    teardown(&f);
  }
}

Test(compact_into_cpu, bad_ids_are_refused_naming_sequence_and_entry) {
  fixture_t f;
  setup(&f, KVC_TEST_CSR, KVC_TEST_DENSE, 30);
  *kvc_test_dst_entry(f.dst, 3, 2) = -1;
  assert_refused(&f, "negative id", "dst page id -1 (sequence 3, page 2 of its destination list) is outside");
  *kvc_test_dst_entry(f.dst, 3, 2) = f.before->desc.num_pages;
  char want[96];
  snprintf(want, sizeof want, "dst page id %d (sequence 3, page 2 of its destination list)", f.before->desc.num_pages);
  assert_refused(&f, "id past the pool", want);
  teardown(&f);
}

Test(compact_into_cpu, short_or_negative_csr_lists_are_refused) {
  fixture_t f;
  setup(&f, KVC_TEST_DENSE, KVC_TEST_CSR, 40);
  f.dst->indptr[2] = f.dst->indptr[1] + f.dst->need[1] - 1; /* sequence 1 (k 21, 6 pages) one short */
  assert_refused(&f, "short list", "dst->page_indptr gives sequence 1 5 pages ([3, 8)) but its 21 kept tokens need 6");
  f.dst->indptr[0] = -1; /* sequence 0's list starts below the table */
  assert_refused(&f, "negative offset", "dst->page_indptr gives sequence 0");
  teardown(&f);
}

Test(compact_into_cpu, shared_destination_pages_are_refused) {
  fixture_t f;
  setup(&f, KVC_TEST_DENSE, KVC_TEST_DENSE, 50);
  const int32_t page = *kvc_test_dst_entry(f.dst, 1, 2);
  *kvc_test_dst_entry(f.dst, 3, 1) = page;
  char want[160];
  snprintf(want, sizeof want, "dst page id %d is page 2 of sequence 1's destination list and page 1 of sequence 3's",
           page);
  assert_refused(&f, "two sequences", want);
  *kvc_test_dst_entry(f.dst, 3, 1) = *kvc_test_dst_entry(f.dst, 3, 0);
  snprintf(want, sizeof want, "is page 0 of sequence 3's destination list and page 1 of sequence 3's");
  assert_refused(&f, "twice by one", want);
  teardown(&f);
}

Test(compact_into_cpu, a_source_page_as_destination_is_refused) {
  for (int own = 0; own < 2; ++own) {
    fixture_t f;
    setup(&f, KVC_TEST_CSR, KVC_TEST_CSR, 60 + (uint64_t)own);
    const int32_t victim = own ? 0 : 4, page = source_page(f.before, victim, 3);
    *kvc_test_dst_entry(f.dst, 0, 1) = page;
    char want[200];
    snprintf(want, sizeof want,
             "dst page id %d (sequence 0, page 1 of its destination list) is also a source page (sequence %d, "
             "page 3 of its table)", page, victim);
    assert_refused(&f, own ? "its own source page" : "another sequence's source page", want);
    teardown(&f);
  }
}

/* The keep rows are checked as for kvc_compact. */
Test(compact_into_cpu, bad_keep_rows_are_refused) {
  fixture_t f;
  setup(&f, KVC_TEST_DENSE, KVC_TEST_CSR, 70);
  f.keep[3] = f.keep[2]; /* sequence 0, head 0: not ascending */
  assert_refused(&f, "keep", "kvc_compact_into: keep[3] of sequence 0, head 0");
  teardown(&f);
}

/* kvc_compress_into refuses a bad destination table before it scores or selects: the keep layout in
 * its workspace is left as it was, and the cache untouched. */
Test(compact_into_cpu, compress_into_refuses_a_bad_table_before_scoring) {
  fixture_t f;
  setup(&f, KVC_TEST_DENSE, KVC_TEST_DENSE, 90);
  *kvc_test_dst_entry(f.dst, 1, 0) = -3;
  kvc_plan_info_t info;
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_get_info(f.plan, &info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(f.plan, KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
  unsigned char *ws = kvc_test_workspace_new(bytes);
  memset(ws, 0x5a, bytes);
  kvc_test_cache_t *got = kvc_test_cache_clone(f.before);
  cr_assert_eq(kvc_compress_into(f.ctx, f.plan, &got->desc, &f.dst->desc, NULL, NULL, ws, bytes, NULL),
               KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(f.ctx), "kvc_compact_into: dst page id -3 (sequence 1, page 0") != NULL, "%s",
            kvc_last_error(f.ctx));
  for (int64_t i = 0; i < 4 * info.keep_elems; ++i)
    cr_assert_eq(ws[info.keep_offset_bytes + (size_t)i], 0x5a, "keep layout byte %lld written", (long long)i);
  cr_assert_eq(memcmp(got->k, f.before->k, got->pool_bytes), 0);
  cr_assert_eq(memcmp(got->v, f.before->v, got->pool_bytes), 0);
  kvc_test_cache_free(got);
  free(ws);
  teardown(&f);
}

/* NULL arguments of the four calls: INVALID_VALUE, the detail naming the argument (no context: no
 * detail to keep, still INVALID_VALUE). */
Test(compact_into_cpu, null_arguments) {
  fixture_t f;
  setup(&f, KVC_TEST_DENSE, KVC_TEST_DENSE, 80);
  const kvc_page_table_t *dst = &f.dst->desc;
  const kvc_paged_kv_t *c = &f.before->desc;
  cr_assert_eq(kvc_compact_into(NULL, f.plan, c, dst, f.keep, NULL, 0, f.ws, f.ws_bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_compress_into(NULL, f.plan, c, dst, NULL, NULL, f.ws, f.ws_bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_compact_layers_into(NULL, f.plan, c, NULL, dst, f.keep, NULL, 0, f.ws, f.ws_bytes, NULL),
               KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_compress_layers_into(NULL, f.plan, c, NULL, dst, f.ws, f.ws_bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_compress_into(f.ctx, f.plan, c, NULL, NULL, NULL, f.ws, f.ws_bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert_str_eq(kvc_last_error(f.ctx), "kvc_compress_into: dst is NULL");
  void *k = f.before->k, *v = f.before->v;
  const kvc_layers_t layers = {1, &k, &v, NULL, NULL};
  cr_assert_eq(kvc_compact_layers_into(f.ctx, f.plan, c, NULL, dst, f.keep, NULL, 0, f.ws, f.ws_bytes, NULL),
               KVC_ERROR_INVALID_VALUE);
  cr_assert_str_eq(kvc_last_error(f.ctx), "kvc_compact_layers_into: layers is NULL");
  cr_assert_eq(kvc_compress_layers_into(f.ctx, f.plan, c, &layers, NULL, f.ws, f.ws_bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert_str_eq(kvc_last_error(f.ctx), "kvc_compress_layers_into: dst is NULL");
  teardown(&f);
}
