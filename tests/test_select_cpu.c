/*
 * test_select_cpu.c - kvc_select on the CPU backend against an oracle written here from the
 * header's selection semantics, done the obvious way: the protected set rebuilt from the plan
 * description, quotas solved in exact integer arithmetic (breakpoints of the bounded proportional
 * shares, then largest remainder with ties to the later partition) and checked against
 * kvc_plan_span_quotas, and the choice made by an exhaustive qsort of (score, position) with its
 * own comparator. Scores are the test's own arrays so ties, NaN, infinities and signed zeros are
 * under control. Weights are multiples of 1/4 so every w_p * L_p is an exact integer / 4.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

#define MAX_BATCH 8
#define MAX_SPANS 2048

typedef struct {
  int32_t batch, heads;
  int32_t seq_lens[MAX_BATCH], budgets[MAX_BATCH], span_indptr[MAX_BATCH + 1];
  kvc_span_t spans[MAX_SPANS];
  int32_t sink_tokens, recent_tokens, window;
  kvc_score_method_t method;
  float fairness;
  float *scores; /* score layout, filled by fill_scores */
} scenario_t;

typedef enum { SCORES_RANDOM, SCORES_EQUAL, SCORES_NAN, SCORES_SPECIAL, SCORES_FEW } score_mode_t;

static void scenario_init(scenario_t *s, int32_t heads, kvc_score_method_t method, float fairness) {
  memset(s, 0, sizeof *s);
  s->heads = heads;
  s->method = method;
  s->fairness = fairness;
  s->window = 4;
}

/* Appends a sequence; its budget is set later (set_budget) once the protected count is known. */
static void add_sequence(scenario_t *s, int32_t n, const kvc_span_t *spans, int32_t nspans) {
  cr_assert_lt(s->batch, MAX_BATCH);
  cr_assert_leq(s->span_indptr[s->batch] + nspans, MAX_SPANS);
  s->seq_lens[s->batch] = n;
  s->budgets[s->batch] = n;
  if (nspans > 0) memcpy(s->spans + s->span_indptr[s->batch], spans, sizeof(kvc_span_t) * (size_t)nspans);
  s->span_indptr[s->batch + 1] = s->span_indptr[s->batch] + nspans;
  s->batch++;
}

static int64_t total_tokens(const scenario_t *s) {
  int64_t total = 0;
  for (int32_t b = 0; b < s->batch; ++b) total += s->seq_lens[b];
  return total;
}

/* ---- the oracle ------------------------------------------------------------------------------ */

/* Protected tokens from the description: sinks, recent, PROTECT spans, the method's own. */
static int32_t oracle_protected(const scenario_t *s, int32_t b, unsigned char *prot) {
  const int32_t n = s->seq_lens[b];
  memset(prot, 0, (size_t)n);
  for (int32_t t = 0; t < n; ++t) prot[t] = t < s->sink_tokens || t >= n - s->recent_tokens;
  for (int32_t i = s->span_indptr[b]; i < s->span_indptr[b + 1]; ++i)
    if (s->spans[i].kind == KVC_SPAN_PROTECT)
      for (int32_t t = s->spans[i].start; t < s->spans[i].end; ++t) prot[t] = 1;
  int32_t own = s->method == KVC_SCORE_SNAPKV ? (s->window < n ? s->window : n) : s->method == KVC_SCORE_TOVA ? 1 : 0;
  for (int32_t t = n - own; t < n; ++t) prot[t] = 1;
  int32_t count = 0;
  for (int32_t t = 0; t < n; ++t) count += prot[t];
  return count;
}

typedef struct {
  int32_t n, k, nparts, fill, F;
  unsigned char *prot;
  int32_t *part_of;               /* partition of each token */
  int64_t c[MAX_SPANS + 1];       /* 4 * w_p * L_p, exact */
  int32_t lo[MAX_SPANS + 1], len[MAX_SPANS + 1], quota[MAX_SPANS + 1];
} oracle_seq_t;

/* mu = num / den; returns den * sum_p clamp(mu * c_p, lo_p, hi_p), exactly. */
static int64_t scaled_total(const oracle_seq_t *o, int64_t num, int64_t den) {
  int64_t sum = 0;
  for (int32_t p = 0; p < o->nparts; ++p) {
    int64_t x = num * o->c[p], lo = o->lo[p] * den, hi = o->len[p] * den;
    sum += x < lo ? lo : x > hi ? hi : x;
  }
  return sum;
}

typedef struct { int64_t num, den; } ratio_t;

static int ratio_cmp(ratio_t a, ratio_t b) {
  int64_t x = a.num * b.den, y = b.num * a.den;
  return (x > y) - (x < y);
}

/* Integer quotas lo_p <= q_p <= L_p, sum F, proportional to c_p, largest remainder, ties to the
 * later partition - all in exact integer arithmetic. */
