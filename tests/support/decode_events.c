/*
 * decode_events.c - see decode_events.h. The oracles here are written from the header's
 * definitions, not from the library's code: spans after compaction by scanning which original
 * token each compacted slot holds, H2O scores by explicit softmaxes in double over the logical
 * token list the test keeps itself.
 */
#include "decode_events.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "select_oracle.h"
#include "test_util.h"

#define CHECK(cond, ...)                  \
  do {                                    \
    if (!(cond)) {                        \
      snprintf(why, cap, __VA_ARGS__);    \
      return 1;                           \
    }                                     \
  } while (0)

#define CALL(ctx, expr)                                                                                \
  do {                                                                                                 \
    kvc_status_t status_ = (expr);                                                                     \
    CHECK(status_ == KVC_SUCCESS, "%s:%d: %s: %s (%s)", __FILE__, __LINE__, #expr, kvc_status_name(status_), \
          kvc_last_error(ctx));                                                                        \
  } while (0)

enum { MAX_BATCH = 4, MAX_HEADS = 4, MAX_ROWS = MAX_BATCH * MAX_HEADS, MAX_SPANS = 1024 };

/* ---- running one op on a fresh workspace ---------------------------------------------------------- */

static kvc_status_t run_op(kvc_context_t ctx, kvc_plan_t plan, kvc_op_t op, const float *scores, int32_t *keep,
                           int32_t *counts) {
  size_t bytes = 0;
  kvc_status_t status = kvc_plan_workspace_size(plan, op, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  if (status == KVC_SUCCESS)
    status = op == KVC_OP_SELECT ? kvc_select(ctx, plan, scores, keep, ws, bytes, NULL)
                                 : kvc_retention(ctx, plan, keep, counts, ws, bytes, NULL);
  free(ws);
  return status;
}

/* ---- per-head spans against the oracles --------------------------------------------------------- */

typedef struct {
  int32_t seq_lens[MAX_BATCH], budgets[MAX_BATCH], indptr[MAX_ROWS + 1];
  kvc_span_t spans[MAX_SPANS];
  kvc_plan_desc_t desc; /* points into this struct */
} span_case_t;

/* Random spans for `rows` span rows of the case's sequences (row r belongs to r / per_seq). */
static void random_rows(span_case_t *c, kvc_rng_t *rng, int32_t rows, int32_t per_seq) {
  c->indptr[0] = 0;
  for (int32_t r = 0; r < rows; ++r)
    c->indptr[r + 1] = c->indptr[r] + kvc_test_random_spans(rng, c->seq_lens[r / per_seq], kvc_rng_range(rng, 0, 3),
                                                            kvc_rng_range(rng, 0, 2), 0, c->spans, c->indptr[r],
                                                            MAX_SPANS);
}

/* The plan of c, with budgets lowered to what the largest protected count allows: a CLAMP plan's
 * new lengths become the budgets of a plain one, so k = min(budget, n) as the oracle assumes. */
static int make_plan(kvc_context_t ctx, span_case_t *c, kvc_plan_t *plan, char *why, size_t cap) {
  c->desc.budgets = c->budgets;
  c->desc.budget_policy = KVC_BUDGET_CLAMP;
  CALL(ctx, kvc_plan_create(ctx, &c->desc, plan));
  CALL(ctx, kvc_plan_new_lengths(*plan, c->budgets));
  kvc_plan_destroy(*plan);
  c->desc.budget_policy = KVC_BUDGET_FAIL;
  CALL(ctx, kvc_plan_create(ctx, &c->desc, plan));
  return 0;
}

/* Quotas of span row r of `plan` equal those of a one-sequence, one-head plan of that row alone. */
static int check_row_quotas(kvc_context_t ctx, const span_case_t *c, kvc_plan_t plan, int32_t r, int32_t b,
                            char *why, size_t cap) {
  kvc_plan_info_t info;
  CALL(ctx, kvc_plan_get_info(plan, &info));
  int32_t *quotas = malloc(sizeof(int32_t) * (size_t)(info.total_spans + 1));
  int32_t implicit[MAX_ROWS], one_quotas[MAX_SPANS + 1], one_implicit = 0;
  CALL(ctx, kvc_plan_span_quotas(plan, quotas, implicit));
  kvc_plan_desc_t one = c->desc;
  const int32_t zero = 0, count = c->indptr[r + 1] - c->indptr[r], indptr[2] = {zero, count};
  one.num_kv_heads = one.num_q_heads = 1;
  one.batch = 1;
  one.seq_lens = &c->seq_lens[b];
  one.budgets = &c->budgets[b];
  one.span_indptr = indptr;
  one.spans = c->spans + c->indptr[r];
  one.spans_per_head = 0;
  one.score_row_capacity = 0;
  kvc_plan_t one_plan = NULL;
  CALL(ctx, kvc_plan_create(ctx, &one, &one_plan));
  CALL(ctx, kvc_plan_span_quotas(one_plan, one_quotas, &one_implicit));
  kvc_plan_destroy(one_plan);
  for (int32_t i = 0; i < count; ++i)
    CHECK(quotas[c->indptr[r] + i] == one_quotas[i], "span row %d span %d: quota %d, its one-row plan's %d", r, i,
          quotas[c->indptr[r] + i], one_quotas[i]);
  CHECK(implicit[r] == one_implicit, "span row %d: implicit quota %d, its one-row plan's %d", r, implicit[r],
        one_implicit);
  free(quotas);
  return 0;
}

/* Counts (count layout of `plan`) against the keep layout, brute force. */
static int check_counts(const span_case_t *c, int32_t heads, const int32_t *keep, const int32_t *counts, char *why,
                        size_t cap) {
  int64_t keep_at = 0;
  const int per_head = c->desc.spans_per_head;
  for (int32_t b = 0; b < c->desc.batch; ++b) {
    const int32_t k = c->budgets[b] < c->seq_lens[b] ? c->budgets[b] : c->seq_lens[b];
    for (int32_t h = 0; h < heads; ++h, keep_at += k) {
      const int32_t r = per_head ? b * heads + h : b, nspans = c->indptr[r + 1] - c->indptr[r];
      const int32_t *row_counts = counts + (per_head ? c->indptr[r] : (int64_t)heads * c->indptr[b] + (int64_t)h * nspans);
      for (int32_t i = 0; i < nspans; ++i) {
        const kvc_span_t *s = &c->spans[c->indptr[r] + i];
        int32_t expect = 0;
        for (int32_t j = 0; j < k; ++j) expect += keep[keep_at + j] >= s->start && keep[keep_at + j] < s->end;
        CHECK(row_counts[i] == expect, "sequence %d head %d span %d [%d, %d): count %d, kept %d", b, h, i, s->start,
              s->end, row_counts[i], expect);
      }
    }
  }
  return 0;
}

/* Selection, retention and quotas of one case on `backend`; keep_out / counts_out (may be NULL) get
 * the results (keep_elems / count_elems + 1 elements). */
static int run_case(kvc_backend_t backend, span_case_t *c, const float *scores_packed, int32_t *keep_out,
                    int32_t *counts_out, int check_quotas, char *why, size_t cap) {
  kvc_context_t ctx = NULL;
  kvc_plan_t plan = NULL;
  CHECK(kvc_context_create(backend, 0, &ctx) == KVC_SUCCESS, "context of backend %d", (int)backend);
  if (make_plan(ctx, c, &plan, why, cap)) return 1;
  kvc_plan_info_t info;
  CALL(ctx, kvc_plan_get_info(plan, &info));
  const int32_t heads = c->desc.num_kv_heads, C = c->desc.score_row_capacity;
  /* the case's scores, packed, moved into the plan's layout (capacity rows: NaN in the tails, which
   * selection must never read) */
  float *scores = malloc(sizeof(float) * (size_t)(info.score_elems + 1));
  int64_t packed_at = 0;
  for (int64_t i = 0; i < info.score_elems; ++i) scores[i] = NAN;
  for (int32_t b = 0; b < c->desc.batch; ++b)
    for (int32_t h = 0; h < heads; ++h, packed_at += c->seq_lens[b])
      memcpy(scores + (C ? ((int64_t)b * heads + h) * C : packed_at), scores_packed + packed_at,
             sizeof(float) * (size_t)c->seq_lens[b]);
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)(info.keep_elems + 1));
  int32_t *want = malloc(sizeof(int32_t) * (size_t)(info.keep_elems + 1));
  int32_t *counts = malloc(sizeof(int32_t) * (size_t)(info.count_elems + 1));
  CALL(ctx, run_op(ctx, plan, KVC_OP_SELECT, scores, keep, NULL));
  CHECK(kvc_test_select_oracle(plan, &c->desc, scores, want) == 0, "the oracle failed");
  int64_t at = 0;
  for (int32_t b = 0; b < c->desc.batch; ++b)
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t n = c->seq_lens[b], k = c->budgets[b] < n ? c->budgets[b] : n;
      for (int32_t j = 0; j < k; ++j, ++at)
        CHECK(keep[at] == want[at],
              "backend %d, method %d, spans_per_head %d, capacity %d, fairness %.1f: sequence %d (n %d, k %d) head %d: "
              "keep[%d] = %d, oracle %d", (int)backend, (int)c->desc.method, c->desc.spans_per_head, C,
              (double)c->desc.fairness, b, n, k, h, j, keep[at], want[at]);
    }
  CALL(ctx, run_op(ctx, plan, KVC_OP_RETENTION, NULL, keep, counts));
  if (check_counts(c, heads, keep, counts, why, cap)) return 1;
  for (int32_t r = 0; check_quotas && r < c->desc.batch * (c->desc.spans_per_head ? heads : 1); ++r)
    if (check_row_quotas(ctx, c, plan, r, c->desc.spans_per_head ? r / heads : r, why, cap)) return 1;
  if (keep_out) memcpy(keep_out, keep, sizeof(int32_t) * (size_t)info.keep_elems);
  if (counts_out) memcpy(counts_out, counts, sizeof(int32_t) * (size_t)info.count_elems);
  free(scores), free(keep), free(want), free(counts);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
  return 0;
}

