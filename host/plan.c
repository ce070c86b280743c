/*
 * plan.c - validation of the plan description and everything derived from it once per
 * compression event: observation positions, scoring domains, partitions and their quotas, the
 * protected bitmask, workspace sizes, and (on CUDA) the upload of all of it to the device.
 * This is the only layer that validates metadata: nothing after the plan may fail on it.
 */
#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "device.h"
#include "internal.h"

/* Sizes of the plan arrays, counted in a first pass so all of them fit one allocation. */
typedef kvc_plan_counts_t plan_counts_t;

/* The most (query head, token) pairs a plan may have: num_q_heads * sum of seq_lens. Every count
 * an op or the plan sizes memory by (score, keep and count layouts, observation rows times heads,
 * partitions times heads) is at most twice that, and the ops multiply such counts by small
 * factors only (element sizes, key chunks, tile shapes: well under 2^14), so no size computed
 * from a plan that passes can overflow 64 bits; kvc_carve saturates any sum of them. 2^48 pairs
 * is a 1 PiB score array: far past any real prompt, and it leaves that headroom. */
#define KVC_MAX_HEAD_TOKENS ((int64_t)1 << 48)

/* Span rows of a desc: one per sequence, or one per (sequence, KV head) with spans_per_head. */
static int32_t span_heads(const kvc_plan_desc_t *d) { return d->spans_per_head ? d->num_kv_heads : 1; }
static int32_t span_rows(const kvc_plan_desc_t *d) { return d->batch * span_heads(d); }

static int is_attention_method(kvc_score_method_t m) {
  return m == KVC_SCORE_SNAPKV || m == KVC_SCORE_H2O || m == KVC_SCORE_TOVA;
}

static int32_t ceil_div(int64_t a, int64_t b) { return (int32_t)((a + b - 1) / b); }

/* ---------------------------------------------------------------------------------------------
 * Validation of the description (no derived data yet)
 */

static kvc_status_t validate_scalars(kvc_context_t ctx, const kvc_plan_desc_t *d) {
  const char *where = "kvc_plan_create";
  if (d->struct_size != sizeof(kvc_plan_desc_t))
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: desc->struct_size is %zu, expected sizeof(kvc_plan_desc_t) = %zu (use KVC_PLAN_DESC_INIT)",
                    where, d->struct_size, sizeof(kvc_plan_desc_t));
  if (d->num_kv_heads < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: num_kv_heads is %d, must be >= 1", where, d->num_kv_heads);
  if (d->num_q_heads < 1 || d->num_q_heads % d->num_kv_heads != 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: num_q_heads is %d, must be a positive multiple of num_kv_heads (%d)", where,
                    d->num_q_heads, d->num_kv_heads);
  if (d->head_dim < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: head_dim is %d, must be >= 1", where, d->head_dim);
  if (d->head_dim > 256 || (ctx->backend == KVC_BACKEND_CUDA && d->head_dim % 8 != 0))
    return kvc_fail(ctx, KVC_ERROR_NOT_SUPPORTED,
                    "%s: head_dim %d is not supported (CPU: 1..256; CUDA: multiples of 8 up to 256)", where,
                    d->head_dim);
  if ((unsigned)d->dtype > KVC_DTYPE_FP8_E4M3)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: dtype is %d, not a kvc_dtype_t", where, (int)d->dtype);
  if ((unsigned)d->method > KVC_SCORE_STREAMING)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: method is %d, not a kvc_score_method_t", where, (int)d->method);
  if (d->batch < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: batch is %d, must be >= 1", where, d->batch);
  /* the CUDA kernels put sequences and KV heads on grid axes limited to 65535 blocks */
  if (ctx->backend == KVC_BACKEND_CUDA && (d->batch > 65535 || d->num_kv_heads > 65535))
    return kvc_fail(ctx, KVC_ERROR_NOT_SUPPORTED, "%s: batch %d / num_kv_heads %d: the CUDA backend handles at most 65535 of each",
                    where, d->batch, d->num_kv_heads);
  if (!d->seq_lens) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: seq_lens is NULL", where);
  if (!d->budgets) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: budgets is NULL", where);
  if (d->spans_per_head != 0 && d->spans_per_head != 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: spans_per_head is %d, must be 0 or 1", where, d->spans_per_head);
  if (d->spans_per_head && d->span_local)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: spans_per_head is 1 with span_local 1: span_local's scoring domains are the FAIR spans, "
                    "which would differ per KV head, and scoring has one set of domains per sequence", where);
  if (d->score_row_capacity < 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: score_row_capacity is %d, must be >= 0 (0: packed)", where,
                    d->score_row_capacity);
  if (d->spans_per_head && (int64_t)d->batch * d->num_kv_heads >= INT32_MAX)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: spans_per_head with batch %d x num_kv_heads %d span rows: at most 2^31 - 2 are supported", where,
                    d->batch, d->num_kv_heads);
  const int32_t rows = span_rows(d);
  if (d->span_indptr && !d->spans && d->span_indptr[rows] > 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: spans is NULL but span_indptr[%d] (the last) is %d", where, rows,
                    d->span_indptr[rows]);
  if ((d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_H2O) && d->window < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: window is %d, must be >= 1 for SNAPKV and H2O", where, d->window);
  if (d->pool_kernel < 1 || d->pool_kernel % 2 == 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: pool_kernel is %d, must be odd and >= 1", where, d->pool_kernel);
  if ((unsigned)d->pool > KVC_POOL_MAX)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: pool is %d, not a kvc_pool_t", where, (int)d->pool);
  if ((unsigned)d->group_reduce > KVC_REDUCE_MAX)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: group_reduce is %d, not a kvc_reduce_t", where,
                    (int)d->group_reduce);
  if (!isfinite(d->scale) || d->scale < 0.0f)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: scale is %.9g, must be finite and >= 0", where, (double)d->scale);
  if (d->span_local != 0 && d->span_local != 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: span_local is %d, must be 0 or 1", where, d->span_local);
  if (d->sink_tokens < 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: sink_tokens is %d, must be >= 0", where, d->sink_tokens);
  if (d->recent_tokens < 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: recent_tokens is %d, must be >= 0", where, d->recent_tokens);
  if (!(d->fairness >= 0.0f && d->fairness <= 1.0f)) /* also rejects NaN */
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: fairness is %.9g, must be in [0, 1]", where, (double)d->fairness);
  if ((unsigned)d->budget_policy > KVC_BUDGET_SKIP)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: budget_policy is %d, not a kvc_budget_policy_t", where,
                    (int)d->budget_policy);
  if ((unsigned)d->device_memory > KVC_PLAN_MEMORY_CALLER)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: device_memory is %d, not a kvc_plan_memory_t", where,
                    (int)d->device_memory);
  if ((unsigned)d->quota_rounding > KVC_QUOTA_LATER_FIRST)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: quota_rounding is %d, not a kvc_quota_rounding_t", where,
                    (int)d->quota_rounding);
  if ((unsigned)d->window_protection > KVC_WINDOW_RANKED)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: window_protection is %d, not a kvc_window_protection_t", where,
                    (int)d->window_protection);
  return KVC_SUCCESS;
}

static const char *dtype_name(kvc_dtype_t dtype) {
  static const char *const names[] = {"KVC_DTYPE_F32", "KVC_DTYPE_F16", "KVC_DTYPE_BF16", "KVC_DTYPE_FP8_E4M3"};
  return names[dtype];
}

/* The queries' dtype: query_dtype AS_CACHE is the cache's, the others are kvc_dtype_t + 1. */
static kvc_dtype_t resolve_query_dtype(const kvc_plan_desc_t *d) {
  return d->query_dtype == KVC_QUERY_DTYPE_AS_CACHE ? d->dtype : (kvc_dtype_t)(d->query_dtype - 1);
}

/* query_dtype, k_scale and k_scales (after validate_scalars: dtype and method are valid). A scale
 * is read only where the keys are FP8 and the method reads them; elsewhere a scale other than
 * "none" is refused, so it is never silently dropped. */
static kvc_status_t validate_queries_and_key_scales(kvc_context_t ctx, const kvc_plan_desc_t *d) {
  const char *where = "kvc_plan_create";
  if ((unsigned)d->query_dtype > KVC_QUERY_DTYPE_BF16)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: query_dtype is %d, not a kvc_query_dtype_t", where,
                    (int)d->query_dtype);
  const kvc_dtype_t queries = resolve_query_dtype(d);
  const int fp8 = d->dtype == KVC_DTYPE_FP8_E4M3, reads_keys = d->method != KVC_SCORE_STREAMING;
  if (!fp8 && queries != d->dtype)
    return kvc_fail(ctx, KVC_ERROR_NOT_SUPPORTED,
                    "%s: query_dtype %s with dtype %s: queries of another dtype than the cache's are supported for "
                    "KVC_DTYPE_FP8_E4M3 caches only", where, dtype_name(queries), dtype_name(d->dtype));
  if (fp8 && queries == KVC_DTYPE_FP8_E4M3 && is_attention_method(d->method))
    return kvc_fail(ctx, KVC_ERROR_NOT_SUPPORTED,
                    "%s: dtype KVC_DTYPE_FP8_E4M3 with an attention method needs query_dtype KVC_QUERY_DTYPE_F16, "
                    "_BF16 or _F32 (query_dtype is KVC_QUERY_DTYPE_AS_CACHE: there are no fp8 queries)", where);
  if (fp8 && reads_keys && ctx->backend == KVC_BACKEND_CUDA && d->head_dim % 16 != 0)
    return kvc_fail(ctx, KVC_ERROR_NOT_SUPPORTED,
                    "%s: head_dim %d with KVC_DTYPE_FP8_E4M3 keys on CUDA: must be a multiple of 16 (16-byte copies "
                    "of a row)", where, d->head_dim);
  if (!fp8) {
    if (d->k_scales)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: k_scales is set but dtype is %s: key scales apply to "
                      "KVC_DTYPE_FP8_E4M3 caches only", where, dtype_name(d->dtype));
    if (d->k_scale != 0.0f && d->k_scale != 1.0f)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: k_scale is %.9g but dtype is %s: key scales apply to "
                      "KVC_DTYPE_FP8_E4M3 caches only (leave it 1)", where, (double)d->k_scale, dtype_name(d->dtype));
    return KVC_SUCCESS;
  }
  if (!reads_keys) return KVC_SUCCESS;
  if (!d->k_scales && !(isfinite(d->k_scale) && d->k_scale > 0.0f))
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: k_scale is %.9g, must be finite and > 0", where,
                    (double)d->k_scale);
  for (int32_t h = 0; d->k_scales && h < d->num_kv_heads; ++h)
    if (!(isfinite(d->k_scales[h]) && d->k_scales[h] > 0.0f))
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: k_scales[%d] is %.9g, must be finite and > 0", where, h,
                      (double)d->k_scales[h]);
  return KVC_SUCCESS;
}