static void oracle_quotas(oracle_seq_t *o) {
  const int32_t np = o->nparts;
  ratio_t breaks[2 * (MAX_SPANS + 1)];
  int32_t nb = 0;
  for (int32_t p = 0; p < np; ++p) {
    breaks[nb++] = (ratio_t){o->lo[p], o->c[p]};
    breaks[nb++] = (ratio_t){o->len[p], o->c[p]};
  }
  for (int32_t i = 1; i < nb; ++i)
    for (int32_t j = i; j > 0 && ratio_cmp(breaks[j - 1], breaks[j]) > 0; --j) {
      ratio_t t = breaks[j];
      breaks[j] = breaks[j - 1];
      breaks[j - 1] = t;
    }
  int32_t chosen = 0;
  while (scaled_total(o, breaks[chosen].num, breaks[chosen].den) < (int64_t)o->F * breaks[chosen].den) chosen++;
  ratio_t upper = breaks[chosen], lower = {0, 1};
  for (int32_t i = chosen - 1; i >= 0; --i)
    if (ratio_cmp(breaks[i], upper) < 0) {
      lower = breaks[i];
      break;
    }
  /* On the open interval (lower, upper) the total is linear: partitions with lo/c >= upper sit at
   * lo, those with hi/c <= lower at hi, the rest share what is left in proportion to c. With
   * upper = 0 the total is already F at mu = 0: everything sits at lo. */
  enum { AT_LO, AT_HI, FREE } state[MAX_SPANS + 1];
  int64_t fixed = 0, free_c = 0;
  for (int32_t p = 0; p < np; ++p) {
    ratio_t lo = {o->lo[p], o->c[p]}, hi = {o->len[p], o->c[p]};
    state[p] = upper.num == 0 || ratio_cmp(lo, upper) >= 0 ? AT_LO : ratio_cmp(hi, lower) <= 0 ? AT_HI : FREE;
    if (state[p] == FREE) free_c += o->c[p];
    else fixed += state[p] == AT_LO ? o->lo[p] : o->len[p];
  }
  const int64_t left = o->F - fixed;
  cr_assert(free_c > 0 || left == 0, "oracle: nothing free but %lld tokens to share", (long long)left);
  int64_t rem[MAX_SPANS + 1], assigned = 0;
  for (int32_t p = 0; p < np; ++p) {
    o->quota[p] = state[p] == FREE ? (int32_t)(left * o->c[p] / free_c) : state[p] == AT_LO ? o->lo[p] : o->len[p];
    rem[p] = state[p] == FREE ? left * o->c[p] % free_c : 0;
    assigned += o->quota[p];
  }
  while (assigned < o->F) {
    int32_t best = -1;
    for (int32_t p = 0; p < np; ++p)
      if (rem[p] >= 0 && (best < 0 || rem[p] >= rem[best])) best = p; /* >=: ties go to the later one */
    o->quota[best]++;
    rem[best] = -1;
    assigned++;
  }
}

static void oracle_sequence(const scenario_t *s, int32_t b, oracle_seq_t *o) {
  const int32_t n = s->seq_lens[b];
  o->n = n;
  o->k = s->budgets[b] < n ? s->budgets[b] : n;
  o->prot = (unsigned char *)malloc((size_t)n);
  o->part_of = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
  oracle_protected(s, b, o->prot);
  for (int32_t t = 0; t < n; ++t) o->part_of[t] = -1;
  o->nparts = 0;
  for (int32_t i = s->span_indptr[b]; i < s->span_indptr[b + 1]; ++i) {
    const kvc_span_t *sp = &s->spans[i];
    if (sp->kind != KVC_SPAN_FAIR) continue;
    const int32_t p = o->nparts++;
    for (int32_t t = sp->start; t < sp->end; ++t) o->part_of[t] = p;
    double quarters = sp->weight * 4.0;
    cr_assert_eq(quarters, floor(quarters), "test weights must be multiples of 1/4");
    o->c[p] = (int64_t)quarters * (sp->end - sp->start);
  }
  int32_t implicit_len = 0;
  for (int32_t t = 0; t < n; ++t) implicit_len += o->part_of[t] < 0;
  if (implicit_len > 0) {
    const int32_t p = o->nparts++;
    for (int32_t t = 0; t < n; ++t)
      if (o->part_of[t] < 0) o->part_of[t] = p;
    o->c[p] = 4 * (int64_t)implicit_len;
  }
  int32_t sum_lo = 0;
  for (int32_t p = 0; p < o->nparts; ++p) o->lo[p] = o->len[p] = 0;
  for (int32_t t = 0; t < n; ++t) {
    o->len[o->part_of[t]]++;
    o->lo[o->part_of[t]] += o->prot[t];
    sum_lo += o->prot[t];
  }
  const int32_t rounded = (int32_t)floor((double)s->fairness * o->k + 0.5);
  o->F = rounded > sum_lo ? rounded : sum_lo;
  o->fill = o->k - o->F;
  oracle_quotas(o);
}

static void oracle_free(oracle_seq_t *o) {
  free(o->prot);
  free(o->part_of);
}

typedef struct {
  float score;
  int32_t pos;
} entry_t;

