/*
 * score_cpu.c - the CPU backend's scoring op: the scoring semantics of the comment above
 * kvc_plan_desc_t in kvcompress.h. Logits are float32 dot products (f16 and bf16 widen exactly to
 * float); softmax normalisers, column sums, means, pooling and group reduction are double; each
 * score is rounded to float once, when it is stored. The obviously-correct reference (everything
 * in double, one query at a time) lives in tests/test_score_cpu.c, which checks this file against
 * it within a bound derived there from the float arithmetic.
 *
 * Work: one item per (scoring domain, KV head), independent of each other, so the context's
 * threads (kvc_context_set_threads) take items from a shared counter and each item's scores are
 * computed by one thread in one fixed order: the result does not depend on the thread count.
 * TOVA's items each leave their q heads' sum in a per-sequence row; one thread then adds the KV
 * heads' rows in order.
 *
 * Attention methods (SNAPKV, H2O, TOVA) in an item go one block of observation rows at a time
 * (consecutive rows, ascending): the pairs (q head, row) of the block, all G q heads of the group,
 * are the lanes of float vectors; keys are converted to float once per tile of KEY_TILE keys and
 * every vector of the block takes its logits against the tile (kernels/score_cpu_simd.h: FMA
 * micro-kernel, then per vector exp, double sums and column sums). The block's logits are kept
 * (LOGITS_CAP floats, or MIN_VECTORS vectors' worth when that is more: the micro-kernel wants 4
 * query vectors per key broadcast), so every logit is computed once; a domain's rows are split
 * into blocks of equal size. With the engine's normaliser the exp pass is fused into the column
 * sums. Buffer size barely matters here (1 to 8 MiB measured within noise at n = 1k-16k). The [heads x
 * window x n] attention matrix never exists. The inner loops are built three times - AVX-512,
 * AVX2+FMA (x86, picked at run time) and portable (GCC/Clang vector extensions) - and agree up to
 * the order of lane sums; KVC_CPU_ISA=1|2|3 (read at plan creation) caps the choice for tests.
 * No BLAS, by measurement: OpenBLAS 0.3.31's sgemm (one thread, this repository's bench machine)
 * runs 82-128 GFLOP/s on these shapes, and a whole kvc_compress here reaches 64-83 GFLOP/s of QK^T
 * flops with softmax, column sums, selection and compaction included (bench/RESULTS.md); a BLAS
 * could only shorten the logit part (about 60% of the time) and needs K packed per tile anyway.
 *
 * Non-finite data (the header's rule): a NaN or +-inf among the logits a pair sees makes its whole
 * softmax row NaN (every key it sees gets a NaN contribution); MAX pooling and MAX group-reduce
 * propagate NaN; pool_kernel 1 is the identity. KNORM is summed in double (no intermediate
 * overflow) and a norm past FLT_MAX is stored as -FLT_MAX, so every finite key scores finite.
 *
 * FP8 keys (e4m3): widened to float exactly with the other dtypes' keys (kernels/score_cpu_simd.h),
 * unscaled; the KV head's k_scale is folded into the logit scale (scale * k_scale, one float
 * product per item) and multiplies KNORM's norm in double. Queries are in the plan's query dtype.
 *
 * Workspace per thread (L = longest sequence, Lp = L rounded up to KEY_GROUP, G = group size,
 * D = head_dim, V = lanes, B = block rows, M = ceil(B * G / V) vectors), each piece rounded up to
 * 256 bytes: floats M * V * D (queries) + KEY_TILE * D (key tile) + M * V * Lp (logits) + 4 M V
 * (lane data); int64 L (key offsets); doubles G * L + 2 L (head rows, pooling, reduction). TOVA
 * adds one shared [num_kv_heads][L] double row set. KNORM and STREAMING need none.
 */
#include <float.h>
#include <math.h>

#include "common.h"
#include "ops.h"