static void random_base(span_case_t *c, kvc_rng_t *rng, kvc_score_method_t method) {
  memset(c, 0, sizeof *c);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = kvc_rng_range(rng, 1, MAX_HEADS);
  d.num_q_heads = d.num_kv_heads * kvc_rng_range(rng, 1, 2);
  d.head_dim = 64;
  d.batch = kvc_rng_range(rng, 1, MAX_BATCH);
  for (int32_t b = 0; b < d.batch; ++b) {
    c->seq_lens[b] = kvc_rng_range(rng, 0, 2) ? kvc_rng_range(rng, 1, 60) : kvc_rng_range(rng, 500, 900);
    c->budgets[b] = kvc_rng_range(rng, 1, c->seq_lens[b]);
  }
  d.seq_lens = c->seq_lens;
  d.span_indptr = c->indptr;
  d.spans = c->spans;
  d.method = method;
  d.window = 4;
  d.sink_tokens = kvc_rng_range(rng, 0, 3);
  d.recent_tokens = kvc_rng_range(rng, 0, 2);
  static const float fairness[] = {0.0f, 0.5f, 1.0f};
  d.fairness = fairness[kvc_rng_range(rng, 0, 2)];
  c->desc = d;
}

static int64_t packed_elems(const span_case_t *c) {
  int64_t total = 0;
  for (int32_t b = 0; b < c->desc.batch; ++b) total += (int64_t)c->desc.num_kv_heads * c->seq_lens[b];
  return total;
}