/* Descending priority: larger score first, NaN after everything, equal scores (and -0 vs +0, and
 * NaN vs NaN) the later position first. */
static int by_priority(const void *pa, const void *pb) {
  const entry_t *a = (const entry_t *)pa, *b = (const entry_t *)pb;
  int a_nan = isnan(a->score), b_nan = isnan(b->score);
  if (a_nan != b_nan) return a_nan - b_nan;
  if (!a_nan && a->score != b->score) return a->score > b->score ? -1 : 1;
  return (b->pos > a->pos) - (b->pos < a->pos);
}

static entry_t *sorted_row(const float *row, int32_t n) {
  entry_t *e = (entry_t *)malloc(sizeof(entry_t) * (size_t)n);
  for (int32_t t = 0; t < n; ++t) e[t] = (entry_t){row[t], t};
  qsort(e, (size_t)n, sizeof(entry_t), by_priority);
  return e;
}

/* The full selection of one row, by the header's steps 1-5; writes o->k ascending indices. */
static void oracle_select(const oracle_seq_t *o, const float *row, int32_t *keep) {
  const int32_t n = o->n;
  entry_t *order = sorted_row(row, n);
  unsigned char *kept = (unsigned char *)malloc((size_t)n);
  memcpy(kept, o->prot, (size_t)n);
  for (int32_t p = 0; p < o->nparts; ++p) {
    int32_t need = o->quota[p] - o->lo[p];
    for (int32_t i = 0; i < n && need > 0; ++i)
      if (o->part_of[order[i].pos] == p && !kept[order[i].pos]) kept[order[i].pos] = 1, need--;
  }
  int32_t need = o->fill;
  for (int32_t i = 0; i < n && need > 0; ++i)
    if (!kept[order[i].pos]) kept[order[i].pos] = 1, need--;
  int32_t w = 0;
  for (int32_t t = 0; t < n; ++t)
    if (kept[t]) keep[w++] = t;
  cr_assert_eq(w, o->k, "oracle kept %d tokens, expected %d", w, o->k);
  free(kept);
  free(order);
}

/* ---- running the library --------------------------------------------------------------------- */

typedef struct {
  kvc_context_t ctx;
  kvc_plan_t plan;
  int32_t *keep, *quotas, *implicit;
  int64_t keep_elems;
} run_t;

static kvc_plan_desc_t describe(const scenario_t *s) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_kv_heads = s->heads;
  d.num_q_heads = 2 * s->heads;
  d.head_dim = 8;
  d.dtype = KVC_DTYPE_F32;
  d.batch = s->batch;
  d.seq_lens = s->seq_lens;
  d.budgets = s->budgets;
  d.span_indptr = s->span_indptr;
  d.spans = s->spans;
  d.method = s->method;
  d.window = s->window;
  d.sink_tokens = s->sink_tokens;
  d.recent_tokens = s->recent_tokens;
  d.fairness = s->fairness;
  return d;
}