enum {
  KEY_GROUP = 24, /* the micro-kernel's key counts (accumulators / vectors, 1..4 vectors) divide it */
  KEY_TILE = 96   /* keys converted to float per tile (a multiple of KEY_GROUP)                      */
};
#define LOGITS_CAP ((int64_t)1 << 18) /* floats of a block's logits (1 MiB), unless MIN_VECTORS vectors need more */
#define MIN_VECTORS 4                 /* vectors of a block when the domain has the rows (micro-kernel width) */

/* One block: what kernels/score_cpu_simd.h computes, and the thread's scratch it uses. */
typedef struct {
  const kvc_paged_kv_t *cache;
  const int64_t *key_offset; /* [keys] element offset in cache->k of key lo + i, the item's KV head */
  int32_t dim, group;        /* D, G */
  float scale;
  int32_t lo;                /* the domain's first key                                               */
  int32_t keys;              /* keys the block sees: lo .. lo + keys - 1                             */
  int32_t scored;            /* keys lo .. lo + scored - 1 get column sums                           */
  int32_t rows_per_head;     /* rows of the block: pair p is q head p / rows, row p % rows           */
  int32_t vectors;           /* ceil(group * rows / lanes)                                           */
  const float *lse;          /* the engine's normalisers (non-NULL: use lane_lse) or NULL            */
  float *qpack;              /* [vectors][D][lanes] the pairs' queries                               */
  float *tile;               /* [KEY_TILE][D] keys as floats                                         */
  float *logits;             /* [vectors][logits_keys][lanes]                                        */
  int64_t logits_keys;
  int32_t *lane_pos;         /* [vectors * lanes] each pair's position, -1 for padding lanes         */
  int32_t *vector_keys;      /* [vectors] keys any lane of the vector sees                           */
  float *lane_max, *lane_bad, *lane_lse; /* [vectors * lanes]                                        */
  double *heads;             /* [G][heads_stride]: each q head's attention sums over scored keys     */
  int64_t heads_stride;
} score_block_t;

/* ---- the inner loops, once per instruction set ------------------------------------------------ */

#if !defined(__GNUC__)
#error "score_cpu.c needs GCC or Clang vector extensions"
#endif

#define SIMD(name) name##_portable
#define SIMD_TARGET
#define SIMD_LANES 4
#define SIMD_ACCUMULATORS 12
#define SIMD_FMA(a, b, c) ((a) * (b) + (c))
#define SIMD_SPLAT(x) ((float __attribute__((vector_size(16)))){x, x, x, x})
#define SIMD_SPLAT_INT(x) ((int32_t __attribute__((vector_size(16)))){x, x, x, x})
#define SIMD_WIDEN_LOW(v) ((double __attribute__((vector_size(16)))){(v)[0], (v)[1]})
#define SIMD_WIDEN_HIGH(v) ((double __attribute__((vector_size(16)))){(v)[2], (v)[3]})
#define SIMD_SUM_HALF(x) ((x)[0] + (x)[1])
#include "score_cpu_simd.h"
#undef SIMD
#undef SIMD_TARGET
#undef SIMD_LANES
#undef SIMD_ACCUMULATORS
#undef SIMD_FMA
#undef SIMD_SPLAT
#undef SIMD_SPLAT_INT
#undef SIMD_WIDEN_LOW
#undef SIMD_WIDEN_HIGH
#undef SIMD_SUM_HALF

#if defined(__x86_64__) || defined(__i386__)
#define KVC_SCORE_X86 1
#include <immintrin.h>

