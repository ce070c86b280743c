/*
 * outcome_cases.h - batches in which some sequences protect more tokens than their budget keeps
 * (the per-sequence outcomes of kvc_plan_outcomes), and what each budget policy must make of them,
 * computed from the selection rules of kvcompress.h without the library.
 */
#ifndef KVC_OUTCOME_CASES_H
#define KVC_OUTCOME_CASES_H

#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_TEST_OUTCOME_MAX_BATCH 6
#define KVC_TEST_OUTCOME_MAX_SPANS 12

/* Inline arrays only: Criterion passes parameters to re-executed test processes by value. */
typedef struct {
  char name[32];
  kvc_score_method_t method;
  int32_t batch, window, sinks, recent;
  float fairness;
  int32_t seq_lens[KVC_TEST_OUTCOME_MAX_BATCH], budgets[KVC_TEST_OUTCOME_MAX_BATCH];
  int32_t span_indptr[KVC_TEST_OUTCOME_MAX_BATCH + 1];
  kvc_span_t spans[KVC_TEST_OUTCOME_MAX_SPANS];
  int32_t first_over_budget; /* the sequence KVC_BUDGET_FAIL names                              */
} kvc_test_outcome_case_t;

/* The fixed cases (SNAPKV with the default window 64, STREAMING with sinks, recents, PROTECT and
 * FAIR spans, TOVA, KNORM); returns how many were written to out[0 .. 8). */
int kvc_test_outcome_cases(kvc_test_outcome_case_t *out);

/* The plan descriptor of a case (num_q_heads 4, num_kv_heads 2, head_dim 16, f32), pointing into
 * c, with `budgets` (c->budgets or a replacement) and `policy`. */
kvc_plan_desc_t kvc_test_outcome_desc(const kvc_test_outcome_case_t *c, const int32_t *budgets,
                                      kvc_budget_policy_t policy);

/* Protected tokens of sequence b: sinks, recents, PROTECT spans and the method's own (SNAPKV's
 * last min(window, n) positions, TOVA's last token), counted by marking. */
int32_t kvc_test_outcome_protected(const kvc_test_outcome_case_t *c, int32_t b);

/* What `policy` must make of every sequence: keep length k[b] and outcome[b] (kvc_outcome_t).
 * Returns 0, or -1 when KVC_BUDGET_FAIL must fail the plan. */
int kvc_test_outcome_expect(const kvc_test_outcome_case_t *c, kvc_budget_policy_t policy, int32_t *k,
                            int32_t *outcome);

#ifdef __cplusplus
}
#endif

#endif /* KVC_OUTCOME_CASES_H */