static void run_select(const scenario_t *s, run_t *r) {
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &r->ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = describe(s);
  cr_assert_eq(kvc_plan_create(r->ctx, &d, &r->plan), KVC_SUCCESS, "%s", kvc_last_error(r->ctx));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(r->plan, &info), KVC_SUCCESS);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(r->plan, KVC_OP_SELECT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  memset(ws, 0xA5, bytes ? bytes : 1); /* contents need not be initialised */
  r->keep_elems = info.keep_elems;
  r->keep = (int32_t *)malloc(sizeof(int32_t) * (size_t)(info.keep_elems + 1));
  cr_assert_eq(kvc_select(r->ctx, r->plan, s->scores, r->keep, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(r->ctx));
  /* a second run on a dirty workspace must give the same bits */
  int32_t *again = (int32_t *)malloc(sizeof(int32_t) * (size_t)(info.keep_elems + 1));
  cr_assert_eq(kvc_select(r->ctx, r->plan, s->scores, again, ws, bytes, NULL), KVC_SUCCESS);
  cr_assert_eq(memcmp(r->keep, again, sizeof(int32_t) * (size_t)info.keep_elems), 0, "two runs differ");
  free(again);
  free(ws);
  r->quotas = (int32_t *)malloc(sizeof(int32_t) * (size_t)(info.total_spans + 1));
  r->implicit = (int32_t *)malloc(sizeof(int32_t) * (size_t)s->batch);
  cr_assert_eq(kvc_plan_span_quotas(r->plan, r->quotas, r->implicit), KVC_SUCCESS);
}

static void run_free(run_t *r) {
  kvc_plan_destroy(r->plan);
  kvc_context_destroy(r->ctx);
  free(r->keep);
  free(r->quotas);
  free(r->implicit);
}

static const int32_t *keep_row(const scenario_t *s, const run_t *r, int32_t b, int32_t h, int32_t *k) {
  int64_t offset = 0;
  for (int32_t i = 0; i < b; ++i) offset += s->budgets[i] < s->seq_lens[i] ? s->budgets[i] : s->seq_lens[i];
  *k = s->budgets[b] < s->seq_lens[b] ? s->budgets[b] : s->seq_lens[b];
  return r->keep + s->heads * offset + (int64_t)h * *k;
}

static const float *score_row(const scenario_t *s, int32_t b, int32_t h) {
  int64_t offset = 0;
  for (int32_t i = 0; i < b; ++i) offset += s->seq_lens[i];
  return s->scores + s->heads * offset + (int64_t)h * s->seq_lens[b];
}

/* ---- the check every scenario goes through ---------------------------------------------------- */

static void check_quotas(const scenario_t *s, const run_t *r, int32_t b, const oracle_seq_t *o) {
  int32_t p = 0;
  for (int32_t i = s->span_indptr[b]; i < s->span_indptr[b + 1]; ++i) {
    const kvc_span_t *sp = &s->spans[i];
    int32_t expect = sp->kind == KVC_SPAN_FAIR ? o->quota[p++] : sp->end - sp->start;
    cr_assert_eq(r->quotas[i], expect, "sequence %d span %d [%d, %d): quota %d, oracle %d", b, i, sp->start, sp->end,
                 r->quotas[i], expect);
  }
  cr_assert_eq(r->implicit[b], p < o->nparts ? o->quota[p] : -1, "sequence %d: implicit quota %d", b, r->implicit[b]);
}

/* The keep layout r->keep against the oracle of s's scores (and the quotas against its quotas). */
static void check_keep(const scenario_t *s, const run_t *r) {
  for (int32_t b = 0; b < s->batch; ++b) {
    oracle_seq_t *o = (oracle_seq_t *)malloc(sizeof *o);
    oracle_sequence(s, b, o);
    check_quotas(s, r, b, o);
    int32_t *expect = (int32_t *)malloc(sizeof(int32_t) * (size_t)o->k);
    for (int32_t h = 0; h < s->heads; ++h) {
      int32_t k;
      const int32_t *got = keep_row(s, r, b, h, &k);
      cr_assert_eq(k, o->k);
      int32_t kept_protected = 0;
      for (int32_t j = 0; j < k; ++j) {
        cr_assert(got[j] >= 0 && got[j] < o->n, "sequence %d head %d: index %d out of range", b, h, got[j]);
        cr_assert(j == 0 || got[j] > got[j - 1], "sequence %d head %d: not ascending at %d", b, h, j);
        kept_protected += o->prot[got[j]];
      }
      int32_t protected_total = 0;
      for (int32_t t = 0; t < o->n; ++t) protected_total += o->prot[t];
      cr_assert_eq(kept_protected, protected_total, "sequence %d head %d: a protected token was evicted", b, h);
      oracle_select(o, score_row(s, b, s->method == KVC_SCORE_TOVA ? 0 : h), expect);
      for (int32_t j = 0; j < k; ++j)
        cr_assert_eq(got[j], expect[j], "sequence %d (n %d, k %d) head %d: keep[%d] = %d, oracle %d", b, o->n, k, h, j,
                     got[j], expect[j]);
    }
    free(expect);
    oracle_free(o);
    free(o);
  }
}

static void check_scenario(const scenario_t *s) {
  run_t r;
  run_select(s, &r);
  check_keep(s, &r);
  run_free(&r);
}

/* ---- scenario generators ---------------------------------------------------------------------- */

static float random_weight(kvc_rng_t *rng) {
  static const float weights[] = {0.25f, 0.5f, 1.0f, 1.0f, 1.5f, 2.0f, 3.0f};
  return weights[kvc_rng_range(rng, 0, 6)];
}

/* Random FAIR spans (adjacent or gapped, some one token long) and PROTECT spans (anywhere: inside
 * or across FAIR ones), merged by start. Returns the span count. */
static int32_t random_spans(kvc_rng_t *rng, int32_t n, int32_t max_fair, int32_t max_protect, kvc_span_t *out) {
  kvc_span_t fair[MAX_SPANS], prot[MAX_SPANS];
  int32_t nf = 0, np = 0, t = 0, typical = 2 * n / (max_fair + 1) + 1;
  while (nf < max_fair && t < n) {
    int32_t start = t + (kvc_rng_range(rng, 0, 1) ? 0 : kvc_rng_range(rng, 1, typical));
    if (start >= n) break;
    int32_t len = kvc_rng_range(rng, 0, 4) == 0 ? 1 : kvc_rng_range(rng, 1, typical);
    int32_t end = start + len < n ? start + len : n;
    fair[nf++] = (kvc_span_t){start, end, KVC_SPAN_FAIR, random_weight(rng)};
    t = end;
  }
  for (t = 0; np < max_protect && t < n;) {
    int32_t start = t + kvc_rng_range(rng, 0, typical);
    if (start >= n) break;
    int32_t end = start + kvc_rng_range(rng, 1, 3);
    end = end < n ? end : n;
    prot[np++] = (kvc_span_t){start, end, KVC_SPAN_PROTECT, 1.0f};
    t = end + kvc_rng_range(rng, 0, typical);
  }
  int32_t i = 0, j = 0, w = 0;
  while (i < nf || j < np) out[w++] = (j >= np || (i < nf && fair[i].start <= prot[j].start)) ? fair[i++] : prot[j++];
  return w;
}

/* Infinities, zeros of both signs, denormals, ordinary values, and NaNs of both signs with
 * quiet, signalling and payload bit patterns (all must rank alike: below -inf). */
static float special_value(kvc_rng_t *rng) {
  static const float values[] = {INFINITY, -INFINITY, 0.0f, -0.0f, 1e-45f, -1e-45f, 1.0f, -1.0f, 3.5f};
  static const uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff812345u, 0x7fffffffu};
  int32_t pick = kvc_rng_range(rng, 0, 13);
  if (pick < 9) return values[pick];
  float nan;
  memcpy(&nan, &nans[pick - 9], sizeof nan);
  return nan;
}