int kvc_test_head_spans_rounds(kvc_backend_t backend, uint64_t seed, int rounds, char *why, size_t cap) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_KNORM, KVC_SCORE_STREAMING,
                                               KVC_SCORE_TOVA};
  kvc_rng_t rng = {seed};
  span_case_t *c = malloc(sizeof *c), *seq = malloc(sizeof *seq);
  for (int round = 0; round < rounds; ++round) {
    /* odd rounds split the long rows of the CUDA selection into segments of 128 tokens */
    if (round % 2) setenv("KVC_SELECT_SEGMENT", "128", 1);
    else unsetenv("KVC_SELECT_SEGMENT");
    const kvc_score_method_t method = methods[round % 5];
    random_base(seq, &rng, method);
    const int32_t heads = seq->desc.num_kv_heads, batch = seq->desc.batch;
    const kvc_score_pattern_t pattern = (kvc_score_pattern_t)kvc_rng_range(&rng, 0, 4);
    float *scores = malloc(sizeof(float) * (size_t)(packed_elems(seq) + 1));
    kvc_test_fill_scores(scores, packed_elems(seq), pattern, seed + (uint64_t)round);
    int32_t capacity = 0;
    for (int32_t b = 0; b < batch; ++b) capacity = capacity > seq->seq_lens[b] ? capacity : seq->seq_lens[b];

    /* per-head spans, random per row (not for TOVA, which needs them identical) */
    if (method != KVC_SCORE_TOVA) {
      *c = *seq;
      c->desc.seq_lens = c->seq_lens, c->desc.span_indptr = c->indptr, c->desc.spans = c->spans;
      c->desc.spans_per_head = 1;
      c->desc.score_row_capacity = round % 4 < 2 ? 0 : capacity + kvc_rng_range(&rng, 0, 9);
      random_rows(c, &rng, batch * heads, heads);
      if (run_case(backend, c, scores, NULL, NULL, 1, why, cap)) return 1;
    }

    /* per-sequence spans, and the same spans given to every head */
    random_rows(seq, &rng, batch, 1);
    *c = *seq;
    c->desc.seq_lens = c->seq_lens, c->desc.span_indptr = c->indptr, c->desc.spans = c->spans;
    c->desc.spans_per_head = 1;
    c->indptr[0] = 0;
    for (int32_t r = 0; r < batch * heads; ++r) {
      const int32_t b = r / heads, count = seq->indptr[b + 1] - seq->indptr[b];
      memcpy(c->spans + c->indptr[r], seq->spans + seq->indptr[b], sizeof(kvc_span_t) * (size_t)count);
      c->indptr[r + 1] = c->indptr[r] + count;
    }
    const int64_t keep_cap = packed_elems(seq) + 1, count_cap = (int64_t)heads * seq->indptr[batch] + 1;
    int32_t *keep_seq = malloc(sizeof(int32_t) * (size_t)keep_cap), *keep_head = malloc(sizeof(int32_t) * (size_t)keep_cap);
    int32_t *counts_seq = malloc(sizeof(int32_t) * (size_t)count_cap);
    int32_t *counts_head = malloc(sizeof(int32_t) * (size_t)count_cap);
    if (run_case(backend, seq, scores, keep_seq, counts_seq, 0, why, cap)) return 1;
    if (run_case(backend, c, scores, keep_head, counts_head, 0, why, cap)) return 1;
    int64_t kept = 0;
    for (int32_t b = 0; b < batch; ++b) kept += (int64_t)heads * (seq->budgets[b] < seq->seq_lens[b] ? seq->budgets[b] : seq->seq_lens[b]);
    for (int32_t b = 0; b < batch; ++b)
      CHECK(seq->budgets[b] == c->budgets[b], "identical spans: sequence %d keeps %d per head, %d per sequence", b,
            c->budgets[b], seq->budgets[b]);
    CHECK(memcmp(keep_seq, keep_head, sizeof(int32_t) * (size_t)kept) == 0,
          "method %d: per-head spans identical across heads select differently from per-sequence spans", (int)method);
    CHECK(memcmp(counts_seq, counts_head, sizeof(int32_t) * (size_t)(count_cap - 1)) == 0,
          "method %d: counts of identical per-head spans differ from per-sequence ones", (int)method);
    free(keep_seq), free(keep_head), free(counts_seq), free(counts_head), free(scores);
  }
  unsetenv("KVC_SELECT_SEGMENT");
  free(c), free(seq);
  return 0;
}

