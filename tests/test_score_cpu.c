/*
 * test_score_cpu.c - kvc_score on the CPU backend, through the public API, against an oracle
 * written here from the scoring comment in kvcompress.h, done the plain way: domains and
 * observation positions rebuilt from the plan description (and checked against
 * kvc_plan_obs_positions), keys read through kvc_test_k (which maps pages independently of the
 * library), a full softmax exp(l_j - max) / sum per (query, q head) in double, per-q-head rows of
 * mean attention, naive pooling and a naive group reduction, and the header's non-finite rule
 * (a NaN or +-inf logit makes its whole row NaN; MAX pooling and MAX reduce propagate NaN; KNORM
 * finite for every finite key). Plus hand-worked examples whose expected values are derived in
 * the comments. Every case also runs on 1 and on 2 or 3 threads (bit-identical) and on each of
 * the library's instruction sets (KVC_CPU_ISA = 1 portable, 2 AVX2, 3 AVX-512, capped by the CPU).
 * FP8 (e4m3) keys: the oracle decodes each byte by the format's definition (tests/support) and
 * multiplies by the desc's k_scale / k_scales; queries are in the desc's query dtype.
 *
 * Tolerance against the oracle, derived from the library's arithmetic (kernels/score_cpu.c; u =
 * 2^-24): a logit is a float FMA chain over D products, then times the float scale, so it errs by
 * at most E = gamma_D * scale * sum_d |q_d k_d| + u |l| (gamma_D = D u / (1 - D u); f16/bf16
 * widen exactly). The softmax subtracts the row maximum in float (error u |l - max|) and takes
 * exp in float (relative error eps_exp = 4u: kernels/score_cpu_simd.h's polynomial, measured at
 * 1.5 ulps at most over every float argument); sums, means, pooling and reduction are double (a
 * few 2^-53 per term). A probability is a ratio whose numerator and normaliser each carry at most
 * A_row = max over the row's keys of (E + u |l - max|) in the exponent, so its relative error is
 * at most expm1(2 A_row + 2 eps_exp); means, AVG pooling, MEAN / MAX reduce and TOVA's mean add
 * or compare positive terms, which keeps the largest relative error of their terms. With the
 * engine's normaliser (float lse, itself within u |lse| of the exact one): expm1(A'_row +
 * eps_exp), A'_row = max of (E + u |l - lse|) + u |lse|. Each case's tolerance is that bound at
 * the case's worst row (computed here from its data), plus 2^-23 for the float output and 2^-30
 * for every double rounding: 1e-5 to 2e-5 for head_dim 16, up to 3e-3 for head_dim 256 with
 * scale 0.37 (logits near 70); the errors seen are at most 5% of the bound (1e-7 to 2e-5). KNORM and STREAMING are double all the way: 2^-23 (one
 * float ulp). Keys a method does not score must be exactly +inf, poisoned scores NaN exactly where
 * the oracle's are. Hand-worked examples: 1e-6 absolute. Selections made from these scores may
 * differ from the double-precision ones at near-ties (scores within the tolerance).
 */
#include <criterion/criterion.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

static const double kFloatUlp = 1.0 / 8388608.0; /* 2^-23 */
static const double kUnit = 1.0 / 16777216.0;    /* u = 2^-24 */
static const double kExpError = 4.0 / 16777216.0; /* eps_exp = 4u */
static const double kHandTol = 1e-6;

#define MAX_BATCH 8
#define MAX_DOMAINS 16

/* ---- one scoring case -------------------------------------------------------------------------- */

typedef struct {
  kvc_score_method_t method;
  kvc_dtype_t dtype;
  kvc_test_layout_t layout;
  kvc_test_table_t table;
  int32_t num_kv_heads, group, head_dim, page_size;
  int32_t batch;
  const int32_t *seq_lens;
  const int32_t *span_indptr; /* NULL: no spans */
  const kvc_span_t *spans;
  int32_t span_local, window, pool_kernel;
  kvc_pool_t pool;
  kvc_reduce_t reduce;
  float scale; /* 0: 1/sqrt(head_dim); the cases keep head_dim a power of 4 then, so it is exact */
  uint64_t seed;
  int32_t threads; /* of the context (0: 1); each case is also checked bit for bit against 1 thread */
  int32_t isa;     /* KVC_CPU_ISA at plan creation (0: the best the CPU has) */
  kvc_query_dtype_t query_dtype; /* FP8 cases: the queries' dtype (0: the cache's) */
  int32_t per_head_scale;        /* FP8 cases: k_scales per KV head (kFp8HeadScales), else k_scale kFp8Scale */
} score_case_t;

/* FP8 keys' scales: not powers of two, so a scale applied twice or not at all shows. */
static const float kFp8Scale = 1.7f;
static const float kFp8HeadScales[] = {0.55f, 2.3f, 1.1f, 0.8f};

static score_case_t base_case(kvc_score_method_t method, kvc_dtype_t dtype, uint64_t seed) {
  static const int32_t lens[] = {1, 2, 17, 100};
  score_case_t c;
  memset(&c, 0, sizeof c);
  c.method = method;
  c.dtype = dtype;
  c.layout = KVC_TEST_NHD;
  c.table = KVC_TEST_DENSE;
  c.num_kv_heads = 2;
  c.group = 1;
  c.head_dim = 16;
  c.page_size = 4;
  c.batch = 4;
  c.seq_lens = lens;
  c.window = 5;
  c.pool_kernel = 5;
  c.pool = KVC_POOL_AVG;
  c.reduce = KVC_REDUCE_MEAN;
  c.seed = seed;
  c.threads = 1 + (int32_t)(seed % 3);
  c.isa = 1 + (int32_t)(seed / 3 % 3);
  return c;
}

static const char *method_name(kvc_score_method_t m) {
  static const char *names[] = {"SNAPKV", "H2O", "TOVA", "KNORM", "STREAMING"};
  return names[m];
}

static void describe(const score_case_t *c, char *buf, size_t cap) {
  static const char *dtypes[] = {"f32", "f16", "bf16", "fp8"}, *tables[] = {"dense", "csr", "contig"};
  static const char *queries[] = {"", " queries f32", " queries f16", " queries bf16"};
  snprintf(buf, cap, "%s %s%s%s %s %s group %d head_dim %d window %d pool %s/%d reduce %s span_local %d threads %d isa %d",
           method_name(c->method), dtypes[c->dtype], queries[c->query_dtype],
           c->dtype != KVC_DTYPE_FP8_E4M3 ? "" : c->per_head_scale ? " k_scales per head" : " k_scale",
           c->layout == KVC_TEST_NHD ? "NHD" : "HND", tables[c->table],
           c->group, c->head_dim, c->window, c->pool == KVC_POOL_AVG ? "avg" : "max", c->pool_kernel,
           c->reduce == KVC_REDUCE_MEAN ? "mean" : "max", c->span_local, c->threads, c->isa);
}

/* A case set up through the public API, ready to score. */
typedef struct {
  score_case_t c;
  char name[256];
  int32_t budgets[MAX_BATCH];
  kvc_plan_desc_t desc;
  kvc_context_t ctx;
  kvc_plan_t plan;
  kvc_plan_info_t info;
  kvc_test_cache_t *cache;
  int32_t obs_indptr[MAX_BATCH + 1];
  int32_t *obs_pos;
  void *queries;
  void *workspace; /* NULL when the plan needs none: that must work */
  size_t workspace_bytes;
  const float *lse; /* the engine normalisers the run is given (NULL: none), for the tolerance */
  double tol;       /* set by oracle_scores: the relative tolerance of this case (header comment) */
} score_run_t;