/* Fills the score layout; TOVA gets the same row on every head, as kvc_score gives it. */
static void fill_scores(scenario_t *s, score_mode_t mode, kvc_rng_t *rng) {
  free(s->scores);
  s->scores = (float *)malloc(sizeof(float) * (size_t)(s->heads * total_tokens(s) + 1));
  for (int32_t b = 0; b < s->batch; ++b)
    for (int32_t h = 0; h < s->heads; ++h) {
      float *row = (float *)score_row(s, b, h);
      for (int32_t t = 0; t < s->seq_lens[b]; ++t) {
        if (s->method == KVC_SCORE_TOVA && h > 0) {
          row[t] = score_row(s, b, 0)[t];
          continue;
        }
        switch (mode) {
          case SCORES_RANDOM: row[t] = (float)kvc_rng_normal(rng); break;
          case SCORES_EQUAL: row[t] = 0.25f; break;
          case SCORES_NAN: row[t] = NAN; break;
          case SCORES_SPECIAL: row[t] = special_value(rng); break;
          case SCORES_FEW: row[t] = (float)kvc_rng_range(rng, 0, 3); break;
        }
      }
    }
}

/* Budget between the protected count and past the length, with the edges k = |P| and k = n
 * (and budget > n) each drawn often. */
static void random_budget(scenario_t *s, int32_t b, kvc_rng_t *rng) {
  const int32_t n = s->seq_lens[b];
  unsigned char *prot = (unsigned char *)malloc((size_t)n);
  int32_t floor_k = oracle_protected(s, b, prot);
  free(prot);
  floor_k = floor_k > 0 ? floor_k : 1;
  switch (kvc_rng_range(rng, 0, 5)) {
    case 0: s->budgets[b] = floor_k; break;
    case 1: s->budgets[b] = n + kvc_rng_range(rng, 0, 3); break;
    default: s->budgets[b] = kvc_rng_range(rng, floor_k, n); break;
  }
}

static void random_scenario(scenario_t *s, kvc_rng_t *rng, const int32_t *lengths, int32_t nlengths) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_STREAMING, KVC_SCORE_KNORM, KVC_SCORE_H2O,
                                               KVC_SCORE_SNAPKV, KVC_SCORE_TOVA};
  static const float fairness[] = {0.0f, 0.5f, 1.0f, 0.3f};
  scenario_init(s, kvc_rng_range(rng, 1, 3), methods[kvc_rng_range(rng, 0, 4)], fairness[kvc_rng_range(rng, 0, 3)]);
  s->window = kvc_rng_range(rng, 1, 6);
  s->sink_tokens = kvc_rng_range(rng, 0, 2) ? 0 : kvc_rng_range(rng, 1, 4);
  s->recent_tokens = kvc_rng_range(rng, 0, 2) ? 0 : kvc_rng_range(rng, 1, 4);
  int32_t batch = kvc_rng_range(rng, 1, 4);
  for (int32_t b = 0; b < batch; ++b) {
    int32_t n = lengths[kvc_rng_range(rng, 0, nlengths - 1)];
    kvc_span_t spans[MAX_SPANS];
    int32_t max_fair = kvc_rng_range(rng, 0, n < 40 ? n : 40);
    int32_t nspans = random_spans(rng, n, max_fair, kvc_rng_range(rng, 0, 6), spans);
    add_sequence(s, n, spans, nspans);
    random_budget(s, b, rng);
  }
}

/* ---- tests ------------------------------------------------------------------------------------ */

static void random_rounds(uint64_t seed, int rounds, const int32_t *lengths, int32_t nlengths) {
  kvc_rng_t rng = {seed};
  for (int round = 0; round < rounds; ++round) {
    scenario_t *s = (scenario_t *)calloc(1, sizeof *s);
    random_scenario(s, &rng, lengths, nlengths);
    fill_scores(s, (score_mode_t)kvc_rng_range(&rng, 0, 4), &rng);
    check_scenario(s);
    free(s->scores);
    free(s);
  }
}