/* The spans of span row r (sequence b) against the rules of kvc_span_t. */
static kvc_status_t validate_span_row(kvc_context_t ctx, const kvc_plan_desc_t *d, int32_t r, int32_t b) {
  const char *where = "kvc_plan_create";
  const int32_t n = d->seq_lens[b], first = d->span_indptr[r], last = d->span_indptr[r + 1];
  int32_t fair_end = 0, protect_end = 0, prev_start = 0, fair_count = 0;
  char row[48] = "";
  if (d->spans_per_head) snprintf(row, sizeof row, ", KV head %d", r % d->num_kv_heads);
  for (int32_t i = first; i < last; ++i) {
    const kvc_span_t *s = &d->spans[i];
    if (s->kind != KVC_SPAN_FAIR && s->kind != KVC_SPAN_PROTECT)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: spans[%d] (sequence %d%s): kind is %d, not a kvc_span_kind_t",
                      where, i, b, row, s->kind);
    if (s->start < 0 || s->end > n || s->start >= s->end)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: spans[%d] (sequence %d%s): range [%d, %d) is empty or outside [0, seq_lens[%d] = %d)", where,
                      i, b, row, s->start, s->end, b, n);
    if (s->kind == KVC_SPAN_FAIR && (!(s->weight > 0.0f) || !isfinite(s->weight)))
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: spans[%d] (sequence %d%s): weight is %.9g, must be finite and > 0",
                      where, i, b, row, (double)s->weight);
    if (i > first && s->start < prev_start)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: spans[%d] (sequence %d%s): start %d is before the previous span's start %d (spans must be sorted)",
                      where, i, b, row, s->start, prev_start);
    int32_t *kind_end = s->kind == KVC_SPAN_FAIR ? &fair_end : &protect_end;
    if (s->start < *kind_end)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: spans[%d] (sequence %d%s): [%d, %d) overlaps an earlier %s span ending at %d",
                      where, i, b, row, s->start, s->end, s->kind == KVC_SPAN_FAIR ? "FAIR" : "PROTECT", *kind_end);
    *kind_end = s->end;
    prev_start = s->start;
    fair_count += s->kind == KVC_SPAN_FAIR;
  }
  if (d->span_local && (d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_H2O) && d->window < fair_count)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: window is %d but sequence %d has %d FAIR spans: span_local needs one query per span", where,
                    d->window, b, fair_count);
  /* TOVA selects one set per sequence, by head 0's spans: the other heads' must be the same */
  if (d->spans_per_head && d->method == KVC_SCORE_TOVA && r % d->num_kv_heads != 0) {
    const int32_t head0 = d->span_indptr[r - r % d->num_kv_heads], count0 = d->span_indptr[r - r % d->num_kv_heads + 1] - head0;
    int same = last - first == count0;
    for (int32_t i = 0; same && i < count0; ++i) {
      const kvc_span_t *x = &d->spans[first + i], *y = &d->spans[head0 + i];
      same = x->start == y->start && x->end == y->end && x->kind == y->kind &&
             (x->kind != KVC_SPAN_FAIR || x->weight == y->weight); /* PROTECT weights are not read */
    }
    if (!same)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: spans_per_head with method TOVA: the spans of sequence %d, KV head %d (span_indptr[%d] .. "
                      "span_indptr[%d]) differ from its head 0's; TOVA selects one set for all KV heads, so they must be "
                      "identical", where, b, r % d->num_kv_heads, r, r + 1);
  }
  return KVC_SUCCESS;
}

static kvc_status_t validate_sequences(kvc_context_t ctx, const kvc_plan_desc_t *d) {
  const char *where = "kvc_plan_create";
  const int32_t rows = span_rows(d);
  if (d->span_indptr && d->span_indptr[0] != 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: span_indptr[0] is %d, must be 0", where, d->span_indptr[0]);
  for (int32_t r = 0; d->span_indptr && r < rows; ++r) /* before any span is read */
    if (d->span_indptr[r + 1] < d->span_indptr[r])
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: span_indptr[%d] = %d is below span_indptr[%d] = %d", where,
                      r + 1, d->span_indptr[r + 1], r, d->span_indptr[r]);
  for (int32_t b = 0; b < d->batch; ++b) {
    int32_t n = d->seq_lens[b];
    if (n < 1)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: seq_lens[%d] is %d, must be >= 1", where, b, n);
    if (d->budgets[b] < 1)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: budgets[%d] is %d, must be >= 1", where, b, d->budgets[b]);
    if (d->score_row_capacity > 0 && n > d->score_row_capacity)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: score_row_capacity is %d but seq_lens[%d] is %d: every score row must hold its sequence",
                      where, d->score_row_capacity, b, n);
    for (int32_t h = 0; d->span_indptr && h < span_heads(d); ++h) {
      kvc_status_t status = validate_span_row(ctx, d, b * span_heads(d) + h, b);
      if (status != KVC_SUCCESS) return status;
    }
  }
  return KVC_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * Quotas: integer q_p in [lo_p, hi_p] with sum F, proportional to c_p = w_p * L_p.
 */

static long double clamp_ld(long double x, long double lo, long double hi) { return x < lo ? lo : x > hi ? hi : x; }