static void run_open(score_run_t *run, const score_case_t *c) {
  memset(run, 0, sizeof *run);
  run->c = *c;
  describe(c, run->name, sizeof run->name);
  cr_assert_leq(c->batch, MAX_BATCH);
  kvc_plan_desc_t *d = &run->desc;
  kvc_plan_desc_init(d);
  d->num_kv_heads = c->num_kv_heads;
  d->num_q_heads = c->num_kv_heads * c->group;
  d->head_dim = c->head_dim;
  d->dtype = c->dtype;
  d->batch = c->batch;
  d->seq_lens = c->seq_lens;
  for (int32_t b = 0; b < c->batch; ++b) run->budgets[b] = c->seq_lens[b]; /* scoring ignores budgets */
  d->budgets = run->budgets;
  d->span_indptr = c->span_indptr;
  d->spans = c->spans;
  d->method = c->method;
  d->window = c->window;
  d->pool_kernel = c->pool_kernel;
  d->pool = c->pool;
  d->group_reduce = c->reduce;
  d->scale = c->scale;
  d->span_local = c->span_local;
  d->query_dtype = c->query_dtype;
  if (c->dtype == KVC_DTYPE_FP8_E4M3) {
    cr_assert_leq(c->num_kv_heads, 4);
    d->k_scale = kFp8Scale;
    d->k_scales = c->per_head_scale ? kFp8HeadScales : NULL;
  }

  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &run->ctx), KVC_SUCCESS);
  cr_assert_eq(kvc_context_set_threads(run->ctx, c->threads > 1 ? c->threads : 1), KVC_SUCCESS);
  char isa[8];
  snprintf(isa, sizeof isa, "%d", c->isa);
  cr_assert_eq(setenv("KVC_CPU_ISA", isa, 1), 0);
  kvc_status_t status = kvc_plan_create(run->ctx, d, &run->plan);
  cr_assert_eq(status, KVC_SUCCESS, "%s: kvc_plan_create: %s", run->name, kvc_last_error(run->ctx));
  cr_assert_eq(kvc_plan_get_info(run->plan, &run->info), KVC_SUCCESS);
  run->obs_pos = (int32_t *)malloc(sizeof(int32_t) * (size_t)(run->info.obs_total + 1));
  cr_assert_eq(kvc_plan_obs_positions(run->plan, run->obs_indptr, run->obs_pos), KVC_SUCCESS);
  run->cache = kvc_test_cache_new(c->batch, c->seq_lens, c->num_kv_heads, c->head_dim, c->dtype, c->page_size,
                                  c->layout, c->table, 2, c->seed);
  run->queries = kvc_test_queries_new(run->info.obs_total, d->num_q_heads, c->head_dim, kvc_test_query_dtype(d), c->seed + 1);
  cr_assert_eq(kvc_plan_workspace_size(run->plan, KVC_OP_SCORE, &run->workspace_bytes), KVC_SUCCESS);
  run->workspace = run->workspace_bytes ? kvc_test_workspace_new(run->workspace_bytes) : NULL;
  /* the workspace need not be initialised: NaN bytes make any read of unwritten scratch show */
  if (run->workspace) memset(run->workspace, 0xFF, run->workspace_bytes);
}

static void run_score(score_run_t *run, float *scores, int accumulate) {
  kvc_status_t status = kvc_score(run->ctx, run->plan, &run->cache->desc, run->queries, NULL, scores, accumulate,
                                  run->workspace, run->workspace_bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s: kvc_score: %s", run->name, kvc_last_error(run->ctx));
}

static void run_close(score_run_t *run) {
  kvc_plan_destroy(run->plan);
  kvc_context_destroy(run->ctx);
  kvc_test_cache_free(run->cache);
  free(run->obs_pos);
  free(run->queries);
  free(run->workspace);
}

static float *new_scores(const score_run_t *run, float fill) {
  float *scores = (float *)malloc(sizeof(float) * (size_t)(run->info.score_elems + 1));
  for (int64_t i = 0; i <= run->info.score_elems; ++i) scores[i] = fill;
  return scores;
}

/* ---- the oracle -------------------------------------------------------------------------------- */

typedef struct {
  int32_t start, end;
} range_t;

/* Scoring domains of sequence b: [0, n), or each FAIR span with span_local. */
static int32_t oracle_domains(const kvc_plan_desc_t *d, int32_t b, range_t *out) {
  if (!d->span_local) {
    out[0].start = 0;
    out[0].end = d->seq_lens[b];
    return 1;
  }
  int32_t count = 0;
  for (int32_t i = d->span_indptr[b]; i < d->span_indptr[b + 1]; ++i)
    if (d->spans[i].kind == KVC_SPAN_FAIR) {
      cr_assert_lt(count, MAX_DOMAINS);
      out[count].start = d->spans[i].start;
      out[count++].end = d->spans[i].end;
    }
  return count;
}

/* Observation positions of sequence b by the header's rule: TOVA one per domain (its last token);
 * SNAPKV/H2O domain i of S gets min(len_i, ceil(R / (S - i))) of what is left (R) of the window
 * (S = 1: the last min(window, n)); KNORM/STREAMING none. */
static int32_t oracle_positions(const kvc_plan_desc_t *d, int32_t b, int32_t *out) {
  range_t doms[MAX_DOMAINS];
  const int32_t S = oracle_domains(d, b, doms);
  int32_t count = 0, left = d->window;
  for (int32_t i = 0; i < S; ++i) {
    const int32_t len = doms[i].end - doms[i].start;
    int32_t q = 0;
    if (d->method == KVC_SCORE_TOVA) q = 1;
    if (d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_H2O) {
      const int32_t even = (left + (S - i) - 1) / (S - i);
      q = len < even ? len : even;
      left -= q;
    }
    for (int32_t p = doms[i].end - q; p < doms[i].end; ++p) out[count++] = p;
  }
  return count;
}

static void expect_positions(const score_run_t *run) {
  for (int32_t b = 0; b < run->c.batch; ++b) {
    int32_t *want = (int32_t *)malloc(sizeof(int32_t) * (size_t)run->c.seq_lens[b]);
    const int32_t count = oracle_positions(&run->desc, b, want);
    cr_assert_eq(run->obs_indptr[b + 1] - run->obs_indptr[b], count, "%s: sequence %d has %d queries, expected %d",
                 run->name, b, run->obs_indptr[b + 1] - run->obs_indptr[b], count);
    for (int32_t i = 0; i < count; ++i)
      cr_assert_eq(run->obs_pos[run->obs_indptr[b] + i], want[i], "%s: sequence %d query %d", run->name, b, i);
    free(want);
  }
}

/* The larger of a and b, NaN if either is: the rule for MAX pooling and MAX reduce. */
static double max_nan(double a, double b) { return isnan(a) || isnan(b) ? NAN : a > b ? a : b; }

/* Expected scores of one domain [s, e) of sequence b into rows ([H][n] doubles, +inf prefilled);
 * raises *bound to the tolerance terms A_row (header comment) of the domain's rows.
 * keys: [n][H][D] doubles of the sequence; queries: [obs_total][Hq][D] doubles. */
static void oracle_domain(const score_run_t *run, int32_t b, range_t dom, const double *keys, const double *queries,
                          double *rows, double *bound) {
  const kvc_plan_desc_t *d = &run->desc;
  const int32_t n = d->seq_lens[b], H = d->num_kv_heads, Hq = d->num_q_heads, D = d->head_dim;
  const int32_t G = Hq / H, s = dom.start, e = dom.end, L = e - s;
  const double scale = d->scale > 0.0f ? (double)d->scale : 1.0 / sqrt((double)D);
  const double gamma = D * kUnit / (1.0 - D * kUnit); /* an FMA chain of D products */

  if (d->method == KVC_SCORE_KNORM || d->method == KVC_SCORE_STREAMING) {
    for (int32_t h = 0; h < H; ++h)
      for (int32_t j = s; j < e; ++j) {
        double value = d->span_local ? (double)(j - s) / (double)L : (double)j;
        if (d->method == KVC_SCORE_KNORM) {
          double squares = 0.0;
          for (int32_t x = 0; x < D; ++x) squares += keys[((int64_t)j * H + h) * D + x] * keys[((int64_t)j * H + h) * D + x];
          value = isfinite(squares) ? fmax(-sqrt(squares), -FLT_MAX) : -sqrt(squares); /* finite for finite keys */
        }
        rows[(int64_t)h * n + j] = value;
      }
    return;
  }

  /* the domain's query rows */
  int32_t first_row = -1, last_row = -1;
  for (int32_t r = run->obs_indptr[b]; r < run->obs_indptr[b + 1]; ++r)
    if (run->obs_pos[r] >= s && run->obs_pos[r] < e) {
      if (first_row < 0) first_row = r;
      last_row = r;
    }
  cr_assert_geq(first_row, 0, "%s: a domain without queries", run->name);

  /* mean[g][j - s]: a_gij summed over the queries that see j, divided by their number */
  double *mean = (double *)calloc((size_t)Hq * (size_t)L, sizeof(double));
  double *logits = (double *)malloc(sizeof(double) * (size_t)L), *errors = (double *)malloc(sizeof(double) * (size_t)L);
  int32_t *seen = (int32_t *)calloc((size_t)L, sizeof(int32_t));
  for (int32_t r = first_row; r <= last_row; ++r)
    for (int32_t j = s; j <= run->obs_pos[r]; ++j) seen[j - s]++;
  for (int32_t g = 0; g < Hq; ++g) {
    const int32_t h = g / G;
    for (int32_t r = first_row; r <= last_row; ++r) {
      const double *q = queries + ((int64_t)r * Hq + g) * D;
      double max = -INFINITY, total = 0.0;
      int finite = 1;
      for (int32_t j = s; j <= run->obs_pos[r]; ++j) {
        double dot = 0.0, magnitude = 0.0;
        for (int32_t x = 0; x < D; ++x) {
          dot += q[x] * keys[((int64_t)j * H + h) * D + x];
          magnitude += fabs(q[x] * keys[((int64_t)j * H + h) * D + x]);
        }
        logits[j - s] = scale * dot;
        /* FP8: one rounding more, of scale * k_scale */
        errors[j - s] = gamma * scale * magnitude + (d->dtype == KVC_DTYPE_FP8_E4M3 ? 2 : 1) * kUnit * fabs(logits[j - s]);
        finite &= isfinite(logits[j - s]);
        max = fmax(max, logits[j - s]);
      }
      if (!finite) { /* the rule: the whole row is NaN */
        for (int32_t j = s; j <= run->obs_pos[r]; ++j) mean[(int64_t)g * L + j - s] = NAN;
        continue;
      }
      for (int32_t j = s; j <= run->obs_pos[r]; ++j) total += exp(logits[j - s] - max);
      for (int32_t j = s; j <= run->obs_pos[r]; ++j) mean[(int64_t)g * L + j - s] += exp(logits[j - s] - max) / total;
      /* the library's normaliser: its max, or the engine's lse */
      const double norm = run->lse ? (double)run->lse[(int64_t)r * Hq + g] : max;
      double row = 0.0;
      for (int32_t j = s; j <= run->obs_pos[r]; ++j) row = fmax(row, errors[j - s] + kUnit * fabs(logits[j - s] - norm));
      *bound = fmax(*bound, run->lse ? row + kUnit * fabs(norm) : row);
    }
    for (int32_t j = s; j < e; ++j) mean[(int64_t)g * L + j - s] /= seen[j - s];
  }

  const int32_t scored_end = d->method == KVC_SCORE_SNAPKV ? run->obs_pos[first_row]
                             : d->method == KVC_SCORE_TOVA ? e - 1
                                                           : e;
  /* per q head value: SNAPKV pools over the scored keys [s, scored_end) with zero padding */
  double *value = (double *)malloc(sizeof(double) * (size_t)Hq * (size_t)L);
  const int32_t half = d->method == KVC_SCORE_SNAPKV ? d->pool_kernel / 2 : 0;
  for (int32_t g = 0; g < Hq; ++g)
    for (int32_t j = s; j < scored_end; ++j) {
      double sum = 0.0, max = -INFINITY;
      for (int32_t o = -half; o <= half; ++o) {
        if (j + o < s || j + o >= scored_end) continue;
        const double x = mean[(int64_t)g * L + j + o - s];
        sum += x;
        max = max_nan(max, x);
      }
      value[(int64_t)g * L + j - s] =
          d->method == KVC_SCORE_SNAPKV ? (d->pool == KVC_POOL_MAX ? max : sum / d->pool_kernel) : sum;
    }
  for (int32_t h = 0; h < H; ++h) {
    /* TOVA: the mean over all q heads, in every KV head's row; else the KV head's group */
    const int32_t g0 = d->method == KVC_SCORE_TOVA ? 0 : h * G, count = d->method == KVC_SCORE_TOVA ? Hq : G;
    const int use_max = d->method != KVC_SCORE_TOVA && d->group_reduce == KVC_REDUCE_MAX;
    for (int32_t j = s; j < scored_end; ++j) {
      double sum = 0.0, max = -INFINITY;
      for (int32_t g = g0; g < g0 + count; ++g) {
        sum += value[(int64_t)g * L + j - s];
        max = max_nan(max, value[(int64_t)g * L + j - s]);
      }
      rows[(int64_t)h * n + j] = use_max ? max : sum / count;
    }
  }
  free(mean);
  free(logits);
  free(errors);
  free(seen);
  free(value);
}

/* Expected scores in the score layout, +inf wherever no domain scores a key; sets run->tol. */
static double *oracle_scores(score_run_t *run) {
  const kvc_plan_desc_t *d = &run->desc;
  const int32_t H = d->num_kv_heads, Hq = d->num_q_heads, D = d->head_dim;
  double *expect = (double *)malloc(sizeof(double) * (size_t)run->info.score_elems);
  for (int64_t i = 0; i < run->info.score_elems; ++i) expect[i] = INFINITY;
  double *queries = (double *)malloc(sizeof(double) * (size_t)(run->info.obs_total * Hq * D + 1));
  for (int64_t i = 0; i < run->info.obs_total * Hq * D; ++i) queries[i] = kvc_test_load(run->queries, kvc_test_query_dtype(d), i);
  int64_t offset = 0;
  double bound = 0.0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = d->seq_lens[b];
    double *keys = (double *)malloc(sizeof(double) * (size_t)n * (size_t)H * (size_t)D);
    for (int32_t t = 0; t < n; ++t)
      for (int32_t h = 0; h < H; ++h)
        for (int32_t x = 0; x < D; ++x)
          keys[((int64_t)t * H + h) * D + x] = kvc_test_key_scale(d, h) * kvc_test_k(run->cache, b, t, h, x);
    range_t doms[MAX_DOMAINS];
    const int32_t count = oracle_domains(d, b, doms);
    for (int32_t i = 0; i < count; ++i) oracle_domain(run, b, doms[i], keys, queries, expect + H * offset, &bound);
    free(keys);
    offset += n;
  }
  free(queries);
  const int attention = d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_H2O || d->method == KVC_SCORE_TOVA;
  run->tol = kFloatUlp + (attention ? expm1(run->lse ? bound + kExpError : 2.0 * (bound + kExpError)) + 0x1p-30 : 0.0);
  return expect;
}