#define SIMD(name) name##_avx2
#define SIMD_TARGET __attribute__((target("avx2,fma")))
#define SIMD_LANES 8
#define SIMD_ACCUMULATORS 12
#define SIMD_FMA(a, b, c) ((__typeof__(a))_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define SIMD_SPLAT(x) _mm256_set1_ps(x)
#define SIMD_SPLAT_INT(x) _mm256_set1_epi32(x)
#define SIMD_WIDEN_LOW(v) _mm256_cvtps_pd(_mm256_castps256_ps128((__m256)(v)))
#define SIMD_WIDEN_HIGH(v) _mm256_cvtps_pd(_mm256_extractf128_ps((__m256)(v), 1))
#define SIMD_SUM_HALF(x) sum_half_avx2(x)
static inline __attribute__((target("avx2,fma"))) double sum_half_avx2(__m256d x) {
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}
#include "score_cpu_simd.h"
#undef SIMD
#undef SIMD_TARGET
#undef SIMD_LANES
#undef SIMD_ACCUMULATORS
#undef SIMD_FMA
#undef SIMD_SPLAT
#undef SIMD_SPLAT_INT
#undef SIMD_WIDEN_LOW
#undef SIMD_WIDEN_HIGH
#undef SIMD_SUM_HALF

#define SIMD(name) name##_avx512
#define SIMD_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))
#define SIMD_LANES 16
#define SIMD_ACCUMULATORS 24
#define SIMD_FMA(a, b, c) ((__typeof__(a))_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
#define SIMD_SPLAT(x) _mm512_set1_ps(x)
#define SIMD_SPLAT_INT(x) _mm512_set1_epi32(x)
#define SIMD_WIDEN_LOW(v) _mm512_cvtps_pd(_mm512_castps512_ps256((__m512)(v)))
#define SIMD_WIDEN_HIGH(v) _mm512_cvtps_pd(_mm512_extractf32x8_ps((__m512)(v), 1))
#define SIMD_SUM_HALF(x) _mm512_reduce_add_pd(x)
#include "score_cpu_simd.h"
#undef SIMD
#undef SIMD_TARGET
#undef SIMD_LANES
#undef SIMD_ACCUMULATORS
#undef SIMD_FMA
#undef SIMD_SPLAT
#undef SIMD_SPLAT_INT
#undef SIMD_WIDEN_LOW
#undef SIMD_WIDEN_HIGH
#undef SIMD_SUM_HALF
#endif

typedef enum { ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 } isa_t;

/* The widest instruction set this CPU runs, capped by the plan's request (0: no cap). */
static isa_t pick_isa(int32_t requested) {
  isa_t best = ISA_PORTABLE;
#ifdef KVC_SCORE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = ISA_AVX2;
  if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    best = ISA_AVX512;
#endif
  return requested >= ISA_PORTABLE && requested < (int32_t)best ? (isa_t)requested : best;
}

static int32_t isa_lanes(isa_t isa) { return isa == ISA_AVX512 ? 16 : isa == ISA_AVX2 ? 8 : 4; }

static void run_block(isa_t isa, const score_block_t *blk) {
  switch (isa) {
#ifdef KVC_SCORE_X86
    case ISA_AVX512: score_block_avx512(blk); break;
    case ISA_AVX2: score_block_avx2(blk); break;
#endif
    default: score_block_portable(blk); break;
  }
}

/* ---- workspace ------------------------------------------------------------------------------ */

typedef struct {
  isa_t isa;
  int32_t lanes, block_rows, vectors; /* V, B, M of the workspace comment */
  int32_t whole_rows;                 /* rows of a block that fill whole vectors come in multiples of it */
  int64_t logits_keys;                /* Lp */
} score_shape_t;

/* One thread's scratch. */
typedef struct {
  float *qpack, *tile, *logits, *lane_max, *lane_bad, *lane_lse;
  int32_t *lane_pos, *vector_keys;
  int64_t *key_offset;
  double *heads, *pooled, *reduced;
} score_scratch_t;

static int is_attention_method(kvc_score_method_t method) {
  return method == KVC_SCORE_SNAPKV || method == KVC_SCORE_H2O || method == KVC_SCORE_TOVA;
}

static int32_t gcd(int32_t a, int32_t b) { return b ? gcd(b, a % b) : a; }