/* ---- a small contiguous f32 cache: K[b][h][t][d] with room for `room` tokens ------------------------- */

enum { DIM = 8 };

typedef struct {
  int32_t batch, heads, room;
  float *k, *v;
  kvc_paged_kv_t desc;
} cache_t;

static void cache_init(cache_t *c, int32_t batch, int32_t heads, int32_t room, kvc_rng_t *rng) {
  c->batch = batch, c->heads = heads, c->room = room;
  const size_t elems = (size_t)batch * heads * room * DIM;
  c->k = kvc_test_workspace_new(sizeof(float) * elems);
  c->v = kvc_test_workspace_new(sizeof(float) * elems);
  for (size_t i = 0; i < elems; ++i) c->k[i] = (float)kvc_rng_normal(rng), c->v[i] = (float)kvc_rng_normal(rng);
  memset(&c->desc, 0, sizeof c->desc);
  c->desc.k = c->k, c->desc.v = c->v;
  c->desc.dtype = KVC_DTYPE_F32;
  c->desc.num_kv_heads = heads;
  c->desc.head_dim = DIM;
  c->desc.page_size = room;
  c->desc.num_pages = batch;
  c->desc.stride_page = (int64_t)heads * room * DIM;
  c->desc.stride_head = (int64_t)room * DIM;
  c->desc.stride_token = DIM;
}

static float *key_at(const cache_t *c, int32_t b, int32_t h, int32_t t) {
  return c->k + (((int64_t)b * c->heads + h) * c->room + t) * DIM;
}

/* The keep layout kvc_compress leaves in its workspace, after compressing `cache` with `plan`. */
static int compress(kvc_context_t ctx, kvc_plan_t plan, cache_t *cache, const float *queries, int32_t *keep, char *why,
                    size_t cap) {
  kvc_plan_info_t info;
  size_t bytes = 0;
  CALL(ctx, kvc_plan_get_info(plan, &info));
  CALL(ctx, kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes));
  char *ws = kvc_test_workspace_new(bytes);
  CALL(ctx, kvc_compress(ctx, plan, &cache->desc, queries, NULL, ws, bytes, NULL));
  memcpy(keep, ws + info.keep_offset_bytes, sizeof(int32_t) * (size_t)info.keep_elems);
  free(ws);
  return 0;
}

/* The spans of span row r of `desc` in the compacted coordinates of keep row `keep` (k indices),
 * by scanning: the slots whose original token lies in the span, which must be one run. Appended to
 * out[*count]. */
static int scan_row_spans(const kvc_plan_desc_t *desc, int32_t r, const int32_t *keep, int32_t k, kvc_span_t *out,
                          int32_t *count, char *why, size_t cap) {
  for (int32_t i = desc->span_indptr[r]; i < desc->span_indptr[r + 1]; ++i) {
    const kvc_span_t s = desc->spans[i];
    int32_t first = -1, last = -1;
    for (int32_t j = 0; j < k; ++j)
      if (keep[j] >= s.start && keep[j] < s.end) {
        CHECK(first < 0 || last == j - 1, "span [%d, %d) is not contiguous after compaction", s.start, s.end);
        if (first < 0) first = j;
        last = j;
      }
    if (first < 0) continue;
    out[*count] = s;
    out[*count].start = first;
    out[*count].end = last + 1;
    (*count)++;
  }
  return 0;
}

/* kvc_spans_after_compaction of (plan, desc, keep) against scan_row_spans; its spans and indptr are
 * left in spans / indptr (MAX_SPANS, MAX_ROWS + 1). */
static int check_helper(kvc_context_t ctx, kvc_plan_t plan, const kvc_plan_desc_t *desc, const int32_t *keep,
                        kvc_span_t *spans, int32_t *indptr, char *why, size_t cap) {
  const int32_t heads = desc->num_kv_heads;
  int32_t new_lens[MAX_BATCH];
  CALL(ctx, kvc_plan_new_lengths(plan, new_lens));
  kvc_span_t *expect = malloc(sizeof(kvc_span_t) * MAX_SPANS);
  int32_t expect_indptr[MAX_ROWS + 1], count = 0;
  expect_indptr[0] = 0;
  int64_t keep_at = 0;
  for (int32_t b = 0; b < desc->batch; ++b)
    for (int32_t h = 0; h < heads; ++h, keep_at += new_lens[b]) {
      if (desc->span_indptr &&
          scan_row_spans(desc, desc->spans_per_head ? b * heads + h : b, keep + keep_at, new_lens[b], expect, &count,
                         why, cap))
        return 1;
      expect_indptr[b * heads + h + 1] = count;
    }
  int64_t needed = -1;
  CALL(ctx, kvc_spans_after_compaction(ctx, plan, keep, NULL, 0, NULL, &needed));
  CHECK(needed == count, "size query: %lld spans, the keep indices give %d", (long long)needed, count);
  if (count > 0) {
    CHECK(kvc_spans_after_compaction(ctx, plan, keep, spans, count - 1, indptr, &needed) == KVC_ERROR_INVALID_VALUE &&
              strstr(kvc_last_error(ctx), "out_capacity"),
          "a capacity of %d for %d spans: %s", count - 1, count, kvc_last_error(ctx));
  }
  CALL(ctx, kvc_spans_after_compaction(ctx, plan, keep, spans, count, indptr, &needed));
  for (int32_t r = 0; r <= desc->batch * heads; ++r)
    CHECK(indptr[r] == expect_indptr[r], "out_indptr[%d] = %d, expected %d", r, indptr[r], expect_indptr[r]);
  for (int32_t i = 0; i < count; ++i)
    CHECK(spans[i].start == expect[i].start && spans[i].end == expect[i].end && spans[i].kind == expect[i].kind &&
              spans[i].weight == expect[i].weight,
          "span %d: [%d, %d) kind %d weight %g, expected [%d, %d) kind %d weight %g", i, spans[i].start, spans[i].end,
          spans[i].kind, (double)spans[i].weight, expect[i].start, expect[i].end, expect[i].kind,
          (double)expect[i].weight);
  free(expect);
  return 0;
}

