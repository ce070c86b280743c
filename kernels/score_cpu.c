/*
 * score_cpu.c - the CPU backend's scoring op, and the reference the CUDA kernels are tested
 * against: the scoring semantics of the comment above kvc_plan_desc_t in kvcompress.h, computed
 * in double and rounded to float once, when the score is stored.
 *
 * Attention methods (SNAPKV, H2O, TOVA) go one (domain, KV head) at a time, and inside it one
 * block of observation rows at a time (consecutive rows, ascending; all G q heads of the group).
 * The block's queries are widened to double once; the keys the block sees are read from their
 * pages in tiles of TILE_KEYS keys, each widened to double once per block into a packed tile, and
 * every (row, q head) of the block takes its logits against the tile from there: so each key is
 * read and converted once per block of up to BLOCK_ROW_HEADS (row, q head) pairs instead of once
 * per row. The block's logits are stored (one pass), then each (row, q head) turns its own into
 * probabilities in place exactly as a plain implementation would (max-subtracted, so exp never
 * overflows; one exp per (row, q head, key); summed in key order) and adds them to the head's
 * per-key sums, rows in ascending order. Every dot product is summed in head_dim order from 0:
 * the result is the same, bit for bit, as taking the rows one at a time.
 *
 * Workspace (doubles; L = the longest sequence, G = the GQA group size, D = head_dim, Q = the
 * most observation queries of one domain, B = block rows = max(1, min(Q, floor(256 / G),
 * floor(2^20 / (G * L))))), each piece rounded up to 256 bytes:
 *     B * G * D * 2     the block's queries (each element twice: a ready 2-lane broadcast)
 *   + TILE_KEYS * D     one tile of keys (64 x D: 64 KiB at D = 128)
 *   + B * G * L         the block's logits: at most 2^20 doubles (8 MiB), or one row's G * L
 *                       when that alone is larger (B = 1, as for a single query row)
 *   + G * L + 2 * L     per-q-head attention sums, pooling and reduction rows
 * The [heads x window x n] attention matrix never exists, and keys are read straight from their
 * pages, never converted as a whole. KNORM and STREAMING need none.
 */
#include <math.h>

#include "common.h"
#include "ops.h"

enum {
  KEY_LANES = 8,        /* keys of a packed group: the dot-product kernel's vector width       */
  TILE_KEYS = 64,       /* keys widened per tile (a multiple of KEY_LANES)                     */
  BLOCK_ROW_HEADS = 256 /* (row, q head) pairs per block, at most (one row when G is larger)   */
};
#define LOGITS_CAP ((int64_t)1 << 20) /* doubles of the block's logits, unless one row needs more */

/* Workspace of the attention methods (sizes above). */
typedef struct {
  int32_t block_rows; /* B: observation rows per block                                          */
  double *query;      /* [B * G][D][2] the block's queries ((row, q head) pairs in row-major
                         order), each element twice                                              */
  double *keys;       /* [TILE_KEYS / 8][D][8] one tile of keys, packed by groups of 8 keys     */
  double *logits;     /* [B * G][L] each pair's logits, then softmax, over the keys it sees      */
  double *heads;      /* [G][L] each q head's attention per scored key, averaged over its queries */
  double *pooled;     /* [L] one head's attention after SNAPKV's pooling                          */
  double *reduced;    /* [L] the reduction over q heads: the domain's scores for one row set      */
} score_rows_t;

static int is_attention_method(kvc_score_method_t method) {
  return method == KVC_SCORE_SNAPKV || method == KVC_SCORE_H2O || method == KVC_SCORE_TOVA;
}

/* B of the workspace comment. */
static int32_t block_rows(const kvc_plan_view_t *plan) {
  const int64_t G = plan->group_size, L = plan->max_seq_len;
  int64_t rows = plan->max_obs_per_domain;
  if (rows > BLOCK_ROW_HEADS / G) rows = BLOCK_ROW_HEADS / G;
  if (rows > LOGITS_CAP / (G * L)) rows = LOGITS_CAP / (G * L);
  return rows < 1 ? 1 : (int32_t)rows;
}

