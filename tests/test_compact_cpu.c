/*
 * test_compact_cpu.c - kvc_compact and kvc_retention on the CPU backend. Every cache layout the
 * descriptor supports (NHD / HND x dense table / CSR / one page per sequence) in every dtype and
 * several page sizes, with mixed lengths and budgets in one batch and guard pages interleaved.
 * The oracle is a clone of the cache taken before the call, read through test_util's own address
 * arithmetic: after compaction slot j of each (sequence, head) holds what slot keep[j] held, and
 * every other byte of both pools - slots past k, sequences that keep everything, guard pages,
 * the unused tails of last pages - is byte-identical to the clone.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "kvcompress.h"
#include "layer_util.h"
#include "test_util.h"

#define BATCH 7
#define NUM_EXTRAS 2

typedef struct {
  kvc_test_layout_t layout;
  kvc_test_table_t table;
  kvc_dtype_t dtype;
  int32_t page_size;
} combo_t;

/* A batch compacted end to end: the cache, its clone from before, the plan, keep and extras. */
typedef struct {
  int32_t batch, heads, seq_lens[BATCH], budgets[BATCH], span_indptr[BATCH + 1];
  kvc_span_t spans[BATCH * 8];
  kvc_context_t ctx;
  kvc_plan_t plan;
  kvc_test_cache_t *cache, *before;
  int32_t *keep;
  float *extras[NUM_EXTRAS], *extras_before[NUM_EXTRAS];
  int64_t score_elems;
} fixture_t;

static int32_t kept_len(const fixture_t *f, int32_t b) {
  return f->budgets[b] < f->seq_lens[b] ? f->budgets[b] : f->seq_lens[b];
}

static int64_t token_offset(const fixture_t *f, int32_t b) {
  int64_t offset = 0;
  for (int32_t i = 0; i < b; ++i) offset += f->seq_lens[i];
  return offset;
}

static const int32_t *keep_row(const fixture_t *f, int32_t b, int32_t h) {
  int64_t offset = 0;
  for (int32_t i = 0; i < b; ++i) offset += kept_len(f, i);
  return f->keep + f->heads * offset + (int64_t)h * kept_len(f, b);
}

/* Random spans per sequence (for retention): FAIR ones with gaps, PROTECT ones anywhere. */
static void random_spans(fixture_t *f, kvc_rng_t *rng) {
  f->span_indptr[0] = 0;
  for (int32_t b = 0; b < f->batch; ++b) {
    int32_t n = f->seq_lens[b], w = f->span_indptr[b], t = 0;
    for (int32_t i = 0; i < 4 && t < n; ++i) {
      int32_t start = t + kvc_rng_range(rng, 0, n / 4), end = start + kvc_rng_range(rng, 1, n / 3 + 1);
      if (start >= n) break;
      f->spans[w++] = (kvc_span_t){start, end < n ? end : n, KVC_SPAN_FAIR, 1.0f};
      t = f->spans[w - 1].end;
    }
    if (n > 2 && kept_len(f, b) >= 2 && kvc_rng_range(rng, 0, 1)) { /* a PROTECT span: sorted in by start */
      int32_t start = kvc_rng_range(rng, 0, n - 2), at = w;
      kvc_span_t protect = {start, start + 2, KVC_SPAN_PROTECT, 1.0f};
      while (at > f->span_indptr[b] && f->spans[at - 1].start > start) {
        f->spans[at] = f->spans[at - 1];
        at--;
      }
      f->spans[at] = protect;
      w++;
    }
    f->span_indptr[b + 1] = w;
  }
}