/* got within run->tol of the oracle (relative); +inf and NaN exactly where the oracle has them. */
static void expect_oracle(const score_run_t *run, const float *got, const double *expect) {
  const int32_t H = run->desc.num_kv_heads;
  int64_t offset = 0;
  for (int32_t b = 0; b < run->c.batch; ++b) {
    const int32_t n = run->c.seq_lens[b];
    for (int32_t h = 0; h < H; ++h)
      for (int32_t j = 0; j < n; ++j) {
        const int64_t i = H * offset + (int64_t)h * n + j;
        const int ok = isnan(expect[i])   ? isnan(got[i])
                       : isinf(expect[i]) ? got[i] == expect[i]
                                          : fabs(got[i] - expect[i]) <= run->tol * fabs(expect[i]);
        if (!ok)
          cr_assert_fail("%s: sequence %d, KV head %d, key %d: got %.9g, oracle %.17g (tolerance %.3g relative)",
                         run->name, b, h, j, (double)got[i], expect[i], run->tol);
      }
    offset += n;
  }
}

/* Scores of the run's plan on a fresh 1-thread context, which must equal `got` bit for bit. */
static void expect_single_thread_equal(const score_run_t *run, const float *got) {
  kvc_context_t one;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &one), KVC_SUCCESS);
  float *again = new_scores(run, NAN);
  cr_assert_eq(kvc_score(one, run->plan, &run->cache->desc, run->queries, run->lse, again, 0, run->workspace,
                         run->workspace_bytes, NULL),
               KVC_SUCCESS, "%s: %s", run->name, kvc_last_error(one));
  cr_assert_eq(memcmp(again, got, sizeof(float) * (size_t)run->info.score_elems), 0,
               "%s: 1 thread and %d threads differ", run->name, run->c.threads);
  free(again);
  kvc_context_destroy(one);
}

/* Scores a case and checks it against the oracle; also that only the score layout is written
 * and the cache is only read. */