static void store_score(float *out, double value, int accumulate) {
  *out = accumulate ? *out + (float)value : (float)value;
}

/* out[k * stride] = element i0 + k of base as double, k < count (the dtype switch hoisted). */
static void widen(const void *base, kvc_dtype_t dtype, int64_t i0, int32_t count, double *restrict out,
                  int32_t stride) {
  switch (dtype) {
    case KVC_DTYPE_F32: {
      const float *restrict in = (const float *)base + i0;
      for (int32_t k = 0; k < count; ++k) out[(int64_t)k * stride] = in[k];
      break;
    }
    case KVC_DTYPE_F16: {
      const uint16_t *restrict in = (const uint16_t *)base + i0;
      for (int32_t k = 0; k < count; ++k) out[(int64_t)k * stride] = kvc_f16_to_f32(in[k]);
      break;
    }
    case KVC_DTYPE_BF16: {
      const uint16_t *restrict in = (const uint16_t *)base + i0;
      for (int32_t k = 0; k < count; ++k) out[(int64_t)k * stride] = kvc_bf16_to_f32(in[k]);
      break;
    }
    default: /* fp8 is never scored (plan validation) */
      for (int32_t k = 0; k < count; ++k) out[(int64_t)k * stride] = 0.0;
      break;
  }
}

/* Key t of sequence b, KV head h, as doubles. */
static void load_key(const kvc_paged_kv_t *cache, const int32_t *pages, int32_t b, int32_t t, int32_t h,
                     int32_t dim, double *out) {
  widen(cache->k, cache->dtype, kvc_slot_offset(cache, kvc_page_of(cache, pages, b, t), t, h), dim, out, 1);
}

/* Keys [t0, t0 + count) of KV head h into the packed tile: key j at tile[(j / 8) * D * 8 + d * 8
 * + j % 8]. The last group is padded with zero keys (their logits are computed, never used). */
static void load_key_tile(const kvc_paged_kv_t *cache, const int32_t *pages, int32_t b, int32_t t0,
                          int32_t count, int32_t h, int32_t dim, double *restrict tile) {
  const int32_t padded = (count + KEY_LANES - 1) / KEY_LANES * KEY_LANES;
  for (int32_t j = 0; j < padded; ++j) {
    double *dst = tile + (int64_t)(j / KEY_LANES) * dim * KEY_LANES + j % KEY_LANES;
    if (j < count) {
      const int32_t t = t0 + j;
      widen(cache->k, cache->dtype, kvc_slot_offset(cache, kvc_page_of(cache, pages, b, t), t, h), dim, dst,
            KEY_LANES);
    } else {
      for (int32_t d = 0; d < dim; ++d) dst[(int64_t)d * KEY_LANES] = 0.0;
    }
  }
}

/* Dot products of two query vectors qa, qb (each element stored twice: qa[2d] = qa[2d + 1], so a
 * 2-lane broadcast is one aligned load) with the 8 keys of one packed group, each summed in d
 * order from 0: 16 independent sums, so they vectorize across keys and stay in registers (GCC and
 * Clang: explicit 2-lane vectors, which x86-64 and AArch64 have natively; elsewhere plain loops). */
#if defined(__GNUC__)
typedef double kvc_v2d __attribute__((vector_size(16)));
static void dot_group(const double *restrict qa, const double *restrict qb, const double *restrict keys,
                      int32_t dim, double *restrict out_a, double *restrict out_b) {
  kvc_v2d a0 = {0.0, 0.0}, a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
  for (int32_t d = 0; d < dim; ++d) {
    const kvc_v2d *k = (const kvc_v2d *)(keys + (int64_t)d * KEY_LANES); /* 16-byte aligned */
    const kvc_v2d x = ((const kvc_v2d *)qa)[d], y = ((const kvc_v2d *)qb)[d]; /* pre-broadcast */
    const kvc_v2d k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3];
    a0 += x * k0, a1 += x * k1, a2 += x * k2, a3 += x * k3;
    c0 += y * k0, c1 += y * k1, c2 += y * k2, c3 += y * k3;
  }
  const kvc_v2d a[4] = {a0, a1, a2, a3}, c[4] = {c0, c1, c2, c3};
  for (int32_t j = 0; j < KEY_LANES; ++j) {
    out_a[j] = a[j / 2][j % 2];
    out_b[j] = c[j / 2][j % 2];
  }
}
#else
static void dot_group(const double *restrict qa, const double *restrict qb, const double *restrict keys,
                      int32_t dim, double *restrict out_a, double *restrict out_b) {
  double a[KEY_LANES], c[KEY_LANES];
  for (int32_t j = 0; j < KEY_LANES; ++j) a[j] = c[j] = 0.0;
  for (int32_t d = 0; d < dim; ++d) {
    const double x = qa[2 * d], y = qb[2 * d];
    const double *restrict k = keys + (int64_t)d * KEY_LANES;
    for (int32_t j = 0; j < KEY_LANES; ++j) {
      a[j] += x * k[j];
      c[j] += y * k[j];
    }
  }
  for (int32_t j = 0; j < KEY_LANES; ++j) {
    out_a[j] = a[j];
    out_b[j] = c[j];
  }
}
#endif