Test(select_cpu, random_short_sequences_every_score_mode) {
  static const int32_t lengths[] = {1, 2, 3, 5, 17, 31, 64};
  random_rounds(11, 2000, lengths, 7);
}

Test(select_cpu, random_long_sequences_every_score_mode) {
  static const int32_t lengths[] = {17, 1000, 4096, 777};
  random_rounds(12, 150, lengths, 4);
}

/* One sequence, given spans, each budget from |P| to n, each score mode. */
static void sweep_budgets(scenario_t *s, int32_t n, const kvc_span_t *spans, int32_t nspans, uint64_t seed) {
  kvc_rng_t rng = {seed};
  unsigned char *prot = (unsigned char *)malloc((size_t)n + 1);
  add_sequence(s, n, spans, nspans);
  int32_t floor_k = oracle_protected(s, 0, prot);
  free(prot);
  for (int32_t k = floor_k > 0 ? floor_k : 1; k <= n + 1; ++k)
    for (int mode = SCORES_RANDOM; mode <= SCORES_FEW; ++mode) {
      s->budgets[0] = k;
      fill_scores(s, (score_mode_t)mode, &rng);
      check_scenario(s);
    }
  free(s->scores);
}

Test(select_cpu, tiny_sequences_every_budget) {
  for (int32_t n = 1; n <= 4; ++n)
    for (int fair = 0; fair <= 2; ++fair) {
      scenario_t s;
      scenario_init(&s, 2, KVC_SCORE_STREAMING, fair * 0.5f);
      kvc_span_t span = {0, 1, KVC_SPAN_FAIR, 1.0f};
      sweep_budgets(&s, n, &span, n > 1 ? 1 : 0, 100 + n);
    }
}

Test(select_cpu, sinks_recent_and_protect_inside_fair_every_budget) {
  const kvc_span_t spans[] = {{0, 10, KVC_SPAN_FAIR, 1.0f},  {4, 6, KVC_SPAN_PROTECT, 1.0f},
                              {10, 11, KVC_SPAN_FAIR, 2.0f}, {14, 30, KVC_SPAN_FAIR, 0.5f},
                              {20, 33, KVC_SPAN_PROTECT, 1.0f}, {36, 37, KVC_SPAN_PROTECT, 1.0f}};
  for (int fair = 0; fair <= 2; ++fair) {
    scenario_t s;
    scenario_init(&s, 2, KVC_SCORE_KNORM, fair * 0.5f);
    s.sink_tokens = 2;
    s.recent_tokens = 3;
    sweep_budgets(&s, 40, spans, 6, 200 + fair);
  }
}

/* Equal scores everywhere: ties cross every partition border and are broken by position alone. */
Test(select_cpu, ties_across_partition_borders) {
  const kvc_span_t spans[] = {{3, 9, KVC_SPAN_FAIR, 1.0f}, {9, 12, KVC_SPAN_FAIR, 1.0f}, {15, 22, KVC_SPAN_FAIR, 3.0f}};
  for (int fair = 0; fair <= 4; ++fair) {
    scenario_t s;
    scenario_init(&s, 3, KVC_SCORE_H2O, fair * 0.25f);
    add_sequence(&s, 25, spans, 3);
    s.scores = (float *)malloc(sizeof(float) * 3 * 25);
    for (int32_t i = 0; i < 3 * 25; ++i) {
      float v = (float)((i % 25) / 5); /* runs of 5 equal scores; the zeros alternate in sign */
      s.scores[i] = v == 0.0f && i % 2 ? -0.0f : v;
    }
    for (int32_t k = 1; k <= 25; ++k) {
      s.budgets[0] = k;
      check_scenario(&s);
    }
    free(s.scores);
  }
}

/* A heavy span takes everything it has (q = L) while a light one gets 0: c = 12, 14, 1/4 and 3
 * for the implicit partition; mu = 20 / 29.25 puts the heavy span above its 4 tokens, the rest
 * share 16 as 12.99, 0.23 and 2.78. */
Test(select_cpu, quotas_of_zero_and_of_the_whole_partition) {
  const kvc_span_t spans[] = {{0, 4, KVC_SPAN_FAIR, 3.0f}, {4, 60, KVC_SPAN_FAIR, 0.25f}, {60, 61, KVC_SPAN_FAIR, 0.25f}};
  scenario_t s;
  scenario_init(&s, 1, KVC_SCORE_STREAMING, 1.0f);
  add_sequence(&s, 64, spans, 3);
  s.budgets[0] = 20;
  kvc_rng_t rng = {7};
  fill_scores(&s, SCORES_RANDOM, &rng);
  check_scenario(&s);
  run_t r;
  run_select(&s, &r);
  cr_assert_eq(r.quotas[0], 4, "the heavy span keeps all its 4 tokens (quota %d)", r.quotas[0]);
  cr_assert_eq(r.quotas[2], 0, "the one-token light span gets nothing (quota %d)", r.quotas[2]);
  run_free(&r);
  free(s.scores);
}