static float *random_queries(kvc_plan_t plan, int32_t q_heads, kvc_rng_t *rng) {
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  const size_t elems = (size_t)info.obs_total * q_heads * DIM;
  float *q = kvc_test_workspace_new(sizeof(float) * (elems + 1));
  for (size_t i = 0; i < elems; ++i) q[i] = (float)kvc_rng_normal(rng);
  return q;
}

int kvc_test_spans_after_compaction_rounds(kvc_backend_t backend, uint64_t seed, int rounds, char *why, size_t cap) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_TOVA, KVC_SCORE_H2O, KVC_SCORE_KNORM,
                                               KVC_SCORE_STREAMING};
  kvc_rng_t rng = {seed};
  kvc_context_t ctx = NULL;
  CHECK(kvc_context_create(backend, 0, &ctx) == KVC_SUCCESS, "context of backend %d", (int)backend);
  span_case_t *c = malloc(sizeof *c);
  kvc_span_t *spans = malloc(sizeof(kvc_span_t) * MAX_SPANS);
  int32_t indptr[MAX_ROWS + 1];
  for (int round = 0; round < rounds; ++round) {
    random_base(c, &rng, methods[round % 5]); /* TOVA: its one selection gives identical per-head spans */
    const int32_t batch = c->desc.batch, heads = c->desc.num_kv_heads;
    c->desc.num_q_heads = 2 * heads;
    c->desc.head_dim = DIM;
    c->desc.dtype = KVC_DTYPE_F32;
    int32_t room = 0;
    for (int32_t b = 0; b < batch; ++b) {
      c->seq_lens[b] = kvc_rng_range(&rng, 8, 80);
      c->budgets[b] = kvc_rng_range(&rng, c->seq_lens[b] / 3, c->seq_lens[b]);
      room = room > c->seq_lens[b] + 8 ? room : c->seq_lens[b] + 8;
    }
    random_rows(c, &rng, batch, 1);
    cache_t cache;
    cache_init(&cache, batch, heads, room, &rng);
    kvc_plan_t plan = NULL;
    if (make_plan(ctx, c, &plan, why, cap)) return 1;
    float *queries = random_queries(plan, c->desc.num_q_heads, &rng);
    int32_t *keep = malloc(sizeof(int32_t) * (size_t)(packed_elems(c) + 1));
    const size_t pool_bytes = sizeof(float) * (size_t)batch * heads * room * DIM;
    float *k_before = malloc(pool_bytes), *v_before = malloc(pool_bytes);
    memcpy(k_before, cache.k, pool_bytes), memcpy(v_before, cache.v, pool_bytes);
    if (compress(ctx, plan, &cache, queries, keep, why, cap)) return 1;
    if (check_helper(ctx, plan, &c->desc, keep, spans, indptr, why, cap)) return 1;
    /* kvc_compress in the fixed-capacity score layout (its workspace's scores) does the same */
    {
      kvc_plan_desc_t fixed_desc = c->desc;
      fixed_desc.score_row_capacity = room + round;
      kvc_plan_t fixed = NULL;
      CALL(ctx, kvc_plan_create(ctx, &fixed_desc, &fixed));
      cache_t other = cache;
      other.k = kvc_test_workspace_new(pool_bytes), other.v = kvc_test_workspace_new(pool_bytes);
      memcpy(other.k, k_before, pool_bytes), memcpy(other.v, v_before, pool_bytes);
      other.desc.k = other.k, other.desc.v = other.v;
      int32_t *fixed_keep = malloc(sizeof(int32_t) * (size_t)(packed_elems(c) + 1));
      if (compress(ctx, fixed, &other, queries, fixed_keep, why, cap)) return 1;
      kvc_plan_info_t info;
      CALL(ctx, kvc_plan_get_info(fixed, &info));
      CHECK(memcmp(fixed_keep, keep, sizeof(int32_t) * (size_t)info.keep_elems) == 0 &&
                memcmp(other.k, cache.k, pool_bytes) == 0 && memcmp(other.v, cache.v, pool_bytes) == 0,
            "round %d: kvc_compress with score_row_capacity %d keeps or moves differently from the packed layout",
            round, fixed_desc.score_row_capacity);
      kvc_plan_destroy(fixed);
      free(other.k), free(other.v), free(fixed_keep);
    }
    free(k_before), free(v_before);

    /* the next event: the helper's per-head spans on the compacted lengths plus appended tokens */
    span_case_t *next = malloc(sizeof *next);
    *next = *c;
    next->desc.seq_lens = next->seq_lens, next->desc.budgets = next->budgets;
    next->desc.span_indptr = next->indptr, next->desc.spans = next->spans;
    next->desc.spans_per_head = 1;
    CALL(ctx, kvc_plan_new_lengths(plan, next->seq_lens));
    memcpy(next->indptr, indptr, sizeof(int32_t) * (size_t)(batch * heads + 1));
    memcpy(next->spans, spans, sizeof(kvc_span_t) * (size_t)indptr[batch * heads]);
    for (int32_t b = 0; b < batch; ++b) {
      next->seq_lens[b] += kvc_rng_range(&rng, 0, 8); /* appended (decode) tokens; their K/V are what is there */
      next->budgets[b] = kvc_rng_range(&rng, 1, next->seq_lens[b]);
    }
    kvc_plan_t plan2 = NULL;
    if (make_plan(ctx, next, &plan2, why, cap)) return 1;
    float *queries2 = random_queries(plan2, c->desc.num_q_heads, &rng);
    if (compress(ctx, plan2, &cache, queries2, keep, why, cap)) return 1;
    if (check_helper(ctx, plan2, &next->desc, keep, spans, indptr, why, cap)) return 1;
    kvc_plan_destroy(plan), kvc_plan_destroy(plan2);
    free(queries), free(queries2), free(keep), free(next), free(cache.k), free(cache.v);
  }
  free(c), free(spans);
  kvc_context_destroy(ctx);
  return 0;
}