/* x86 only: the same 2 rows x 16 keys (two consecutive packed groups) with 4-lane AVX2 vectors,
 * picked at run time when the CPU has AVX2. Still a separate multiply and add, summed in d order
 * from 0 (AVX2 does not enable FMA contraction): the same results, bit for bit, as dot_group. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define KVC_SCORE_AVX2 1
typedef double kvc_v4d __attribute__((vector_size(32)));
__attribute__((target("avx2"))) static void dot_group16(const double *restrict qa, const double *restrict qb,
                                                        const double *restrict keys, int32_t dim,
                                                        double *restrict out_a, double *restrict out_b) {
  const double *restrict second = keys + (int64_t)dim * KEY_LANES;
  kvc_v4d a0 = {0.0, 0.0, 0.0, 0.0}, a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
  for (int32_t d = 0; d < dim; ++d) {
    const kvc_v4d *k = (const kvc_v4d *)(keys + (int64_t)d * KEY_LANES), *l = (const kvc_v4d *)(second + (int64_t)d * KEY_LANES);
    const double xs = qa[2 * d], ys = qb[2 * d];
    const kvc_v4d x = {xs, xs, xs, xs}, y = {ys, ys, ys, ys};
    const kvc_v4d k0 = k[0], k1 = k[1], k2 = l[0], k3 = l[1];
    a0 += x * k0, a1 += x * k1, a2 += x * k2, a3 += x * k3;
    c0 += y * k0, c1 += y * k1, c2 += y * k2, c3 += y * k3;
  }
  const kvc_v4d a[4] = {a0, a1, a2, a3}, c[4] = {c0, c1, c2, c3};
  for (int32_t j = 0; j < 2 * KEY_LANES; ++j) {
    out_a[j] = a[j / 4][j % 4];
    out_b[j] = c[j / 4][j % 4];
  }
}
#endif

/* Adds the attention of observation rows [r0, r1) (one block), for each q head of KV head h's
 * group, to rows->heads over the scored keys each row sees. Row r sees keys [lo, obs_pos[r]]. */
