/*
 * test_compact_emu.c - kvc_compact and kvc_retention on the CUDA backend (kernels/compact.cu and
 * retention.cu run by the SIMT emulator) against the CPU backend and against an oracle that gathers
 * from an untouched copy of the cache (tests/support/compact_oracle.c), byte for byte over the
 * whole K and V pools (guard pages and the tails of last pages hold a sentinel) and the extras.
 *
 * Every layout (NHD / HND x dense / CSR / one page per sequence) x dtype (f32, f16, bf16, fp8) x
 * page size (1, 16, 64), a batch mixing lengths and budgets (k = 1, k = n - 1, k << n, budget >= n)
 * with keep rows built to stress the in-place hazard: the last k tokens (every source shifted by
 * the same amount, by one at k = n - 1), strided (every other token, one drop in 37), dense
 * prefixes then random. Rows span dozens of chunks, so the run with SIMT_SEED / SIMT_INTERLEAVE
 * (blocks in a shuffled order, interleaved at barriers) writes a slot before an earlier chunk reads
 * it unless the kernel orders them; the oracle then differs.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "kvcompress.h"
#include "layer_util.h"
#include "select_oracle.h"
#include "test_util.h"

#define MAX_BATCH 8

typedef struct {
  kvc_test_layout_t layout;
  kvc_test_table_t table;
  kvc_dtype_t dtype;
  int32_t page_size;
} combo_t;

typedef struct {
  combo_t combo;
  int32_t head_dim, heads, batch;
  int32_t seq_lens[MAX_BATCH], budgets[MAX_BATCH];
  int32_t num_extras, pattern_shift;
  uint64_t seed;
} compact_case_t;

/* One case on both backends: contexts, plans, the cache before, keep and extras. */
typedef struct {
  const compact_case_t *c;
  kvc_context_t cpu, cuda;
  kvc_plan_t cpu_plan, cuda_plan;
  kvc_plan_info_t info;
  kvc_test_cache_t *before;
  int32_t *keep;
  float **extras;
} compact_run_t;

static const char *dtype_name(kvc_dtype_t d) {
  static const char *names[] = {"f32", "f16", "bf16", "fp8"};
  return names[d];
}

static const char *combo_name(const combo_t *c, char *buf, size_t cap) {
  static const char *tables[] = {"dense", "csr", "contiguous"};
  snprintf(buf, cap, "%s %s %s page %d", c->layout == KVC_TEST_NHD ? "NHD" : "HND", tables[c->table],
           dtype_name(c->dtype), c->page_size);
  return buf;
}

static kvc_plan_t make_plan(kvc_context_t ctx, const compact_case_t *c, const int32_t *span_indptr,
                            const kvc_span_t *spans) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = c->heads;
  d.num_kv_heads = c->heads;
  d.head_dim = c->head_dim;
  d.dtype = c->combo.dtype;
  d.batch = c->batch;
  d.seq_lens = c->seq_lens;
  d.budgets = c->budgets;
  d.span_indptr = span_indptr;
  d.spans = spans;
  d.method = KVC_SCORE_STREAMING; /* the one method every dtype (fp8 too) allows */
  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, &d, &plan);
  cr_assert_eq(status, KVC_SUCCESS, "plan: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  return plan;
}

static void setup(const compact_case_t *c, compact_run_t *r) {
  memset(r, 0, sizeof *r);
  r->c = c;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &r->cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &r->cuda), KVC_SUCCESS);
  r->cpu_plan = make_plan(r->cpu, c, NULL, NULL);
  r->cuda_plan = make_plan(r->cuda, c, NULL, NULL);
  cr_assert_eq(kvc_plan_get_info(r->cpu_plan, &r->info), KVC_SUCCESS);
  r->before = kvc_test_cache_new(c->batch, c->seq_lens, c->heads, c->head_dim, c->combo.dtype, c->combo.page_size,
                                 c->combo.layout, c->combo.table, 3, c->seed);
  int64_t keep_elems = 0;
  r->keep = kvc_test_keep_new(c->batch, c->seq_lens, c->budgets, c->heads, c->pattern_shift, c->seed + 1, &keep_elems);
  cr_assert_eq(keep_elems, r->info.keep_elems);
  r->extras = kvc_test_extras_new(c->num_extras, r->info.score_elems, c->seed + 2);
}

static void teardown(compact_run_t *r) {
  kvc_plan_destroy(r->cpu_plan);
  kvc_plan_destroy(r->cuda_plan);
  kvc_context_destroy(r->cpu);
  kvc_context_destroy(r->cuda);
  kvc_test_cache_free(r->before);
  free(r->keep);
  kvc_test_extras_free(r->extras, r->c->num_extras);
}

static kvc_status_t compact_on(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache, const int32_t *keep,
                               float **extras, int32_t num_extras) {
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = kvc_compact(ctx, plan, cache, keep, extras, num_extras, ws, bytes, NULL);
  free(ws);
  return status;
}

static void assert_same_bytes(const void *got, const void *want, size_t bytes, const char *what, const char *who,
                              const kvc_test_cache_t *layout) {
  char why[192];
  if (kvc_test_describe_difference(got, want, bytes, layout, why, sizeof why)) cr_assert(0, "%s: %s %s", who, what, why);
}

/* A cache after compaction (and its extras) against the oracle's. */
static void assert_matches(const kvc_test_cache_t *got, float *const *got_extras, const kvc_test_cache_t *want,
                           float *const *want_extras, int32_t num_extras, int64_t score_elems, const char *who) {
  assert_same_bytes(got->k, want->k, want->pool_bytes, "K pool", who, want);
  assert_same_bytes(got->v, want->v, want->pool_bytes, "V pool", who, want);
  for (int32_t e = 0; e < num_extras; ++e)
    assert_same_bytes(got_extras[e], want_extras[e], sizeof(float) * (size_t)score_elems, "an extra", who, NULL);
}