/* ---- two events of a decode loop ------------------------------------------------------------------- */

enum { EV_BATCH = 2, EV_HEADS = 2, EV_GROUP = 2, EV_QHEADS = EV_HEADS * EV_GROUP, EV_STEPS = 6, EV_CAPACITY = 80 };

/* The logical state of one (sequence, head) row: the original token of each slot (appended
 * tokens numbered from 1000) and, in double, its accumulated H2O score. */
typedef struct {
  int32_t len, token[EV_CAPACITY];
  double score[EV_CAPACITY];
  float key[EV_CAPACITY][DIM];
} logical_row_t;

/* softmax_j(scale * <q, key_j>) over keys [0, count) of a row, added (times `weight`) to out. */
static void add_attention(const float *q, const logical_row_t *row, int32_t count, double scale, double weight,
                          double *out) {
  double logits[EV_CAPACITY], top = -INFINITY, sum = 0;
  for (int32_t j = 0; j < count; ++j) {
    double dot = 0;
    for (int32_t d = 0; d < DIM; ++d) dot += (double)q[d] * row->key[j][d];
    logits[j] = scale * dot;
    top = logits[j] > top ? logits[j] : top;
  }
  for (int32_t j = 0; j < count; ++j) sum += exp(logits[j] - top);
  for (int32_t j = 0; j < count; ++j) out[j] += weight * exp(logits[j] - top) / sum;
}