static void add_block_attention(const kvc_op_args_t *args, const int32_t *pages, int32_t b,
                                const kvc_domain_t *dom, int32_t h, int64_t r0, int64_t r1,
                                const score_rows_t *rows) {
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t G = plan->group_size, dim = plan->head_dim, L = plan->max_seq_len;
  const int32_t lo = dom->start, last = plan->obs_pos[r1 - 1]; /* rows ascend: last sees the most */
  const int32_t pairs = (int32_t)(r1 - r0) * G;                /* (row, q head) pair i: row r0 + i / G */
  const double scale = (double)plan->scale;
#ifdef KVC_SCORE_AVX2
  const int avx2 = __builtin_cpu_supports("avx2");
#endif
  for (int64_t r = r0; r < r1; ++r)
    for (int32_t gi = 0; gi < G; ++gi) {
      double *restrict q = rows->query + ((r - r0) * G + gi) * 2 * dim;
      widen(args->queries, plan->dtype, (r * plan->num_q_heads + (int64_t)h * G + gi) * dim, dim, q, 2);
      for (int32_t d = 0; d < dim; ++d) q[2 * d + 1] = q[2 * d];
    }

  for (int32_t t0 = lo; t0 <= last; t0 += TILE_KEYS) {
    const int32_t count = last + 1 - t0 < TILE_KEYS ? last + 1 - t0 : TILE_KEYS;
    load_key_tile(args->cache, pages, b, t0, count, h, dim, rows->keys);
    for (int32_t i = 0; i < pairs; i += 2) {
      const int32_t k = i + 1 < pairs ? i + 1 : i; /* an odd last pair goes with itself */
      const int32_t sees = plan->obs_pos[r0 + k / G] + 1 - t0; /* keys of the tile the later row sees */
      const int32_t upto = sees < count ? sees : count;
      const double *qa = rows->query + (int64_t)i * 2 * dim, *qk = rows->query + (int64_t)k * 2 * dim;
      double *la = rows->logits + (int64_t)i * L + (t0 - lo), *lk = rows->logits + (int64_t)k * L + (t0 - lo);
      for (int32_t j0 = 0; j0 < upto;) {
        const double *group = rows->keys + (int64_t)(j0 / KEY_LANES) * dim * KEY_LANES;
        double da[2 * KEY_LANES], dk[2 * KEY_LANES];
        int32_t step = KEY_LANES;
#ifdef KVC_SCORE_AVX2
        if (avx2 && j0 + KEY_LANES < upto) { /* both groups hold keys the pair sees */
          dot_group16(qa, qk, group, dim, da, dk);
          step = 2 * KEY_LANES;
        } else
#endif
          dot_group(qa, qk, group, dim, da, dk);
        const int32_t width = count - j0 < step ? count - j0 : step;
        for (int32_t j = 0; j < width; ++j) {
          la[j0 + j] = scale * da[j];
          lk[j0 + j] = scale * dk[j];
        }
        j0 += step;
      }
    }
  }

  for (int64_t r = r0; r < r1; ++r) {
    const int32_t p = plan->obs_pos[r], seen = p - lo + 1; /* obs_lo[r] is dom->start */
    const int32_t scored_seen = (p < dom->scored_end ? p + 1 : dom->scored_end) - dom->start;
    for (int32_t gi = 0; gi < G; ++gi) {
      double *restrict probs = rows->logits + ((r - r0) * G + gi) * L, *restrict head = rows->heads + (int64_t)gi * L;
      if (args->lse) { /* the engine's normaliser: a_gij = exp(logit - lse) */
        const double lse = args->lse[r * plan->num_q_heads + (int64_t)h * G + gi];
        for (int32_t i = 0; i < scored_seen; ++i) head[i] += exp(probs[i] - lse);
        continue;
      }
      double max = -INFINITY, sum = 0.0;
      for (int32_t i = 0; i < seen; ++i) max = probs[i] > max ? probs[i] : max;
      for (int32_t i = 0; i < seen; ++i) {
        probs[i] = exp(probs[i] - max);
        sum += probs[i];
      }
      for (int32_t i = 0; i < scored_seen; ++i) head[i] += probs[i] / sum;
    }
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
  for (int64_t r0 = dom->obs_begin; r0 < dom->obs_end; r0 += rows->block_rows) {
    const int64_t r1 = r0 + rows->block_rows < dom->obs_end ? r0 + rows->block_rows : dom->obs_end;
    add_block_attention(args, pages, b, dom, h, r0, r1, rows);
  }
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
  score_rows_t rows = {0, NULL, NULL, NULL, NULL, NULL, NULL};
  if (is_attention_method(plan->method)) { /* the workspace comment at the top */
    const size_t G = (size_t)plan->group_size, dim = (size_t)plan->head_dim, row = sizeof(double) * (size_t)plan->max_seq_len;
    rows.block_rows = block_rows(plan);
    const size_t pairs = (size_t)rows.block_rows * G;
    rows.query = (double *)kvc_carve(ws, sizeof(double) * pairs * 2 * dim);
    rows.keys = (double *)kvc_carve(ws, sizeof(double) * TILE_KEYS * dim);
    rows.logits = (double *)kvc_carve(ws, pairs * row);
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