static void check_case(const score_case_t *c) {
  score_run_t run;
  run_open(&run, c);
  expect_positions(&run);
  unsigned char *k_before = (unsigned char *)malloc(run.cache->pool_bytes);
  memcpy(k_before, run.cache->k, run.cache->pool_bytes);
  float *got = new_scores(&run, NAN);
  got[run.info.score_elems] = 12345.0f;
  run_score(&run, got, 0);
  cr_assert_eq(got[run.info.score_elems], 12345.0f, "%s: wrote past the score layout", run.name);
  cr_assert_eq(memcmp(k_before, run.cache->k, run.cache->pool_bytes), 0, "%s: the cache changed", run.name);
  double *expect = oracle_scores(&run);
  expect_oracle(&run, got, expect);
  if (run.c.threads > 1) expect_single_thread_equal(&run, got);
  free(expect);
  free(got);
  free(k_before);
  run_close(&run);
}

/* ---- every method x dtype x layout x table x group x window ------------------------------------- */

/* n = 1, 2, 17, 100 in one batch; window 5 (< n for 17 and 100, > n for 1 and 2) and 150 (> all). */
static void check_matrix(kvc_score_method_t method) {
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};
  static const kvc_test_table_t tables[] = {KVC_TEST_DENSE, KVC_TEST_CSR, KVC_TEST_CONTIG};
  static const int32_t groups[] = {1, 4, 8}, windows[] = {5, 150};
  uint64_t seed = 1000 * (uint64_t)method;
  for (int dt = 0; dt < 3; ++dt)
    for (int layout = 0; layout < 2; ++layout)
      for (int table = 0; table < 3; ++table)
        for (int g = 0; g < 3; ++g)
          for (int w = 0; w < 2; ++w) {
            score_case_t c = base_case(method, dtypes[dt], ++seed);
            c.layout = (kvc_test_layout_t)layout;
            c.table = tables[table];
            c.group = groups[g];
            c.window = windows[w];
            check_case(&c);
          }
}

Test(score_cpu, snapkv_every_dtype_layout_table_group) { check_matrix(KVC_SCORE_SNAPKV); }
Test(score_cpu, h2o_every_dtype_layout_table_group) { check_matrix(KVC_SCORE_H2O); }
Test(score_cpu, tova_every_dtype_layout_table_group) { check_matrix(KVC_SCORE_TOVA); }
Test(score_cpu, knorm_every_dtype_layout_table_group) { check_matrix(KVC_SCORE_KNORM); }
Test(score_cpu, streaming_every_dtype_layout_table_group) { check_matrix(KVC_SCORE_STREAMING); }

/* n = 1000 beside a short sequence; window 64 < n, and for the windowed methods 1200 > n (H2O over
 * the whole prompt: 1000 queries). Layouts and tables rotate with the dtype. */
Test(score_cpu, long_sequences_every_method_and_dtype) {
  static const int32_t lens[] = {1000, 3};
  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_STREAMING; ++m)
    for (int dt = 0; dt < 3; ++dt)
      for (int w = 0; w < 2; ++w) {
        if (w == 1 && m != KVC_SCORE_SNAPKV && m != KVC_SCORE_H2O) continue;
        score_case_t c = base_case((kvc_score_method_t)m, dtypes[dt], 7000 + 10 * m + dt);
        c.seq_lens = lens;
        c.batch = 2;
        c.group = 4;
        c.window = w ? 1200 : 64;
        c.layout = (kvc_test_layout_t)(dt % 2);
        c.table = (kvc_test_table_t)dt;
        c.page_size = 16;
        check_case(&c);
      }
}

/* head_dim 1, odd 5 and the largest ones, with an explicit scale. */
Test(score_cpu, head_dims_and_explicit_scale) {
  static const int32_t dims[] = {1, 5, 128, 256};
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_KNORM; ++m)
    for (int i = 0; i < 4; ++i) {
      score_case_t c = base_case((kvc_score_method_t)m, KVC_DTYPE_F16, 8000 + 10 * m + i);
      c.head_dim = dims[i];
      c.scale = 0.37f;
      c.group = 2;
      c.layout = (kvc_test_layout_t)(i % 2);
      check_case(&c);
    }
}

/* ---- engine-supplied normalisers (kvc_score's `lse`) --------------------------------------------- */

/* With the engine's normalisers the scores match the oracle within the lse tolerance of the
 * header comment; the run on 1 thread gives the same bits. */
static void check_lse_case(const score_case_t *c) {
  score_run_t run;
  run_open(&run, c);
  float *lse = kvc_test_lse(&run.desc, run.plan, run.cache, run.queries), *got = new_scores(&run, NAN);
  run.lse = lse;
  cr_assert_eq(kvc_score(run.ctx, run.plan, &run.cache->desc, run.queries, lse, got, 0, run.workspace,
                         run.workspace_bytes, NULL),
               KVC_SUCCESS, "%s: %s", run.name, kvc_last_error(run.ctx));
  double *expect = oracle_scores(&run);
  expect_oracle(&run, got, expect);
  if (run.c.threads > 1) expect_single_thread_equal(&run, got);
  /* and it is really used: a normaliser larger by ln 2 halves every attention probability, so
   * every finite score halves (pooling and the group reduce are linear or scale-invariant), up to
   * the rounding of lse + ln 2 and of both runs' exp: within twice the tolerance */
  for (int64_t i = 0; i < run.info.obs_total * run.desc.num_q_heads; ++i) lse[i] += (float)M_LN2;
  float *halved = new_scores(&run, NAN);
  cr_assert_eq(kvc_score(run.ctx, run.plan, &run.cache->desc, run.queries, lse, halved, 0, run.workspace,
                         run.workspace_bytes, NULL),
               KVC_SUCCESS);
  for (int64_t i = 0; i < run.info.score_elems; ++i)
    cr_assert(isinf(expect[i]) ? halved[i] == INFINITY : fabs(halved[i] - 0.5 * got[i]) <= 2.0 * run.tol * fabs(got[i]),
              "%s: lse + ln 2 gives %.9g for score %lld, expected half of %.9g", run.name, (double)halved[i],
              (long long)i, (double)got[i]);
  free(halved);
  free(expect);
  free(got);
  free(lse);
  run_close(&run);
}

Test(score_cpu, engine_lse_gives_the_same_scores) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m)
    for (int w = 0; w < 2; ++w) {
      score_case_t c = base_case((kvc_score_method_t)m, m == KVC_SCORE_H2O ? KVC_DTYPE_F32 : KVC_DTYPE_BF16, 9500 + 10 * m + w);
      c.group = 4;
      c.window = w ? 150 : 5;
      check_lse_case(&c);
    }
}

/* ---- span-local domains ------------------------------------------------------------------------ */

/* Sequence 0 (n 60): three FAIR spans, PROTECT spans over the gaps and one inside a FAIR span.
 * Sequence 1 (n 31): two FAIR spans, a PROTECT gap between them and one at the end. */
static const int32_t kSpanLens[] = {60, 31};
static const int32_t kSpanIndptr[] = {0, 7, 11};
static const kvc_span_t kSpans[] = {
    {0, 4, KVC_SPAN_PROTECT, 1.0f},   {4, 20, KVC_SPAN_FAIR, 1.0f},   {10, 12, KVC_SPAN_PROTECT, 1.0f},
    {20, 23, KVC_SPAN_PROTECT, 1.0f}, {23, 40, KVC_SPAN_FAIR, 2.0f},  {40, 57, KVC_SPAN_FAIR, 1.0f},
    {57, 60, KVC_SPAN_PROTECT, 1.0f}, {0, 13, KVC_SPAN_FAIR, 1.0f},   {13, 15, KVC_SPAN_PROTECT, 1.0f},
    {15, 29, KVC_SPAN_FAIR, 1.0f},    {29, 31, KVC_SPAN_PROTECT, 1.0f}};

static score_case_t span_case(kvc_score_method_t method, uint64_t seed) {
  score_case_t c = base_case(method, KVC_DTYPE_BF16, seed);
  c.batch = 2;
  c.seq_lens = kSpanLens;
  c.span_indptr = kSpanIndptr;
  c.spans = kSpans;
  c.span_local = 1;
  c.window = 7; /* split 3 + 2 + 2 over three spans, 4 + 3 over two */
  c.pool_kernel = 3;
  return c;
}

Test(score_cpu, span_local_domains_every_method) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_STREAMING; ++m)
    for (int group = 1; group <= 4; group *= 4) {
      score_case_t c = span_case((kvc_score_method_t)m, 9000 + 10 * m + group);
      c.group = group;
      c.layout = (kvc_test_layout_t)(group == 4);
      c.table = group == 4 ? KVC_TEST_CSR : KVC_TEST_DENSE;
      check_case(&c);
    }
}

