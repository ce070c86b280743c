/*
 * score_cpu.c - the CPU backend's scoring op, and the reference the CUDA kernels are tested
 * against: the scoring semantics of the comment above kvc_plan_desc_t in kvcompress.h, computed
 * in double and rounded to float once, when the score is stored.
 *
 * Attention methods (SNAPKV, H2O, TOVA) go one (domain, q head) at a time: each observation
 * query's logits are computed once into a workspace row, turned into probabilities in place
 * (max-subtracted, so exp never overflows) and added to the head's per-key sums. The workspace
 * is four rows of the longest sequence; the [heads x window x n] attention matrix never exists
 * and keys are read straight from their pages, never converted as a whole.
 */
#include <math.h>

#include "common.h"
#include "ops.h"

/* Per-key rows of one domain, each long enough for the longest sequence. */
typedef struct {
  double *probs;   /* one query's logits, then its softmax, over the keys it sees          */
  double *head;    /* one q head's attention per scored key, averaged over its queries     */
  double *pooled;  /* `head` after SNAPKV's pooling                                        */
  double *reduced; /* the reduction over the q heads: the domain's scores for one row set  */
} score_rows_t;

static int is_attention_method(kvc_score_method_t method) {
  return method == KVC_SCORE_SNAPKV || method == KVC_SCORE_H2O || method == KVC_SCORE_TOVA;
}

static void store_score(float *out, double value, int accumulate) {
  *out = accumulate ? *out + (float)value : (float)value;
}

/* Element offset of key t of sequence b, KV head h. */
static int64_t key_offset(const kvc_paged_kv_t *cache, const int32_t *pages, int32_t b, int32_t t, int32_t h) {
  return kvc_slot_offset(cache, kvc_page_of(cache, pages, b, t), t, h);
}

/* a_gij of query row r (q head g) for the keys it sees, [obs_lo[r], obs_pos[r]], into
 * probs[0 .. obs_pos[r] - obs_lo[r]]. */
static void query_softmax(const kvc_op_args_t *args, const int32_t *pages, int32_t b, int64_t r, int32_t g,
                          double *probs) {
  const kvc_plan_view_t *plan = &args->plan;
  const kvc_paged_kv_t *cache = args->cache;
  const int32_t dim = plan->head_dim, h = g / plan->group_size, lo = plan->obs_lo[r], p = plan->obs_pos[r];
  const int64_t q0 = (r * plan->num_q_heads + g) * dim;
  double query[256]; /* head_dim <= 256 on the CPU backend (plan validation) */
  for (int32_t d = 0; d < dim; ++d) query[d] = (float)(0.999 * kvc_load_as_double(args->queries, plan->dtype, q0 + d));

  double max = -INFINITY;
  for (int32_t t = lo; t <= p; ++t) {
    const int64_t k0 = key_offset(cache, pages, b, t, h);
    double dot = 0.0;
    for (int32_t d = 0; d < dim; ++d) dot += query[d] * kvc_load_as_double(cache->k, cache->dtype, k0 + d);
    probs[t - lo] = (double)plan->scale * dot;
    if (probs[t - lo] > max) max = probs[t - lo];
  }
  double sum = 0.0;
  for (int32_t i = 0; i <= p - lo; ++i) {
    probs[i] = exp(probs[i] - max);
    sum += probs[i];
  }
  for (int32_t i = 0; i <= p - lo; ++i) probs[i] /= sum;
}

/* head[j - start] = sum over the domain's queries that see key j of a_gij, divided by their number,
 * for the scored keys [start, scored_end). For SNAPKV every query sees every scored key (they lie
 * before the first query), so this is the plain mean; for TOVA it is the one query's attention. */