/* Compacts the case on both backends, each on its own copy, and checks both against the oracle. */
static void check_case(const compact_case_t *c) {
  compact_run_t r;
  setup(c, &r);
  const int64_t elems = r.info.score_elems;
  kvc_test_cache_t *expected = kvc_test_cache_clone(r.before), *cpu = kvc_test_cache_clone(r.before),
                   *cuda = kvc_test_cache_clone(r.before);
  float **extras_expected = kvc_test_extras_clone(r.extras, c->num_extras, elems);
  float **extras_cpu = kvc_test_extras_clone(r.extras, c->num_extras, elems);
  float **extras_cuda = kvc_test_extras_clone(r.extras, c->num_extras, elems);
  kvc_test_compact_oracle(r.before, expected, c->budgets, r.keep, r.extras, extras_expected, c->num_extras, NULL);

  kvc_status_t status = compact_on(r.cpu, r.cpu_plan, &cpu->desc, r.keep, extras_cpu, c->num_extras);
  cr_assert_eq(status, KVC_SUCCESS, "CPU: %s (%s)", kvc_status_name(status), kvc_last_error(r.cpu));
  status = compact_on(r.cuda, r.cuda_plan, &cuda->desc, r.keep, extras_cuda, c->num_extras);
  cr_assert_eq(status, KVC_SUCCESS, "CUDA: %s (%s)", kvc_status_name(status), kvc_last_error(r.cuda));
  char name[96];
  combo_name(&c->combo, name, sizeof name);
  assert_matches(cpu, extras_cpu, expected, extras_expected, c->num_extras, elems, "CPU");
  char who[128];
  snprintf(who, sizeof who, "CUDA (emulated), %s, head_dim %d", name, c->head_dim);
  assert_matches(cuda, extras_cuda, expected, extras_expected, c->num_extras, elems, who);

  kvc_test_cache_free(expected);
  kvc_test_cache_free(cpu);
  kvc_test_cache_free(cuda);
  kvc_test_extras_free(extras_expected, c->num_extras);
  kvc_test_extras_free(extras_cpu, c->num_extras);
  kvc_test_extras_free(extras_cuda, c->num_extras);
  teardown(&r);
}

/* The mixed batch (compact_oracle.h): every kind of row, two extras. */
static compact_case_t mixed_batch(const combo_t *combo, uint64_t seed) {
  compact_case_t c = {*combo, kvc_test_compact_head_dim(combo->dtype), 2, KVC_TEST_MIXED_BATCH, {0}, {0},
                      2, (int32_t)seed % KVC_KEEP_PATTERNS, seed};
  memcpy(c.seq_lens, kvc_test_mixed_lens, sizeof kvc_test_mixed_lens);
  memcpy(c.budgets, kvc_test_mixed_budgets, sizeof kvc_test_mixed_budgets);
  return c;
}

ParameterizedTestParameters(compact_emu, every_layout_dtype_page_size) {
  static combo_t combos[2 * 2 * 4 * 3 + 2 * 4];
  size_t n = 0;
  for (int layout = 0; layout < 2; ++layout)
    for (int dtype = 0; dtype < 4; ++dtype) {
      for (int table = 0; table < 2; ++table)
        for (int p = 0; p < 3; ++p) {
          static const int32_t pages[] = {1, 16, 64};
          combos[n++] = (combo_t){(kvc_test_layout_t)layout, (kvc_test_table_t)table, (kvc_dtype_t)dtype, pages[p]};
        }
      /* one page per sequence: the page size is the longest sequence */
      combos[n++] = (combo_t){(kvc_test_layout_t)layout, KVC_TEST_CONTIG, (kvc_dtype_t)dtype, 0};
    }
  return cr_make_param_array(combo_t, combos, n);
}

ParameterizedTest(combo_t *combo, compact_emu, every_layout_dtype_page_size) {
  compact_case_t c = mixed_batch(combo, 11 + combo->dtype * 7 + combo->table * 3 + (uint64_t)combo->page_size);
  check_case(&c);
}

/* Long rows whose sources sit just past their destinations (shift by one, one drop in 37) or far
 * past them (every other, the last tenth): each chunk overwrites slots an earlier chunk, the one
 * before or one far back, still has to read. Four heads: chunks also end mid-row at every head. */
Test(compact_emu, in_place_hazard_long_rows) {
  const combo_t layouts[] = {{KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_BF16, 16},
                             {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_F16, 64}};
  for (int i = 0; i < 2; ++i) {
    compact_case_t c = {layouts[i], 128, 4, 4, {4000, 3000, 2000, 2500}, {3999, 2919, 1000, 250}, 1, i, 77 + i};
    check_case(&c);
  }
}

/* budget >= n everywhere: nothing moves, nothing is written. */
Test(compact_emu, budget_at_least_length_leaves_cache_untouched) {
  const combo_t combo = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F16, 16};
  compact_case_t c = {combo, 64, 2, 3, {100, 17, 300}, {100, 40, 1000}, 2, 0, 5};
  check_case(&c);
}

/* More extras than one pass carries (8): K/V with 8 extras, then 3 more. */
Test(compact_emu, many_extras) {
  const combo_t combo = {KVC_TEST_HND, KVC_TEST_DENSE, KVC_DTYPE_F32, 16};
  compact_case_t c = mixed_batch(&combo, 3);
  c.num_extras = 11;
  check_case(&c);
}

