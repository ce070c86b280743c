/*
 * test_nonfinite_cpu.c - the non-finite rule of kvcompress.h on the CPU backend, against an oracle
 * written here from that rule:
 *   a NaN or +-inf among a query row's logits makes that whole softmax row NaN, so every key it
 *   observes gets a NaN contribution; MAX pooling and MAX group-reduce propagate NaN;
 *   pool_kernel 1 is the identity; KNORM is computed without intermediate overflow.
 *
 * One sequence of two FAIR spans scored on their own (span_local), 2 KV heads of GQA groups of 2,
 * f32. A NaN or +-inf in one key element of the first span, or a NaN in one query head's query of
 * the second span, poisons exactly the rows that observe it; the oracle (double, the plain
 * softmax) says which scores become NaN and what the others are. Every method with queries x
 * pool AVG / MAX x pool_kernel 1 / 3 x group reduce MEAN / MAX.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

enum { N = 24, KV = 2, G = 2, QH = KV * G, D = 8, WINDOW = 6, PAGE = 4 };
static const int32_t kSpanEnd[2] = {12, 24};

typedef enum { CLEAN, NAN_KEY, POS_INF_KEY, NEG_INF_KEY, NAN_QUERY, POISONS } poison_t;

typedef struct {
  kvc_score_method_t method;
  kvc_pool_t pool;
  int32_t pool_kernel;
  kvc_reduce_t reduce;
  poison_t poison;
} case_t;

static double nan_max(double a, double b) { return isnan(a) || isnan(b) ? NAN : a > b ? a : b; }

/* Per q head, the plain softmax contributions of one domain's rows to its keys, then the method's
 * pooling and reduction; out[h][t] (t in the domain) in double. */
static void oracle_domain(const case_t *c, const kvc_test_cache_t *cache, const float *q, const int32_t *rows,
                          const int32_t *pos, int32_t nq, int32_t lo, int32_t hi, double out[KV][N]) {
  const double scale = 1.0 / sqrt((double)D);
  double attn[QH][N]; /* summed contributions per q head */
  int32_t seen[N];
  memset(attn, 0, sizeof attn);
  memset(seen, 0, sizeof seen);
  for (int32_t i = 0; i < nq; ++i) {
    for (int32_t j = lo; j <= pos[i]; ++j) seen[j]++;
    for (int32_t g = 0; g < QH; ++g) {
      double logit[N], top = -INFINITY, sum = 0;
      int finite = 1;
      for (int32_t j = lo; j <= pos[i]; ++j) {
        double dot = 0;
        for (int32_t d = 0; d < D; ++d) dot += (double)q[((int64_t)rows[i] * QH + g) * D + d] * kvc_test_k(cache, 0, j, g / G, d);
        logit[j] = scale * dot;
        finite &= isfinite(logit[j]);
        top = logit[j] > top ? logit[j] : top;
      }
      for (int32_t j = lo; j <= pos[i]; ++j) sum += exp(logit[j] - top);
      for (int32_t j = lo; j <= pos[i]; ++j) attn[g][j] += finite ? exp(logit[j] - top) / sum : NAN;
    }
  }
  const int32_t scored_end = c->method == KVC_SCORE_H2O ? hi : hi - nq; /* SNAPKV / TOVA protect their queries */
  for (int32_t h = 0; h < KV; ++h)
    for (int32_t t = lo; t < hi; ++t) out[h][t] = INFINITY;
  if (c->method == KVC_SCORE_TOVA) { /* mean over ALL q heads, the same for every KV head */
    for (int32_t t = lo; t < scored_end; ++t) {
      double mean = 0;
      for (int32_t g = 0; g < QH; ++g) mean += attn[g][t] / QH;
      for (int32_t h = 0; h < KV; ++h) out[h][t] = mean;
    }
    return;
  }
  for (int32_t h = 0; h < KV; ++h)
    for (int32_t t = lo; t < scored_end; ++t) {
      double reduced = c->reduce == KVC_REDUCE_MAX ? -INFINITY : 0;
      for (int32_t gg = 0; gg < G; ++gg) {
        const int32_t g = h * G + gg;
        double v;
        if (c->method == KVC_SCORE_H2O) {
          v = attn[g][t] / seen[t];
        } else { /* SNAPKV: mean over the queries, pooled inside [lo, scored_end) */
          const int32_t r = c->pool_kernel / 2;
          v = c->pool == KVC_POOL_MAX ? -INFINITY : 0;
          for (int32_t u = t - r; u <= t + r; ++u) {
            if (u < lo || u >= scored_end) continue; /* zero padding: AVG adds 0, MAX ignores it */
            const double m = attn[g][u] / nq;
            v = c->pool == KVC_POOL_MAX ? nan_max(v, m) : v + m;
          }
          if (c->pool == KVC_POOL_AVG) v /= c->pool_kernel;
        }
        reduced = c->reduce == KVC_REDUCE_MAX ? nan_max(reduced, v) : reduced + v / G;
      }
      out[h][t] = reduced;
    }
}