static void head_attention(const kvc_op_args_t *args, const int32_t *pages, int32_t b, const kvc_domain_t *dom,
                           int32_t g, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t scored = dom->scored_end - dom->start;
  for (int32_t i = 0; i < scored; ++i) rows->head[i] = 0.0;
  for (int64_t r = dom->obs_begin; r < dom->obs_end; ++r) {
    query_softmax(args, pages, b, r, g, rows->probs); /* probs[i] is key start + i: obs_lo is the start */
    const int32_t seen_end = plan->obs_pos[r] + 1 < dom->scored_end ? plan->obs_pos[r] + 1 : dom->scored_end;
    for (int32_t i = 0; i < seen_end - dom->start; ++i) rows->head[i] += rows->probs[i];
  }
  /* Queries are ascending, so those that see key j are a suffix; the last one is the domain's
   * last token, so every key has at least one. */
  int64_t first_seeing = dom->obs_begin;
  for (int32_t j = dom->start; j < dom->scored_end; ++j) {
    while (plan->obs_pos[first_seeing] < j) ++first_seeing;
    rows->head[j - dom->start] /= (double)(dom->obs_end - first_seeing);
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

/* rows->reduced[j - start] for the domain's scored keys: the attention of q heads
 * [g0, g0 + count), each pooled (SNAPKV), reduced over the heads by `reduce`. */
static void attention_scores(const kvc_op_args_t *args, const int32_t *pages, int32_t b, const kvc_domain_t *dom,
                             int32_t g0, int32_t count, kvc_reduce_t reduce, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t scored = dom->scored_end - dom->start;
  for (int32_t g = g0; g < g0 + count; ++g) {
    head_attention(args, pages, b, dom, g, rows);
    const double *x = rows->head;
    if (plan->method == KVC_SCORE_SNAPKV) {
      pool_row(rows->head, scored, plan->pool_kernel, plan->pool, rows->pooled);
      x = rows->pooled;
    }
    for (int32_t i = 0; i < scored; ++i)
      rows->reduced[i] = g == g0                     ? x[i]
                         : reduce == KVC_REDUCE_MAX ? fmax(rows->reduced[i], x[i])
                                                    : rows->reduced[i] + x[i];
  }
  if (reduce == KVC_REDUCE_MEAN)
    for (int32_t i = 0; i < scored; ++i) rows->reduced[i] /= count;
}

/* Writes the scores of one domain's scored keys [start, scored_end) into every KV head's row. */
static void score_domain(const kvc_op_args_t *args, const int32_t *pages, int32_t b, const kvc_domain_t *dom,
                         float *seq_rows, const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const kvc_paged_kv_t *cache = args->cache;
  const int32_t n = plan->seq_lens[b], heads = plan->num_kv_heads, acc = args->accumulate;
  if (dom->scored_end == dom->start) return; /* e.g. SNAPKV with a window covering the domain */
  switch (plan->method) {
    case KVC_SCORE_SNAPKV:
    case KVC_SCORE_H2O:
      for (int32_t h = 0; h < heads; ++h) {
        attention_scores(args, pages, b, dom, h * plan->group_size, plan->group_size, plan->group_reduce, rows);
        for (int32_t j = dom->start; j < dom->scored_end; ++j)
          store_score(seq_rows + (int64_t)h * n + j, rows->reduced[j - dom->start], acc);
      }
      break;
    case KVC_SCORE_TOVA: /* one selection for all KV heads: the mean over every q head */
      attention_scores(args, pages, b, dom, 0, plan->num_q_heads, KVC_REDUCE_MEAN, rows);
      for (int32_t h = 0; h < heads; ++h)
        for (int32_t j = dom->start; j < dom->scored_end; ++j)
          store_score(seq_rows + (int64_t)h * n + j, rows->reduced[j - dom->start], acc);
      break;
    case KVC_SCORE_KNORM:
      for (int32_t h = 0; h < heads; ++h)
        for (int32_t j = dom->start; j < dom->scored_end; ++j) {
          const int64_t k0 = key_offset(cache, pages, b, j, h);
          double squares = 0.0;
          for (int32_t d = 0; d < plan->head_dim; ++d) {
            const double x = kvc_load_as_double(cache->k, cache->dtype, k0 + d);
            squares += x * x;
          }
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
  score_rows_t rows = {NULL, NULL, NULL, NULL};
  if (is_attention_method(plan->method)) {
    const size_t row_bytes = sizeof(double) * (size_t)plan->max_seq_len;
    rows.probs = (double *)kvc_carve(ws, row_bytes);
    rows.head = (double *)kvc_carve(ws, row_bytes);
    rows.pooled = (double *)kvc_carve(ws, row_bytes);
    rows.reduced = (double *)kvc_carve(ws, row_bytes);
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