/* Builds the cache and its clone, plans, and selects from random scores. */
static void fixture_setup(fixture_t *f, const combo_t *c, const int32_t *seq_lens, const int32_t *budgets,
                          int32_t batch, uint64_t seed) {
  kvc_rng_t rng = {seed};
  memset(f, 0, sizeof *f);
  f->batch = batch;
  f->heads = 3;
  memcpy(f->seq_lens, seq_lens, sizeof(int32_t) * (size_t)batch);
  memcpy(f->budgets, budgets, sizeof(int32_t) * (size_t)batch);
  random_spans(f, &rng);
  const int32_t head_dim = 5 + 3 * (int32_t)c->dtype; /* odd and even row sizes */
  f->cache = kvc_test_cache_new(batch, seq_lens, f->heads, head_dim, c->dtype, c->page_size, c->layout, c->table,
                                3, seed + 1);
  f->before = kvc_test_cache_clone(f->cache);

  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &f->ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = f->heads;
  d.num_kv_heads = f->heads;
  d.head_dim = head_dim;
  d.dtype = c->dtype;
  d.batch = batch;
  d.seq_lens = f->seq_lens;
  d.budgets = f->budgets;
  d.span_indptr = f->span_indptr;
  d.spans = f->spans;
  d.method = KVC_SCORE_STREAMING; /* the one method every dtype (fp8 too) allows */
  cr_assert_eq(kvc_plan_create(f->ctx, &d, &f->plan), KVC_SUCCESS, "%s", kvc_last_error(f->ctx));

  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(f->plan, &info), KVC_SUCCESS);
  f->score_elems = info.score_elems;
  float *scores = (float *)malloc(sizeof(float) * (size_t)info.score_elems);
  for (int64_t i = 0; i < info.score_elems; ++i) scores[i] = (float)kvc_rng_normal(&rng);
  for (int e = 0; e < NUM_EXTRAS; ++e) {
    f->extras[e] = (float *)malloc(sizeof(float) * (size_t)info.score_elems);
    f->extras_before[e] = (float *)malloc(sizeof(float) * (size_t)info.score_elems);
    for (int64_t i = 0; i < info.score_elems; ++i) f->extras[e][i] = (float)kvc_rng_normal(&rng);
    memcpy(f->extras_before[e], f->extras[e], sizeof(float) * (size_t)info.score_elems);
  }
  f->keep = (int32_t *)malloc(sizeof(int32_t) * (size_t)(info.keep_elems + 1));
  size_t bytes;
  cr_assert_eq(kvc_plan_workspace_size(f->plan, KVC_OP_SELECT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  cr_assert_eq(kvc_select(f->ctx, f->plan, scores, f->keep, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(f->ctx));
  free(ws);
  free(scores);
}

static kvc_status_t fixture_compact(fixture_t *f) {
  size_t bytes;
  cr_assert_eq(kvc_plan_workspace_size(f->plan, KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = kvc_compact(f->ctx, f->plan, &f->cache->desc, f->keep, f->extras, NUM_EXTRAS, ws, bytes, NULL);
  free(ws);
  return status;
}

static void fixture_teardown(fixture_t *f) {
  kvc_plan_destroy(f->plan);
  kvc_context_destroy(f->ctx);
  kvc_test_cache_free(f->cache);
  kvc_test_cache_free(f->before);
  free(f->keep);
  for (int e = 0; e < NUM_EXTRAS; ++e) free(f->extras[e]), free(f->extras_before[e]);
}

/* Both pools and all extras are exactly as before. */
static void assert_untouched(const fixture_t *f) {
  cr_assert_eq(memcmp(f->cache->k, f->before->k, f->cache->pool_bytes), 0, "K pool changed");
  cr_assert_eq(memcmp(f->cache->v, f->before->v, f->cache->pool_bytes), 0, "V pool changed");
  for (int e = 0; e < NUM_EXTRAS; ++e)
    cr_assert_eq(memcmp(f->extras[e], f->extras_before[e], sizeof(float) * (size_t)f->score_elems), 0,
                 "extra %d changed", e);
}

/* The gather, and byte identity of everything else (with a per-byte map of what may change). */
static void assert_compacted(const fixture_t *f) {
  const size_t row = kvc_test_row_bytes(f->cache), pool = f->cache->pool_bytes;
  unsigned char *may_change = (unsigned char *)calloc(pool, 1);
  for (int32_t b = 0; b < f->batch; ++b) {
    const int32_t n = f->seq_lens[b], k = kept_len(f, b);
    for (int32_t h = 0; h < f->heads; ++h) {
      const int32_t *keep = keep_row(f, b, h);
      for (int32_t j = 0; j < k && k < n; ++j) {
        cr_assert_eq(memcmp(kvc_test_k_ptr(f->cache, b, j, h), kvc_test_k_ptr(f->before, b, keep[j], h), row), 0,
                     "K of sequence %d head %d slot %d is not old slot %d", b, h, j, keep[j]);
        cr_assert_eq(memcmp(kvc_test_v_ptr(f->cache, b, j, h), kvc_test_v_ptr(f->before, b, keep[j], h), row), 0,
                     "V of sequence %d head %d slot %d is not old slot %d", b, h, j, keep[j]);
        memset(may_change + ((unsigned char *)kvc_test_k_ptr(f->cache, b, j, h) - f->cache->k), 1, row);
      }
      const int64_t base = f->heads * token_offset(f, b) + (int64_t)h * n;
      for (int e = 0; e < NUM_EXTRAS; ++e)
        for (int32_t t = 0; t < n; ++t) {
          float expect = f->extras_before[e][base + (t < k ? keep[t] : t)];
          cr_assert_eq(memcmp(&f->extras[e][base + t], &expect, sizeof expect), 0,
                       "extra %d, sequence %d head %d slot %d (k %d, n %d)", e, b, h, t, k, n);
        }
    }
  }
  /* K and V share their layout, so one map serves both pools */
  for (size_t i = 0; i < pool; ++i) {
    if (may_change[i]) continue;
    cr_assert_eq(f->cache->k[i], f->before->k[i], "K byte %zu (owned by no compacted slot) changed", i);
    cr_assert_eq(f->cache->v[i], f->before->v[i], "V byte %zu (owned by no compacted slot) changed", i);
  }
  free(may_change);
}

/* kvc_retention against a brute-force count over the keep rows. */
static void assert_retention(const fixture_t *f) {
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(f->plan, &info), KVC_SUCCESS);
  int32_t *counts = (int32_t *)malloc(sizeof(int32_t) * (size_t)(info.count_elems + 1));
  size_t bytes;
  cr_assert_eq(kvc_plan_workspace_size(f->plan, KVC_OP_RETENTION, &bytes), KVC_SUCCESS);
  void *ws = bytes ? kvc_test_workspace_new(bytes) : NULL;
  cr_assert_eq(kvc_retention(f->ctx, f->plan, f->keep, counts, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(f->ctx));
  for (int32_t b = 0; b < f->batch; ++b) {
    const int32_t first = f->span_indptr[b], nspans = f->span_indptr[b + 1] - first;
    for (int32_t h = 0; h < f->heads; ++h) {
      const int32_t *keep = keep_row(f, b, h);
      for (int32_t i = 0; i < nspans; ++i) {
        const kvc_span_t *s = &f->spans[first + i];
        int32_t expect = 0;
        for (int32_t j = 0; j < kept_len(f, b); ++j) expect += keep[j] >= s->start && keep[j] < s->end;
        int32_t got = counts[(int64_t)f->heads * first + (int64_t)h * nspans + i];
        cr_assert_eq(got, expect, "sequence %d head %d span %d [%d, %d): %d kept, brute force %d", b, h, i, s->start,
                     s->end, got, expect);
      }
    }
  }
  free(ws);
  free(counts);
}

/* ---- every layout x table x dtype x page size ------------------------------------------------- */

#define NUM_COMBOS (2 * 3 * 4 * 3)

ParameterizedTestParameters(compact_cpu, every_layout) {
  static combo_t combos[NUM_COMBOS];
  static const int32_t page_sizes[] = {1, 16, 64};
  int i = 0;
  for (int layout = 0; layout < 2; ++layout)
    for (int table = 0; table < 3; ++table)
      for (int dtype = 0; dtype < 4; ++dtype)
        for (int p = 0; p < 3; ++p)
          combos[i++] = (combo_t){(kvc_test_layout_t)layout, (kvc_test_table_t)table, (kvc_dtype_t)dtype, page_sizes[p]};
  return cr_make_param_array(combo_t, combos, NUM_COMBOS);
}

/* Lengths around page borders; budgets from 1 to past the length, all in one batch. */
ParameterizedTest(combo_t *c, compact_cpu, every_layout) {
  const int32_t seq_lens[BATCH] = {1, c->page_size + 1, 3 * c->page_size + 5, 200, c->page_size, 97, 64};
  const int32_t budgets[BATCH] = {1, c->page_size, c->page_size + 1, 37, c->page_size + 9, 1, 63};
  fixture_t f;
  fixture_setup(&f, c, seq_lens, budgets, BATCH, 1000 + (uint64_t)(c->layout * 100 + c->table * 10 + c->dtype));
  cr_assert_eq(fixture_compact(&f), KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
  assert_compacted(&f);
  assert_retention(&f);
  fixture_teardown(&f);
}

/* ---- the rest --------------------------------------------------------------------------------- */

Test(compact_cpu, budget_at_or_past_length_leaves_everything_untouched) {
  const combo_t c = {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_BF16, 16};
  const int32_t seq_lens[3] = {1, 40, 100}, budgets[3] = {1, 40, 1000};
  fixture_t f;
  fixture_setup(&f, &c, seq_lens, budgets, 3, 5);
  cr_assert_eq(fixture_compact(&f), KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
  assert_untouched(&f);
  assert_retention(&f);
  fixture_teardown(&f);
}

Test(compact_cpu, random_batches) {
  kvc_rng_t rng = {77};
  for (int round = 0; round < 40; ++round) {
    combo_t c = {(kvc_test_layout_t)kvc_rng_range(&rng, 0, 1), (kvc_test_table_t)kvc_rng_range(&rng, 0, 2),
                 (kvc_dtype_t)kvc_rng_range(&rng, 0, 3), kvc_rng_range(&rng, 1, 40)};
    int32_t batch = kvc_rng_range(&rng, 1, BATCH), seq_lens[BATCH], budgets[BATCH];
    for (int32_t b = 0; b < batch; ++b) {
      seq_lens[b] = kvc_rng_range(&rng, 1, 300);
      budgets[b] = kvc_rng_range(&rng, 1, seq_lens[b] + 3);
    }
    fixture_t f;
    fixture_setup(&f, &c, seq_lens, budgets, batch, 500 + (uint64_t)round);
    cr_assert_eq(fixture_compact(&f), KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
    assert_compacted(&f);
    assert_retention(&f);
    fixture_teardown(&f);
  }
}

/* A keep array that is not kvc_select's (descending, repeated or out of range) is refused before
 * anything moves: an index past the length would reach a page the sequence does not own. */
Test(compact_cpu, malformed_keep_is_refused_and_nothing_moves) {
  const combo_t c = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F16, 4};
  const int32_t seq_lens[2] = {30, 30}, budgets[2] = {10, 10};
  for (int which = 0; which < 4; ++which) {
    fixture_t f;
    fixture_setup(&f, &c, seq_lens, budgets, 2, 9);
    int32_t *last_row = f.keep + 3 * 10 + 2 * 10; /* sequence 1, head 2: compacted after all others */
    switch (which) {
      case 0: last_row[9] = 30; break;             /* past the length */
      case 1: last_row[0] = -1; break;             /* negative */
      case 2: last_row[5] = last_row[4]; break;    /* repeated */
      case 3: { int32_t t = last_row[3]; last_row[3] = last_row[4]; last_row[4] = t; } break; /* descending */
    }
    cr_assert_eq(fixture_compact(&f), KVC_ERROR_INVALID_VALUE, "case %d", which);
    cr_assert(strstr(kvc_last_error(f.ctx), "keep") != NULL, "detail: %s", kvc_last_error(f.ctx));
    assert_untouched(&f);
    fixture_teardown(&f);
  }
}

/* One page per sequence with one-token and untouched sequences; retention read before compaction. */
Test(compact_cpu, retention_counts_protect_and_fair_spans_across_heads) {
  const combo_t c = {KVC_TEST_HND, KVC_TEST_CONTIG, KVC_DTYPE_F32, 1};
  const int32_t seq_lens[4] = {50, 1, 9, 120}, budgets[4] = {20, 1, 3, 120};
  fixture_t f;
  fixture_setup(&f, &c, seq_lens, budgets, 4, 21);
  assert_retention(&f);
  cr_assert_eq(fixture_compact(&f), KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
  assert_compacted(&f);
  fixture_teardown(&f);
}

/* ---- every layer in one call, and the status array --------------------------------------------- */

enum { LAYERS = 3 };

/* A plan over the fixture's shape, layer caches with different data, and stacked keep rows. */
typedef struct {
  fixture_t f;
  kvc_test_layers_t *before, *layers;
  int32_t *keep;
  int64_t keep_elems;
} layered_t;

static void layered_setup(layered_t *l, const combo_t *c, uint64_t seed) {
  const int32_t seq_lens[5] = {1, 40, 3 * c->page_size + 5, 200, 97}, budgets[5] = {1, 17, c->page_size + 1, 200, 30};
  fixture_setup(&l->f, c, seq_lens, budgets, 5, seed);
  l->before = kvc_test_layers_new(l->f.before, LAYERS);
  l->layers = kvc_test_layers_clone(l->before);
  l->keep = kvc_test_keep_layers_new(LAYERS, 5, seq_lens, budgets, l->f.heads, 1, seed + 3, &l->keep_elems);
}

static void layered_teardown(layered_t *l) {
  kvc_test_layers_free(l->before);
  kvc_test_layers_free(l->layers);
  free(l->keep);
  fixture_teardown(&l->f);
}

static kvc_status_t compact_layers_call(layered_t *l, const kvc_paged_kv_t *desc, const kvc_layers_t *view,
                                        float **extras, int32_t num_extras, void **ws_out) {
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(l->f.plan, KVC_OP_COMPACT, LAYERS, &layout), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(layout.workspace_bytes);
  memset(ws, 0x5A, layout.workspace_bytes);
  kvc_status_t status = kvc_compact_layers(l->f.ctx, l->f.plan, desc, view, l->keep, extras, num_extras, ws,
                                           layout.workspace_bytes, NULL);
  if (ws_out) *ws_out = ws;
  else free(ws);
  return status;
}

/* kvc_compact_layers == the oracle for every layer (pools and stacked extras), and its status array
 * [layers][batch] is all zeros; every layout and table. */
Test(compact_cpu, layers_in_one_call_match_the_oracle) {
  const combo_t combos[] = {{KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F16, 16},
                            {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_F32, 4},
                            {KVC_TEST_NHD, KVC_TEST_CONTIG, KVC_DTYPE_FP8_E4M3, 1}};
  for (int ci = 0; ci < 3; ++ci) {
    layered_t l;
    layered_setup(&l, &combos[ci], 40 + (uint64_t)ci);
    const int64_t elems = l.f.score_elems;
    float **extras = kvc_test_extras_new(NUM_EXTRAS, LAYERS * elems, 7);
    float **want_extras = kvc_test_extras_clone(extras, NUM_EXTRAS, LAYERS * elems);
    kvc_test_layers_t *want = kvc_test_layers_clone(l.before);
    for (int32_t i = 0; i < LAYERS; ++i) {
      float *from[NUM_EXTRAS], *to[NUM_EXTRAS];
      for (int e = 0; e < NUM_EXTRAS; ++e) from[e] = extras[e] + i * elems, to[e] = want_extras[e] + i * elems;
      kvc_test_compact_oracle(l.before->cache[i], want->cache[i], l.f.budgets, l.keep + i * l.keep_elems, from, to,
                              NUM_EXTRAS, NULL);
    }
    kvc_layers_t view = kvc_test_layers_view(l.layers);
    void *ws = NULL;
    cr_assert_eq(compact_layers_call(&l, &l.layers->desc, &view, extras, NUM_EXTRAS, &ws), KVC_SUCCESS, "%s",
                 kvc_last_error(l.f.ctx));
    kvc_workspace_layout_t layout;
    cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, KVC_OP_COMPACT, LAYERS, &layout), KVC_SUCCESS);
    const int32_t *flags = (const int32_t *)((char *)ws + layout.status_offset_bytes);
    for (int32_t i = 0; i < LAYERS * l.f.batch; ++i) cr_assert_eq(flags[i], 0, "status[%d] is %d", i, flags[i]);
    free(ws);
    for (int32_t i = 0; i < LAYERS; ++i) {
      cr_assert_eq(memcmp(l.layers->cache[i]->k, want->cache[i]->k, want->cache[i]->pool_bytes), 0, "layer %d K", i);
      cr_assert_eq(memcmp(l.layers->cache[i]->v, want->cache[i]->v, want->cache[i]->pool_bytes), 0, "layer %d V", i);
    }
    for (int e = 0; e < NUM_EXTRAS; ++e)
      cr_assert_eq(memcmp(extras[e], want_extras[e], sizeof(float) * (size_t)(LAYERS * elems)), 0, "extra %d", e);
    kvc_test_layers_free(want);
    kvc_test_extras_free(extras, NUM_EXTRAS);
    kvc_test_extras_free(want_extras, NUM_EXTRAS);
    layered_teardown(&l);
  }
}

/* Bad layer arguments are refused, naming them, before anything of any layer moves. */
Test(compact_cpu, bad_layer_arguments_are_refused_and_nothing_moves) {
  const combo_t c = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F16, 8};
  layered_t l;
  layered_setup(&l, &c, 60);
  void *k[LAYERS], *v[LAYERS];
  for (int32_t i = 0; i < LAYERS; ++i) k[i] = l.layers->k[i], v[i] = l.layers->v[i];
  kvc_layers_t view = {LAYERS, k, v, NULL, NULL};
  const char *detail;

  cr_assert_eq(compact_layers_call(&l, &l.layers->desc, NULL, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(l.f.ctx), "layers is NULL"), "%s", kvc_last_error(l.f.ctx));
  kvc_layers_t none = view;
  none.num_layers = 0;
  cr_assert_eq(compact_layers_call(&l, &l.layers->desc, &none, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(l.f.ctx), "num_layers is 0"), "%s", kvc_last_error(l.f.ctx));
  kvc_paged_kv_t single = l.layers->desc;
  single.k = k[0];
  cr_assert_eq(compact_layers_call(&l, &single, &view, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(l.f.ctx), "must be NULL"), "%s", kvc_last_error(l.f.ctx));
  k[2] = NULL;
  cr_assert_eq(compact_layers_call(&l, &l.layers->desc, &view, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  detail = kvc_last_error(l.f.ctx);
  cr_assert(strstr(detail, "layers->k[2] is NULL"), "%s", detail);
  k[2] = v[2];
  cr_assert_eq(compact_layers_call(&l, &l.layers->desc, &view, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  detail = kvc_last_error(l.f.ctx);
  cr_assert(strstr(detail, "layer 2") && strstr(detail, "same pool"), "%s", detail);
  k[2] = l.layers->k[2];
  l.keep[2 * l.keep_elems + 5] = -1; /* layer 2's keep, after layers 0 and 1 would have moved */
  cr_assert_eq(compact_layers_call(&l, &l.layers->desc, &view, NULL, 0, NULL), KVC_ERROR_INVALID_VALUE);
  detail = kvc_last_error(l.f.ctx);
  cr_assert(strstr(detail, "layer 2"), "%s", detail);
  for (int32_t i = 0; i < LAYERS; ++i)
    cr_assert_eq(memcmp(l.layers->cache[i]->k, l.before->cache[i]->k, l.before->cache[i]->pool_bytes), 0,
                 "layer %d moved", i);
  /* a workspace one byte short of what three layers need */
  kvc_workspace_layout_t three;
  cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, KVC_OP_COMPACT, LAYERS, &three), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(three.workspace_bytes);
  cr_assert_eq(kvc_compact_layers(l.f.ctx, l.f.plan, &l.layers->desc, &view, l.keep, NULL, 0, ws,
                                  three.workspace_bytes - 1, NULL),
               KVC_ERROR_WORKSPACE_TOO_SMALL);
  cr_assert(strstr(kvc_last_error(l.f.ctx), "3 layers"), "%s", kvc_last_error(l.f.ctx));
  free(ws);
  layered_teardown(&l);
}

/* kvc_plan_workspace_layout: one layer is kvc_plan_workspace_size and the info's offsets; more
 * layers need more; zero layers is refused. */
Test(compact_cpu, workspace_layout_per_layer_count) {
  const combo_t c = {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_BF16, 16};
  layered_t l;
  layered_setup(&l, &c, 61);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(l.f.plan, &info), KVC_SUCCESS);
  for (int op = KVC_OP_SCORE; op <= KVC_OP_COMPRESS; ++op) {
    size_t bytes = 0;
    kvc_workspace_layout_t one, many;
    cr_assert_eq(kvc_plan_workspace_size(l.f.plan, (kvc_op_t)op, &bytes), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, (kvc_op_t)op, 1, &one), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, (kvc_op_t)op, 32, &many), KVC_SUCCESS);
    cr_assert_eq(one.workspace_bytes, bytes, "op %d", op);
    cr_assert_geq(many.workspace_bytes, one.workspace_bytes, "op %d", op);
    cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, (kvc_op_t)op, 0, &one), KVC_ERROR_INVALID_VALUE);
  }
  kvc_workspace_layout_t compress, compact, many;
  cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, KVC_OP_COMPRESS, 1, &compress), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, KVC_OP_COMPACT, 1, &compact), KVC_SUCCESS);
  cr_assert_eq(compress.keep_offset_bytes, info.keep_offset_bytes);
  cr_assert_eq(compress.status_offset_bytes, info.compress_status_offset_bytes);
  cr_assert_eq(compact.status_offset_bytes, info.compact_status_offset_bytes);
  cr_assert_geq(info.compress_status_offset_bytes, sizeof(int32_t) * (size_t)info.keep_elems,
                "the status array lies past the keep layout");
  cr_assert_eq(kvc_plan_workspace_layout(l.f.plan, KVC_OP_COMPRESS, 32, &many), KVC_SUCCESS);
  cr_assert_geq(many.status_offset_bytes, 32 * sizeof(int32_t) * (size_t)info.keep_elems + 32 * sizeof(float) * (size_t)info.score_elems);
  cr_assert_leq(many.status_offset_bytes + 32 * sizeof(int32_t) * (size_t)info.batch, many.workspace_bytes);
  layered_teardown(&l);
}