static score_shape_t shape_of(const kvc_plan_view_t *plan) {
  score_shape_t s;
  s.isa = pick_isa(plan->cpu_isa);
  s.lanes = isa_lanes(s.isa);
  s.logits_keys = ((int64_t)plan->max_seq_len + KEY_GROUP - 1) / KEY_GROUP * KEY_GROUP;
  const int64_t G = plan->group_size, whole = s.lanes / gcd(plan->group_size, s.lanes); /* rows filling whole vectors */
  const int64_t fewest = (MIN_VECTORS * s.lanes + G - 1) / G;                            /* rows of MIN_VECTORS vectors */
  int64_t rows = LOGITS_CAP / (G * s.logits_keys);
  rows = rows > fewest ? rows : fewest;
  rows = (rows + whole - 1) / whole * whole;
  if (rows > plan->max_obs_per_domain) rows = plan->max_obs_per_domain;
  s.block_rows = rows < 1 ? 1 : (int32_t)rows;
  s.whole_rows = (int32_t)whole;
  s.vectors = (int32_t)((G * s.block_rows + s.lanes - 1) / s.lanes);
  return s;
}

static void carve_scratch(kvc_carver_t *ws, const kvc_plan_view_t *plan, const score_shape_t *s, score_scratch_t *out) {
  const size_t D = (size_t)plan->head_dim, L = (size_t)plan->max_seq_len, lanes = (size_t)s->vectors * (size_t)s->lanes;
  out->qpack = (float *)kvc_carve(ws, sizeof(float) * lanes * D);
  out->tile = (float *)kvc_carve(ws, sizeof(float) * KEY_TILE * D);
  out->logits = (float *)kvc_carve(ws, sizeof(float) * lanes * (size_t)s->logits_keys);
  out->lane_max = (float *)kvc_carve(ws, sizeof(float) * lanes);
  out->lane_bad = (float *)kvc_carve(ws, sizeof(float) * lanes);
  out->lane_lse = (float *)kvc_carve(ws, sizeof(float) * lanes);
  out->lane_pos = (int32_t *)kvc_carve(ws, sizeof(int32_t) * lanes);
  out->vector_keys = (int32_t *)kvc_carve(ws, sizeof(int32_t) * (size_t)s->vectors);
  out->key_offset = (int64_t *)kvc_carve(ws, sizeof(int64_t) * L);
  out->heads = (double *)kvc_carve(ws, sizeof(double) * (size_t)plan->group_size * L);
  out->pooled = (double *)kvc_carve(ws, sizeof(double) * L);
  out->reduced = (double *)kvc_carve(ws, sizeof(double) * L);
}

/* ---- one item ------------------------------------------------------------------------------- */

typedef struct {
  const kvc_op_args_t *args;
  score_shape_t shape;
  char *scratch;            /* thread t's scratch starts at scratch + t * scratch_bytes */
  size_t scratch_bytes;
  double *tova;             /* [num_kv_heads][L]: TOVA's per-KV-head sums of one sequence */
  int32_t first_domain;     /* items: (first_domain + item / heads, item % heads) */
} score_job_t;

static void store_score(float *out, double value, int accumulate) {
  *out = accumulate ? *out + (float)value : (float)value;
}

/* The larger of a and b, NaN if either is (fmax drops NaN). */
static double max_or_nan(double a, double b) { return a != a ? a : b != b || b > a ? b : a; }

