/*
 * score_cpu.c - the CPU backend's scoring op, and the reference the CUDA kernels are tested
 * against: the scoring semantics of the comment above kvc_plan_desc_t in kvcompress.h, computed
 * in double and rounded to float once, when the score is stored.
 *
 * Attention methods (SNAPKV, H2O, TOVA) go one (domain, KV head) at a time: each observation
 * query's logits, for all q heads of the KV head's group at once (each key is loaded and widened
 * once per query row), are computed once into workspace rows, turned into probabilities in place
 * (max-subtracted, so exp never overflows) and added to each head's per-key sums. The workspace
 * is 2 * group + 2 rows of the longest sequence: the [heads x window x n] attention matrix never
 * exists, and keys are read straight from their pages, never converted as a whole.
 */
#include <math.h>

#include "common.h"
#include "ops.h"

/* Workspace of the attention methods; L = the longest sequence, G = the GQA group size. */
typedef struct {
  double *query;   /* [G][head_dim] one observation row's queries, for the q heads of a group   */
  double *dots;    /* [G] the group's dot products with one key                                 */
  double *probs;   /* [G][L] the row's logits, then softmax, over the keys it sees              */
  double *heads;   /* [G][L] each q head's attention per scored key, averaged over its queries  */
  double *pooled;  /* [L] one head's attention after SNAPKV's pooling                           */
  double *reduced; /* [L] the reduction over q heads: the domain's scores for one row set       */
} score_rows_t;

static int is_attention_method(kvc_score_method_t method) {
  return method == KVC_SCORE_SNAPKV || method == KVC_SCORE_H2O || method == KVC_SCORE_TOVA;
}

static void store_score(float *out, double value, int accumulate) {
  *out = accumulate ? *out + (float)value : (float)value;
}

/* Key t of sequence b, KV head h, as doubles. */
static void load_key(const kvc_paged_kv_t *cache, const int32_t *pages, int32_t b, int32_t t, int32_t h,
                     int32_t dim, double *out) {
  const int64_t k0 = kvc_slot_offset(cache, kvc_page_of(cache, pages, b, t), t, h);
  for (int32_t d = 0; d < dim; ++d) out[d] = kvc_load_as_double(cache->k, cache->dtype, k0 + d);
}

/* Adds the attention of query row r, for each q head of KV head h's group, to rows->heads over the
 * scored keys it sees. All heads of the group go together so each key is loaded once per row. */
static void add_query_attention(const kvc_op_args_t *args, const int32_t *pages, int32_t b,
                                const kvc_domain_t *dom, int32_t h, int64_t r, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t G = plan->group_size, dim = plan->head_dim, L = plan->max_seq_len;
  const int32_t lo = plan->obs_lo[r], p = plan->obs_pos[r], seen = p - lo + 1; /* lo is dom->start */
  for (int32_t gi = 0; gi < G; ++gi) {
    const int64_t q0 = (r * plan->num_q_heads + (int64_t)h * G + gi) * dim;
    for (int32_t d = 0; d < dim; ++d) rows->query[gi * dim + d] = kvc_load_as_double(args->queries, plan->dtype, q0 + d);
  }
  double key[256]; /* head_dim <= 256 on the CPU backend (plan validation) */
  for (int32_t t = lo; t <= p; ++t) {
    load_key(args->cache, pages, b, t, h, dim, key);
    for (int32_t gi = 0; gi < G; ++gi) rows->dots[gi] = 0.0;
    for (int32_t d = 0; d < dim; ++d) /* heads innermost: G independent sums, each in d order */
      for (int32_t gi = 0; gi < G; ++gi) rows->dots[gi] += rows->query[gi * dim + d] * key[d];
    for (int32_t gi = 0; gi < G; ++gi) rows->probs[(int64_t)gi * L + t - lo] = (double)plan->scale * rows->dots[gi];
  }
  const int32_t scored_seen = (p < dom->scored_end ? p + 1 : dom->scored_end) - dom->start;
  for (int32_t gi = 0; gi < G; ++gi) {
    double *probs = rows->probs + (int64_t)gi * L, *head = rows->heads + (int64_t)gi * L;
    double max = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < seen; ++i) max = probs[i] > max ? probs[i] : max;
    for (int32_t i = 0; i < seen; ++i) {
      probs[i] = exp(probs[i] - max);
      sum += probs[i];
    }
    for (int32_t i = 0; i < scored_seen; ++i) head[i] += probs[i] / sum;
  }
}