static long double bounded_total(const long double *c, const int32_t *lo, const int32_t *hi, int np, long double mu) {
  long double sum = 0;
  for (int p = 0; p < np; ++p) sum += clamp_ld(mu * c[p], lo[p], hi[p]);
  return sum;
}

/* Solves sum_p clamp(mu * c_p, lo_p, hi_p) = F for mu by walking the sorted breakpoints, then
 * recomputes the free partitions' shares from the exact ratio (F - fixed) * c_p / sum(c_free) so
 * equal partitions get bit-equal fractions, and rounds by largest remainder (ties to the later
 * partition) or, later_first, hands the leftover to the latest partitions. `scratch` holds 3 * np
 * long doubles and np ints. */
static void apportion(const long double *c, const int32_t *lo, const int32_t *hi, int np, int64_t F, int later_first,
                      int32_t *q, long double *scratch, int *order) {
  long double *breaks = scratch, *share = scratch + 2 * np;
  int nb = 0;
  for (int p = 0; p < np; ++p) {
    breaks[nb++] = lo[p] / c[p];
    breaks[nb++] = hi[p] / c[p];
  }
  /* insertion sort: np is the number of spans of one sequence */
  for (int i = 1; i < nb; ++i)
    for (int j = i; j > 0 && breaks[j - 1] > breaks[j]; --j) {
      long double t = breaks[j];
      breaks[j] = breaks[j - 1];
      breaks[j - 1] = t;
    }
  long double mu = breaks[nb - 1];
  for (int i = 0; i < nb; ++i)
    if (bounded_total(c, lo, hi, np, breaks[i]) >= (long double)F) {
      mu = breaks[i];
      break;
    }
  /* Partitions strictly inside their bounds at mu share the remainder exactly by c_p. Evaluate
   * the free set just below the crossing breakpoint, where the total is still linear in mu. */
  long double below = mu;
  for (int i = nb - 1; i >= 0; --i)
    if (breaks[i] < mu) {
      below = breaks[i];
      break;
    }
  long double probe = below < mu ? (below + mu) / 2 : mu;
  long double fixed = 0, free_c = 0;
  for (int p = 0; p < np; ++p) {
    long double x = probe * c[p];
    if (x > lo[p] && x < hi[p]) free_c += c[p];
    else fixed += x <= lo[p] ? lo[p] : hi[p];
  }
  /* Free partitions get (F - fixed) * c_p / free_c. Their remainders all have the denominator
   * free_c, so compare numerators: exact whenever the products fit the 64-bit mantissa, which
   * keeps exact ties exact (fractional parts taken after a division would round differently for
   * shares of different magnitude). share[] holds the remainder numerators; bounded ones have 0. */
  const long double left = (long double)F - fixed;
  int64_t assigned = 0;
  for (int p = 0; p < np; ++p) {
    long double x = probe * c[p];
    share[p] = 0;
    order[p] = p;
    if (!(x > lo[p] && x < hi[p])) {
      q[p] = x <= lo[p] ? lo[p] : hi[p];
    } else {
      long double numerator = left * c[p];
      q[p] = (int32_t)floorl(numerator / free_c);
      share[p] = numerator - (long double)q[p] * free_c;
      if (share[p] < 0) q[p]--, share[p] += free_c;         /* the division rounded up */
      if (share[p] >= free_c) q[p]++, share[p] -= free_c;  /* or down */
      if (q[p] < lo[p]) q[p] = lo[p], share[p] = 0;
      if (q[p] >= hi[p]) q[p] = hi[p], share[p] = 0;
    }
    assigned += q[p];
  }
  /* Who gets a leftover token first: the largest remainder, equal remainders the later partition;
   * later_first: among the partitions with a remainder, the later one (the leftover count is the
   * sum of the remainders, so it never reaches a partition without one). */
  for (int i = 1; i < np; ++i)
    for (int j = i; j > 0; --j) {
      int a = order[j - 1], b = order[j];
      int b_first = later_first ? (share[b] > 0) > (share[a] > 0) || ((share[b] > 0) == (share[a] > 0) && b > a)
                                : share[b] > share[a] || (share[b] == share[a] && b > a);
      if (b_first) {
        order[j - 1] = b;
        order[j] = a;
      } else {
        break;
      }
    }
  for (int i = 0; assigned < F && i < np; ++i) {
    int p = order[i];
    if (q[p] < hi[p]) {
      q[p]++;
      assigned++;
    }
  }
}

/* ---------------------------------------------------------------------------------------------
 * Building the plan
 */

typedef struct {
  kvc_plan_view_t *v;
  int32_t *seq_lens, *keep_lens, *obs_indptr, *obs_pos, *obs_lo, *domain_indptr, *part_indptr, *fill, *span_indptr;
  int64_t *token_offsets, *keep_offsets, *protect_word_offsets, *split_segments, *split_parts;
  kvc_domain_t *domains;
  kvc_partition_t *parts;
  uint32_t *protect_bits;
  kvc_span_t *spans;
  float *k_scales;
} plan_arrays_t;

/* One routine lays the arrays out for counting (base NULL) and for real. */
static size_t layout_arrays(plan_arrays_t *a, char *base, int32_t batch, const plan_counts_t *n) {
  const int64_t rows = n->span_rows;
  kvc_carver_t c = {base, 0};
#define CARVE(field, type, count) a->field = (type *)kvc_carve(&c, sizeof(type) * (size_t)(count))
  CARVE(seq_lens, int32_t, batch);
  CARVE(keep_lens, int32_t, batch);
  CARVE(token_offsets, int64_t, batch + 1);
  CARVE(keep_offsets, int64_t, batch + 1);
  CARVE(obs_indptr, int32_t, batch + 1);
  CARVE(obs_pos, int32_t, n->obs);
  CARVE(obs_lo, int32_t, n->obs);
  CARVE(domain_indptr, int32_t, batch + 1);
  CARVE(domains, kvc_domain_t, n->domains);
  CARVE(part_indptr, int32_t, rows + 1);
  CARVE(parts, kvc_partition_t, n->parts);
  CARVE(fill, int32_t, rows);
  CARVE(protect_word_offsets, int64_t, rows + 1);
  CARVE(protect_bits, uint32_t, n->protect_words);
  CARVE(split_segments, int64_t, batch + 1);
  CARVE(split_parts, int64_t, rows + 1);
  CARVE(span_indptr, int32_t, rows + 1);
  CARVE(spans, kvc_span_t, n->spans);
  CARVE(k_scales, float, n->key_scales);
#undef CARVE
  return c.used;
}

static void point_view(kvc_plan_view_t *v, const plan_arrays_t *a) {
  v->seq_lens = a->seq_lens;
  v->keep_lens = a->keep_lens;
  v->token_offsets = a->token_offsets;
  v->keep_offsets = a->keep_offsets;
  v->obs_indptr = a->obs_indptr;
  v->obs_pos = a->obs_pos;
  v->obs_lo = a->obs_lo;
  v->domain_indptr = a->domain_indptr;
  v->domains = a->domains;
  v->part_indptr = a->part_indptr;
  v->parts = a->parts;
  v->fill = a->fill;
  v->protect_word_offsets = a->protect_word_offsets;
  v->protect_bits = a->protect_bits;
  v->split_segments = a->split_segments;
  v->split_parts = a->split_parts;
  v->span_indptr = a->span_indptr;
  v->spans = a->spans;
  v->k_scales = a->k_scales;
}

/* Spans of span row r, and its FAIR ones. */
static int32_t span_count(const kvc_plan_desc_t *d, int32_t r) {
  return d->span_indptr ? d->span_indptr[r + 1] - d->span_indptr[r] : 0;
}

static int32_t fair_span_count(const kvc_plan_desc_t *d, int32_t r) {
  int32_t count = 0;
  for (int32_t i = 0; i < span_count(d, r); ++i) count += d->spans[d->span_indptr[r] + i].kind == KVC_SPAN_FAIR;
  return count;
}