static void run_case(const case_t *c) {
  int32_t len = N, budget = N / 2, indptr[2] = {0, 2};
  kvc_span_t spans[2] = {{0, kSpanEnd[0], KVC_SPAN_FAIR, 1.0f}, {kSpanEnd[0], kSpanEnd[1], KVC_SPAN_FAIR, 1.0f}};
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = QH, d.num_kv_heads = KV, d.head_dim = D, d.dtype = KVC_DTYPE_F32;
  d.batch = 1, d.seq_lens = &len, d.budgets = &budget, d.span_indptr = indptr, d.spans = spans;
  d.method = c->method, d.window = WINDOW, d.pool = c->pool, d.pool_kernel = c->pool_kernel;
  d.group_reduce = c->reduce, d.span_local = 1;
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  int32_t obs_indptr[2], positions[WINDOW];
  kvc_plan_obs_positions(plan, obs_indptr, positions);
  kvc_test_cache_t *cache = kvc_test_cache_new(1, &len, KV, D, KVC_DTYPE_F32, PAGE, KVC_TEST_NHD, KVC_TEST_DENSE, 1, 99);
  float *q = kvc_test_queries_new(info.obs_total, QH, D, KVC_DTYPE_F32, 7);
  static const float poison_value[POISONS] = {0, NAN, INFINITY, -INFINITY, NAN};
  if (c->poison != CLEAN && c->poison != NAN_QUERY) /* one element of one key of the first span */
    ((float *)kvc_test_k_ptr(cache, 0, 3, c->poison == NAN_KEY ? 0 : 1))[2] = poison_value[c->poison];
  if (c->poison == NAN_QUERY) /* one query head's query in the second span */
    q[((int64_t)(info.obs_total - 1) * QH + 1) * D + 5] = NAN;

  double want[KV][N];
  for (int s = 0; s < 2; ++s) { /* the domain's queries are the observation rows inside its span */
    int32_t rows[WINDOW], pos[WINDOW], nq = 0, lo = s ? kSpanEnd[0] : 0;
    for (int32_t r = 0; r < info.obs_total; ++r)
      if (positions[r] >= lo && positions[r] < kSpanEnd[s]) rows[nq] = r, pos[nq++] = positions[r];
    oracle_domain(c, cache, q, rows, pos, nq, lo, kSpanEnd[s], want);
  }
  float scores[KV * N];
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  cr_assert_eq(kvc_score(ctx, plan, &cache->desc, q, NULL, scores, 0, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  free(ws);
  int poisoned = 0;
  for (int32_t h = 0; h < KV; ++h)
    for (int32_t t = 0; t < N; ++t) {
      const double w = want[h][t], got = scores[h * N + t];
      poisoned += isnan(w);
      if (isnan(w) || isinf(w))
        cr_expect(isnan(w) ? isnan(got) : got == w, "method %d pool %d/%d reduce %d poison %d: head %d key %d is %g, "
                  "the rule says %g", c->method, c->pool, c->pool_kernel, c->reduce, c->poison, h, t, got, w);
      else
        cr_expect(fabs(got - w) <= 4e-7 * fabs(w) + 1e-30, "method %d pool %d/%d reduce %d poison %d: head %d key %d is "
                  "%.9g, the oracle %.9g", c->method, c->pool, c->pool_kernel, c->reduce, c->poison, h, t, got, w);
    }
  cr_expect_eq(poisoned > 0, c->poison != CLEAN, "poison %d reached %d scores", c->poison, poisoned);
  free(q);
  kvc_test_cache_free(cache);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

static void run_all(kvc_score_method_t method) {
  for (int pool = 0; pool < 2; ++pool)
    for (int kernel = 1; kernel <= 3; kernel += 2)
      for (int reduce = 0; reduce < 2; ++reduce)
        for (int poison = 0; poison < POISONS; ++poison) {
          const case_t c = {method, (kvc_pool_t)pool, kernel, (kvc_reduce_t)reduce, (poison_t)poison};
          run_case(&c);
        }
}

Test(nonfinite_cpu, snapkv) { run_all(KVC_SCORE_SNAPKV); }
Test(nonfinite_cpu, h2o) { run_all(KVC_SCORE_H2O); }
Test(nonfinite_cpu, tova) { run_all(KVC_SCORE_TOVA); }

/* KNORM: ||k|| without intermediate overflow. Squares of 1e20 and of 3e38 overflow fp32; the
 * norms themselves are finite floats. */
Test(nonfinite_cpu, knorm_of_large_finite_keys_is_finite) {
  int32_t len = 3, budget = 2;
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 1, d.num_kv_heads = 1, d.head_dim = D, d.dtype = KVC_DTYPE_F32;
  d.batch = 1, d.seq_lens = &len, d.budgets = &budget, d.method = KVC_SCORE_KNORM;
  kvc_plan_t plan;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_test_cache_t *cache = kvc_test_cache_new(1, &len, 1, D, KVC_DTYPE_F32, PAGE, KVC_TEST_NHD, KVC_TEST_DENSE, 0, 5);
  const double want[3] = {-1e20 * sqrt(8.0), -3e38, -2e30};
  for (int32_t dd = 0; dd < D; ++dd) {
    ((float *)kvc_test_k_ptr(cache, 0, 0, 0))[dd] = 1e20f;
    ((float *)kvc_test_k_ptr(cache, 0, 1, 0))[dd] = dd == 3 ? -3e38f : 0.0f;
    ((float *)kvc_test_k_ptr(cache, 0, 2, 0))[dd] = dd < 4 ? 1e30f : 0.0f;
  }
  float scores[3];
  cr_assert_eq(kvc_score(ctx, plan, &cache->desc, NULL, NULL, scores, 0, NULL, 0, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  for (int t = 0; t < 3; ++t)
    cr_expect(isfinite(scores[t]) && fabs(scores[t] - want[t]) <= 1e-6 * fabs(want[t]), "key %d: %.9g, want %.9g", t,
              scores[t], want[t]);
  kvc_test_cache_free(cache);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
