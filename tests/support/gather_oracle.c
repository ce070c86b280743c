/* gather_oracle.c - see gather_oracle.h. */
#include "gather_oracle.h"

#include <stdlib.h>
#include <string.h>

#include "test_util.h"

static size_t elem_bytes(kvc_dtype_t d) { return d == KVC_DTYPE_F32 ? 4 : d == KVC_DTYPE_FP8_E4M3 ? 1 : 2; }

int kvc_test_gather_cases(kvc_test_gather_case_t *out) {
  const kvc_test_gather_case_t cases[] = {
      /* whole prefills, packed q [tokens][Hq][D] */
      {"snapkv_f16_prefill", KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 16, 0, 8, 2, 64, 3, {100, 40, 7}, {100, 40, 7}, 0, 0},
      /* q inside a fused qkv row (stride (Hq + 2 Hkv) * D), last chunks only, padding rows */
      {"snapkv_bf16_qkv_chunks", KVC_SCORE_SNAPKV, KVC_DTYPE_BF16, 16, 0, 4, 1, 128, 4, {300, 20, 64, 17},
       {32, 20, 16, 17}, 2 * 128, 5},
      /* H2O over the whole prompt: every position is an observation row */
      {"h2o_f32_whole_prompt", KVC_SCORE_H2O, KVC_DTYPE_F32, 4096, 0, 6, 3, 8, 2, {50, 33}, {50, 33}, 0, 0},
      /* TOVA: one row per sequence, decode-like single packed rows */
      {"tova_f16_decode", KVC_SCORE_TOVA, KVC_DTYPE_F16, 1, 0, 2, 2, 72, 5, {9, 1, 200, 33, 2}, {1, 1, 1, 1, 1}, 0, 1},
      /* span_local: observation rows at the end of each FAIR span, all over the sequence */
      {"span_local_bf16", KVC_SCORE_SNAPKV, KVC_DTYPE_BF16, 12, 1, 8, 4, 16, 3, {80, 45, 200}, {80, 45, 200}, 8, 0},
      /* rows of 3 * 8 f16 = 48 bytes, a token stride of 56 bytes: 8-byte vectors */
      {"odd_stride_f16", KVC_SCORE_SNAPKV, KVC_DTYPE_F16, 5, 0, 3, 1, 8, 2, {30, 12}, {10, 12}, 4, 3},
  };
  const int count = (int)(sizeof cases / sizeof cases[0]);
  memcpy(out, cases, sizeof cases);
  return count;
}

kvc_plan_desc_t kvc_test_gather_desc(const kvc_test_gather_case_t *c, int32_t *budgets, int32_t *span_indptr,
                                     kvc_span_t *spans) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = c->num_q_heads;
  d.num_kv_heads = c->num_kv_heads;
  d.head_dim = c->head_dim;
  d.dtype = c->dtype;
  d.batch = c->batch;
  d.seq_lens = c->seq_lens;
  for (int32_t b = 0; b < c->batch; ++b) budgets[b] = c->seq_lens[b] / 2 + 1;
  d.budgets = budgets;
  d.method = c->method;
  d.window = c->window;
  d.budget_policy = KVC_BUDGET_SKIP; /* the gather does not care what the budgets allow */
  if (c->span_local) {
    span_indptr[0] = 0;
    for (int32_t b = 0; b < c->batch; ++b) {
      const int32_t n = c->seq_lens[b], cut = n / 3;
      spans[2 * b] = (kvc_span_t){0, cut, KVC_SPAN_FAIR, 1.0f};
      spans[2 * b + 1] = (kvc_span_t){cut, n, KVC_SPAN_FAIR, 1.0f};
      span_indptr[b + 1] = 2 * (b + 1);
    }
    d.span_local = 1;
    d.span_indptr = span_indptr;
    d.spans = spans;
  }
  return d;
}

void *kvc_test_packed_q_new(const kvc_test_gather_case_t *c, int32_t *qo_indptr, int64_t *num_tokens,
                            int64_t *token_stride, uint64_t seed) {
  qo_indptr[0] = 0;
  for (int32_t b = 0; b < c->batch; ++b) qo_indptr[b + 1] = qo_indptr[b] + c->packed_lens[b];
  *num_tokens = qo_indptr[c->batch] + c->pad_tokens;
  *token_stride = (int64_t)c->num_q_heads * c->head_dim + c->stride_extra;
  const size_t bytes = (size_t)(*num_tokens * *token_stride) * elem_bytes(c->dtype);
  unsigned char *q = malloc(bytes ? bytes : 1);
  kvc_rng_t rng = {seed};
  for (size_t i = 0; i < bytes; ++i) q[i] = (unsigned char)kvc_rng_next(&rng);
  return q;
}

void kvc_test_gather_oracle(kvc_plan_t plan, const kvc_plan_desc_t *d, const void *packed_q, int64_t num_tokens,
                            int64_t token_stride, const int32_t *qo_indptr, void *out) {
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  int32_t *indptr = malloc(sizeof(int32_t) * (size_t)(d->batch + 1));
  int32_t *positions = malloc(sizeof(int32_t) * (size_t)(info.obs_total + 1));
  kvc_plan_obs_positions(plan, indptr, positions);
  const size_t elem = elem_bytes(d->dtype), row = (size_t)d->num_q_heads * (size_t)d->head_dim;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int64_t start = qo_indptr[b], end = qo_indptr[b + 1], len = end - start, n = d->seq_lens[b];
    for (int32_t r = indptr[b]; r < indptr[b + 1]; ++r) {
      unsigned char *dst = (unsigned char *)out + (size_t)r * row * elem;
      const int64_t p = positions[r], first_packed = n - len;
      if (start < 0 || len < 0 || end > num_tokens || len > n || p < first_packed) {
        memset(dst, 0, row * elem);
        continue;
      }
      /* element by element, through the documented address formula */
      const int64_t token = start + (p - first_packed);
      for (size_t e = 0; e < row; ++e)
        memcpy(dst + e * elem, (const unsigned char *)packed_q + ((size_t)token * (size_t)token_stride + e) * elem, elem);
    }
  }
  free(indptr);
  free(positions);
}