/* span_local: the normaliser runs over the row's own span only ([span start, p]). */
Test(score_cpu, engine_lse_span_local) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m) {
    score_case_t c = span_case((kvc_score_method_t)m, 9600 + m);
    c.group = 2;
    check_lse_case(&c);
  }
}

/* Which keys are +inf, from the spans alone (no oracle): tokens outside FAIR spans with span_local,
 * plus SNAPKV's query positions (the last 3/2/2 and 4/3 of the spans) and TOVA's last token of
 * each span. Every other key is finite. */
Test(score_cpu, unscored_keys_are_exactly_inf) {
  static const int32_t inf_count[][2] = {
      /* seq 0: 60 - 50 FAIR = 10 outside; seq 1: 31 - 27 = 4 outside */
      {10 + 7, 4 + 7}, /* SNAPKV: + window */
      {10, 4},         /* H2O */
      {10 + 3, 4 + 2}, /* TOVA: + one per span */
      {10, 4},         /* KNORM */
      {10, 4}};        /* STREAMING */
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_STREAMING; ++m) {
    score_case_t c = span_case((kvc_score_method_t)m, 9500 + m);
    c.group = 2;
    score_run_t run;
    run_open(&run, &c);
    float *got = new_scores(&run, NAN);
    run_score(&run, got, 0);
    int64_t offset = 0;
    for (int32_t b = 0; b < 2; ++b) {
      const int32_t n = kSpanLens[b];
      for (int32_t h = 0; h < c.num_kv_heads; ++h) {
        int32_t infs = 0;
        for (int32_t j = 0; j < n; ++j) {
          const float s = got[c.num_kv_heads * offset + (int64_t)h * n + j];
          int in_fair = 0, is_query = 0;
          for (int32_t i = kSpanIndptr[b]; i < kSpanIndptr[b + 1]; ++i)
            if (kSpans[i].kind == KVC_SPAN_FAIR && j >= kSpans[i].start && j < kSpans[i].end) in_fair = 1;
          for (int32_t r = run.obs_indptr[b]; r < run.obs_indptr[b + 1]; ++r) is_query |= run.obs_pos[r] == j;
          const int want_inf = !in_fair || ((m == KVC_SCORE_SNAPKV || m == KVC_SCORE_TOVA) && is_query);
          cr_assert(want_inf ? s == INFINITY : isfinite(s), "%s: sequence %d head %d key %d: %g", run.name, b, h, j,
                    (double)s);
          infs += s == INFINITY;
        }
        cr_assert_eq(infs, inf_count[m][b], "%s: sequence %d head %d: %d keys +inf", run.name, b, h, infs);
      }
      offset += n;
    }
    free(got);
    run_close(&run);
  }
}

/* ---- non-finite data (the header's rule) -------------------------------------------------------- */

/* A value of the case's dtype: NaN, +inf, -inf or a finite float. */
static void poke(void *at, kvc_dtype_t dtype, float value) {
  if (dtype == KVC_DTYPE_F32) memcpy(at, &value, sizeof value);
  else {
    const uint16_t bits = dtype == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(value) : kvc_test_f32_to_bf16(value);
    memcpy(at, &bits, sizeof bits);
  }
}

static size_t dtype_bytes(kvc_dtype_t dtype) { return dtype == KVC_DTYPE_F32 ? 4 : 2; }

/* Scores a case after `edit` changed its keys or queries; checks the oracle (NaN exactly where it
 * has NaN) and that the poisoning is partial where `partial` says so: some finite and some NaN
 * scores. */
static void check_edited(const score_case_t *c, void (*edit)(score_run_t *, float), float value, int partial) {
  score_run_t run;
  run_open(&run, c);
  edit(&run, value);
  float *got = new_scores(&run, NAN);
  run_score(&run, got, 0);
  double *expect = oracle_scores(&run);
  expect_oracle(&run, got, expect);
  if (run.c.threads > 1) expect_single_thread_equal(&run, got);
  int64_t nans = 0, finite = 0;
  for (int64_t i = 0; i < run.info.score_elems; ++i) {
    nans += isnan(got[i]);
    finite += isfinite(got[i]);
  }
  cr_assert_gt(nans, 0, "%s: no NaN score after a non-finite input %g", run.name, (double)value);
  if (partial) cr_assert_gt(finite, 0, "%s: every score NaN after one non-finite input", run.name);
  free(expect);
  free(got);
  run_close(&run);
}

/* key 40 of sequence 3 (n 100), KV head 1, element 3 */
static void edit_key(score_run_t *run, float value) {
  poke((char *)kvc_test_k_ptr(run->cache, 3, 40, 1) + 3 * dtype_bytes(run->c.dtype), run->c.dtype, value);
}

/* the query of q head 1 (KV head 0) in sequence 3's middle observation row, element 2 */
static void edit_query(score_run_t *run, float value) {
  const int32_t r = (run->obs_indptr[3] + run->obs_indptr[4]) / 2, Hq = run->desc.num_q_heads;
  poke((char *)run->queries + (((int64_t)r * Hq + 1) * run->c.head_dim + 2) * dtype_bytes(run->c.dtype), run->c.dtype, value);
}

/* A NaN, +inf or -inf element in one key: every row that sees it is NaN, so every key those rows
 * see scores NaN (for KV head 1 of sequence 3; the other head and sequences stay finite). -inf
 * counts too (a -inf logit is not just weight 0). */
Test(score_cpu, nonfinite_key_poisons_the_rows_that_see_it) {
  static const float values[] = {NAN, INFINITY, -INFINITY};
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m)
    for (int v = 0; v < 3; ++v) {
      score_case_t c = base_case((kvc_score_method_t)m, (kvc_dtype_t)v, 16000 + 10 * m + v);
      c.group = 2;
      c.window = m == KVC_SCORE_H2O ? 150 : 5;
      check_edited(&c, edit_key, values[v], 1);
    }
}

/* A non-finite query element poisons that q head's row only: with H2O the keys after its position
 * stay finite; MAX pooling (kernel 1, 3) and MAX reduce keep the NaN (fmax would drop it), MEAN
 * propagates it. */
Test(score_cpu, nonfinite_query_poisons_its_row_through_pooling_and_reduce) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_TOVA; ++m)
    for (int reduce = KVC_REDUCE_MEAN; reduce <= KVC_REDUCE_MAX; ++reduce)
      for (int kernel = 1; kernel <= 3; kernel += 2) {
        if (m != KVC_SCORE_SNAPKV && kernel == 3) continue;
        score_case_t c = base_case((kvc_score_method_t)m, KVC_DTYPE_F32, 17000 + 100 * m + 10 * reduce + kernel);
        c.group = 4;
        c.reduce = (kvc_reduce_t)reduce;
        c.pool = KVC_POOL_MAX;
        c.pool_kernel = kernel;
        c.window = m == KVC_SCORE_H2O ? 150 : 5;
        check_edited(&c, edit_query, reduce ? INFINITY : NAN, 1);
      }
}

/* KNORM is finite for every finite key, even when the norm is past FLT_MAX (-FLT_MAX then); a NaN
 * key scores NaN and an infinite one -inf. */
Test(score_cpu, knorm_finite_for_every_finite_key) {
  score_case_t c = base_case(KVC_SCORE_KNORM, KVC_DTYPE_F32, 18000);
  score_run_t run;
  run_open(&run, &c);
  float *key = (float *)kvc_test_k_ptr(run.cache, 3, 10, 0), *huge = (float *)kvc_test_k_ptr(run.cache, 3, 11, 0);
  for (int32_t d = 0; d < c.head_dim; ++d) {
    key[d] = 2e38f;  /* norm 8e38 > FLT_MAX */
    huge[d] = 1e30f; /* norm 4e30 */
  }
  ((float *)kvc_test_k_ptr(run.cache, 3, 12, 1))[5] = NAN;
  ((float *)kvc_test_k_ptr(run.cache, 3, 13, 1))[0] = -INFINITY;
  float *got = new_scores(&run, NAN);
  run_score(&run, got, 0);
  double *expect = oracle_scores(&run);
  expect_oracle(&run, got, expect);
  const int64_t row0 = 2 * (1 + 2 + 17), row1 = row0 + 100; /* sequence 3, KV heads 0 and 1 */
  cr_assert_eq(got[row0 + 10], -FLT_MAX);
  cr_assert(fabs(got[row0 + 11] + 4e30) <= 1e-6 * 4e30, "%g", (double)got[row0 + 11]);
  cr_assert(isnan(got[row1 + 12]));
  cr_assert_eq(got[row1 + 13], -INFINITY);
  free(expect);
  free(got);
  run_close(&run);
}