/* Number of observation queries of a domain of length `len`, given what is left of the window
 * and how many domains (this one included) still need queries. */
static int32_t domain_queries(const kvc_plan_desc_t *d, int32_t len, int64_t window_left, int32_t domains_left) {
  if (d->method == KVC_SCORE_TOVA) return 1;
  if (!(d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_H2O)) return 0;
  int64_t even = (window_left + domains_left - 1) / domains_left;
  return len < even ? len : (int32_t)even;
}

static void count_arrays(const kvc_plan_desc_t *d, plan_counts_t *n) {
  memset(n, 0, sizeof *n);
  n->span_rows = span_rows(d);
  n->key_scales = d->dtype == KVC_DTYPE_FP8_E4M3 && d->k_scales ? d->num_kv_heads : 1;
  for (int32_t b = 0; b < d->batch; ++b) {
    int32_t len = d->seq_lens[b], fair = fair_span_count(d, b * span_heads(d)); /* span_local: per sequence */
    for (int32_t r = b * span_heads(d); r < (b + 1) * span_heads(d); ++r) {
      n->protect_words += ceil_div(len, 32);
      n->spans += span_count(d, r);
      n->parts += fair_span_count(d, r) + 1; /* an upper bound: the implicit partition may be empty */
    }
    if (!d->span_local) {
      n->domains += 1;
      n->obs += d->method == KVC_SCORE_TOVA ? 1 : is_attention_method(d->method) ? (d->window < len ? d->window : len) : 0;
    } else {
      n->domains += fair;
      n->obs += is_attention_method(d->method) ? (d->method == KVC_SCORE_TOVA ? fair : (d->window < len ? d->window : len)) : 0;
    }
  }
}

static void set_bits(uint32_t *bits, int32_t from, int32_t to) {
  for (int32_t t = from; t < to; ++t) bits[t >> 5] |= 1u << (t & 31);
}

static int32_t count_bits(const uint32_t *bits, int32_t from, int32_t to) {
  int32_t count = 0;
  for (int32_t t = from; t < to; ++t) count += (int32_t)((bits[t >> 5] >> (t & 31)) & 1u);
  return count;
}

/* The keep length of a sequence of length n whose budget keeps `k` and which protects
 * `protected_total` tokens, by the desc's budget policy; *outcome says what happened. Returns -1
 * when the policy is to fail. */
static int32_t keep_length(const kvc_plan_desc_t *d, int32_t n, int32_t k, int32_t protected_total, int32_t *outcome) {
  *outcome = k < n ? KVC_OUTCOME_COMPRESSED : KVC_OUTCOME_WITHIN_BUDGET;
  if (protected_total <= k) return k;
  switch (d->budget_policy) {
    case KVC_BUDGET_CLAMP: *outcome = KVC_OUTCOME_CLAMPED; return protected_total;
    case KVC_BUDGET_SKIP: *outcome = KVC_OUTCOME_SKIPPED; return n;
    default: return -1;
  }
}

/* Scratch of the quota solver, sized for the span row with the most partitions. */
typedef struct {
  long double *c;  /* [4 * max_parts]: w_p * L_p, then apportion's scratch */
  int32_t *lohi;   /* [3 * max_parts]: lo_p, hi_p, q_p                      */
  int *order;      /* [max_parts]                                           */
  int32_t max_parts;
} quota_scratch_t;

/* The partitions of span row r (sequence b of n tokens keeping k, protected bits `bits` counting
 * protected_total) and their quotas and fill, appended at a->parts[*npart]; INVALID_VALUE with a
 * detail on ctx when span_local leaves a token of the row outside every domain unprotected. */
static kvc_status_t fill_partitions(kvc_context_t ctx, const kvc_plan_desc_t *d, plan_arrays_t *a, int32_t r,
                                    int32_t b, int32_t n, int32_t k, const uint32_t *bits, int32_t protected_total,
                                    quota_scratch_t *q, int32_t *npart) {
  const kvc_span_t *spans = d->span_indptr ? d->spans + d->span_indptr[r] : NULL;
  const int32_t nspans = span_count(d, r), max_parts = q->max_parts;
  a->part_indptr[r] = *npart;
  int32_t in_fair = 0, nparts = 0;
  for (int32_t i = 0; i < nspans; ++i) {
    if (spans[i].kind != KVC_SPAN_FAIR) continue;
    kvc_partition_t *p = &a->parts[*npart + nparts];
    p->start = spans[i].start;
    p->end = spans[i].end;
    p->implicit = 0;
    p->length = p->end - p->start;
    p->protected_count = count_bits(bits, p->start, p->end);
    q->c[nparts] = (long double)spans[i].weight * p->length;
    in_fair += p->length;
    nparts++;
  }
  if (in_fair < n) {
    if (d->span_local) {
      /* every token outside the FAIR spans must be protected: it belongs to no scoring domain */
      int32_t prev = 0;
      for (int32_t i = 0; i <= nspans; ++i) {
        int32_t gap_end = i < nspans ? (spans[i].kind == KVC_SPAN_FAIR ? spans[i].start : prev) : n;
        if (gap_end > prev && count_bits(bits, prev, gap_end) < gap_end - prev)
          return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                          "kvc_plan_create: span_local is 1 but tokens [%d, %d) of sequence %d are in no FAIR "
                          "span and not all protected (cover them with PROTECT spans, sinks or recent tokens)",
                          prev, gap_end, b);
        if (i < nspans && spans[i].kind == KVC_SPAN_FAIR) prev = spans[i].end;
      }
    }
    kvc_partition_t *p = &a->parts[*npart + nparts];
    p->start = 0;
    p->end = n;
    p->implicit = 1;
    p->length = n - in_fair;
    p->protected_count = protected_total;
    for (int32_t i = 0; i < nparts; ++i) p->protected_count -= a->parts[*npart + i].protected_count;
    q->c[nparts] = (long double)p->length;
    nparts++;
  }
  int64_t sum_lo = 0;
  for (int32_t i = 0; i < nparts; ++i) {
    q->lohi[i] = a->parts[*npart + i].protected_count;
    q->lohi[max_parts + i] = a->parts[*npart + i].length;
    sum_lo += q->lohi[i];
  }
  int64_t F = (int64_t)floor((double)d->fairness * k + 0.5);
  if (F < sum_lo) F = sum_lo;
  apportion(q->c, q->lohi, q->lohi + max_parts, nparts, F, d->quota_rounding == KVC_QUOTA_LATER_FIRST,
            q->lohi + 2 * max_parts, q->c + nparts, q->order);
  for (int32_t i = 0; i < nparts; ++i) a->parts[*npart + i].quota = q->lohi[2 * max_parts + i];
  a->fill[r] = (int32_t)(k - F);
  *npart += nparts;
  a->part_indptr[r + 1] = *npart;
  return KVC_SUCCESS;
}

/* Fills the arrays for every sequence (and each of its span rows) and the per-sequence outcomes
 * (host [batch]); returns BUDGET / INVALID_VALUE with a detail on ctx. */