Test(select_cpu, many_partitions_unequal_weights) {
  kvc_rng_t rng = {31};
  for (int round = 0; round < 12; ++round) {
    scenario_t *s = (scenario_t *)calloc(1, sizeof *s);
    scenario_init(s, 2, KVC_SCORE_STREAMING, round % 3 * 0.5f);
    kvc_span_t spans[MAX_SPANS];
    int32_t n = round < 6 ? 1000 : 4096;
    int32_t nspans = random_spans(&rng, n, 200, 20, spans);
    add_sequence(s, n, spans, nspans);
    random_budget(s, 0, &rng);
    fill_scores(s, round % 2 ? SCORES_FEW : SCORES_RANDOM, &rng);
    check_scenario(s);
    free(s->scores);
    free(s);
  }
}

/* Fairness 1, weight 1, nothing protected: every partition keeps k * L_p / n tokens, within one. */
Test(select_cpu, fairness_one_equal_retention_rates) {
  kvc_rng_t rng = {41};
  for (int round = 0; round < 40; ++round) {
    scenario_t s;
    scenario_init(&s, 2, KVC_SCORE_STREAMING, 1.0f);
    kvc_span_t spans[64];
    int32_t n = kvc_rng_range(&rng, 20, 3000), nspans = 0, covered = 0;
    while (covered < n && nspans < 64) {
      int32_t start = covered + kvc_rng_range(&rng, 0, 30), end = start + kvc_rng_range(&rng, 1, 200);
      if (start >= n) break;
      spans[nspans++] = (kvc_span_t){start, end < n ? end : n, KVC_SPAN_FAIR, 1.0f};
      covered = spans[nspans - 1].end;
    }
    add_sequence(&s, n, spans, nspans);
    s.budgets[0] = kvc_rng_range(&rng, 1, n);
    fill_scores(&s, SCORES_RANDOM, &rng);
    check_scenario(&s);
    run_t r;
    run_select(&s, &r);
    int32_t part_of[3000], len[65] = {0}; /* partition of each token; nspans = the implicit one */
    for (int32_t t = 0; t < n; ++t) part_of[t] = nspans;
    for (int32_t i = 0; i < nspans; ++i)
      for (int32_t t = spans[i].start; t < spans[i].end; ++t) part_of[t] = i;
    for (int32_t t = 0; t < n; ++t) len[part_of[t]]++;
    for (int32_t h = 0; h < 2; ++h) {
      int32_t k, kept[65] = {0};
      const int32_t *keep = keep_row(&s, &r, 0, h, &k);
      for (int32_t j = 0; j < k; ++j) kept[part_of[keep[j]]]++;
      for (int32_t p = 0; p <= nspans; ++p) {
        double ideal = (double)k * len[p] / n;
        cr_assert(fabs(kept[p] - ideal) < 1.0, "partition %d of %d tokens keeps %d, ideal %.3f (k %d, n %d)", p,
                  len[p], kept[p], ideal, k, n);
      }
    }
    run_free(&r);
    free(s.scores);
  }
}

/* Fairness 0 is the plain policy: the protected set plus the top (k - |P|) of the rest. */
Test(select_cpu, fairness_zero_is_plain_top_k_with_protection) {
  kvc_rng_t rng = {51};
  static const int32_t lengths[] = {1, 2, 17, 300, 1000};
  for (int round = 0; round < 60; ++round) {
    scenario_t *s = (scenario_t *)calloc(1, sizeof *s);
    random_scenario(s, &rng, lengths, 5);
    s->fairness = 0.0f;
    fill_scores(s, (score_mode_t)kvc_rng_range(&rng, 0, 4), &rng);
    run_t r;
    run_select(s, &r);
    for (int32_t b = 0; b < s->batch; ++b) {
      const int32_t n = s->seq_lens[b];
      unsigned char *kept = (unsigned char *)malloc((size_t)n);
      int32_t need = (s->budgets[b] < n ? s->budgets[b] : n) - oracle_protected(s, b, kept);
      for (int32_t h = 0; h < s->heads; ++h) {
        unsigned char *mine = (unsigned char *)malloc((size_t)n);
        memcpy(mine, kept, (size_t)n);
        entry_t *order = sorted_row(score_row(s, b, s->method == KVC_SCORE_TOVA ? 0 : h), n);
        for (int32_t i = 0, left = need; i < n && left > 0; ++i)
          if (!mine[order[i].pos]) mine[order[i].pos] = 1, left--;
        int32_t k;
        const int32_t *keep = keep_row(s, &r, b, h, &k);
        for (int32_t j = 0, t = 0; t < n; ++t)
          if (mine[t]) cr_assert_eq(keep[j++], t, "sequence %d head %d: plain top-k keeps %d", b, h, t);
        free(order);
        free(mine);
      }
      free(kept);
    }
    run_free(&r);
    free(s->scores);
    free(s);
  }
}

