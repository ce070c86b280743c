/* outcome_cases.c - see outcome_cases.h. */
#include "outcome_cases.h"

#include <stdlib.h>
#include <string.h>

static void add_span(kvc_test_outcome_case_t *c, int32_t b, int32_t start, int32_t end, int32_t kind, float weight) {
  c->spans[c->span_indptr[b + 1]++] = (kvc_span_t){start, end, kind, weight};
}

/* Sequences are given in order; each starts its span list where the previous one ended. */
static void begin_sequence(kvc_test_outcome_case_t *c, int32_t b, int32_t n, int32_t budget) {
  c->seq_lens[b] = n;
  c->budgets[b] = budget;
  c->span_indptr[b + 1] = c->span_indptr[b];
  c->batch = b + 1;
}

int kvc_test_outcome_cases(kvc_test_outcome_case_t *out) {
  int count = 0;
  kvc_test_outcome_case_t *c;

  /* The engine's default SnapKV window 64 with budgets of a quarter of each prompt: the 100-token
   * prompt protects its 64 window tokens but keeps 25, the 40-token one protects all 40. */
  c = &out[count++];
  memset(c, 0, sizeof *c);
  strcpy(c->name, "snapkv_window64");
  c->method = KVC_SCORE_SNAPKV;
  c->window = 64;
  begin_sequence(c, 0, 300, 75);
  begin_sequence(c, 1, 100, 25);
  begin_sequence(c, 2, 40, 10);
  c->first_over_budget = 1;

  /* STREAMING with 4 sinks and 8 recents, fair eviction over FAIR spans with a PROTECT span
   * inside: a sequence fully protected (clamped to its own length), one within budget, one whose
   * protected count equals its budget (compressed), one clamped below its length. */
  c = &out[count++];
  memset(c, 0, sizeof *c);
  strcpy(c->name, "streaming_spans");
  c->method = KVC_SCORE_STREAMING;
  c->sinks = 4;
  c->recent = 8;
  c->fairness = 1.0f;
  begin_sequence(c, 0, 50, 30);
  add_span(c, 0, 0, 25, KVC_SPAN_FAIR, 1.0f);
  add_span(c, 0, 10, 14, KVC_SPAN_PROTECT, 1.0f);
  add_span(c, 0, 25, 50, KVC_SPAN_FAIR, 2.0f);
  begin_sequence(c, 1, 20, 5);
  add_span(c, 1, 0, 20, KVC_SPAN_PROTECT, 1.0f);
  begin_sequence(c, 2, 200, 250);
  add_span(c, 2, 0, 120, KVC_SPAN_FAIR, 1.0f);
  begin_sequence(c, 3, 13, 12);
  begin_sequence(c, 4, 30, 9);
  add_span(c, 4, 5, 25, KVC_SPAN_FAIR, 1.0f);
  c->first_over_budget = 1;

  /* TOVA protects its last token: with 2 sinks a budget of 2 is one short. */
  c = &out[count++];
  memset(c, 0, sizeof *c);
  strcpy(c->name, "tova_sinks");
  c->method = KVC_SCORE_TOVA;
  c->sinks = 2;
  begin_sequence(c, 0, 10, 2);
  begin_sequence(c, 1, 64, 8);
  begin_sequence(c, 2, 3, 1);
  c->first_over_budget = 0;

  /* KNORM with a long PROTECT span and half-fair quotas (FAIR spans plus an implicit partition). */
  c = &out[count++];
  memset(c, 0, sizeof *c);
  strcpy(c->name, "knorm_protect");
  c->method = KVC_SCORE_KNORM;
  c->fairness = 0.5f;
  begin_sequence(c, 0, 60, 59);
  add_span(c, 0, 0, 30, KVC_SPAN_FAIR, 1.0f);
  begin_sequence(c, 1, 120, 10);
  add_span(c, 1, 0, 40, KVC_SPAN_FAIR, 1.0f);
  add_span(c, 1, 30, 50, KVC_SPAN_PROTECT, 1.0f);
  add_span(c, 1, 60, 100, KVC_SPAN_FAIR, 3.0f);
  c->first_over_budget = 1;
  return count;
}

kvc_plan_desc_t kvc_test_outcome_desc(const kvc_test_outcome_case_t *c, const int32_t *budgets,
                                      kvc_budget_policy_t policy) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 4;
  d.num_kv_heads = 2;
  d.head_dim = 16;
  d.dtype = KVC_DTYPE_F32;
  d.batch = c->batch;
  d.seq_lens = c->seq_lens;
  d.budgets = budgets;
  d.span_indptr = c->span_indptr;
  d.spans = c->spans;
  d.method = c->method;
  d.window = c->window > 0 ? c->window : 64;
  d.sink_tokens = c->sinks;
  d.recent_tokens = c->recent;
  d.fairness = c->fairness;
  d.budget_policy = policy;
  return d;
}

int32_t kvc_test_outcome_protected(const kvc_test_outcome_case_t *c, int32_t b) {
  const int32_t n = c->seq_lens[b], window = c->window > 0 ? c->window : 64;
  unsigned char *mark = calloc((size_t)n, 1);
  for (int32_t t = 0; t < n; ++t) {
    mark[t] = t < c->sinks || t >= n - c->recent;
    if (c->method == KVC_SCORE_SNAPKV && t >= n - window) mark[t] = 1;
    if (c->method == KVC_SCORE_TOVA && t == n - 1) mark[t] = 1;
  }
  for (int32_t i = c->span_indptr[b]; i < c->span_indptr[b + 1]; ++i)
    if (c->spans[i].kind == KVC_SPAN_PROTECT)
      for (int32_t t = c->spans[i].start; t < c->spans[i].end; ++t) mark[t] = 1;
  int32_t count = 0;
  for (int32_t t = 0; t < n; ++t) count += mark[t];
  free(mark);
  return count;
}

int kvc_test_outcome_expect(const kvc_test_outcome_case_t *c, kvc_budget_policy_t policy, int32_t *k,
                            int32_t *outcome) {
  for (int32_t b = 0; b < c->batch; ++b) {
    const int32_t n = c->seq_lens[b], budget = c->budgets[b], p = kvc_test_outcome_protected(c, b);
    if (budget >= n) {
      k[b] = n, outcome[b] = KVC_OUTCOME_WITHIN_BUDGET;
    } else if (p <= budget) {
      k[b] = budget, outcome[b] = KVC_OUTCOME_COMPRESSED;
    } else if (policy == KVC_BUDGET_CLAMP) {
      k[b] = p, outcome[b] = KVC_OUTCOME_CLAMPED;
    } else if (policy == KVC_BUDGET_SKIP) {
      k[b] = n, outcome[b] = KVC_OUTCOME_SKIPPED;
    } else {
      return -1;
    }
  }
  return 0;
}