/* Adds to s->heads the attention of observation rows [r0, r1) of the domain (one block). */
static void add_block(const score_job_t *job, const score_scratch_t *s, const kvc_domain_t *dom, int32_t h,
                      int64_t r0, int64_t r1) {
  const kvc_op_args_t *args = job->args;
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t G = plan->group_size, D = plan->head_dim, V = job->shape.lanes, rows = (int32_t)(r1 - r0);
  score_block_t blk;
  blk.cache = args->cache;
  blk.key_offset = s->key_offset;
  blk.dim = D;
  blk.group = G;
  blk.scale = plan->scale * kvc_key_scale(plan, h); /* FP8 keys' scale folded in (1 for other dtypes: exact) */
  blk.lo = dom->start;
  blk.keys = plan->obs_pos[r1 - 1] + 1 - dom->start; /* rows ascend: the last sees the most */
  blk.scored = dom->scored_end - dom->start;
  blk.rows_per_head = rows;
  blk.vectors = (G * rows + V - 1) / V;
  blk.lse = args->lse;
  blk.qpack = s->qpack;
  blk.tile = s->tile;
  blk.logits = s->logits;
  blk.logits_keys = job->shape.logits_keys;
  blk.lane_pos = s->lane_pos;
  blk.vector_keys = s->vector_keys;
  blk.lane_max = s->lane_max;
  blk.lane_bad = s->lane_bad;
  blk.lane_lse = s->lane_lse;
  blk.heads = s->heads;
  blk.heads_stride = plan->max_seq_len;
  for (int32_t v = 0; v < blk.vectors; ++v) {
    int32_t keys = 0;
    for (int32_t l = 0; l < V; ++l) {
      const int32_t p = v * V + l, lane = v * V + l;
      float *q = s->qpack + (int64_t)v * D * V + l; /* element d at q[d * V] */
      s->lane_max[lane] = -INFINITY;
      s->lane_bad[lane] = 0.0f;
      if (p < G * rows) {
        const int64_t r = r0 + p % rows, head = (int64_t)h * G + p / rows;
        const int32_t pos = plan->obs_pos[r];
        s->lane_pos[lane] = pos;
        s->lane_lse[lane] = args->lse ? args->lse[r * plan->num_q_heads + head] : 0.0f;
        for (int32_t d = 0; d < D; ++d)
          q[(int64_t)d * V] = (float)kvc_load_as_double(args->queries, plan->query_dtype, (r * plan->num_q_heads + head) * D + d);
        keys = pos + 1 - dom->start > keys ? pos + 1 - dom->start : keys;
      } else {
        s->lane_pos[lane] = -1;
        s->lane_lse[lane] = 0.0f;
        for (int32_t d = 0; d < D; ++d) q[(int64_t)d * V] = 0.0f;
      }
    }
    s->vector_keys[v] = keys;
  }
  run_block(job->shape.isa, &blk);
}

/* s->heads[gi][j - start] = sum over the domain's queries that see key j of a_gij, divided by
 * their number, for each q head g = h * G + gi and the scored keys [start, scored_end). SNAPKV:
 * every query sees every scored key (they lie before the first query), so it is the plain mean;
 * TOVA: the one query's attention. */
static void group_attention(const score_job_t *job, const score_scratch_t *s, int32_t b, const kvc_domain_t *dom,
                            int32_t h) {
  const kvc_plan_view_t *plan = &job->args->plan;
  const kvc_paged_kv_t *cache = job->args->cache;
  const int32_t G = plan->group_size, L = plan->max_seq_len, scored = dom->scored_end - dom->start;
  const int32_t *pages = kvc_seq_pages(cache, b);
  for (int32_t gi = 0; gi < G; ++gi)
    for (int32_t i = 0; i < scored; ++i) s->heads[(int64_t)gi * L + i] = 0.0;
  for (int32_t t = dom->start; t <= plan->obs_pos[dom->obs_end - 1]; ++t)
    s->key_offset[t - dom->start] = kvc_slot_offset(cache, kvc_page_of(cache, pages, b, t), t, h);
  /* blocks of equal size (a multiple of whole_rows where that fits), at most block_rows each */
  const int64_t rows = dom->obs_end - dom->obs_begin, blocks = (rows + job->shape.block_rows - 1) / job->shape.block_rows;
  int64_t step = (rows + blocks - 1) / blocks;
  step = (step + job->shape.whole_rows - 1) / job->shape.whole_rows * job->shape.whole_rows;
  step = step < job->shape.block_rows ? step : job->shape.block_rows;
  for (int64_t r0 = dom->obs_begin; r0 < dom->obs_end; r0 += step) add_block(job, s, dom, h, r0, r0 + step < dom->obs_end ? r0 + step : dom->obs_end);
  /* Queries are ascending, so those that see key j are a suffix; the last one is the domain's
   * last token, so every key has at least one. */
  int64_t first_seeing = dom->obs_begin;
  for (int32_t j = dom->start; j < dom->scored_end; ++j) {
    while (plan->obs_pos[first_seeing] < j) ++first_seeing;
    for (int32_t gi = 0; gi < G; ++gi) s->heads[(int64_t)gi * L + j - dom->start] /= (double)(dom->obs_end - first_seeing);
  }
}