Test(select_cpu, tova_rows_identical_across_heads) {
  kvc_rng_t rng = {61};
  const kvc_span_t spans[] = {{0, 300, KVC_SPAN_FAIR, 1.0f}, {300, 301, KVC_SPAN_FAIR, 2.0f}, {500, 900, KVC_SPAN_FAIR, 1.0f}};
  scenario_t s;
  scenario_init(&s, 4, KVC_SCORE_TOVA, 0.5f);
  add_sequence(&s, 1000, spans, 3);
  add_sequence(&s, 17, NULL, 0);
  s.budgets[0] = 300;
  s.budgets[1] = 5;
  fill_scores(&s, SCORES_FEW, &rng);
  check_scenario(&s);
  run_t r;
  run_select(&s, &r);
  for (int32_t b = 0; b < 2; ++b)
    for (int32_t h = 1; h < 4; ++h) {
      int32_t k;
      const int32_t *first = keep_row(&s, &r, b, 0, &k), *row = keep_row(&s, &r, b, h, &k);
      cr_assert_eq(memcmp(first, row, sizeof(int32_t) * (size_t)k), 0, "sequence %d head %d differs from head 0", b, h);
    }
  run_free(&r);
  /* Scores that differ per head (not kvc_score's): head 0's row decides for every head, on both
   * backends (check_scenario's oracle reads head 0 for TOVA). */
  for (int32_t b = 0; b < 2; ++b)
    for (int32_t h = 1; h < 4; ++h)
      for (int32_t t = 0; t < s.seq_lens[b]; ++t) ((float *)score_row(&s, b, h))[t] = (float)kvc_rng_normal(&rng);
  check_scenario(&s);
  free(s.scores);
}

/* The special orders one by one: NaN below -inf, -0 equal to +0 (so position decides). */
Test(select_cpu, nan_infinity_and_signed_zero_order) {
  scenario_t s;
  scenario_init(&s, 1, KVC_SCORE_STREAMING, 0.0f);
  add_sequence(&s, 6, NULL, 0);
  float row[6] = {-INFINITY, NAN, 0.0f, -0.0f, INFINITY, NAN};
  s.scores = row;
  const int32_t expect[4][4] = {{4}, {3, 4}, {2, 3, 4}, {0, 2, 3, 4}};
  for (int32_t k = 1; k <= 4; ++k) {
    s.budgets[0] = k;
    run_t r;
    run_select(&s, &r);
    for (int32_t j = 0; j < k; ++j) cr_assert_eq(r.keep[j], expect[k - 1][j], "k %d: keep[%d] = %d", k, j, r.keep[j]);
    run_free(&r);
  }
  s.budgets[0] = 5; /* then the later NaN */
  run_t r;
  run_select(&s, &r);
  const int32_t five[5] = {0, 2, 3, 4, 5};
  cr_assert_eq(memcmp(r.keep, five, sizeof five), 0);
  run_free(&r);
}

/* kvc_select_layers: random scenarios over 3 layers of different scores (every score mode, one per
 * layer), each layer's stacked keep layout against the oracle of its own scores. */
Test(select_cpu, layers_in_one_call_every_layer_against_the_oracle) {
  enum { L = 3 };
  static const int32_t lengths[] = {1, 17, 300, 1000};
  kvc_rng_t rng = {13};
  for (int round = 0; round < 40; ++round) {
    scenario_t *s = (scenario_t *)calloc(1, sizeof *s);
    random_scenario(s, &rng, lengths, 4);
    const int64_t elems = s->heads * total_tokens(s);
    float *scores = (float *)malloc(sizeof(float) * (size_t)(L * elems));
    for (int32_t l = 0; l < L; ++l) {
      fill_scores(s, (score_mode_t)((round + l) % 5), &rng);
      memcpy(scores + l * elems, s->scores, sizeof(float) * (size_t)elems);
    }
    run_t r;
    run_select(s, &r); /* the plan and quotas (and a single-layer run on the last layer's scores) */
    kvc_workspace_layout_t layout;
    cr_assert_eq(kvc_plan_workspace_layout(r.plan, KVC_OP_SELECT, L, &layout), KVC_SUCCESS);
    void *ws = kvc_test_workspace_new(layout.workspace_bytes);
    int32_t *keep = (int32_t *)malloc(sizeof(int32_t) * (size_t)(L * r.keep_elems + 1));
    cr_assert_eq(kvc_select_layers(r.ctx, r.plan, L, scores, keep, ws, layout.workspace_bytes, NULL), KVC_SUCCESS, "%s",
                 kvc_last_error(r.ctx));
    int32_t *first = r.keep;
    for (int32_t l = 0; l < L; ++l) {
      memcpy(s->scores, scores + l * elems, sizeof(float) * (size_t)elems);
      r.keep = keep + l * r.keep_elems;
      check_keep(s, &r);
    }
    r.keep = first;
    cr_assert_eq(kvc_select_layers(r.ctx, r.plan, 0, scores, keep, ws, layout.workspace_bytes, NULL),
                 KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(r.ctx), "num_layers is 0") != NULL, "%s", kvc_last_error(r.ctx));
    free(ws), free(keep), free(scores);
    run_free(&r);
    free(s->scores);
    free(s);
  }
}