/* kvc_compress_layers and kvc_retention_layers == one kvc_compress / kvc_retention per layer; the
 * status arrays are all zeros. KNORM (rotated data: each layer keeps other tokens). */
Test(compact_cpu, compress_and_retention_layers_match_single_layer_calls) {
  const combo_t c = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_BF16, 16};
  const int32_t seq_lens[3] = {90, 300, 17}, budgets[3] = {30, 100, 17}, span_indptr[4] = {0, 2, 3, 3};
  const kvc_span_t spans[3] = {{0, 40, KVC_SPAN_FAIR, 1.0f}, {40, 90, KVC_SPAN_FAIR, 2.0f}, {5, 9, KVC_SPAN_PROTECT, 1.0f}};
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = d.num_kv_heads = 2;
  d.head_dim = 16;
  d.dtype = c.dtype;
  d.batch = 3;
  d.seq_lens = seq_lens;
  d.budgets = budgets;
  d.span_indptr = span_indptr;
  d.spans = spans;
  d.method = KVC_SCORE_KNORM;
  d.fairness = 0.5f;
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  kvc_test_cache_t *base = kvc_test_cache_new(3, seq_lens, 2, 16, c.dtype, c.page_size, c.layout, c.table, 2, 9);
  kvc_test_layers_t *layers = kvc_test_layers_new(base, LAYERS), *singles = kvc_test_layers_clone(layers);
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(plan, KVC_OP_COMPRESS, LAYERS, &layout), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(layout.workspace_bytes);
  kvc_layers_t view = kvc_test_layers_view(layers);
  cr_assert_eq(kvc_compress_layers(ctx, plan, &layers->desc, &view, ws, layout.workspace_bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  const int32_t *keep = (const int32_t *)((char *)ws + layout.keep_offset_bytes);
  const int32_t *flags = (const int32_t *)((char *)ws + layout.status_offset_bytes);
  for (int32_t i = 0; i < LAYERS * 3; ++i) cr_assert_eq(flags[i], 0);
  int32_t *counts = malloc(sizeof(int32_t) * (size_t)(LAYERS * info.count_elems));
  cr_assert_eq(kvc_retention_layers(ctx, plan, LAYERS, keep, counts, NULL, 0, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
  void *single_ws = kvc_test_workspace_new(bytes);
  int differs = 0;
  int32_t *single_counts = malloc(sizeof(int32_t) * (size_t)info.count_elems);
  for (int32_t l = 0; l < LAYERS; ++l) {
    cr_assert_eq(kvc_compress(ctx, plan, &singles->cache[l]->desc, NULL, NULL, single_ws, bytes, NULL), KVC_SUCCESS);
    const int32_t *want = (const int32_t *)((char *)single_ws + info.keep_offset_bytes);
    for (int64_t e = 0; e < info.keep_elems; ++e)
      cr_assert_eq(keep[l * info.keep_elems + e], want[e], "layer %d keep element %lld", l, (long long)e);
    if (l > 0) differs |= memcmp(keep, keep + l * info.keep_elems, sizeof(int32_t) * (size_t)info.keep_elems) != 0;
    cr_assert_eq(memcmp(layers->cache[l]->k, singles->cache[l]->k, base->pool_bytes), 0, "layer %d K", l);
    cr_assert_eq(memcmp(layers->cache[l]->v, singles->cache[l]->v, base->pool_bytes), 0, "layer %d V", l);
    cr_assert_eq(kvc_retention(ctx, plan, want, single_counts, NULL, 0, NULL), KVC_SUCCESS);
    for (int64_t e = 0; e < info.count_elems; ++e)
      cr_assert_eq(counts[l * info.count_elems + e], single_counts[e], "layer %d count %lld", l, (long long)e);
  }
  cr_assert(differs, "the layers' data differ, so some layer keeps other tokens than layer 0");
  free(single_counts), free(counts), free(single_ws), free(ws);
  kvc_test_layers_free(layers), kvc_test_layers_free(singles);
  kvc_test_cache_free(base);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

Test(compact_cpu, score_layers_match_single_layer_calls) { kvc_test_score_layers_match_single_calls(KVC_BACKEND_CPU); }