static kvc_status_t fill_arrays(kvc_context_t ctx, const kvc_plan_desc_t *d, plan_arrays_t *a, kvc_plan_view_t *v,
                                int32_t *outcomes) {
  const int32_t heads = span_heads(d);
  int32_t obs = 0, ndom = 0, npart = 0;
  int64_t words = 0, tokens = 0, kept = 0;
  quota_scratch_t q;
  q.max_parts = 1;
  for (int32_t r = 0; r < span_rows(d); ++r)
    q.max_parts = q.max_parts > fair_span_count(d, r) + 1 ? q.max_parts : fair_span_count(d, r) + 1;
  q.c = (long double *)malloc(sizeof(long double) * 4 * (size_t)q.max_parts);
  q.lohi = (int32_t *)malloc(sizeof(int32_t) * 3 * (size_t)q.max_parts);
  q.order = (int *)malloc(sizeof(int) * (size_t)q.max_parts);
  if (!q.c || !q.lohi || !q.order) {
    free(q.c), free(q.lohi), free(q.order);
    return kvc_fail(ctx, KVC_ERROR_OUT_OF_MEMORY, "kvc_plan_create: out of host memory");
  }
  kvc_status_t status = KVC_SUCCESS;
  a->span_indptr[0] = 0;
  for (int32_t b = 0; b < d->batch && status == KVC_SUCCESS; ++b) {
    const int32_t n = d->seq_lens[b], budget_k = d->budgets[b] < n ? d->budgets[b] : n, row0 = b * heads;
    const int32_t nwords = ceil_div(n, 32);
    a->seq_lens[b] = n;
    a->token_offsets[b] = tokens;
    a->keep_offsets[b] = kept;
    tokens += n;
    for (int32_t r = row0; r < row0 + heads; ++r) {
      const int32_t nspans = span_count(d, r);
      if (nspans) memcpy(a->spans + a->span_indptr[r], d->spans + d->span_indptr[r], sizeof(kvc_span_t) * (size_t)nspans);
      a->span_indptr[r + 1] = a->span_indptr[r] + nspans;
      a->protect_word_offsets[r] = words + (int64_t)(r - row0) * nwords;
    }
    uint32_t *bits0 = a->protect_bits + words;
    memset(bits0, 0, sizeof(uint32_t) * (size_t)nwords * (size_t)heads);
    words += (int64_t)nwords * heads;

    /* scoring domains and their observation queries (span_local: by row0's spans, heads is 1) */
    const kvc_span_t *spans = d->span_indptr ? d->spans + d->span_indptr[row0] : NULL;
    const int32_t nspans = span_count(d, row0), nfair = fair_span_count(d, row0);
    a->obs_indptr[b] = obs;
    a->domain_indptr[b] = ndom;
    /* int64: the window of TOVA, KNORM and STREAMING is not validated (they ignore it) */
    int64_t window_left = d->window;
    int32_t domains_total = d->span_local ? nfair : 1, domain_index = 0;
    for (int32_t i = -1; i < nspans; ++i) {
      int32_t start, end;
      if (!d->span_local) {
        if (i >= 0) break;
        start = 0, end = n;
      } else {
        if (i < 0 || spans[i].kind != KVC_SPAN_FAIR) continue;
        start = spans[i].start, end = spans[i].end;
      }
      int32_t nq = domain_queries(d, end - start, window_left, domains_total - domain_index);
      window_left -= nq;
      domain_index++;
      kvc_domain_t *dom = &a->domains[ndom++];
      dom->start = start;
      dom->end = end;
      dom->obs_begin = obs;
      for (int32_t p = end - nq; p < end; ++p) {
        a->obs_pos[obs] = p;
        a->obs_lo[obs++] = start;
      }
      dom->obs_end = obs;
      dom->scored_end = (d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_TOVA) ? end - nq : end;
      /* unscored, they score +inf: protected, or only ranked first (KVC_WINDOW_RANKED) */
      if (dom->scored_end < end && d->window_protection == KVC_WINDOW_PROTECTED) set_bits(bits0, end - nq, end);
    }
    a->obs_indptr[b + 1] = obs;
    a->domain_indptr[b + 1] = ndom;

    /* protected set of every span row: the method's positions (row0's bits so far), sinks, recent
     * tokens, the row's PROTECT spans; k compares with the largest */
    int32_t protected_max = 0, protected_head = 0;
    for (int32_t r = row0 + 1; r < row0 + heads; ++r)
      memcpy(a->protect_bits + a->protect_word_offsets[r], bits0, sizeof(uint32_t) * (size_t)nwords);
    for (int32_t r = row0; r < row0 + heads; ++r) {
      uint32_t *bits = a->protect_bits + a->protect_word_offsets[r];
      set_bits(bits, 0, d->sink_tokens < n ? d->sink_tokens : n);
      set_bits(bits, d->recent_tokens < n ? n - d->recent_tokens : 0, n);
      for (int32_t i = d->span_indptr ? d->span_indptr[r] : 0; d->span_indptr && i < d->span_indptr[r + 1]; ++i)
        if (d->spans[i].kind == KVC_SPAN_PROTECT) set_bits(bits, d->spans[i].start, d->spans[i].end);
      const int32_t count = count_bits(bits, 0, n);
      if (count > protected_max) protected_max = count, protected_head = r - row0;
    }
    const int32_t k = keep_length(d, n, budget_k, protected_max, &outcomes[b]);
    if (k < 0) {
      char head[32] = "";
      if (heads > 1) snprintf(head, sizeof head, " in KV head %d", protected_head);
      status = kvc_fail(ctx, KVC_ERROR_BUDGET,
                        "kvc_plan_create: sequence %d protects %d tokens%s (sinks %d, recent %d, PROTECT spans, the "
                        "method's own) but its budget keeps %d of %d (budget_policy KVC_BUDGET_CLAMP or "
                        "KVC_BUDGET_SKIP would keep the batch going)",
                        b, protected_max, head, d->sink_tokens, d->recent_tokens, budget_k, n);
      break;
    }
    a->keep_lens[b] = k;
    kept += k;

    /* partitions of every span row: FAIR spans in order, then the implicit one */
    for (int32_t r = row0; r < row0 + heads && status == KVC_SUCCESS; ++r) {
      const uint32_t *bits = a->protect_bits + a->protect_word_offsets[r];
      status = fill_partitions(ctx, d, a, r, b, n, k, bits, count_bits(bits, 0, n), &q, &npart);
    }

    if (n > v->max_seq_len) v->max_seq_len = n;
    if (k > v->max_keep_len) v->max_keep_len = k;
    for (int32_t i = a->domain_indptr[b]; i < ndom; ++i) {
      int32_t nq = a->domains[i].obs_end - a->domains[i].obs_begin;
      if (nq > v->max_obs_per_domain) v->max_obs_per_domain = nq;
    }
  }
  free(q.c), free(q.lohi), free(q.order);
  if (status != KVC_SUCCESS) return status;
  a->token_offsets[d->batch] = tokens;
  a->keep_offsets[d->batch] = kept;
  a->protect_word_offsets[span_rows(d)] = words;
  v->total_tokens = tokens;
  v->total_kept = kept;
  v->obs_total = obs;
  v->total_spans = a->span_indptr[span_rows(d)];
  v->span_heads = heads;
  v->score_row_capacity = d->score_row_capacity;
  v->score_elems = d->score_row_capacity ? (int64_t)d->batch * d->num_kv_heads * d->score_row_capacity
                                         : d->num_kv_heads * tokens;
  return KVC_SUCCESS;
}

/* The host image (zeroed) in whole pages of its own, so that a caller can page-lock it
 * (cudaHostRegister) without pinning, or overlapping, anything else. *raw gets what to free. */
static void *image_alloc(size_t bytes, void **raw) {
  const size_t page = 4096;
  *raw = bytes < SIZE_MAX - 2 * page ? calloc(1, (bytes + page - 1) / page * page + page) : NULL;
  return *raw ? (char *)*raw + (page - (uintptr_t)*raw % page) % page : NULL;
}

/* Points the ops' view of a CUDA plan at a device copy of its blob at `base` (NULL: none yet, every
 * array pointer NULL). The scalars stay those of the host view. */
static void bind_view(kvc_plan_t plan, void *base) {
  plan_arrays_t arrays;
  memset(&arrays, 0, sizeof arrays);
  if (base) layout_arrays(&arrays, (char *)base, plan->host.batch, &plan->counts);
  point_view(&plan->view, &arrays);
  plan->view_on_device = base != NULL;
}

/* An integer from the environment in [lo, hi], else `fallback`: the test overrides of the CPU
 * scoring's instruction set and of selection's segment length, read once here so that the plan
 * carries them. */
static int32_t env_int(const char *name, int32_t fallback, int32_t lo, int32_t hi) {
  const char *text = getenv(name);
  if (!text || !*text) return fallback;
  char *end = NULL;
  long value = strtol(text, &end, 10);
  return *end == '\0' && value >= lo && value <= hi ? (int32_t)value : fallback;
}