/* ---- FP8 keys ------------------------------------------------------------------------------------ */

/* e4m3 keys (decoded by the oracle from the format's definition, times k_scale) with a per-tensor
 * or per-KV-head scale, for every method that reads K, with f16, bf16 and f32 queries, every layout
 * and table kind, GQA 1 and 4, window 5 and 150; instruction sets and threads rotate. */
Test(score_cpu, fp8_keys_every_method_query_dtype_and_scale) {
  static const kvc_score_method_t methods[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA, KVC_SCORE_KNORM};
  static const kvc_query_dtype_t queries[] = {KVC_QUERY_DTYPE_F16, KVC_QUERY_DTYPE_BF16, KVC_QUERY_DTYPE_F32};
  static const kvc_test_table_t tables[] = {KVC_TEST_DENSE, KVC_TEST_CSR, KVC_TEST_CONTIG};
  uint64_t seed = 30000;
  for (int m = 0; m < 4; ++m)
    for (int q = 0; q < 3; ++q)
      for (int per_head = 0; per_head <= 1; ++per_head)
        for (int layout = 0; layout < 2; ++layout)
          for (int g = 0; g < 2; ++g) {
            score_case_t c = base_case(methods[m], KVC_DTYPE_FP8_E4M3, ++seed);
            c.query_dtype = queries[q];
            c.per_head_scale = per_head;
            c.layout = (kvc_test_layout_t)layout;
            c.table = tables[seed % 3];
            c.group = g ? 4 : 1;
            c.window = seed % 2 ? 150 : 5;
            check_case(&c);
          }
}

/* Every one of the 256 e4m3 codes, through KNORM (head_dim 16: token t of sequence 3 holds codes
 * 16 t .. 16 t + 15, so the vector decode of the portable and the scalar tail both see them all)
 * and through SNAPKV's logits (head_dim 16, every code in some key): the oracle decodes by the
 * definition. Rows with 0x7f or 0xff (NaN) score NaN; the others are finite. */
Test(score_cpu, fp8_every_code_decodes_exactly) {
  for (int m = 0; m < 2; ++m) {
    score_case_t c = base_case(m ? KVC_SCORE_H2O : KVC_SCORE_KNORM, KVC_DTYPE_FP8_E4M3, 31000 + m);
    c.query_dtype = KVC_QUERY_DTYPE_F32;
    c.window = 150;
    c.scale = 0.002f; /* logits of keys up to 448 stay within float's exp (no probability underflows) */
    score_run_t run;
    run_open(&run, &c);
    for (int32_t t = 0; t < 16; ++t)
      for (int32_t x = 0; x < 16; ++x) {
        const int code = 16 * t + x;
        /* H2O: NaN codes would poison whole rows; keep them to KNORM */
        ((uint8_t *)kvc_test_k_ptr(run.cache, 3, 20 + t, 1))[x] = (uint8_t)(m && (code & 0x7f) == 0x7f ? 0x00 : code);
      }
    float *got = new_scores(&run, NAN);
    run_score(&run, got, 0);
    double *expect = oracle_scores(&run);
    expect_oracle(&run, got, expect);
    const int64_t row1 = 2 * (1 + 2 + 17) + 100; /* sequence 3, KV head 1 */
    for (int32_t t = 0; t < 16; ++t)
      cr_assert(m || (isnan(got[row1 + 20 + t]) == (t == 7 || t == 15)), "token %d: %g", 20 + t, (double)got[row1 + 20 + t]);
    free(expect);
    free(got);
    run_close(&run);
  }
}

/* A NaN fp8 key element poisons the rows that see it, as any non-finite key does (e4m3 has no
 * inf: its largest magnitude, 448, is finite and stays so); KNORM of a key of 448s with a huge
 * k_scale saturates at -FLT_MAX. */
static void edit_fp8_key(score_run_t *run, float value) {
  ((uint8_t *)kvc_test_k_ptr(run->cache, 3, 40, 1))[3] = kvc_test_f32_to_e4m3(value);
}

Test(score_cpu, fp8_nan_key_poisons_the_rows_that_see_it) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_KNORM; ++m) {
    score_case_t c = base_case((kvc_score_method_t)m, KVC_DTYPE_FP8_E4M3, 32000 + m);
    c.query_dtype = m % 2 ? KVC_QUERY_DTYPE_BF16 : KVC_QUERY_DTYPE_F16;
    c.group = 2;
    c.per_head_scale = m % 2;
    c.window = m == KVC_SCORE_H2O ? 150 : 5;
    check_edited(&c, edit_fp8_key, NAN, 1);
  }
}

Test(score_cpu, fp8_knorm_saturates_with_a_huge_scale) {
  score_case_t c = base_case(KVC_SCORE_KNORM, KVC_DTYPE_FP8_E4M3, 33000);
  score_run_t run;
  run_open(&run, &c);
  const float huge[2] = {3e37f, 1.0f};
  kvc_plan_t plan;
  run.desc.k_scales = huge;
  cr_assert_eq(kvc_plan_create(run.ctx, &run.desc, &plan), KVC_SUCCESS, "%s", kvc_last_error(run.ctx));
  kvc_plan_destroy(run.plan);
  run.plan = plan;
  for (int32_t x = 0; x < c.head_dim; ++x) ((uint8_t *)kvc_test_k_ptr(run.cache, 3, 10, 0))[x] = 0x7e; /* 448 */
  float *got = new_scores(&run, NAN);
  run_score(&run, got, 0);
  double *expect = oracle_scores(&run);
  expect_oracle(&run, got, expect);
  const int64_t row0 = 2 * (1 + 2 + 17); /* sequence 3, KV head 0: 3e37 * 448 * 4 > FLT_MAX */
  cr_assert_eq(got[row0 + 10], -FLT_MAX);
  for (int32_t j = 0; j < 100; ++j) cr_assert(isfinite(got[row0 + j]) && got[row0 + j] < 0.0f, "key %d", j);
  free(expect);
  free(got);
  run_close(&run);
}

/* ---- threads ---------------------------------------------------------------------------------- */

/* 1, 2, 3 and 7 threads: the same bits, for every method, with several sequences and span-local
 * domains (many items), and a plan made on 3 threads used from a 1- and an 8-thread context. */
Test(score_cpu, threads_give_identical_scores) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_STREAMING; ++m)
    for (int local = 0; local <= 1; ++local) {
      float *first = NULL;
      for (int32_t threads = 1; threads <= 7; threads += threads < 3 ? 1 : 4) {
        score_case_t c = local ? span_case((kvc_score_method_t)m, 19000 + m) : base_case((kvc_score_method_t)m, KVC_DTYPE_F16, 19000 + m);
        c.group = 4;
        c.threads = threads;
        score_run_t run;
        run_open(&run, &c);
        float *got = new_scores(&run, NAN);
        run_score(&run, got, 0);
        if (!first) first = got;
        else {
          cr_assert_eq(memcmp(first, got, sizeof(float) * (size_t)run.info.score_elems), 0, "%s: differs from 1 thread", run.name);
          free(got);
        }
        if (threads == 3) { /* the plan's workspace is for 3: a context with more uses 3 */
          kvc_context_t eight;
          cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &eight), KVC_SUCCESS);
          cr_assert_eq(kvc_context_set_threads(eight, 8), KVC_SUCCESS);
          float *again = new_scores(&run, NAN);
          cr_assert_eq(kvc_score(eight, run.plan, &run.cache->desc, run.queries, NULL, again, 0, run.workspace,
                                 run.workspace_bytes, NULL),
                       KVC_SUCCESS);
          cr_assert_eq(memcmp(first, again, sizeof(float) * (size_t)run.info.score_elems), 0, "%s: 8-thread context", run.name);
          free(again);
          kvc_context_destroy(eight);
        }
        run_close(&run);
      }
      free(first);
    }
}