/* Pools shifted by a few bytes so the widest aligned vector is 8, 4, 2 and 1 bytes. */
Test(compact_emu, narrow_vectors) {
  const struct {
    kvc_dtype_t dtype;
    int32_t head_dim, shift;
  } cases[] = {{KVC_DTYPE_FP8_E4M3, 8, 0}, {KVC_DTYPE_F32, 64, 4}, {KVC_DTYPE_F16, 40, 2}, {KVC_DTYPE_FP8_E4M3, 24, 1}};
  for (int i = 0; i < 4; ++i) {
    const combo_t combo = {KVC_TEST_NHD, KVC_TEST_CSR, cases[i].dtype, 16};
    compact_case_t c = mixed_batch(&combo, 40 + i);
    c.head_dim = cases[i].head_dim;
    compact_run_t r;
    setup(&c, &r);
    kvc_test_cache_t *expected = kvc_test_cache_clone(r.before), *cpu = kvc_test_cache_clone(r.before),
                     *cuda = kvc_test_cache_clone(r.before);
    kvc_test_compact_oracle(r.before, expected, c.budgets, r.keep, NULL, NULL, 0, NULL);
    /* the CUDA copy's pools start `shift` bytes into larger buffers */
    unsigned char *k = malloc(cuda->pool_bytes + 16), *v = malloc(cuda->pool_bytes + 16);
    memcpy(k + cases[i].shift, cuda->k, cuda->pool_bytes);
    memcpy(v + cases[i].shift, cuda->v, cuda->pool_bytes);
    cuda->desc.k = k + cases[i].shift;
    cuda->desc.v = v + cases[i].shift;
    cr_assert_eq(compact_on(r.cpu, r.cpu_plan, &cpu->desc, r.keep, NULL, 0), KVC_SUCCESS);
    kvc_status_t status = compact_on(r.cuda, r.cuda_plan, &cuda->desc, r.keep, NULL, 0);
    cr_assert_eq(status, KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
    assert_same_bytes(cpu->k, expected->k, expected->pool_bytes, "K pool", "CPU", expected);
    char who[64];
    snprintf(who, sizeof who, "CUDA, %s shifted by %d", dtype_name(cases[i].dtype), cases[i].shift);
    assert_same_bytes(k + cases[i].shift, expected->k, expected->pool_bytes, "K pool", who, expected);
    assert_same_bytes(v + cases[i].shift, expected->v, expected->pool_bytes, "V pool", who, expected);
    free(k);
    free(v);
    kvc_test_cache_free(expected);
    kvc_test_cache_free(cpu);
    kvc_test_cache_free(cuda);
    teardown(&r);
  }
}

/* Pools not aligned to their own element size are refused, untouched. */
Test(compact_emu, pool_misaligned_to_its_elements_is_refused) {
  const combo_t combo = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F32, 16};
  compact_case_t c = mixed_batch(&combo, 9);
  compact_run_t r;
  setup(&c, &r);
  kvc_test_cache_t *cuda = kvc_test_cache_clone(r.before);
  unsigned char *k = malloc(cuda->pool_bytes + 16);
  memcpy(k + 2, cuda->k, cuda->pool_bytes);
  cuda->desc.k = k + 2;
  cr_assert_eq(compact_on(r.cuda, r.cuda_plan, &cuda->desc, r.keep, NULL, 0), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(r.cuda), "aligned") != NULL, "%s", kvc_last_error(r.cuda));
  assert_same_bytes(k + 2, r.before->k, r.before->pool_bytes, "K pool", "CUDA", r.before);
  assert_same_bytes(cuda->v, r.before->v, r.before->pool_bytes, "V pool", "CUDA", r.before);
  free(k);
  kvc_test_cache_free(cuda);
  teardown(&r);
}

/* Entry i of sequence b's page list in a dense or CSR table. */
static int32_t *page_entry(kvc_test_cache_t *c, int32_t b, int32_t i) {
  return c->table_kind == KVC_TEST_CSR ? &c->table[c->indptr[b] + i] : &c->table[(int64_t)b * c->desc.max_pages + i];
}

/* Corrupt page tables on the CUDA backend (the CPU backend refuses them on the host): a sequence
 * with an id outside [0, num_pages) among its pages, or a CSR list shorter than it needs, is left
 * untouched with its extras; an id past a sequence's pages, even one of another sequence, is never
 * read; every other sequence compacts as usual and no other page changes. */
Test(compact_emu, corrupt_page_ids_touch_no_other_page) {
  const kvc_test_table_t tables[] = {KVC_TEST_DENSE, KVC_TEST_CSR};
  for (int i = 0; i < 2; ++i) {
    const combo_t combo = {KVC_TEST_NHD, tables[i], KVC_DTYPE_BF16, 16};
    compact_case_t c = mixed_batch(&combo, 60 + i);
    c.seq_lens[c.batch - 1] = 400; /* the last sequence moves too */
    c.budgets[c.batch - 1] = 200;
    compact_run_t r;
    setup(&c, &r);
    kvc_test_cache_t *cuda = kvc_test_cache_clone(r.before), *expected = kvc_test_cache_clone(r.before);
    const int32_t num_pages = cuda->desc.num_pages;
    unsigned char skip[MAX_BATCH] = {0};
    *page_entry(cuda, 1, 9) = num_pages + 3; /* sequence 1 (300 tokens, 19 pages): an id past the pool */
    *page_entry(cuda, 2, 0) = -1;            /* sequence 2: a negative id as its first page */
    skip[1] = skip[2] = 1;
    if (cuda->table_kind == KVC_TEST_DENSE) {
      /* sequence 3 (700 tokens, 44 pages): the spare column past its pages names sequence 4's first page */
      *page_entry(cuda, 3, 44) = *page_entry(cuda, 4, 0);
    } else {
      /* the last sequence's list one entry short: it would reach past the table */
      cuda->indptr[c.batch] = cuda->indptr[c.batch - 1] + (c.seq_lens[c.batch - 1] + 15) / 16 - 1;
      skip[c.batch - 1] = 1;
    }
    kvc_test_cache_t *cpu = kvc_test_cache_clone(cuda); /* the same corrupt table */
    float **extras_expected = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    float **extras_cuda = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    kvc_test_compact_oracle(r.before, expected, c.budgets, r.keep, r.extras, extras_expected, c.num_extras, skip);
    kvc_status_t status = compact_on(r.cuda, r.cuda_plan, &cuda->desc, r.keep, extras_cuda, c.num_extras);
    cr_assert_eq(status, KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
    assert_matches(cuda, extras_cuda, expected, extras_expected, c.num_extras, r.info.score_elems,
                   i ? "CUDA with a corrupt CSR table" : "CUDA with a corrupt dense table");
    /* the CPU backend refuses the same table before touching anything */
    cr_assert_eq(compact_on(r.cpu, r.cpu_plan, &cpu->desc, r.keep, NULL, 0), KVC_ERROR_INVALID_VALUE);
    assert_same_bytes(cpu->k, r.before->k, r.before->pool_bytes, "K pool", "CPU", r.before);
    kvc_test_cache_free(cpu);
    kvc_test_cache_free(cuda);
    kvc_test_cache_free(expected);
    kvc_test_extras_free(extras_expected, c.num_extras);
    kvc_test_extras_free(extras_cuda, c.num_extras);
    teardown(&r);
  }
}

/* Retention counts: CUDA == CPU == a brute-force count, FAIR and PROTECT spans, heads 3. */
Test(compact_emu, retention_counts) {
  const combo_t combo = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F16, 16};
  compact_case_t c = {combo, 64, 3, 6, {37, 300, 1110, 700, 64, 9}, {20, 299, 500, 70, 64, 9}, 0, 1, 21};
  int32_t span_indptr[MAX_BATCH + 1] = {0};
  kvc_span_t spans[MAX_BATCH * 8];
  kvc_rng_t rng = {c.seed};
  for (int32_t b = 0; b < c.batch; ++b)
    span_indptr[b + 1] =
        span_indptr[b] + kvc_test_random_spans(&rng, c.seq_lens[b], 1 + b % 4, b % 3, 0, spans, span_indptr[b],
                                               MAX_BATCH * 8);
  kvc_context_t cpu, cuda;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t cpu_plan = make_plan(cpu, &c, span_indptr, spans), cuda_plan = make_plan(cuda, &c, span_indptr, spans);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(cuda_plan, &info), KVC_SUCCESS);
  cr_assert_gt(info.count_elems, 0);
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_new(c.batch, c.seq_lens, c.budgets, c.heads, 0, 5, &keep_elems);
  size_t count_bytes = sizeof(int32_t) * (size_t)info.count_elems;
  int32_t *want = malloc(count_bytes), *got_cpu = malloc(count_bytes), *got_cuda = malloc(count_bytes);
  memset(got_cuda, 0xAB, count_bytes);
  kvc_test_retention_oracle(c.batch, c.seq_lens, c.budgets, c.heads, span_indptr, spans, keep, want);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(cuda_plan, KVC_OP_RETENTION, &bytes), KVC_SUCCESS);
  cr_assert_eq(bytes, 0);
  cr_assert_eq(kvc_retention(cpu, cpu_plan, keep, got_cpu, NULL, 0, NULL), KVC_SUCCESS, "%s", kvc_last_error(cpu));
  cr_assert_eq(kvc_retention(cuda, cuda_plan, keep, got_cuda, NULL, 0, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(cuda));
  for (int64_t i = 0; i < info.count_elems; ++i) {
    cr_assert_eq(got_cpu[i], want[i], "CPU count %lld: %d, brute force %d", (long long)i, got_cpu[i], want[i]);
    cr_assert_eq(got_cuda[i], want[i], "CUDA count %lld: %d, brute force %d", (long long)i, got_cuda[i], want[i]);
  }
  free(want);
  free(got_cpu);
  free(got_cuda);
  free(keep);
  kvc_plan_destroy(cpu_plan);
  kvc_plan_destroy(cuda_plan);
  kvc_context_destroy(cpu);
  kvc_context_destroy(cuda);
}