/* The CUDA selection's segment length: enough segments to give every resident block one, each at
 * least KVC_SELECT_MIN_SEGMENT tokens (a segment's histograms are merged through global memory, a
 * staged row costs nothing of the kind) and at most KVC_SELECT_MAX_SEGMENT (what a block stages);
 * KVC_SELECT_SEGMENT overrides it for tests. Then the prefix sums of the split rows' segments and
 * partitions. The CPU backend splits nothing. */
static kvc_status_t plan_select_geometry(kvc_context_t ctx, kvc_plan_t plan, plan_arrays_t *a) {
  kvc_plan_view_t *v = &plan->host;
  v->select_segment = INT32_MAX;
#ifdef KVC_WITH_CUDA
  if (plan->backend == KVC_BACKEND_CUDA) {
    int previous;
    kvc_status_t status = kvc_device_enter(plan->device, &previous, ctx->detail, sizeof ctx->detail);
    if (status != KVC_SUCCESS) return status;
    status = kvc_select_cuda_geometry(&v->select_resident_blocks, ctx->detail, sizeof ctx->detail);
    if (status == KVC_SUCCESS)
      status = kvc_compact_cuda_geometry(&v->compact_resident_blocks, ctx->detail, sizeof ctx->detail);
    kvc_device_restore(previous);
    if (status != KVC_SUCCESS) return status;
    const int64_t row_heads = v->method == KVC_SCORE_TOVA ? 1 : v->num_kv_heads;
    const int64_t per_block = (row_heads * v->total_tokens + v->select_resident_blocks - 1) / v->select_resident_blocks;
    int64_t segment = (per_block + 1023) / 1024 * 1024;
    segment = segment < KVC_SELECT_MIN_SEGMENT ? KVC_SELECT_MIN_SEGMENT : segment;
    segment = segment > KVC_SELECT_MAX_SEGMENT ? KVC_SELECT_MAX_SEGMENT : segment;
    v->select_segment = env_int("KVC_SELECT_SEGMENT", (int32_t)segment, 1, KVC_SELECT_MAX_SEGMENT);
  }
#else
  (void)ctx;
#endif
  a->split_segments[0] = a->split_parts[0] = 0;
  for (int32_t b = 0; b < v->batch; ++b) {
    const int split = v->seq_lens[b] > v->select_segment;
    a->split_segments[b + 1] = a->split_segments[b] + (split ? ceil_div(v->seq_lens[b], v->select_segment) : 0);
    for (int32_t r = b * v->span_heads; r < (b + 1) * v->span_heads; ++r)
      a->split_parts[r + 1] = a->split_parts[r] + (split ? v->part_indptr[r + 1] - v->part_indptr[r] : 0);
  }
  return KVC_SUCCESS;
}

/* Bytes op needs over num_layers layers on its slice of the workspace: the dispatch layer's own
 * pieces (kvc_carve_dispatch), then the op's, sized by the same carving code that runs. */
static kvc_status_t op_bytes(kvc_plan_t plan, kvc_op_t op, int32_t num_layers, char *detail, size_t cap,
                             size_t *bytes) {
  kvc_carver_t ws = {NULL, 0};
  kvc_op_args_t args;
  memset(&args, 0, sizeof args);
  args.plan = plan->view;
  args.host_plan = &plan->host;
  args.num_layers = num_layers;
  args.detail = detail;
  args.detail_cap = cap;
  kvc_carve_dispatch(&plan->host, plan->backend, op, args.num_layers, &ws, NULL, NULL);
  kvc_status_t status = kvc_op_for(plan->backend, op)(&args, &ws);
  *bytes = ws.used;
  return status;
}

static size_t align_up(size_t bytes) {
  return (bytes + KVC_WORKSPACE_ALIGN - 1) / KVC_WORKSPACE_ALIGN * KVC_WORKSPACE_ALIGN;
}

kvc_status_t kvc_plan_layout(kvc_plan_t plan, kvc_op_t op, int32_t num_layers, kvc_layout_t *out, char *detail,
                             size_t cap) {
  memset(out, 0, sizeof *out);
  /* every term is at most num_layers times the single-layer one: bound that product first */
  const size_t single = plan->workspace[KVC_OP_COMPRESS] > plan->workspace[op] ? plan->workspace[KVC_OP_COMPRESS]
                                                                             : plan->workspace[op];
  if (num_layers < 1 || (size_t)num_layers > (SIZE_MAX / 4) / (single + KVC_WORKSPACE_ALIGN))
    return kvc_fail_detail(detail, cap, KVC_ERROR_INVALID_VALUE,
                           "num_layers is %d: must be >= 1 and small enough that the workspace size fits size_t",
                           num_layers);
  kvc_status_t status;
  if (op != KVC_OP_COMPRESS) {
    status = op_bytes(plan, op, num_layers, detail, cap, &out->bytes);
    out->status_offset = 0; /* kvc_carve_dispatch carves compaction's status array first */
    return status;
  }
  /* [keep layouts][score layouts][scratch shared by the stages, compaction's status first] */
  const size_t layers = (size_t)num_layers;
  out->keep_offset = 0;
  out->scores_offset = align_up(layers * sizeof(int32_t) * (size_t)(plan->host.num_kv_heads * plan->host.total_kept));
  out->stage_offset =
      align_up(out->scores_offset + layers * sizeof(float) * (size_t)plan->host.score_elems);
  out->status_offset = out->stage_offset;
  size_t stage = 0;
  for (int stage_op = KVC_OP_SCORE; stage_op <= KVC_OP_COMPACT; ++stage_op) {
    size_t bytes = 0;
    status = op_bytes(plan, (kvc_op_t)stage_op, num_layers, detail, cap, &bytes);
    if (status != KVC_SUCCESS) return status;
    stage = bytes > stage ? bytes : stage;
  }
  out->bytes = out->stage_offset + stage;
  return KVC_SUCCESS;
}

/* Workspace of each op for one layer (what the single-layer calls check against). A size that
 * saturated the carver (it cannot, under KVC_MAX_HEAD_TOKENS, but an op's sizing is not trusted to
 * stay under it) is rejected rather than handed out wrapped. */
static kvc_status_t size_workspaces(kvc_context_t ctx, kvc_plan_t plan) {
  static const char *const names[] = {"kvc_score", "kvc_select", "kvc_compact", "kvc_retention", "kvc_compress"};
  for (int op = KVC_OP_SCORE; op <= KVC_OP_RETENTION; ++op) {
    kvc_status_t status = op_bytes(plan, (kvc_op_t)op, 1, ctx->detail, sizeof ctx->detail, &plan->workspace[op]);
    if (status != KVC_SUCCESS) return status;
  }
  kvc_layout_t layout;
  kvc_status_t status = KVC_SUCCESS;
  plan->workspace[KVC_OP_COMPRESS] = 0;
  for (int op = KVC_OP_SCORE; op <= KVC_OP_RETENTION && status == KVC_SUCCESS; ++op)
    if (plan->workspace[op] == (size_t)-1) status = KVC_ERROR_INVALID_VALUE;
  if (status == KVC_SUCCESS) {
    status = kvc_plan_layout(plan, KVC_OP_COMPRESS, 1, &layout, ctx->detail, sizeof ctx->detail);
    if (status != KVC_SUCCESS) return status;
    plan->workspace[KVC_OP_COMPRESS] = layout.bytes;
  }
  for (int op = KVC_OP_SCORE; op <= KVC_OP_COMPRESS; ++op)
    if (plan->workspace[op] == (size_t)-1)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "kvc_plan_create: the workspace of %s would exceed SIZE_MAX bytes (num_q_heads %d, %lld tokens, "
                      "%lld observation queries)", names[op], plan->host.num_q_heads,
                      (long long)plan->host.total_tokens, (long long)plan->host.obs_total);
  return KVC_SUCCESS;
}

void kvc_plan_desc_init(kvc_plan_desc_t *desc) {
  if (desc) {
    kvc_plan_desc_t defaults = KVC_PLAN_DESC_INIT;
    *desc = defaults;
  }
}

