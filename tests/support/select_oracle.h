/*
 * select_oracle.h - the selection semantics of kvcompress.h computed from first principles by
 * sorting (an oracle independent of both backends' threshold searches), the score patterns the
 * selection tests feed it, and random span layouts.
 */
#ifndef KVC_SELECT_ORACLE_H
#define KVC_SELECT_ORACLE_H

#include <stdint.h>

#include "kvcompress.h"
#include "test_util.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  KVC_SCORES_RANDOM = 0,     /* N(0, 1): distinct in practice                               */
  KVC_SCORES_FEW_VALUES = 1, /* 4 values and -0: ties everywhere, across partition borders   */
  KVC_SCORES_SPECIAL = 2,    /* NaN, +-inf, +-0, denormals and a few ordinary values         */
  KVC_SCORES_EQUAL = 3,      /* one value for every token                                   */
  KVC_SCORES_NAN = 4         /* NaN for every token (with mixed signs and payloads)          */
} kvc_score_pattern_t;

void kvc_test_fill_scores(float *scores, int64_t count, kvc_score_pattern_t pattern, uint64_t seed);
const char *kvc_test_pattern_name(kvc_score_pattern_t pattern);

/* Appends `fair` FAIR spans (weights in [0.25, 4], or 1 when equal_weights) with random gaps and
 * `protect` short PROTECT spans at random places inside [0, n) to spans[*count...], sorted by
 * start; never more than `cap` in all. Returns the number appended. */
int32_t kvc_test_random_spans(kvc_rng_t *rng, int32_t n, int32_t fair, int32_t protect, int equal_weights,
                              kvc_span_t *spans, int32_t count, int32_t cap);

/* The keep layout of `plan` (made from `desc`) for `scores` (score layout), by sorting each
 * candidate set: protected = sinks + recents + PROTECT spans + the observation positions of SNAPKV
 * and TOVA (unless window_protection is KVC_WINDOW_RANKED); quotas from kvc_plan_span_quotas.
 * Honours desc->spans_per_head (each (b, h) its own spans; TOVA head 0's) and
 * desc->score_row_capacity (the score layout's rows). Returns 0, or -1 if a plan read-out fails. */
int kvc_test_select_oracle(kvc_plan_t plan, const kvc_plan_desc_t *desc, const float *scores, int32_t *keep);

/* A selection test case: a batch, its budgets and spans, the plan knobs selection reads, and the
 * score pattern. Fixed-size so tests can build cases on the stack. */
#define KVC_TEST_SELECT_MAX_BATCH 16
#define KVC_TEST_SELECT_MAX_SPANS 512
typedef struct {
  kvc_score_method_t method;
  int32_t num_kv_heads, batch;
  int32_t seq_lens[KVC_TEST_SELECT_MAX_BATCH], budgets[KVC_TEST_SELECT_MAX_BATCH];
  int32_t span_indptr[KVC_TEST_SELECT_MAX_BATCH + 1];
  kvc_span_t spans[KVC_TEST_SELECT_MAX_SPANS];
  int has_spans;
  int32_t sink, recent, window; /* window 0: 16 */
  float fairness;
  kvc_score_pattern_t pattern;
  uint64_t seed;
} kvc_test_select_case_t;

/* A batch of the given lengths with budgets keep_fraction * n, at least min_budget; no spans. */
kvc_test_select_case_t kvc_test_select_case(kvc_score_method_t method, int32_t heads, int32_t batch,
                                            const int32_t *lens, double keep_fraction, int32_t min_budget,
                                            kvc_score_pattern_t pattern, uint64_t seed);
/* Random FAIR and PROTECT spans (kvc_test_random_spans) for every sequence of c. */
void kvc_test_select_case_add_spans(kvc_test_select_case_t *c, int32_t fair, int32_t protect, int equal_weights);
/* The plan descriptor of c (head_dim 64, num_q_heads = num_kv_heads); it points into c. */
kvc_plan_desc_t kvc_test_select_case_desc(const kvc_test_select_case_t *c);

/* Number of protected tokens of sequence b per the rules above (for budgets = |P| cases); with
 * spans_per_head the largest over its KV heads. */
int32_t kvc_test_protected_count(kvc_plan_t plan, const kvc_plan_desc_t *desc, int32_t b);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SELECT_ORACLE_H */