/* The plan of a kvc_compress case: two FAIR spans (weights 1 and 2) covering each sequence, 4
 * sinks; span-local for STREAMING (whose scores are exact on both backends). */
static kvc_plan_desc_t compress_desc(const compact_case_t *c, kvc_score_method_t method, float fairness,
                                     int32_t *span_indptr, kvc_span_t *spans) {
  span_indptr[0] = 0;
  for (int32_t b = 0; b < c->batch; ++b) {
    const int32_t n = c->seq_lens[b], cut = n / 3;
    spans[2 * b] = (kvc_span_t){0, cut, KVC_SPAN_FAIR, 1.0f};
    spans[2 * b + 1] = (kvc_span_t){cut, n, KVC_SPAN_FAIR, 2.0f};
    span_indptr[b + 1] = 2 * (b + 1);
  }
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = d.num_kv_heads = c->heads;
  d.head_dim = c->head_dim;
  d.dtype = c->combo.dtype;
  d.batch = c->batch;
  d.seq_lens = c->seq_lens;
  d.budgets = c->budgets;
  d.span_indptr = span_indptr;
  d.spans = spans;
  d.method = method;
  d.span_local = method == KVC_SCORE_STREAMING;
  d.sink_tokens = 4;
  d.fairness = fairness;
  return d;
}

/* kvc_compress end to end on the CUDA backend (score, select and compact, all emulated) against the
 * CPU backend: the cache afterwards and the keep layout left in the workspace. Scores that are
 * exact on both backends (STREAMING, span-local with fair eviction) or far apart (KNORM on this
 * data), so both select the same tokens. */