kvc_status_t kvc_plan_create(kvc_context_t ctx, const kvc_plan_desc_t *desc, kvc_plan_t *out) {
  if (out) *out = NULL;
  if (!ctx) return KVC_ERROR_INVALID_VALUE;
  ctx->detail[0] = '\0';
  if (!desc) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "kvc_plan_create: desc is NULL");
  if (!out) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "kvc_plan_create: out is NULL");
  kvc_status_t status = validate_scalars(ctx, desc);
  if (status == KVC_SUCCESS) status = validate_queries_and_key_scales(ctx, desc);
  if (status == KVC_SUCCESS) status = validate_sequences(ctx, desc);
  if (status != KVC_SUCCESS) return status;

  kvc_plan_t plan = (kvc_plan_t)calloc(1, sizeof *plan);
  if (!plan) return kvc_fail(ctx, KVC_ERROR_OUT_OF_MEMORY, "kvc_plan_create: out of host memory");
  plan->backend = ctx->backend;
  plan->device = ctx->device;
  kvc_plan_view_t *v = &plan->host;
  v->batch = desc->batch;
  v->num_q_heads = desc->num_q_heads;
  v->num_kv_heads = desc->num_kv_heads;
  v->head_dim = desc->head_dim;
  v->group_size = desc->num_q_heads / desc->num_kv_heads;
  v->dtype = desc->dtype;
  v->method = desc->method;
  v->pool = desc->pool;
  v->group_reduce = desc->group_reduce;
  v->pool_kernel = desc->pool_kernel;
  v->span_local = desc->span_local;
  v->scale = desc->scale > 0.0f ? desc->scale : 1.0f / sqrtf((float)desc->head_dim);
  v->cpu_threads = ctx->threads;
  v->cpu_isa = env_int("KVC_CPU_ISA", 0, 0, 3);
  v->query_dtype = resolve_query_dtype(desc);

  plan_counts_t counts;
  count_arrays(desc, &counts);
  if (counts.obs > INT32_MAX || counts.parts > INT32_MAX || counts.domains > INT32_MAX) {
    kvc_plan_destroy(plan);
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "kvc_plan_create: %lld observation queries in the batch: at most 2^31 - 1 are supported",
                    (long long)counts.obs);
  }
  int64_t tokens = 0;
  for (int32_t b = 0; b < desc->batch; ++b) tokens += desc->seq_lens[b];
  if (tokens > KVC_MAX_HEAD_TOKENS / desc->num_q_heads) {
    kvc_plan_destroy(plan);
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "kvc_plan_create: num_q_heads %d x %lld tokens (the sum of seq_lens) exceeds the 2^48 (query head, "
                    "token) pairs a plan may have: its arrays and workspaces could not be sized",
                    desc->num_q_heads, (long long)tokens);
  }
  if (desc->score_row_capacity > 0 &&
      (int64_t)desc->batch * desc->score_row_capacity > KVC_MAX_HEAD_TOKENS / desc->num_q_heads) {
    kvc_plan_destroy(plan);
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "kvc_plan_create: num_q_heads %d x batch %d x score_row_capacity %d exceeds the 2^48 (query head, "
                    "token) pairs a plan may have", desc->num_q_heads, desc->batch, desc->score_row_capacity);
  }
  plan_arrays_t arrays;
  size_t bytes = layout_arrays(&arrays, NULL, desc->batch, &counts);
  plan->host_blob = image_alloc(bytes, &plan->host_alloc);
  plan->span_quotas = (int32_t *)calloc((size_t)counts.spans + 1, sizeof(int32_t));
  plan->implicit_quotas = (int32_t *)calloc((size_t)counts.span_rows, sizeof(int32_t));
  plan->outcomes = (int32_t *)calloc((size_t)desc->batch, sizeof(int32_t));
  if (!plan->host_blob || !plan->span_quotas || !plan->implicit_quotas || !plan->outcomes) {
    kvc_plan_destroy(plan);
    return kvc_fail(ctx, KVC_ERROR_OUT_OF_MEMORY, "kvc_plan_create: out of host memory (%zu bytes)", bytes);
  }
  layout_arrays(&arrays, (char *)plan->host_blob, desc->batch, &counts);
  status = fill_arrays(ctx, desc, &arrays, v, plan->outcomes);
  if (status != KVC_SUCCESS) {
    kvc_plan_destroy(plan);
    return status;
  }
  point_view(v, &arrays);
  v->k_scales_per_head = desc->dtype == KVC_DTYPE_FP8_E4M3 && desc->k_scales; /* as count_arrays sized it */
  arrays.k_scales[0] = desc->dtype != KVC_DTYPE_FP8_E4M3 ? 1.0f : desc->k_scale; /* 1 where no scale is read */
  for (int32_t h = 0; v->k_scales_per_head && h < desc->num_kv_heads; ++h) arrays.k_scales[h] = desc->k_scales[h];

  /* per-span quota read-outs, per span row */
  for (int32_t r = 0; r < (int32_t)counts.span_rows; ++r) {
    plan->implicit_quotas[r] = -1;
    int32_t part = v->part_indptr[r];
    for (int32_t i = v->span_indptr[r]; i < v->span_indptr[r + 1]; ++i)
      plan->span_quotas[i] = v->spans[i].kind == KVC_SPAN_FAIR ? v->parts[part++].quota : v->spans[i].end - v->spans[i].start;
    if (v->part_indptr[r + 1] > v->part_indptr[r] && v->parts[v->part_indptr[r + 1] - 1].implicit)
      plan->implicit_quotas[r] = v->parts[v->part_indptr[r + 1] - 1].quota;
  }

  status = plan_select_geometry(ctx, plan, &arrays);
  if (status != KVC_SUCCESS) {
    kvc_plan_destroy(plan);
    return status;
  }

  plan->counts = counts;
  plan->blob_bytes = bytes;
  plan->view = plan->host;
  if (plan->backend == KVC_BACKEND_CUDA) {
    bind_view(plan, NULL); /* no device copy yet: nothing may follow the view's arrays */
    if (desc->device_memory == KVC_PLAN_MEMORY_OWNED) {
      int previous;
      status = kvc_device_enter(plan->device, &previous, ctx->detail, sizeof ctx->detail);
      if (status == KVC_SUCCESS) {
        status = kvc_device_alloc(&plan->device_blob, bytes, ctx->detail, sizeof ctx->detail);
        if (status == KVC_SUCCESS)
          status = kvc_device_upload(plan->device_blob, plan->host_blob, bytes, ctx->detail, sizeof ctx->detail);
        kvc_device_restore(previous);
      }
      if (status != KVC_SUCCESS) {
        kvc_plan_destroy(plan);
        return status;
      }
      bind_view(plan, plan->device_blob);
    }
  }
  status = size_workspaces(ctx, plan);
  if (status != KVC_SUCCESS) {
    kvc_plan_destroy(plan);
    return status;
  }
  *out = plan;
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_destroy(kvc_plan_t plan) {
  if (!plan) return KVC_SUCCESS;
  if (plan->device_blob) {
    int previous;
    if (kvc_device_enter(plan->device, &previous, NULL, 0) == KVC_SUCCESS) {
      kvc_device_free(plan->device_blob);
      kvc_device_restore(previous);
    }
  }
  free(plan->host_alloc);
  free(plan->span_quotas);
  free(plan->implicit_quotas);
  free(plan->outcomes);
  free(plan);
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_get_info(kvc_plan_t plan, kvc_plan_info_t *info) {
  if (!plan || !info) return KVC_ERROR_INVALID_VALUE;
  const kvc_plan_view_t *v = &plan->host;
  info->batch = v->batch;
  info->num_kv_heads = v->num_kv_heads;
  info->total_tokens = v->total_tokens;
  info->total_kept = v->total_kept;
  info->obs_total = v->obs_total;
  info->score_elems = v->score_elems;
  info->keep_elems = v->num_kv_heads * v->total_kept;
  info->total_spans = v->total_spans;
  info->count_elems = (int64_t)kvc_count_heads(v) * v->total_spans;
  kvc_layout_t compress;
  if (kvc_plan_layout(plan, KVC_OP_COMPRESS, 1, &compress, NULL, 0) != KVC_SUCCESS) return KVC_ERROR_INTERNAL;
  info->keep_offset_bytes = compress.keep_offset;
  info->compact_status_offset_bytes = 0; /* kvc_carve_dispatch carves it first */
  info->compress_status_offset_bytes = compress.status_offset;
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_obs_positions(kvc_plan_t plan, int32_t *indptr, int32_t *positions) {
  if (!plan) return KVC_ERROR_INVALID_VALUE;
  if (indptr) memcpy(indptr, plan->host.obs_indptr, sizeof(int32_t) * (size_t)(plan->host.batch + 1));
  if (positions) memcpy(positions, plan->host.obs_pos, sizeof(int32_t) * (size_t)plan->host.obs_total);
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_new_lengths(kvc_plan_t plan, int32_t *new_lens) {
  if (!plan || !new_lens) return KVC_ERROR_INVALID_VALUE;
  memcpy(new_lens, plan->host.keep_lens, sizeof(int32_t) * (size_t)plan->host.batch);
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_outcomes(kvc_plan_t plan, int32_t *outcomes) {
  if (!plan || !outcomes) return KVC_ERROR_INVALID_VALUE;
  memcpy(outcomes, plan->outcomes, sizeof(int32_t) * (size_t)plan->host.batch);
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_span_quotas(kvc_plan_t plan, int32_t *quotas, int32_t *implicit) {
  if (!plan || (!quotas && !implicit)) return KVC_ERROR_INVALID_VALUE;
  if (quotas) memcpy(quotas, plan->span_quotas, sizeof(int32_t) * (size_t)plan->host.total_spans);
  if (implicit) memcpy(implicit, plan->implicit_quotas, sizeof(int32_t) * (size_t)plan->counts.span_rows);
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_workspace_size(kvc_plan_t plan, kvc_op_t op, size_t *bytes) {
  if (!plan || !bytes || (unsigned)op > KVC_OP_COMPRESS) return KVC_ERROR_INVALID_VALUE;
  *bytes = plan->workspace[op];
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_workspace_layout(kvc_plan_t plan, kvc_op_t op, int32_t num_layers, kvc_workspace_layout_t *layout) {
  if (!plan || !layout || (unsigned)op > KVC_OP_COMPRESS || num_layers < 1) return KVC_ERROR_INVALID_VALUE;
  kvc_layout_t l;
  kvc_status_t status = kvc_plan_layout(plan, op, num_layers, &l, NULL, 0);
  if (status != KVC_SUCCESS) return status;
  layout->workspace_bytes = l.bytes;
  layout->keep_offset_bytes = op == KVC_OP_COMPRESS ? l.keep_offset : 0;
  layout->status_offset_bytes = op == KVC_OP_COMPRESS || op == KVC_OP_COMPACT ? l.status_offset : 0;
  return KVC_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * Plans in a caller's device buffer (CUDA graphs)
 */

kvc_status_t kvc_plan_device_bytes(kvc_plan_t plan, size_t *bytes) {
  if (!plan || !bytes) return KVC_ERROR_INVALID_VALUE;
  *bytes = plan->backend == KVC_BACKEND_CUDA ? plan->blob_bytes : 0;
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_host_image(kvc_plan_t plan, const void **image, size_t *bytes) {
  if (!plan || !image || !bytes) return KVC_ERROR_INVALID_VALUE;
  *image = plan->host_blob;
  *bytes = plan->blob_bytes;
  return KVC_SUCCESS;
}

kvc_status_t kvc_plan_upload(kvc_context_t ctx, kvc_plan_t plan, void *device_buffer, size_t bytes,
                             kvc_stream_t stream) {
  const char *fn = "kvc_plan_upload";
  kvc_status_t status = kvc_check_plan_context(ctx, plan, fn);
  if (status != KVC_SUCCESS) return status;
  if (plan->backend != KVC_BACKEND_CUDA) return KVC_SUCCESS; /* the CPU backend reads the host image itself */
  if (!device_buffer) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: device_buffer is NULL", fn);
  if ((uintptr_t)device_buffer % KVC_WORKSPACE_ALIGN != 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: device_buffer %p is not %d-byte aligned", fn, device_buffer,
                    KVC_WORKSPACE_ALIGN);
  if (bytes < plan->blob_bytes)
    return kvc_fail(ctx, KVC_ERROR_WORKSPACE_TOO_SMALL, "%s: bytes is %zu, the plan needs %zu (kvc_plan_device_bytes)",
                    fn, bytes, plan->blob_bytes);
  int previous;
  status = kvc_device_enter(plan->device, &previous, ctx->detail, sizeof ctx->detail);
  if (status != KVC_SUCCESS) return status;
  status = kvc_device_upload_async(device_buffer, plan->host_blob, plan->blob_bytes, stream, ctx->detail,
                                   sizeof ctx->detail);
  kvc_device_restore(previous);
  if (status == KVC_SUCCESS) bind_view(plan, device_buffer);
  return status;
}

/* Equal bytes at a and b, `count` elements of `size` each. */
static int same_array(const void *a, const void *b, int64_t count, size_t size) {
  return count <= 0 || memcmp(a, b, (size_t)count * size) == 0;
}

/* The by-value scalars of a plan's view, with every array pointer NULL. Copied bytewise from the
 * calloc'd plan, so padding bytes (if the struct ever has any) are zero and memcmp compares fields. */
static void view_scalars(kvc_plan_t plan, kvc_plan_view_t *v) {
  plan_arrays_t none;
  memset(&none, 0, sizeof none);
  memcpy(v, &plan->host, sizeof *v);
  point_view(v, &none);
}

/* Everything a captured execute call depends on besides the contents of the device blob: the
 * scalars its kernels get by value, the blob layout (so every array pointer is the same once both
 * plans sit in one buffer), the workspace carving, and what the CUDA launchers read on the host to
 * shape their launches (args->host_plan: lengths, observation rows, domains, partition counts).
 * An op that starts reading more of the host plan must add it here. */
kvc_status_t kvc_plan_compatible(kvc_plan_t a, kvc_plan_t b, int *compatible) {
  if (!a || !b || !compatible) return KVC_ERROR_INVALID_VALUE;
  const kvc_plan_view_t *x = &a->host, *y = &b->host;
  kvc_plan_view_t xs, ys;
  view_scalars(a, &xs);
  view_scalars(b, &ys);
  int same = a->backend == b->backend && a->device == b->device && a->blob_bytes == b->blob_bytes &&
             memcmp(&a->counts, &b->counts, sizeof a->counts) == 0 && memcmp(&xs, &ys, sizeof xs) == 0 &&
             memcmp(a->workspace, b->workspace, sizeof a->workspace) == 0;
  same = same && same_array(x->seq_lens, y->seq_lens, x->batch, sizeof(int32_t)) &&
         same_array(x->keep_lens, y->keep_lens, x->batch, sizeof(int32_t)) &&
         same_array(x->obs_indptr, y->obs_indptr, x->batch + 1, sizeof(int32_t)) &&
         same_array(x->obs_pos, y->obs_pos, x->obs_total, sizeof(int32_t)) &&
         same_array(x->obs_lo, y->obs_lo, x->obs_total, sizeof(int32_t)) &&
         same_array(x->domain_indptr, y->domain_indptr, x->batch + 1, sizeof(int32_t)) &&
         same_array(x->domains, y->domains, x->domain_indptr[x->batch], sizeof(kvc_domain_t)) &&
         same_array(x->part_indptr, y->part_indptr, a->counts.span_rows + 1, sizeof(int32_t)) &&
         same_array(x->split_segments, y->split_segments, x->batch + 1, sizeof(int64_t)) &&
         same_array(x->split_parts, y->split_parts, a->counts.span_rows + 1, sizeof(int64_t)) &&
         same_array(x->span_indptr, y->span_indptr, a->counts.span_rows + 1, sizeof(int32_t));
  *compatible = same;
  return KVC_SUCCESS;
}