Test(score_cpu, set_threads_checks_its_arguments) {
  kvc_context_t ctx;
  int32_t threads = 0;
  cr_assert_eq(kvc_context_set_threads(NULL, 2), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_context_threads(NULL, &threads), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  cr_assert_eq(kvc_context_threads(ctx, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_context_threads(ctx, &threads), KVC_SUCCESS);
  cr_assert_eq(threads, 1);
  for (int32_t bad = -1; bad <= 0; ++bad) {
    cr_assert_eq(kvc_context_set_threads(ctx, bad), KVC_ERROR_INVALID_VALUE);
    cr_assert(strstr(kvc_last_error(ctx), "threads is") != NULL, "%s", kvc_last_error(ctx));
  }
  cr_assert_eq(kvc_context_set_threads(ctx, 257), KVC_ERROR_INVALID_VALUE);
  cr_assert_eq(kvc_context_set_threads(ctx, 256), KVC_SUCCESS);
  cr_assert_eq(kvc_context_set_threads(ctx, 2), KVC_SUCCESS);
  cr_assert_eq(kvc_context_threads(ctx, &threads), KVC_SUCCESS);
  cr_assert_eq(threads, 2);
  cr_assert_eq(kvc_context_destroy(ctx), KVC_SUCCESS);
  /* a CUDA context (the emulator's, where the test library has one) runs no host threads */
  if (kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx) == KVC_SUCCESS) {
    cr_assert_eq(kvc_context_set_threads(ctx, 1), KVC_SUCCESS);
    cr_assert_eq(kvc_context_set_threads(ctx, 2), KVC_ERROR_NOT_SUPPORTED);
    kvc_context_destroy(ctx);
  }
}

/* ---- pooling and group reduction ---------------------------------------------------------------- */

/* SNAPKV pooling at domain borders: kernel 1, 3, 5 x AVG/MAX x group MEAN/MAX, with one domain and
 * with span-local domains (pooling must not reach across a domain's border or into its window). */
Test(score_cpu, snapkv_pooling_and_group_reduce_at_domain_borders) {
  for (int kernel = 1; kernel <= 5; kernel += 2)
    for (int pool = KVC_POOL_AVG; pool <= KVC_POOL_MAX; ++pool)
      for (int reduce = KVC_REDUCE_MEAN; reduce <= KVC_REDUCE_MAX; ++reduce)
        for (int local = 0; local <= 1; ++local) {
          score_case_t c = local ? span_case(KVC_SCORE_SNAPKV, 0) : base_case(KVC_SCORE_SNAPKV, KVC_DTYPE_F32, 0);
          c.seed = 10000 + 100 * kernel + 10 * pool + 2 * reduce + local;
          c.pool_kernel = kernel;
          c.pool = (kvc_pool_t)pool;
          c.reduce = (kvc_reduce_t)reduce;
          c.group = 4;
          c.table = (kvc_test_table_t)(kernel / 2);
          check_case(&c);
        }
}

Test(score_cpu, h2o_group_reduce_mean_and_max) {
  for (int reduce = KVC_REDUCE_MEAN; reduce <= KVC_REDUCE_MAX; ++reduce)
    for (int group = 4; group <= 8; group *= 2)
      for (int local = 0; local <= 1; ++local) {
        score_case_t c = local ? span_case(KVC_SCORE_H2O, 0) : base_case(KVC_SCORE_H2O, KVC_DTYPE_F16, 0);
        c.seed = 11000 + 100 * reduce + group + local;
        c.reduce = (kvc_reduce_t)reduce;
        c.group = group;
        check_case(&c);
      }
}

/* ---- properties that need no oracle -------------------------------------------------------------- */

/* accumulate = 1 adds (as float) to what is there: onto random values r it gives r + once exactly,
 * and scoring twice gives 2 x once exactly (+inf stays +inf). */
Test(score_cpu, accumulate_adds_to_existing_scores) {
  for (int m = KVC_SCORE_SNAPKV; m <= KVC_SCORE_STREAMING; ++m) {
    score_case_t c = base_case((kvc_score_method_t)m, KVC_DTYPE_F16, 12000 + m);
    c.group = 4;
    score_run_t run;
    run_open(&run, &c);
    const int64_t count = run.info.score_elems;
    float *once = new_scores(&run, NAN), *twice = new_scores(&run, NAN), *onto = new_scores(&run, 0.0f);
    kvc_rng_t rng = {c.seed};
    for (int64_t i = 0; i < count; ++i) onto[i] = (float)kvc_rng_normal(&rng);
    float *base = new_scores(&run, 0.0f);
    memcpy(base, onto, sizeof(float) * (size_t)count);
    run_score(&run, once, 0);
    run_score(&run, twice, 0);
    run_score(&run, twice, 1);
    run_score(&run, onto, 1);
    for (int64_t i = 0; i < count; ++i) {
      cr_assert(!isnan(once[i]), "%s: score %lld not written", run.name, (long long)i);
      cr_assert_eq(twice[i], 2.0f * once[i], "%s: score %lld: twice %g, once %g", run.name, (long long)i,
                   (double)twice[i], (double)once[i]);
      cr_assert_eq(onto[i], base[i] + once[i], "%s: score %lld", run.name, (long long)i);
    }
    free(once);
    free(twice);
    free(onto);
    free(base);
    run_close(&run);
  }
}

/* TOVA: every KV head's row of a sequence holds the same scores, bit for bit. */
Test(score_cpu, tova_rows_identical_across_kv_heads) {
  for (int local = 0; local <= 1; ++local) {
    score_case_t c = local ? span_case(KVC_SCORE_TOVA, 13001) : base_case(KVC_SCORE_TOVA, KVC_DTYPE_F32, 13000);
    c.num_kv_heads = 4;
    c.group = 2;
    score_run_t run;
    run_open(&run, &c);
    float *got = new_scores(&run, NAN);
    run_score(&run, got, 0);
    int64_t offset = 0;
    for (int32_t b = 0; b < c.batch; ++b) {
      const int32_t n = c.seq_lens[b];
      const float *row0 = got + c.num_kv_heads * offset;
      for (int32_t h = 1; h < c.num_kv_heads; ++h)
        cr_assert_eq(memcmp(row0, row0 + (int64_t)h * n, sizeof(float) * (size_t)n), 0,
                     "%s: sequence %d: KV head %d differs from head 0", run.name, b, h);
      offset += n;
    }
    free(got);
    run_close(&run);
  }
}

/* scale 0 means 1/sqrt(head_dim): bit-identical to passing 1/8 for head_dim 64. */
Test(score_cpu, default_scale_is_inverse_sqrt_head_dim) {
  float *results[2];
  for (int explicit_scale = 0; explicit_scale <= 1; ++explicit_scale) {
    score_case_t c = base_case(KVC_SCORE_H2O, KVC_DTYPE_BF16, 14000);
    c.head_dim = 64;
    c.scale = explicit_scale ? 0.125f : 0.0f;
    score_run_t run;
    run_open(&run, &c);
    results[explicit_scale] = new_scores(&run, NAN);
    run_score(&run, results[explicit_scale], 0);
    if (explicit_scale)
      cr_assert_eq(memcmp(results[0], results[1], sizeof(float) * (size_t)run.info.score_elems), 0);
    run_close(&run);
  }
  free(results[0]);
  free(results[1]);
}

/* KNORM and STREAMING read no queries and need no workspace (so NULL works). */
Test(score_cpu, knorm_and_streaming_need_no_workspace) {
  for (int m = KVC_SCORE_KNORM; m <= KVC_SCORE_STREAMING; ++m) {
    score_case_t c = base_case((kvc_score_method_t)m, KVC_DTYPE_F32, 15000 + m);
    score_run_t run;
    run_open(&run, &c);
    cr_assert_eq(run.workspace_bytes, 0u, "%s", run.name);
    cr_assert_eq(run.info.obs_total, 0, "%s", run.name);
    float *got = new_scores(&run, NAN);
    cr_assert_eq(kvc_score(run.ctx, run.plan, &run.cache->desc, NULL, NULL, got, 0, NULL, 0, NULL), KVC_SUCCESS, "%s: %s",
                 run.name, kvc_last_error(run.ctx));
    for (int64_t i = 0; i < run.info.score_elems; ++i) cr_assert(isfinite(got[i]), "%s: score %lld", run.name, (long long)i);
    free(got);
    run_close(&run);
  }
}

/* ---- hand-worked examples ----------------------------------------------------------------------- */

/* One f32 sequence of n <= 8 tokens, one KV head, head_dim 2, contiguous (one page), scale 1. */
typedef struct {
  kvc_score_method_t method;
  int32_t n, num_q_heads, window, pool_kernel;
  kvc_pool_t pool;
  const float (*keys)[2];
  const float *queries; /* [queries][num_q_heads][2] */
  const int32_t *positions; int32_t num_positions; /* expected observation positions */
  const int32_t *span_indptr;
  const kvc_span_t *spans;
  int32_t span_local;
} hand_case_t;

static void hand_scores(const hand_case_t *hc, float *out) {
  float k[8][2], v[8][2];
  memset(v, 0, sizeof v);
  memcpy(k, hc->keys, sizeof(float) * 2 * (size_t)hc->n);
  kvc_paged_kv_t cache;
  memset(&cache, 0, sizeof cache);
  cache.k = k;
  cache.v = v;
  cache.dtype = KVC_DTYPE_F32;
  cache.num_kv_heads = 1;
  cache.head_dim = 2;
  cache.page_size = 8;
  cache.num_pages = 1;
  cache.stride_page = 16;
  cache.stride_token = 2;
  cache.stride_head = 2;

  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  const int32_t lens[] = {hc->n}, budgets[] = {hc->n};
  d.num_q_heads = hc->num_q_heads;
  d.num_kv_heads = 1;
  d.head_dim = 2;
  d.dtype = KVC_DTYPE_F32;
  d.batch = 1;
  d.seq_lens = lens;
  d.budgets = budgets;
  d.method = hc->method;
  d.window = hc->window;
  d.pool_kernel = hc->pool_kernel;
  d.pool = hc->pool;
  d.scale = 1.0f;
  d.span_indptr = hc->span_indptr;
  d.spans = hc->spans;
  d.span_local = hc->span_local;
  kvc_context_t ctx;
  kvc_plan_t plan;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  int32_t indptr[2], positions[8];
  cr_assert_eq(kvc_plan_obs_positions(plan, indptr, positions), KVC_SUCCESS);
  cr_assert_eq(indptr[1], hc->num_positions);
  for (int32_t i = 0; i < hc->num_positions; ++i) cr_assert_eq(positions[i], hc->positions[i]);
  size_t bytes;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  cr_assert_eq(kvc_score(ctx, plan, &cache, hc->queries, NULL, out, 0, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  free(ws);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

static void expect_hand(const float *got, const double *want, int32_t n) {
  for (int32_t j = 0; j < n; ++j)
    if (isinf(want[j]))
      cr_assert_eq(got[j], INFINITY, "key %d: got %g, expected +inf", j, (double)got[j]);
    else
      cr_assert(fabs(got[j] - want[j]) <= kHandTol, "key %d: got %.9g, expected %.9g", j, (double)got[j], want[j]);
}

/* Keys of the attention examples: k0 = (0,0), k1 = (1,0), k2 = (0,1), k3 = (1,1). */
static const float kHandKeys[8][2] = {{0, 0}, {1, 0}, {0, 1}, {1, 1}};

/* SNAPKV, window 2: queries at positions 2 and 3, scored keys 0 and 1, keys 2 and 3 protected.
 *   q(2) = (1,0): logits over keys 0..2 are 0, 1, 0 -> a = 1/(2+e), e/(2+e), 1/(2+e)
 *   q(3) = (0,0): logits 0, 0, 0, 0                 -> a = 1/4 each
 *   mean: s0 = (1/(2+e) + 1/4) / 2 = 0.23097, s1 = (e/(2+e) + 1/4) / 2 = 0.41306
 *   pool 1: s0, s1. pool 3 AVG: key 0 = (0 + s0 + s1)/3 (left zero padding), key 1 = (s0 + s1 + 0)/3
 *   (key 2 is outside the scored range, so it counts as padding). pool 3 MAX: s1 for both. */
Test(score_cpu, hand_snapkv) {
  const double e = exp(1.0), s0 = (1 / (2 + e) + 0.25) / 2, s1 = (e / (2 + e) + 0.25) / 2;
  static const float queries[] = {1, 0, 0, 0};
  static const int32_t positions[] = {2, 3};
  hand_case_t hc = {KVC_SCORE_SNAPKV, 4, 1, 2, 1, KVC_POOL_AVG, kHandKeys, queries, positions, 2, NULL, NULL, 0};
  float got[4];
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){s0, s1, INFINITY, INFINITY}, 4);
  hc.pool_kernel = 3;
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){(s0 + s1) / 3, (s0 + s1) / 3, INFINITY, INFINITY}, 4);
  hc.pool = KVC_POOL_MAX;
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){s1, s1, INFINITY, INFINITY}, 4);
}