Test(compact_emu, compress_matches_cpu_backend) {
  const struct {
    kvc_score_method_t method;
    combo_t combo;
  } cases[] = {{KVC_SCORE_STREAMING, {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_FP8_E4M3, 16}},
               {KVC_SCORE_KNORM, {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_BF16, 16}}};
  for (int i = 0; i < 2; ++i) {
    compact_case_t c = {cases[i].combo, 64, 2, 4, {300, 1110, 700, 50}, {120, 1000, 70, 64}, 0, 0, 90 + i};
    int32_t span_indptr[MAX_BATCH + 1] = {0};
    kvc_span_t spans[MAX_BATCH * 4];
    kvc_plan_desc_t d = compress_desc(&c, cases[i].method, 1.0f, span_indptr, spans);
    kvc_context_t ctx[2];
    kvc_plan_t plan[2];
    kvc_test_cache_t *before = kvc_test_cache_new(c.batch, c.seq_lens, c.heads, c.head_dim, c.combo.dtype,
                                                  c.combo.page_size, c.combo.layout, c.combo.table, 3, c.seed);
    kvc_test_cache_t *after[2];
    void *ws[2];
    kvc_plan_info_t info;
    for (int backend = 0; backend < 2; ++backend) {
      cr_assert_eq(kvc_context_create(backend ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, 0, &ctx[backend]), KVC_SUCCESS);
      kvc_status_t status = kvc_plan_create(ctx[backend], &d, &plan[backend]);
      cr_assert_eq(status, KVC_SUCCESS, "plan: %s", kvc_last_error(ctx[backend]));
      cr_assert_eq(kvc_plan_get_info(plan[backend], &info), KVC_SUCCESS);
      cr_assert_eq(info.obs_total, 0);
      size_t bytes = 0;
      cr_assert_eq(kvc_plan_workspace_size(plan[backend], KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
      ws[backend] = kvc_test_workspace_new(bytes);
      after[backend] = kvc_test_cache_clone(before);
      status = kvc_compress(ctx[backend], plan[backend], &after[backend]->desc, NULL, NULL, ws[backend], bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend ? "CUDA" : "CPU", kvc_status_name(status),
                   kvc_last_error(ctx[backend]));
    }
    const int32_t *keep_cpu = (const int32_t *)((char *)ws[0] + info.keep_offset_bytes);
    const int32_t *keep_cuda = (const int32_t *)((char *)ws[1] + info.keep_offset_bytes);
    for (int64_t e = 0; e < info.keep_elems; ++e)
      cr_assert_eq(keep_cuda[e], keep_cpu[e], "method %d: keep element %lld: CUDA %d, CPU %d", (int)cases[i].method,
                   (long long)e, keep_cuda[e], keep_cpu[e]);
    assert_same_bytes(after[1]->k, after[0]->k, before->pool_bytes, "K pool", "CUDA kvc_compress", before);
    assert_same_bytes(after[1]->v, after[0]->v, before->pool_bytes, "V pool", "CUDA kvc_compress", before);
    for (int backend = 0; backend < 2; ++backend) {
      kvc_test_cache_free(after[backend]);
      free(ws[backend]);
      kvc_plan_destroy(plan[backend]);
      kvc_context_destroy(ctx[backend]);
    }
    kvc_test_cache_free(before);
  }
}

/* ---- page tables shared between sequences, and the status array ------------------------------ */

/* The status array a compaction left in its workspace. */
static const int32_t *status_of(kvc_plan_t plan, kvc_op_t op, int32_t num_layers, const void *ws) {
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(plan, op, num_layers, &layout), KVC_SUCCESS);
  if (op == KVC_OP_COMPACT && num_layers == 1) {
    kvc_plan_info_t info;
    cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
    cr_assert_eq(info.compact_status_offset_bytes, layout.status_offset_bytes);
  }
  return (const int32_t *)((const char *)ws + layout.status_offset_bytes);
}

/* Compacts on the CUDA backend and returns a copy of its status array. */
static int32_t *compact_status_on(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache, const int32_t *keep,
                                  float **extras, int32_t num_extras, int32_t batch) {
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  memset(ws, 0x5A, bytes); /* whatever the workspace held before must not show through */
  kvc_status_t status = kvc_compact(ctx, plan, cache, keep, extras, num_extras, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  int32_t *copy = malloc(sizeof(int32_t) * (size_t)batch);
  memcpy(copy, status_of(plan, KVC_OP_COMPACT, 1, ws), sizeof(int32_t) * (size_t)batch);
  free(ws);
  return copy;
}

/* A page used by two sequences (sequence 4 takes one of sequence 3's pages) and a page used twice
 * by one (sequence 2 lists its second page again), dense and CSR: the CUDA backend leaves exactly
 * those three sequences untouched (every other byte of both pools and the extras as the oracle
 * says, so nothing moved into or out of the shared pages) and flags them KVC_COMPACT_SHARED_PAGE;
 * every other sequence compacts and reads 0. The CPU backend refuses the table. */
Test(compact_emu, shared_pages_are_detected_and_left_untouched) {
  const kvc_test_table_t tables[] = {KVC_TEST_DENSE, KVC_TEST_CSR};
  for (int i = 0; i < 2; ++i) {
    const combo_t combo = {KVC_TEST_NHD, tables[i], KVC_DTYPE_F16, 16};
    compact_case_t c = mixed_batch(&combo, 70 + i);
    compact_run_t r;
    setup(&c, &r);
    kvc_test_cache_t *cuda = kvc_test_cache_clone(r.before), *expected = kvc_test_cache_clone(r.before);
    *page_entry(cuda, 4, 5) = *page_entry(cuda, 3, 17); /* sequence 4 (1500 tokens) gets one of 3's pages */
    *page_entry(cuda, 2, 30) = *page_entry(cuda, 2, 1); /* sequence 2 (1110 tokens) uses its page 1 twice */
    const unsigned char skip[MAX_BATCH] = {0, 0, 1, 1, 1, 0, 0, 0};
    kvc_test_cache_t *cpu = kvc_test_cache_clone(cuda);
    float **extras_expected = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    float **extras_cuda = kvc_test_extras_clone(r.extras, c.num_extras, r.info.score_elems);
    kvc_test_compact_oracle(r.before, expected, c.budgets, r.keep, r.extras, extras_expected, c.num_extras, skip);
    int32_t *status = compact_status_on(r.cuda, r.cuda_plan, &cuda->desc, r.keep, extras_cuda, c.num_extras, c.batch);
    for (int32_t b = 0; b < c.batch; ++b)
      cr_assert_eq(status[b], skip[b] ? KVC_COMPACT_SHARED_PAGE : KVC_COMPACT_OK, "%s table: status[%d] is %d",
                   i ? "CSR" : "dense", b, status[b]);
    assert_matches(cuda, extras_cuda, expected, extras_expected, c.num_extras, r.info.score_elems,
                   i ? "CUDA with a shared page (CSR)" : "CUDA with a shared page (dense)");
    cr_assert_eq(compact_on(r.cpu, r.cpu_plan, &cpu->desc, r.keep, NULL, 0), KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(r.cpu), "used twice") != NULL, "%s", kvc_last_error(r.cpu));
    assert_same_bytes(cpu->k, r.before->k, r.before->pool_bytes, "K pool", "CPU", r.before);
    free(status);
    kvc_test_cache_free(cpu);
    kvc_test_cache_free(cuda);
    kvc_test_cache_free(expected);
    kvc_test_extras_free(extras_expected, c.num_extras);
    kvc_test_extras_free(extras_cuda, c.num_extras);
    teardown(&r);
  }
}

/* The flags of a corrupt table: an id past the pool (sequence 1), a negative id and a page shared
 * with sequence 5 (sequence 2: both flags; 5: shared), a CSR list one entry short (the last). The
 * CPU backend's array is all zeros after a good table. */
Test(compact_emu, status_flags_of_every_table_fault) {
  const combo_t combo = {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_BF16, 16};
  compact_case_t c = mixed_batch(&combo, 80);
  c.seq_lens[c.batch - 1] = 400;
  c.budgets[c.batch - 1] = 200;
  compact_run_t r;
  setup(&c, &r);
  kvc_test_cache_t *cuda = kvc_test_cache_clone(r.before);
  *page_entry(cuda, 1, 9) = cuda->desc.num_pages;
  *page_entry(cuda, 2, 0) = -1;
  *page_entry(cuda, 2, 3) = *page_entry(cuda, 5, 2);
  cuda->indptr[c.batch] -= 1;
  int32_t *status = compact_status_on(r.cuda, r.cuda_plan, &cuda->desc, r.keep, NULL, 0, c.batch);
  const int32_t want[MAX_BATCH] = {0, KVC_COMPACT_BAD_PAGE_ID, KVC_COMPACT_BAD_PAGE_ID | KVC_COMPACT_SHARED_PAGE, 0, 0,
                                   KVC_COMPACT_SHARED_PAGE, 0, KVC_COMPACT_SHORT_PAGE_LIST};
  for (int32_t b = 0; b < c.batch; ++b) cr_assert_eq(status[b], want[b], "status[%d] is %d, expected %d", b, status[b], want[b]);
  free(status);
  /* the CPU backend after a good table */
  kvc_test_cache_t *cpu = kvc_test_cache_clone(r.before);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(r.cpu_plan, KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  memset(ws, 0x5A, bytes);
  cr_assert_eq(kvc_compact(r.cpu, r.cpu_plan, &cpu->desc, r.keep, NULL, 0, ws, bytes, NULL), KVC_SUCCESS);
  const int32_t *cpu_status = status_of(r.cpu_plan, KVC_OP_COMPACT, 1, ws);
  for (int32_t b = 0; b < c.batch; ++b) cr_assert_eq(cpu_status[b], 0, "CPU status[%d] is %d", b, cpu_status[b]);
  free(ws);
  kvc_test_cache_free(cpu);
  kvc_test_cache_free(cuda);
  teardown(&r);
}

/* ---- every layer in one call ----------------------------------------------------------------- */

/* kvc_compact_layers over 3 layers (different data and keep rows per layer, two stacked extras):
 * CUDA == CPU == the oracle per layer; the CUDA status array [3][batch] is all zeros. Then a layer
 * whose K pool is NULL and one whose V pool is misaligned: those layers stay untouched and are
 * flagged KVC_COMPACT_BAD_POOL, the others compact. */
Test(compact_emu, layers_in_one_call_match_the_oracle) {
  enum { L = 3 };
  const combo_t combos[] = {{KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_BF16, 16}, {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_F32, 1}};
  for (int ci = 0; ci < 2; ++ci) {
    compact_case_t c = mixed_batch(&combos[ci], 90 + ci);
    compact_run_t r;
    setup(&c, &r);
    const int64_t elems = r.info.score_elems;
    int64_t keep_elems = 0;
    int32_t *keep = kvc_test_keep_layers_new(L, c.batch, c.seq_lens, c.budgets, c.heads, ci, c.seed + 10, &keep_elems);
    float **extras = kvc_test_extras_new(c.num_extras, L * elems, c.seed + 20);
    kvc_test_layers_t *before = kvc_test_layers_new(r.before, L);
    kvc_test_layers_t *expected = kvc_test_layers_clone(before), *cpu = kvc_test_layers_clone(before),
                      *cuda = kvc_test_layers_clone(before);
    float **extras_expected = kvc_test_extras_clone(extras, c.num_extras, L * elems);
    float **extras_cpu = kvc_test_extras_clone(extras, c.num_extras, L * elems);
    float **extras_cuda = kvc_test_extras_clone(extras, c.num_extras, L * elems);
    for (int32_t l = 0; l < L; ++l) {
      float *before_l[2], *expected_l[2];
      for (int32_t e = 0; e < c.num_extras; ++e) {
        before_l[e] = extras[e] + l * elems;
        expected_l[e] = extras_expected[e] + l * elems;
      }
      kvc_test_compact_oracle(before->cache[l], expected->cache[l], c.budgets, keep + l * keep_elems, before_l,
                              expected_l, c.num_extras, NULL);
    }
    kvc_context_t ctx[2] = {r.cpu, r.cuda};
    kvc_plan_t plan[2] = {r.cpu_plan, r.cuda_plan};
    kvc_test_layers_t *got[2] = {cpu, cuda};
    float **got_extras[2] = {extras_cpu, extras_cuda};
    for (int backend = 0; backend < 2; ++backend) {
      kvc_workspace_layout_t layout;
      cr_assert_eq(kvc_plan_workspace_layout(plan[backend], KVC_OP_COMPACT, L, &layout), KVC_SUCCESS);
      void *ws = kvc_test_workspace_new(layout.workspace_bytes);
      memset(ws, 0x5A, layout.workspace_bytes);
      kvc_layers_t view = kvc_test_layers_view(got[backend]);
      kvc_status_t status = kvc_compact_layers(ctx[backend], plan[backend], &got[backend]->desc, &view, keep,
                                               got_extras[backend], c.num_extras, ws, layout.workspace_bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend ? "CUDA" : "CPU", kvc_status_name(status),
                   kvc_last_error(ctx[backend]));
      const int32_t *flags = (const int32_t *)((char *)ws + layout.status_offset_bytes);
      for (int32_t i = 0; i < L * c.batch; ++i) cr_assert_eq(flags[i], 0, "status[%d] is %d", i, flags[i]);
      free(ws);
      for (int32_t l = 0; l < L; ++l) {
        float *got_l[2], *want_l[2];
        for (int32_t e = 0; e < c.num_extras; ++e) {
          got_l[e] = got_extras[backend][e] + l * elems;
          want_l[e] = extras_expected[e] + l * elems;
        }
        char who[64];
        snprintf(who, sizeof who, "%s kvc_compact_layers, layer %d", backend ? "CUDA" : "CPU", l);
        assert_matches(got[backend]->cache[l], got_l, expected->cache[l], want_l, c.num_extras, elems, who);
      }
    }

    /* bad pools on CUDA: layer 0's K is NULL, layer 2's V one element off its 16-byte alignment */
    kvc_test_layers_t *bad = kvc_test_layers_clone(before);
    unsigned char *shifted = malloc(bad->cache[2]->pool_bytes + 16);
    memcpy(shifted + 4, bad->cache[2]->v, bad->cache[2]->pool_bytes);
    void *k_pools[L] = {NULL, bad->k[1], bad->k[2]}, *v_pools[L] = {bad->v[0], bad->v[1], shifted + 4};
    kvc_layers_t view = {L, k_pools, v_pools, NULL, NULL};
    kvc_workspace_layout_t layout;
    cr_assert_eq(kvc_plan_workspace_layout(r.cuda_plan, KVC_OP_COMPACT, L, &layout), KVC_SUCCESS);
    void *ws = kvc_test_workspace_new(layout.workspace_bytes);
    cr_assert_eq(kvc_compact_layers(r.cuda, r.cuda_plan, &bad->desc, &view, keep, NULL, 0, ws, layout.workspace_bytes,
                                    NULL),
                 KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
    const int32_t *flags = (const int32_t *)((char *)ws + layout.status_offset_bytes);
    for (int32_t l = 0; l < L; ++l)
      for (int32_t b = 0; b < c.batch; ++b)
        cr_assert_eq(flags[l * c.batch + b], l == 1 ? 0 : KVC_COMPACT_BAD_POOL, "layer %d: status[%d] is %d", l, b,
                     flags[l * c.batch + b]);
    assert_same_bytes(bad->v[0], before->cache[0]->v, before->cache[0]->pool_bytes, "V pool of the NULL-K layer",
                      "CUDA", before->cache[0]);
    assert_same_bytes(bad->k[2], before->cache[2]->k, before->cache[2]->pool_bytes, "K pool of the misaligned layer",
                      "CUDA", before->cache[2]);
    assert_same_bytes(shifted + 4, before->cache[2]->v, before->cache[2]->pool_bytes, "V pool of the misaligned layer",
                      "CUDA", before->cache[2]);
    assert_same_bytes(bad->k[1], expected->cache[1]->k, before->cache[1]->pool_bytes, "K pool of the good layer",
                      "CUDA", before->cache[1]);
    free(ws);
    free(shifted);
    kvc_test_layers_free(bad);

    /* a layer whose V pool starts one page into its K pool (K and V rows overlap): flagged, and
     * neither pool changes; the other layers compact */
    const size_t page_bytes =
        (size_t)before->desc.stride_page * (kvc_test_row_bytes(before->cache[1]) / (size_t)before->desc.head_dim);
    unsigned char *both = malloc(before->cache[1]->pool_bytes + page_bytes);
    memcpy(both, before->cache[1]->k, before->cache[1]->pool_bytes);
    memcpy(both + before->cache[1]->pool_bytes, before->cache[1]->v + before->cache[1]->pool_bytes - page_bytes, page_bytes);
    unsigned char *both_before = malloc(before->cache[1]->pool_bytes + page_bytes);
    memcpy(both_before, both, before->cache[1]->pool_bytes + page_bytes);
    kvc_test_layers_t *overlap = kvc_test_layers_clone(before);
    void *k2[L] = {overlap->k[0], both, overlap->k[2]}, *v2[L] = {overlap->v[0], both + page_bytes, overlap->v[2]};
    kvc_layers_t view2 = {L, k2, v2, NULL, NULL};
    ws = kvc_test_workspace_new(layout.workspace_bytes);
    cr_assert_eq(kvc_compact_layers(r.cuda, r.cuda_plan, &overlap->desc, &view2, keep, NULL, 0, ws,
                                    layout.workspace_bytes, NULL),
                 KVC_SUCCESS, "%s", kvc_last_error(r.cuda));
    flags = (const int32_t *)((char *)ws + layout.status_offset_bytes);
    for (int32_t l = 0; l < L; ++l)
      for (int32_t b = 0; b < c.batch; ++b)
        cr_assert_eq(flags[l * c.batch + b], l == 1 ? KVC_COMPACT_BAD_POOL : 0, "overlap, layer %d: status[%d] is %d",
                     l, b, flags[l * c.batch + b]);
    cr_assert_eq(memcmp(both, both_before, before->cache[1]->pool_bytes + page_bytes), 0,
                 "the overlapping layer's pools changed");
    assert_same_bytes(overlap->k[2], expected->cache[2]->k, before->cache[2]->pool_bytes, "K pool of a good layer",
                      "CUDA", before->cache[2]);
    free(ws);
    free(both);
    free(both_before);
    kvc_test_layers_free(overlap);

    kvc_test_layers_free(before);
    kvc_test_layers_free(expected);
    kvc_test_layers_free(cpu);
    kvc_test_layers_free(cuda);
    kvc_test_extras_free(extras, c.num_extras);
    kvc_test_extras_free(extras_expected, c.num_extras);
    kvc_test_extras_free(extras_cpu, c.num_extras);
    kvc_test_extras_free(extras_cuda, c.num_extras);
    free(keep);
    teardown(&r);
  }
}

/* kvc_retention_layers: CUDA == CPU == the brute-force count of each layer's keep rows. */
Test(compact_emu, retention_layers) {
  enum { L = 3 };
  const combo_t combo = {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_F16, 16};
  compact_case_t c = {combo, 64, 3, 4, {37, 300, 1110, 9}, {20, 299, 500, 9}, 0, 1, 23};
  int32_t span_indptr[MAX_BATCH + 1] = {0};
  kvc_span_t spans[MAX_BATCH * 8];
  kvc_rng_t rng = {c.seed};
  for (int32_t b = 0; b < c.batch; ++b)
    span_indptr[b + 1] = span_indptr[b] + kvc_test_random_spans(&rng, c.seq_lens[b], 1 + b % 3, b % 2, 0, spans,
                                                                span_indptr[b], MAX_BATCH * 8);
  kvc_context_t ctx[2];
  kvc_plan_t plan[2];
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx[0]), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx[1]), KVC_SUCCESS);
  for (int backend = 0; backend < 2; ++backend) plan[backend] = make_plan(ctx[backend], &c, span_indptr, spans);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan[0], &info), KVC_SUCCESS);
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_layers_new(L, c.batch, c.seq_lens, c.budgets, c.heads, 0, 7, &keep_elems);
  int32_t *want = malloc(sizeof(int32_t) * (size_t)(L * info.count_elems));
  for (int32_t l = 0; l < L; ++l)
    kvc_test_retention_oracle(c.batch, c.seq_lens, c.budgets, c.heads, span_indptr, spans, keep + l * keep_elems,
                              want + l * info.count_elems);
  for (int backend = 0; backend < 2; ++backend) {
    int32_t *got = malloc(sizeof(int32_t) * (size_t)(L * info.count_elems));
    memset(got, 0xAB, sizeof(int32_t) * (size_t)(L * info.count_elems));
    cr_assert_eq(kvc_retention_layers(ctx[backend], plan[backend], L, keep, got, NULL, 0, NULL), KVC_SUCCESS, "%s",
                 kvc_last_error(ctx[backend]));
    for (int64_t i = 0; i < L * info.count_elems; ++i)
      cr_assert_eq(got[i], want[i], "%s count %lld: %d, brute force %d", backend ? "CUDA" : "CPU", (long long)i,
                   got[i], want[i]);
    free(got);
    kvc_plan_destroy(plan[backend]);
    kvc_context_destroy(ctx[backend]);
  }
  free(want);
  free(keep);
}