/* SNAPKV pooling of x[0 .. len) (stride 1, kernel/2 zero padding each side): AVG divides by the
 * kernel, MAX ignores the padding and propagates NaN. The range is the domain's scored keys:
 * nothing leaks across. */
static void pool_row(const double *x, int32_t len, int32_t kernel, kvc_pool_t pool, double *out) {
  const int32_t half = kernel / 2;
  for (int32_t j = 0; j < len; ++j) {
    const int32_t from = j - half > 0 ? j - half : 0, to = j + half < len - 1 ? j + half : len - 1;
    double acc = pool == KVC_POOL_MAX ? x[from] : 0.0;
    for (int32_t i = from; i <= to; ++i) acc = pool == KVC_POOL_MAX ? max_or_nan(acc, x[i]) : acc + x[i];
    out[j] = pool == KVC_POOL_MAX ? acc : acc / kernel;
  }
}

/* The attention of KV head h's q heads (pooled for SNAPKV), reduced over the group into
 * s->reduced: MAX keeps the maximum (NaN if any is), MEAN the sum (the caller divides). */
static void reduce_group(const score_job_t *job, const score_scratch_t *s, int32_t b, const kvc_domain_t *dom,
                         int32_t h, kvc_reduce_t reduce) {
  const kvc_plan_view_t *plan = &job->args->plan;
  const int32_t scored = dom->scored_end - dom->start;
  group_attention(job, s, b, dom, h);
  for (int32_t gi = 0; gi < plan->group_size; ++gi) {
    const double *x = s->heads + (int64_t)gi * plan->max_seq_len;
    if (plan->method == KVC_SCORE_SNAPKV && plan->pool_kernel > 1) {
      pool_row(x, scored, plan->pool_kernel, plan->pool, s->pooled);
      x = s->pooled;
    }
    for (int32_t i = 0; i < scored; ++i)
      s->reduced[i] = gi == 0 ? x[i] : reduce == KVC_REDUCE_MAX ? max_or_nan(s->reduced[i], x[i]) : s->reduced[i] + x[i];
  }
}

/* -k_scale * ||k|| (k_scale: FP8 keys' scale, else 1), computed in double (no overflow for any
 * finite key), at least -FLT_MAX when finite. */
static double key_norm_score(const kvc_paged_kv_t *cache, int64_t at, int32_t dim, float k_scale) {
  float key[256]; /* head_dim <= 256 (plan validation) */
  widen_portable(cache->k, cache->dtype, at, dim, key);
  double squares = 0.0;
  for (int32_t d = 0; d < dim; ++d) squares += (double)key[d] * (double)key[d];
  const double score = -(double)k_scale * sqrt(squares);
  return isfinite(squares) && score < -FLT_MAX ? -FLT_MAX : score;
}