/* rows->heads[gi][j - start] = sum over the domain's queries that see key j of a_gij, divided by
 * their number, for each q head g = h * G + gi and the scored keys [start, scored_end). SNAPKV:
 * every query sees every scored key (they lie before the first query), so it is the plain mean;
 * TOVA: the one query's attention. */
static void group_attention(const kvc_op_args_t *args, const int32_t *pages, int32_t b, const kvc_domain_t *dom,
                            int32_t h, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t G = plan->group_size, L = plan->max_seq_len, scored = dom->scored_end - dom->start;
  for (int32_t gi = 0; gi < G; ++gi)
    for (int32_t i = 0; i < scored; ++i) rows->heads[(int64_t)gi * L + i] = 0.0;
  for (int64_t r = dom->obs_begin; r < dom->obs_end; ++r) add_query_attention(args, pages, b, dom, h, r, rows);
  /* Queries are ascending, so those that see key j are a suffix; the last one is the domain's
   * last token, so every key has at least one. */
  int64_t first_seeing = dom->obs_begin;
  for (int32_t j = dom->start; j < dom->scored_end; ++j) {
    while (plan->obs_pos[first_seeing] < j) ++first_seeing;
    for (int32_t gi = 0; gi < G; ++gi)
      rows->heads[(int64_t)gi * L + j - dom->start] /= (double)(dom->obs_end - first_seeing);
  }
}

/* SNAPKV pooling of x[0 .. len) (stride 1, kernel/2 zero padding each side): AVG divides by the
 * kernel, MAX ignores the padding. The range is the domain's scored keys: nothing leaks across. */
static void pool_row(const double *x, int32_t len, int32_t kernel, kvc_pool_t pool, double *out) {
  const int32_t half = kernel / 2;
  for (int32_t j = 0; j < len; ++j) {
    const int32_t from = j - half > 0 ? j - half : 0, to = j + half < len - 1 ? j + half : len - 1;
    double acc = pool == KVC_POOL_MAX ? -INFINITY : 0.0;
    for (int32_t i = from; i <= to; ++i) acc = pool == KVC_POOL_MAX ? fmax(acc, x[i]) : acc + x[i];
    out[j] = pool == KVC_POOL_MAX ? acc : acc / kernel;
  }
}

/* Combines the attention of KV head h's q heads (pooled for SNAPKV) into rows->reduced over the
 * domain's scored keys: MAX keeps the maximum, MEAN the sum (the caller divides). `first` starts
 * the reduction afresh. */
static void reduce_group(const kvc_op_args_t *args, const int32_t *pages, int32_t b, const kvc_domain_t *dom,
                         int32_t h, int first, kvc_reduce_t reduce, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t scored = dom->scored_end - dom->start;
  group_attention(args, pages, b, dom, h, rows);
  for (int32_t gi = 0; gi < plan->group_size; ++gi) {
    const double *x = rows->heads + (int64_t)gi * plan->max_seq_len;
    if (plan->method == KVC_SCORE_SNAPKV) {
      pool_row(x, scored, plan->pool_kernel, plan->pool, rows->pooled);
      x = rows->pooled;
    }
    for (int32_t i = 0; i < scored; ++i)
      rows->reduced[i] = first && gi == 0           ? x[i]
                         : reduce == KVC_REDUCE_MAX ? fmax(rows->reduced[i], x[i])
                                                    : rows->reduced[i] + x[i];
  }
}

/* Stores rows->reduced / divisor as the scores of the domain's scored keys in one row. */
static void store_reduced(float *row, const kvc_domain_t *dom, const score_rows_t *rows, double divisor,
                          int accumulate) {
  for (int32_t j = dom->start; j < dom->scored_end; ++j)
    store_score(row + j, rows->reduced[j - dom->start] / divisor, accumulate);
}