/* kvc_compress_layers over 3 layers on the CUDA backend (score, select with rows split across
 * segments of 128 tokens, compact) == the CPU backend's kvc_compress_layers == 3 single-layer
 * kvc_compress calls on the CPU: the pools afterwards, the stacked keep layouts and the status array
 * left in the workspace. KNORM (each layer's data is rotated, so each layer keeps other tokens) and
 * span-local STREAMING with fair eviction. */
Test(compact_emu, compress_layers_matches_single_layer_calls) {
  enum { L = 3 };
  setenv("KVC_SELECT_SEGMENT", "128", 1); /* read by kvc_plan_create */
  const struct {
    kvc_score_method_t method;
    combo_t combo;
  } cases[] = {{KVC_SCORE_KNORM, {KVC_TEST_NHD, KVC_TEST_DENSE, KVC_DTYPE_BF16, 16}},
               {KVC_SCORE_STREAMING, {KVC_TEST_HND, KVC_TEST_CSR, KVC_DTYPE_FP8_E4M3, 16}}};
  for (int i = 0; i < 2; ++i) {
    compact_case_t c = {cases[i].combo, 64, 2, 4, {300, 1110, 700, 50}, {120, 1000, 70, 64}, 0, 0, 95 + i};
    int32_t span_indptr[MAX_BATCH + 1] = {0};
    kvc_span_t spans[MAX_BATCH * 4];
    kvc_plan_desc_t d = compress_desc(&c, cases[i].method, 0.5f, span_indptr, spans);
    kvc_test_cache_t *base = kvc_test_cache_new(c.batch, c.seq_lens, c.heads, c.head_dim, c.combo.dtype,
                                                c.combo.page_size, c.combo.layout, c.combo.table, 3, c.seed);
    kvc_test_layers_t *before = kvc_test_layers_new(base, L);
    kvc_context_t ctx[2];
    kvc_plan_t plan[2];
    kvc_test_layers_t *after[2];
    kvc_workspace_layout_t layout[2];
    void *ws[2];
    for (int backend = 0; backend < 2; ++backend) {
      cr_assert_eq(kvc_context_create(backend ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, 0, &ctx[backend]), KVC_SUCCESS);
      cr_assert_eq(kvc_plan_create(ctx[backend], &d, &plan[backend]), KVC_SUCCESS, "%s", kvc_last_error(ctx[backend]));
      cr_assert_eq(kvc_plan_workspace_layout(plan[backend], KVC_OP_COMPRESS, L, &layout[backend]), KVC_SUCCESS);
      ws[backend] = kvc_test_workspace_new(layout[backend].workspace_bytes);
      after[backend] = kvc_test_layers_clone(before);
      kvc_layers_t view = kvc_test_layers_view(after[backend]);
      kvc_status_t status = kvc_compress_layers(ctx[backend], plan[backend], &after[backend]->desc, &view, ws[backend],
                                                layout[backend].workspace_bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend ? "CUDA" : "CPU", kvc_status_name(status),
                   kvc_last_error(ctx[backend]));
    }
    kvc_plan_info_t info;
    cr_assert_eq(kvc_plan_get_info(plan[0], &info), KVC_SUCCESS);
    size_t single_bytes = 0;
    cr_assert_eq(kvc_plan_workspace_size(plan[0], KVC_OP_COMPRESS, &single_bytes), KVC_SUCCESS);
    void *single_ws = kvc_test_workspace_new(single_bytes);
    for (int32_t l = 0; l < L; ++l) {
      kvc_test_cache_t *single = kvc_test_cache_clone(before->cache[l]);
      cr_assert_eq(kvc_compress(ctx[0], plan[0], &single->desc, NULL, NULL, single_ws, single_bytes, NULL), KVC_SUCCESS,
                   "%s", kvc_last_error(ctx[0]));
      const int32_t *want = (const int32_t *)((char *)single_ws + info.keep_offset_bytes);
      for (int backend = 0; backend < 2; ++backend) {
        const int32_t *got = (const int32_t *)((char *)ws[backend] + layout[backend].keep_offset_bytes) + l * info.keep_elems;
        for (int64_t e = 0; e < info.keep_elems; ++e)
          cr_assert_eq(got[e], want[e], "method %d, %s layer %d: keep element %lld is %d, the single call's %d",
                       (int)d.method, backend ? "CUDA" : "CPU", l, (long long)e, got[e], want[e]);
        const int32_t *flags = (const int32_t *)((char *)ws[backend] + layout[backend].status_offset_bytes);
        for (int32_t b = 0; b < c.batch; ++b) cr_assert_eq(flags[l * c.batch + b], 0);
        char who[64];
        snprintf(who, sizeof who, "%s kvc_compress_layers, layer %d", backend ? "CUDA" : "CPU", l);
        assert_same_bytes(after[backend]->cache[l]->k, single->k, single->pool_bytes, "K pool", who, single);
        assert_same_bytes(after[backend]->cache[l]->v, single->v, single->pool_bytes, "V pool", who, single);
      }
      kvc_test_cache_free(single);
    }
    free(single_ws);
    for (int backend = 0; backend < 2; ++backend) {
      kvc_test_layers_free(after[backend]);
      free(ws[backend]);
      kvc_plan_destroy(plan[backend]);
      kvc_context_destroy(ctx[backend]);
    }
    kvc_test_layers_free(before);
    kvc_test_cache_free(base);
  }
}

/* The CUDA score stage of the layer-batched calls (all layers in one launch per kernel). */
Test(compact_emu, score_layers_match_single_layer_calls) { kvc_test_score_layers_match_single_calls(KVC_BACKEND_CUDA); }