/* Binary search: the sequence whose domains include domain d. */
static int32_t sequence_of_domain(const kvc_plan_view_t *plan, int32_t d) {
  int32_t lo = 0, hi = plan->batch - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (plan->domain_indptr[mid] <= d) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* Scores of domain first_domain + item / heads, KV head item % heads (TOVA: its q heads' sum). */
static void score_item(void *arg, int64_t item, int32_t thread) {
  const score_job_t *job = (const score_job_t *)arg;
  const kvc_op_args_t *args = job->args;
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t heads = plan->num_kv_heads, h = (int32_t)(item % heads), d = job->first_domain + (int32_t)(item / heads);
  const int32_t b = sequence_of_domain(plan, d), acc = args->accumulate;
  const kvc_domain_t *dom = &plan->domains[d];
  score_scratch_t scratch, *s = &scratch;
  if (is_attention_method(plan->method)) {
    kvc_carver_t own = {job->scratch + (size_t)thread * job->scratch_bytes, 0};
    carve_scratch(&own, plan, &job->shape, s);
  }
  float *row = args->scores + kvc_score_row(plan, b, h);
  if (dom->scored_end == dom->start) return; /* e.g. SNAPKV with a window covering the domain */
  switch (plan->method) {
    case KVC_SCORE_SNAPKV:
    case KVC_SCORE_H2O: {
      reduce_group(job, s, b, dom, h, plan->group_reduce);
      const double divisor = plan->group_reduce == KVC_REDUCE_MEAN ? plan->group_size : 1;
      for (int32_t j = dom->start; j < dom->scored_end; ++j) store_score(row + j, s->reduced[j - dom->start] / divisor, acc);
      break;
    }
    case KVC_SCORE_TOVA: /* one selection for all KV heads: the caller adds the heads' sums */
      reduce_group(job, s, b, dom, h, KVC_REDUCE_MEAN);
      memcpy(job->tova + (int64_t)h * plan->max_seq_len + dom->start, s->reduced,
             sizeof(double) * (size_t)(dom->scored_end - dom->start));
      break;
    case KVC_SCORE_KNORM: {
      const int32_t *pages = kvc_seq_pages(args->cache, b);
      for (int32_t j = dom->start; j < dom->scored_end; ++j)
        store_score(row + j,
                    key_norm_score(args->cache, kvc_slot_offset(args->cache, kvc_page_of(args->cache, pages, b, j), j, h),
                                   plan->head_dim, kvc_key_scale(plan, h)),
                    acc);
      break;
    }
    case KVC_SCORE_STREAMING:
      for (int32_t j = dom->start; j < dom->scored_end; ++j)
        store_score(row + j, plan->span_local ? (double)(j - dom->start) / (double)(dom->end - dom->start) : (double)j, acc);
      break;
  }
}

/* Runs items [0, count) on the context's threads (or this one). */
static void run_items(const kvc_op_args_t *args, score_job_t *job, int64_t count) {
  const int32_t threads = kvc_workers_threads(args->workers) < args->plan.cpu_threads ? kvc_workers_threads(args->workers)
                                                                               : args->plan.cpu_threads;
  if (threads > 1 && count > 1) {
    kvc_workers_run(args->workers, threads, count, score_item, job);
  } else {
    for (int64_t i = 0; i < count; ++i) score_item(job, i, 0);
  }
}

/* +inf for keys [from, to) of every KV head's row; rows are `stride` floats apart. */
static void store_unscored(float *seq_rows, int64_t stride, int32_t heads, int32_t from, int32_t to, int accumulate) {
  for (int32_t h = 0; h < heads; ++h)
    for (int32_t j = from; j < to; ++j) store_score(seq_rows + (int64_t)h * stride + j, INFINITY, accumulate);
}

/* One layer: args->cache's K pool, args->queries and args->lse into args->scores. */
static kvc_status_t score_layer(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t *plan = &args->plan;
  score_job_t job = {args, {ISA_PORTABLE, 0, 0, 0, 0, 0}, NULL, 0, NULL, 0};
  if (is_attention_method(plan->method)) { /* the workspace comment at the top */
    job.shape = shape_of(plan);
    if (plan->method == KVC_SCORE_TOVA)
      job.tova = (double *)kvc_carve(ws, sizeof(double) * (size_t)plan->num_kv_heads * (size_t)plan->max_seq_len);
    kvc_carver_t one = {NULL, 0};
    score_scratch_t unused;
    carve_scratch(&one, plan, &job.shape, &unused);
    job.scratch_bytes = (one.used + KVC_WORKSPACE_ALIGN - 1) / KVC_WORKSPACE_ALIGN * KVC_WORKSPACE_ALIGN;
    job.scratch = (char *)kvc_carve(ws, job.scratch_bytes * (size_t)plan->cpu_threads);
  }
  /* The sizing call is told apart by its missing scores, not by ws->base: KNORM and STREAMING
   * need no workspace, which may then legitimately be NULL when the op runs. */
  if (!args->scores) return KVC_SUCCESS;

  const int32_t heads = plan->num_kv_heads;
  for (int32_t b = 0; b < plan->batch; ++b) { /* keys outside every domain (and SNAPKV/TOVA's own) */
    const int32_t n = plan->seq_lens[b];
    const int64_t stride = kvc_score_row_stride(plan, b);
    float *seq_rows = args->scores + kvc_score_row(plan, b, 0);
    int32_t covered = 0; /* domains are sorted and disjoint: keys between them are unscored */
    for (int32_t d = plan->domain_indptr[b]; d < plan->domain_indptr[b + 1]; ++d) {
      store_unscored(seq_rows, stride, heads, covered, plan->domains[d].start, args->accumulate);
      store_unscored(seq_rows, stride, heads, plan->domains[d].scored_end, plan->domains[d].end, args->accumulate);
      covered = plan->domains[d].end;
    }
    store_unscored(seq_rows, stride, heads, covered, n, args->accumulate);
  }
  if (plan->method != KVC_SCORE_TOVA) {
    run_items(args, &job, (int64_t)plan->domain_indptr[plan->batch] * heads);
    return KVC_SUCCESS;
  }
  for (int32_t b = 0; b < plan->batch; ++b) { /* TOVA: the mean over every q head, in every KV head's row */
    const int32_t L = plan->max_seq_len;
    const int64_t stride = kvc_score_row_stride(plan, b);
    float *seq_rows = args->scores + kvc_score_row(plan, b, 0);
    job.first_domain = plan->domain_indptr[b];
    run_items(args, &job, (int64_t)(plan->domain_indptr[b + 1] - plan->domain_indptr[b]) * heads);
    for (int32_t d = plan->domain_indptr[b]; d < plan->domain_indptr[b + 1]; ++d)
      for (int32_t j = plan->domains[d].start; j < plan->domains[d].scored_end; ++j) {
        double sum = job.tova[j];
        for (int32_t h = 1; h < heads; ++h) sum += job.tova[(int64_t)h * L + j];
        for (int32_t h = 0; h < heads; ++h)
          store_score(seq_rows + (int64_t)h * stride + j, sum / plan->num_q_heads, args->accumulate);
      }
  }
  return KVC_SUCCESS;
}

/* The layers one after another on the same workspace (it scales with nothing): layer l's pools,
 * queries and lse from the host arrays of args->layers, its scores stacked at l * score_elems. */
kvc_status_t kvc_score_cpu(const kvc_op_args_t *args, kvc_carver_t *ws) {
  if (!args->layers) return score_layer(args, ws);
  const kvc_layers_t *layers = args->layers;
  kvc_carver_t layer_ws = *ws;
  for (int32_t l = 0; l < args->num_layers; ++l) {
    kvc_paged_kv_t cache = *args->cache;
    cache.k = layers->k[l];
    cache.v = layers->v[l];
    kvc_op_args_t layer = *args;
    layer.cache = &cache;
    layer.queries = layers->queries ? layers->queries[l] : NULL;
    layer.lse = layers->lse ? layers->lse[l] : NULL;
    layer.scores = args->scores ? args->scores + l * args->plan.score_elems : NULL;
    layer.num_layers = 1;
    layer.layers = NULL;
    layer_ws = *ws;
    kvc_status_t status = score_layer(&layer, &layer_ws);
    if (status != KVC_SUCCESS) return status;
  }
  *ws = layer_ws;
  return KVC_SUCCESS;
}