/* Writes the scores of one domain's scored keys [start, scored_end) into every KV head's row. */
static void score_domain(const kvc_op_args_t *args, const int32_t *pages, int32_t b, const kvc_domain_t *dom,
                         float *seq_rows, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t n = plan->seq_lens[b], heads = plan->num_kv_heads, dim = plan->head_dim, acc = args->accumulate;
  if (dom->scored_end == dom->start) return; /* e.g. SNAPKV with a window covering the domain */
  switch (plan->method) {
    case KVC_SCORE_SNAPKV:
    case KVC_SCORE_H2O:
      for (int32_t h = 0; h < heads; ++h) {
        reduce_group(args, pages, b, dom, h, 1, plan->group_reduce, rows);
        store_reduced(seq_rows + (int64_t)h * n, dom, rows,
                      plan->group_reduce == KVC_REDUCE_MEAN ? plan->group_size : 1, acc);
      }
      break;
    case KVC_SCORE_TOVA: /* one selection for all KV heads: the mean over every q head */
      for (int32_t h = 0; h < heads; ++h) reduce_group(args, pages, b, dom, h, h == 0, KVC_REDUCE_MEAN, rows);
      for (int32_t h = 0; h < heads; ++h) store_reduced(seq_rows + (int64_t)h * n, dom, rows, plan->num_q_heads, acc);
      break;
    case KVC_SCORE_KNORM:
      for (int32_t h = 0; h < heads; ++h)
        for (int32_t j = dom->start; j < dom->scored_end; ++j) {
          double key[256], squares = 0.0;
          load_key(args->cache, pages, b, j, h, dim, key);
          for (int32_t d = 0; d < dim; ++d) squares += key[d] * key[d];
          store_score(seq_rows + (int64_t)h * n + j, -sqrt(squares), acc);
        }
      break;
    case KVC_SCORE_STREAMING:
      for (int32_t h = 0; h < heads; ++h)
        for (int32_t j = dom->start; j < dom->scored_end; ++j)
          store_score(seq_rows + (int64_t)h * n + j,
                      plan->span_local ? (double)(j - dom->start) / (double)(dom->end - dom->start) : (double)j, acc);
      break;
  }
}

/* +inf for keys [from, to) of every KV head's row: keys the method does not score. */
static void store_unscored(float *seq_rows, int32_t n, int32_t heads, int32_t from, int32_t to, int accumulate) {
  for (int32_t h = 0; h < heads; ++h)
    for (int32_t j = from; j < to; ++j) store_score(seq_rows + (int64_t)h * n + j, INFINITY, accumulate);
}

kvc_status_t kvc_score_cpu(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t *plan = &args->plan;
  score_rows_t rows = {NULL, NULL, NULL, NULL, NULL, NULL};
  if (is_attention_method(plan->method)) {
    const size_t G = (size_t)plan->group_size, row = sizeof(double) * (size_t)plan->max_seq_len;
    rows.query = (double *)kvc_carve(ws, sizeof(double) * G * (size_t)plan->head_dim);
    rows.dots = (double *)kvc_carve(ws, sizeof(double) * G);
    rows.probs = (double *)kvc_carve(ws, G * row);
    rows.heads = (double *)kvc_carve(ws, G * row);
    rows.pooled = (double *)kvc_carve(ws, row);
    rows.reduced = (double *)kvc_carve(ws, row);
  }
  /* The sizing call is told apart by its missing scores, not by ws->base: KNORM and STREAMING
   * need no workspace, which may then legitimately be NULL when the op runs. */
  if (!args->scores) return KVC_SUCCESS;

  const int32_t heads = plan->num_kv_heads;
  for (int32_t b = 0; b < plan->batch; ++b) {
    const int32_t n = plan->seq_lens[b];
    const int32_t *pages = kvc_seq_pages(args->cache, b);
    float *seq_rows = args->scores + heads * plan->token_offsets[b];
    int32_t covered = 0; /* domains are sorted and disjoint: keys between them are unscored */
    for (int32_t d = plan->domain_indptr[b]; d < plan->domain_indptr[b + 1]; ++d) {
      const kvc_domain_t *dom = &plan->domains[d];
      store_unscored(seq_rows, n, heads, covered, dom->start, args->accumulate);
      score_domain(args, pages, b, dom, seq_rows, &rows);
      store_unscored(seq_rows, n, heads, dom->scored_end, dom->end, args->accumulate);
      covered = dom->end;
    }
    store_unscored(seq_rows, n, heads, covered, n, args->accumulate);
  }
  return KVC_SUCCESS;
}
