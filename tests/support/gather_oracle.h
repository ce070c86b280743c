/*
 * gather_oracle.h - the query gather of kvc_gather_queries computed the slow, obvious way, and the
 * packed-q test cases both backends run.
 */
#ifndef KVC_GATHER_ORACLE_H
#define KVC_GATHER_ORACLE_H

#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_TEST_GATHER_MAX_BATCH 5

/* Inline arrays only (Criterion parameters). */
typedef struct {
  char name[40];
  kvc_score_method_t method;
  kvc_dtype_t dtype;
  int32_t window, span_local, num_q_heads, num_kv_heads, head_dim, batch;
  int32_t seq_lens[KVC_TEST_GATHER_MAX_BATCH];
  int32_t packed_lens[KVC_TEST_GATHER_MAX_BATCH]; /* packed rows per sequence: its last ones     */
  int32_t stride_extra;                           /* elements per token row past Hq * D (qkv)    */
  int32_t pad_tokens;                             /* rows past qo_indptr[batch]                  */
} kvc_test_gather_case_t;

/* The cases; returns how many were written to out[0 .. 16). */
int kvc_test_gather_cases(kvc_test_gather_case_t *out);

/* Its plan descriptor (budgets = n / 2 + 1; span_local cases get two FAIR spans per sequence),
 * pointing into the static storage `spans` / `span_indptr` / `budgets` the caller provides. */
kvc_plan_desc_t kvc_test_gather_desc(const kvc_test_gather_case_t *c, int32_t *budgets, int32_t *span_indptr,
                                     kvc_span_t *spans);

/* Packed q for a case: qo_indptr (host [batch+1]) from packed_lens, *num_tokens rows of
 * *token_stride elements of random bytes (malloc'd). */
void *kvc_test_packed_q_new(const kvc_test_gather_case_t *c, int32_t *qo_indptr, int64_t *num_tokens,
                            int64_t *token_stride, uint64_t seed);

/* What kvc_gather_queries must write: for every observation row r (sequence b, position p, from
 * kvc_plan_obs_positions) with len = qo_indptr[b+1] - qo_indptr[b], the packed row
 * qo_indptr[b] + p - (n_b - len) when qo_indptr[b] >= 0, len >= 0, qo_indptr[b+1] <= num_tokens,
 * len <= n_b and p >= n_b - len; else zeros. `out`: obs_total * Hq * D elements. */
void kvc_test_gather_oracle(kvc_plan_t plan, const kvc_plan_desc_t *desc, const void *packed_q, int64_t num_tokens,
                            int64_t token_stride, const int32_t *qo_indptr, void *out);

#ifdef __cplusplus
}
#endif

#endif /* KVC_GATHER_ORACLE_H */