/* H2O, window 4: every position queries with q = (1,0), so the logit of key j is its x: 0, 1, 0, 1.
 *   q(0) sees key 0:     1
 *   q(1) sees keys 0..1: 1/(1+e),  e/(1+e)
 *   q(2) sees keys 0..2: 1/(2+e),  e/(2+e),  1/(2+e)
 *   q(3) sees keys 0..3: 1/(2+2e), e/(2+2e), 1/(2+2e), e/(2+2e)
 * Key j is seen by the 4 - j queries at positions >= j:
 *   key 0 = (1 + 1/(1+e) + 1/(2+e) + 1/(2+2e)) / 4     key 1 = (e/(1+e) + e/(2+e) + e/(2+2e)) / 3
 *   key 2 = (1/(2+e) + 1/(2+2e)) / 2                   key 3 = e/(2+2e) */
Test(score_cpu, hand_h2o) {
  const double e = exp(1.0);
  static const float queries[] = {1, 0, 1, 0, 1, 0, 1, 0};
  static const int32_t positions[] = {0, 1, 2, 3};
  const hand_case_t hc = {KVC_SCORE_H2O, 4, 1, 4, 5, KVC_POOL_AVG, kHandKeys, queries, positions, 4, NULL, NULL, 0};
  float got[4];
  hand_scores(&hc, got);
  expect_hand(got,
              (const double[]){(1 + 1 / (1 + e) + 1 / (2 + e) + 1 / (2 + 2 * e)) / 4,
                               (e / (1 + e) + e / (2 + e) + e / (2 + 2 * e)) / 3, (1 / (2 + e) + 1 / (2 + 2 * e)) / 2,
                               e / (2 + 2 * e)},
              4);
}

/* TOVA, two q heads on the one KV head; the window (64) is ignored: one query, at position 3.
 *   head 0, q = (0,2): logits 0, 0, 2, 2 -> 1/(2+2e^2), 1/(2+2e^2), e^2/(2+2e^2), e^2/(2+2e^2)
 *   head 1, q = (0,0): 1/4 each
 *   key j = mean over the two heads; key 3 (the query itself) is protected: +inf. */
Test(score_cpu, hand_tova) {
  const double e2 = exp(2.0), low = (1 / (2 + 2 * e2) + 0.25) / 2, high = (e2 / (2 + 2 * e2) + 0.25) / 2;
  static const float queries[] = {0, 2, 0, 0};
  static const int32_t positions[] = {3};
  const hand_case_t hc = {KVC_SCORE_TOVA, 4, 2, 64, 5, KVC_POOL_AVG, kHandKeys, queries, positions, 1, NULL, NULL, 0};
  float got[4];
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){low, low, high, INFINITY}, 4);
}

/* KNORM: keys (3,4), (0,0), (1,0), (1,1) -> -5, 0, -1, -sqrt(2). No queries. */
Test(score_cpu, hand_knorm) {
  static const float keys[8][2] = {{3, 4}, {0, 0}, {1, 0}, {1, 1}};
  const hand_case_t hc = {KVC_SCORE_KNORM, 4, 1, 64, 5, KVC_POOL_AVG, keys, NULL, NULL, 0, NULL, NULL, 0};
  float got[4];
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){-5, 0, -1, -sqrt(2.0)}, 4);
}

/* STREAMING: j. With span_local over FAIR [0, 4) and PROTECT [4, 6) of n = 6:
 * (j - 0) / 4 = 0, 0.25, 0.5, 0.75 inside the FAIR span, +inf for the two tokens in no domain. */
Test(score_cpu, hand_streaming) {
  static const int32_t indptr[] = {0, 2};
  static const kvc_span_t spans[] = {{0, 4, KVC_SPAN_FAIR, 1.0f}, {4, 6, KVC_SPAN_PROTECT, 1.0f}};
  hand_case_t hc = {KVC_SCORE_STREAMING, 6, 1, 64, 5, KVC_POOL_AVG, kHandKeys, NULL, NULL, 0, NULL, NULL, 0};
  float got[6];
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){0, 1, 2, 3, 4, 5}, 6);
  hc.span_indptr = indptr;
  hc.spans = spans;
  hc.span_local = 1;
  hand_scores(&hc, got);
  expect_hand(got, (const double[]){0, 0.25, 0.5, 0.75, INFINITY, INFINITY}, 6);
}