int kvc_test_two_event_decode(kvc_backend_t backend, uint64_t seed, char *why, size_t cap) {
  kvc_rng_t rng = {seed};
  kvc_context_t ctx = NULL;
  CHECK(kvc_context_create(backend, 0, &ctx) == KVC_SUCCESS, "context of backend %d", (int)backend);
  const double scale = 1.0 / sqrt((double)DIM);
  int32_t lens[EV_BATCH] = {40, 57}, budgets[EV_BATCH] = {20, 26}, indptr[EV_BATCH + 1] = {0, 2, 5};
  const kvc_span_t spans[5] = {{4, 20, KVC_SPAN_FAIR, 1.0f}, {20, 40, KVC_SPAN_FAIR, 2.0f},
                               {2, 30, KVC_SPAN_FAIR, 1.0f}, {12, 15, KVC_SPAN_PROTECT, 1.0f},
                               {30, 50, KVC_SPAN_FAIR, 1.0f}};
  cache_t cache;
  cache_init(&cache, EV_BATCH, EV_HEADS, EV_CAPACITY, &rng);
  logical_row_t *rows = calloc(EV_BATCH * EV_HEADS, sizeof *rows);
  for (int32_t b = 0; b < EV_BATCH; ++b)
    for (int32_t h = 0; h < EV_HEADS; ++h) {
      logical_row_t *row = &rows[b * EV_HEADS + h];
      row->len = lens[b];
      for (int32_t t = 0; t < lens[b]; ++t) row->token[t] = t, memcpy(row->key[t], key_at(&cache, b, h, t), sizeof row->key[t]);
    }

  /* event 1: H2O over a window of 12, scores in the capacity layout, compacted as an extra */
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = EV_HEADS, d.num_q_heads = EV_QHEADS, d.head_dim = DIM, d.dtype = KVC_DTYPE_F32;
  d.batch = EV_BATCH, d.seq_lens = lens, d.budgets = budgets, d.span_indptr = indptr, d.spans = spans;
  d.method = KVC_SCORE_H2O, d.window = 12, d.sink_tokens = 2, d.fairness = 1.0f;
  d.score_row_capacity = EV_CAPACITY;
  kvc_plan_t plan = NULL;
  CALL(ctx, kvc_plan_create(ctx, &d, &plan));
  kvc_plan_info_t info;
  CALL(ctx, kvc_plan_get_info(plan, &info));
  CHECK(info.score_elems == EV_BATCH * EV_HEADS * EV_CAPACITY, "score_elems %lld", (long long)info.score_elems);
  float *scores = kvc_test_workspace_new(sizeof(float) * (size_t)info.score_elems);
  float *queries = random_queries(plan, EV_QHEADS, &rng);
  size_t bytes = 0;
  CALL(ctx, kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes));
  void *ws = kvc_test_workspace_new(bytes);
  CALL(ctx, kvc_score(ctx, plan, &cache.desc, queries, NULL, scores, 0, ws, bytes, NULL));
  free(ws);
  /* its oracle: query i of the window (position p) adds softmax over [0, p] / #queries seeing j */
  int32_t obs_indptr[EV_BATCH + 1], obs_pos[64];
  CALL(ctx, kvc_plan_obs_positions(plan, obs_indptr, obs_pos));
  for (int32_t b = 0; b < EV_BATCH; ++b)
    for (int32_t h = 0; h < EV_HEADS; ++h) {
      logical_row_t *row = &rows[b * EV_HEADS + h];
      double sum[EV_CAPACITY] = {0};
      for (int32_t i = obs_indptr[b]; i < obs_indptr[b + 1]; ++i)
        for (int32_t g = h * EV_GROUP; g < (h + 1) * EV_GROUP; ++g)
          add_attention(queries + ((int64_t)i * EV_QHEADS + g) * DIM, row, obs_pos[i] + 1, scale, 1.0 / EV_GROUP, sum);
      for (int32_t j = 0; j < row->len; ++j) {
        int32_t seen = 0;
        for (int32_t i = obs_indptr[b]; i < obs_indptr[b + 1]; ++i) seen += obs_pos[i] >= j;
        row->score[j] = sum[j] / seen;
      }
    }
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  CALL(ctx, run_op(ctx, plan, KVC_OP_SELECT, scores, keep, NULL));
  CALL(ctx, kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes));
  ws = kvc_test_workspace_new(bytes);
  float *extras[1] = {scores};
  CALL(ctx, kvc_compact(ctx, plan, &cache.desc, keep, extras, 1, ws, bytes, NULL));
  free(ws);
  int32_t kept[EV_BATCH];
  CALL(ctx, kvc_plan_new_lengths(plan, kept));
  kvc_span_t *next_spans = malloc(sizeof(kvc_span_t) * MAX_SPANS);
  int32_t next_indptr[MAX_ROWS + 1];
  if (check_helper(ctx, plan, &d, keep, next_spans, next_indptr, why, cap)) return 1;
  /* the logical rows follow the keep indices; the scores' tails are zeroed for the new tokens */
  int64_t keep_at = 0;
  for (int32_t b = 0; b < EV_BATCH; ++b)
    for (int32_t h = 0; h < EV_HEADS; ++h, keep_at += kept[b]) {
      logical_row_t *row = &rows[b * EV_HEADS + h], old = *row;
      for (int32_t j = 0; j < kept[b]; ++j) {
        const int32_t t = keep[keep_at + j];
        row->token[j] = old.token[t], row->score[j] = old.score[t];
        memcpy(row->key[j], old.key[t], sizeof row->key[j]);
      }
      row->len = kept[b];
      for (int32_t j = kept[b]; j < EV_CAPACITY; ++j) scores[((int64_t)b * EV_HEADS + h) * EV_CAPACITY + j] = 0.0f;
    }
  kvc_plan_destroy(plan);
  free(queries);

  /* decode: EV_STEPS tokens appended, each step's query scored by H2O (window 1) and accumulated */
  for (int32_t step = 0; step < EV_STEPS; ++step) {
    int32_t step_lens[EV_BATCH];
    for (int32_t b = 0; b < EV_BATCH; ++b) {
      step_lens[b] = kept[b] + step + 1;
      for (int32_t h = 0; h < EV_HEADS; ++h) {
        logical_row_t *row = &rows[b * EV_HEADS + h];
        float *slot = key_at(&cache, b, h, row->len);
        for (int32_t x = 0; x < DIM; ++x) slot[x] = (float)kvc_rng_normal(&rng);
        memcpy(row->key[row->len], slot, sizeof row->key[0]);
        row->token[row->len] = 1000 + step;
        row->score[row->len++] = 0.0;
      }
    }
    kvc_plan_desc_t s = d;
    s.seq_lens = step_lens, s.budgets = step_lens, s.span_indptr = NULL, s.spans = NULL, s.window = 1, s.sink_tokens = 0;
    CALL(ctx, kvc_plan_create(ctx, &s, &plan));
    queries = random_queries(plan, EV_QHEADS, &rng);
    CALL(ctx, kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes));
    ws = kvc_test_workspace_new(bytes);
    CALL(ctx, kvc_score(ctx, plan, &cache.desc, queries, NULL, scores, 1, ws, bytes, NULL));
    free(ws);
    for (int32_t b = 0; b < EV_BATCH; ++b)
      for (int32_t h = 0; h < EV_HEADS; ++h)
        for (int32_t g = h * EV_GROUP; g < (h + 1) * EV_GROUP; ++g)
          add_attention(queries + ((int64_t)b * EV_QHEADS + g) * DIM, &rows[b * EV_HEADS + h], step_lens[b], scale,
                        1.0 / EV_GROUP, rows[b * EV_HEADS + h].score);
    kvc_plan_destroy(plan);
    free(queries);
  }
  for (int32_t r = 0; r < EV_BATCH * EV_HEADS; ++r)
    for (int32_t j = 0; j < rows[r].len; ++j) {
      const double got = scores[(int64_t)r * EV_CAPACITY + j], want = rows[r].score[j];
      CHECK(fabs(got - want) <= 1e-5 + 1e-4 * fabs(want), "row %d slot %d (token %d): accumulated H2O score %.9g, "
            "from scratch %.9g", r, j, rows[r].token[j], got, want);
    }

  /* event 2: the helper's per-head spans, from-scratch spans of the logical rows, the same scores */
  int32_t lens2[EV_BATCH], budgets2[EV_BATCH] = {18, 21}, scratch_indptr[MAX_ROWS + 1] = {0};
  kvc_span_t *scratch_spans = malloc(sizeof(kvc_span_t) * MAX_SPANS);
  for (int32_t b = 0; b < EV_BATCH; ++b) lens2[b] = kept[b] + EV_STEPS;
  for (int32_t r = 0; r < EV_BATCH * EV_HEADS; ++r) {
    int32_t count = scratch_indptr[r];
    int32_t original[EV_CAPACITY];
    for (int32_t j = 0; j < rows[r].len; ++j) original[j] = rows[r].token[j];
    if (scan_row_spans(&d, r / EV_HEADS, original, rows[r].len, scratch_spans, &count, why, cap)) return 1;
    scratch_indptr[r + 1] = count;
  }
  for (int32_t r = 0; r <= EV_BATCH * EV_HEADS; ++r)
    CHECK(next_indptr[r] == scratch_indptr[r], "event 2: helper indptr[%d] = %d, from scratch %d", r, next_indptr[r],
          scratch_indptr[r]);
  for (int32_t i = 0; i < scratch_indptr[EV_BATCH * EV_HEADS]; ++i)
    CHECK(next_spans[i].start == scratch_spans[i].start && next_spans[i].end == scratch_spans[i].end,
          "event 2: helper span %d [%d, %d), from scratch [%d, %d)", i, next_spans[i].start, next_spans[i].end,
          scratch_spans[i].start, scratch_spans[i].end);
  kvc_plan_desc_t d2 = d;
  d2.seq_lens = lens2, d2.budgets = budgets2, d2.span_indptr = next_indptr, d2.spans = next_spans;
  d2.spans_per_head = 1;
  CALL(ctx, kvc_plan_create(ctx, &d2, &plan));
  CALL(ctx, kvc_plan_get_info(plan, &info));
  int32_t *keep2 = malloc(sizeof(int32_t) * (size_t)info.keep_elems), *want = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  CALL(ctx, run_op(ctx, plan, KVC_OP_SELECT, scores, keep2, NULL));
  kvc_plan_desc_t oracle_desc = d2;
  oracle_desc.span_indptr = scratch_indptr, oracle_desc.spans = scratch_spans;
  CHECK(kvc_test_select_oracle(plan, &oracle_desc, scores, want) == 0, "the oracle failed");
  for (int64_t i = 0; i < info.keep_elems; ++i)
    CHECK(keep2[i] == want[i], "event 2: keep[%lld] = %d, oracle %d", (long long)i, keep2[i], want[i]);
  CALL(ctx, kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes));
  ws = kvc_test_workspace_new(bytes);
  CALL(ctx, kvc_compact(ctx, plan, &cache.desc, keep2, extras, 1, ws, bytes, NULL));
  free(ws);
  /* after both events every slot holds its logical token's key and score */
  keep_at = 0;
  for (int32_t b = 0; b < EV_BATCH; ++b)
    for (int32_t h = 0; h < EV_HEADS; ++h, keep_at += budgets2[b]) {
      const logical_row_t *row = &rows[b * EV_HEADS + h];
      for (int32_t j = 0; j < budgets2[b]; ++j) {
        const int32_t t = keep2[keep_at + j];
        CHECK(memcmp(key_at(&cache, b, h, j), row->key[t], sizeof row->key[t]) == 0,
              "event 2: sequence %d head %d slot %d does not hold token %d's key", b, h, j, row->token[t]);
        CHECK(fabs(scores[((int64_t)b * EV_HEADS + h) * EV_CAPACITY + j] - row->score[t]) <= 1e-5 + 1e-4 * row->score[t],
              "event 2: sequence %d head %d slot %d: compacted score %.9g, token %d's %.9g", b, h, j,
              (double)scores[((int64_t)b * EV_HEADS + h) * EV_CAPACITY + j], row->token[t], row->score[t]);
      }
    }
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
  free(rows), free(scores), free(keep), free(keep2), free(want), free(next_spans), free(scratch_spans);
  free(cache.k), free(cache.v);
  return 0;
}
