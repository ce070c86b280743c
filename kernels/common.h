/*
 * common.h - small helpers shared by the CPU ops (C), the CUDA ops and the tests: page mapping,
 * dtype sizes and host-side conversions, and the order-preserving selection key. Plain C99 that
 * also compiles as C++ and CUDA (functions are host+device there).
 */
#ifndef KVC_COMMON_H
#define KVC_COMMON_H

#include <stdint.h>
#include <string.h>

#include "kvcompress.h"
#include "plan_view.h"

#if defined(__CUDACC__)
#define KVC_HD __host__ __device__ inline
#elif defined(__cplusplus)
#define KVC_HD inline /* includes the SIMT emulator build, where kernels are plain C++ */
#else
#define KVC_HD static inline
#endif

KVC_HD int kvc_dtype_size(kvc_dtype_t dtype) {
  return dtype == KVC_DTYPE_F32 ? 4 : dtype == KVC_DTYPE_FP8_E4M3 ? 1 : 2;
}

/* The scale of KV head h's keys (FP8 caches; 1 for the others). The plan stores one scale unless
 * the desc gave one per head, so its size follows what the caller passed, not num_kv_heads. */
KVC_HD float kvc_key_scale(const kvc_plan_view_t *plan, int32_t h) {
  return plan->k_scales[plan->k_scales_per_head ? h : 0];
}

/* Span row of (sequence b, KV head h): b, or b * num_kv_heads + h with per-head spans. */
KVC_HD int32_t kvc_span_row(const kvc_plan_view_t *plan, int32_t b, int32_t h) {
  return b * plan->span_heads + h % plan->span_heads;
}

/* Start of score row (b, h) in one layer's score layout (kvcompress.h, "Layouts"). */
KVC_HD int64_t kvc_score_row(const kvc_plan_view_t *plan, int32_t b, int32_t h) {
  return plan->score_row_capacity
             ? ((int64_t)b * plan->num_kv_heads + h) * plan->score_row_capacity
             : plan->num_kv_heads * plan->token_offsets[b] + (int64_t)h * plan->seq_lens[b];
}

/* Distance between score rows (b, h) and (b, h + 1): the capacity, or n_b when packed. */
KVC_HD int64_t kvc_score_row_stride(const kvc_plan_view_t *plan, int32_t b) {
  return plan->score_row_capacity ? plan->score_row_capacity : plan->seq_lens[b];
}

/* Number of keep[0, k) below `bound` (keep ascending): retention's counts, where a span lands after
 * compaction (kvc_spans_after_compaction), and scoring's observation rows of a key tile. */
KVC_HD int32_t kvc_count_below(const int32_t *keep, int32_t k, int32_t bound) {
  int32_t lo = 0, hi = k;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (keep[mid] < bound) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/* Count-layout copies of a span row: num_kv_heads with per-sequence spans (row (b, h) at
 * num_kv_heads * span_indptr[b] + h * spans_b), 1 with per-head spans (row at span_indptr[r]). */
KVC_HD int32_t kvc_count_heads(const kvc_plan_view_t *plan) { return plan->num_kv_heads / plan->span_heads; }

/* Pages that n tokens fill, in int64: n + page_size - 1 overflows int32 for long pages. */
KVC_HD int64_t kvc_pages_needed(int64_t n, int32_t page_size) { return (n + page_size - 1) / page_size; }

/* Page list of sequence b (NULL: sequence b is page b). */
KVC_HD const int32_t *kvc_seq_pages(const kvc_paged_kv_t *c, int32_t b) {
  if (!c->page_table) return 0;
  return c->page_indptr ? c->page_table + c->page_indptr[b] : c->page_table + (int64_t)b * c->max_pages;
}

KVC_HD int32_t kvc_page_of(const kvc_paged_kv_t *c, const int32_t *pages, int32_t b, int32_t t) {
  return pages ? pages[t / c->page_size] : b;
}

/* The page of token t of sequence b, or -1 where the table cannot hold it: a CSR list shorter than
 * the token needs or with a negative offset, or an id outside [0, num_pages). The CUDA ops guard
 * with it because they cannot validate tables on the host (the CPU backend validates up front). */
KVC_HD int32_t kvc_page_checked(const kvc_paged_kv_t *c, int32_t b, int32_t t) {
  const int32_t i = t / c->page_size;
  int32_t page;
  if (!c->page_table) {
    page = b;
  } else if (c->page_indptr) {
    const int32_t first = c->page_indptr[b];
    if (first < 0 || i >= (int64_t)c->page_indptr[b + 1] - first) return -1; /* int64: no overflow */
    page = c->page_table[first + i];
  } else {
    page = c->page_table[(int64_t)b * c->max_pages + i];
  }
  return page >= 0 && page < c->num_pages ? page : -1;
}

/* Element offset of (token t of a sequence on `page`, head h, dim 0) in the k or v pool.
 * Cannot overflow for the arguments the ops pass: page in [0, num_pages) (validated on the host or
 * guarded by kvc_page_checked), t % page_size in [0, page_size), h in [0, num_kv_heads), strides
 * > 0. Each product is then at most its axis' (count - 1) * stride and the sum at most the pool
 * extent minus head_dim, which the host (host/dispatch.c, check_layout) proved fits int64 — also
 * in bytes, so offset * element size and offset + a column below head_dim fit as well. */
KVC_HD int64_t kvc_slot_offset(const kvc_paged_kv_t *c, int32_t page, int32_t t, int32_t h) {
  return (int64_t)page * c->stride_page + (int64_t)(t % c->page_size) * c->stride_token +
         (int64_t)h * c->stride_head;
}

/* The packed q row (kvc_gather_queries) holding position p of a sequence of n tokens whose packed
 * rows are [start, end) of `tokens`: they hold its last end - start positions. -1 when they cannot
 * hold p: a negative or reversed range, a range past `tokens`, more rows than the sequence has
 * tokens, or p before the first packed position. */
KVC_HD int64_t kvc_packed_row(int32_t n, int32_t start, int32_t end, int64_t tokens, int32_t p) {
  const int64_t len = (int64_t)end - start;
  if (start < 0 || len < 0 || end > tokens || len > n || p < n - len) return -1;
  return start + (p - (n - len));
}

/* ---- K and V rows of one layout: do they overlap? ----------------------------------------------
 * The rows (page, slot, head) of a pool start at the offsets x_0 a_0 + x_1 a_1 + x_2 a_2 (a_i the
 * strides, 0 <= x_i < c_i). A K row and a V row overlap iff |delta - dist| < head_dim for delta a
 * difference of two row offsets and dist = |v - k| in elements. host/dispatch.c checks it for a
 * descriptor's pools, CUDA compaction for each layer's pools of a layer-batched call. */

/* One axis of the pools (page, slot or head): `count` positions `stride` elements apart. */
typedef struct {
  int64_t stride, count;
} kvc_pool_axis_t;

/* The axes with count >= 2 by increasing stride (the first n; the rest are padding of count 1),
 * reach[i]: the largest |x_0 a_0 + ... + x_{i-1} a_{i-1}| over |x_j| < c_j, reach[0] = 0. */
typedef struct {
  kvc_pool_axis_t axis[3];
  int64_t reach[4];
  int n;
} kvc_pool_lattice_t;

/* The lattice of a layout (num_kv_heads heads). Needs the extent to fit int64 (checked first by
 * the host), so no sum overflows. */
KVC_HD kvc_pool_lattice_t kvc_pool_lattice(const kvc_paged_kv_t *c, int32_t num_kv_heads) {
  kvc_pool_lattice_t L;
  const kvc_pool_axis_t axes[3] = {{c->stride_page, c->num_pages}, {c->stride_token, c->page_size},
                                   {c->stride_head, num_kv_heads}};
  L.n = 0;
  for (int i = 0; i < 3; ++i) {
    if (axes[i].count < 2) continue; /* a single position: no stride to step */
    int j = L.n++;
    for (; j > 0 && L.axis[j - 1].stride > axes[i].stride; --j) L.axis[j] = L.axis[j - 1];
    L.axis[j] = axes[i];
  }
  L.reach[0] = 0;
  for (int i = 0; i < 3; ++i) {
    if (i >= L.n) L.axis[i].stride = L.reach[i] + 1, L.axis[i].count = 1; /* padding: x = 0 only */
    L.reach[i + 1] = L.reach[i] + (L.axis[i].count - 1) * L.axis[i].stride;
  }
  return L;
}

/* [lo, hi] clamped to [-reach[level], reach[level]]; 0 when that is empty. */
KVC_HD int kvc_lattice_clamp(const kvc_pool_lattice_t *L, int level, int64_t *lo, int64_t *hi) {
  const int64_t r = L->reach[level];
  if (*lo > r || *hi < -r) return 0;
  if (*lo < -r) *lo = -r;
  if (*hi > r) *hi = r;
  return 1;
}

/* The x of axis level - 1 with x * a in [lo - r, hi + r] (r = reach[level - 1] < a: the bounds are
 * the truncated quotients moved by at most one, compared, never added, so nothing overflows),
 * within |x| < count. */
KVC_HD void kvc_lattice_steps(const kvc_pool_lattice_t *L, int level, int64_t lo, int64_t hi, int64_t *x_lo,
                              int64_t *x_hi) {
  const int64_t a = L->axis[level - 1].stride, r = L->reach[level - 1], c = L->axis[level - 1].count;
  const int64_t ql = lo / a, rl = lo % a, qh = hi / a, rh = hi % a;
  *x_lo = ql + (rl > r ? 1 : rl > r - a ? 0 : -1);
  *x_hi = qh + (rh >= a - r ? 1 : rh >= -r ? 0 : -1);
  if (*x_lo < 1 - c) *x_lo = 1 - c;
  if (*x_hi > c - 1) *x_hi = c - 1;
}

/* Whether the row-offset differences {sum_i x_i a_i : |x_i| < c_i} meet [lo, hi]. Exact, and cheap
 * once the strides have passed the non-overlap check (a_i >= head_dim + reach[i], so reach[i] <
 * a_i): for an interval narrower than 2 head_dim at most two x are possible at each level, at most
 * 8 leaves. Three nested levels (padding axes take x = 0), no recursion: it also runs in a kernel. */
KVC_HD int kvc_lattice_meets(const kvc_pool_lattice_t *L, int64_t lo, int64_t hi) {
  int64_t x2_lo, x2_hi, x1_lo, x1_hi, x0_lo, x0_hi;
  if (!kvc_lattice_clamp(L, 3, &lo, &hi)) return 0;
  kvc_lattice_steps(L, 3, lo, hi, &x2_lo, &x2_hi);
  for (int64_t x2 = x2_lo; x2 <= x2_hi; ++x2) {
    int64_t lo2 = lo - x2 * L->axis[2].stride, hi2 = hi - x2 * L->axis[2].stride;
    if (!kvc_lattice_clamp(L, 2, &lo2, &hi2)) continue;
    kvc_lattice_steps(L, 2, lo2, hi2, &x1_lo, &x1_hi);
    for (int64_t x1 = x1_lo; x1 <= x1_hi; ++x1) {
      int64_t lo1 = lo2 - x1 * L->axis[1].stride, hi1 = hi2 - x1 * L->axis[1].stride;
      if (!kvc_lattice_clamp(L, 1, &lo1, &hi1)) continue;
      kvc_lattice_steps(L, 1, lo1, hi1, &x0_lo, &x0_hi);
      for (int64_t x0 = x0_lo; x0 <= x0_hi; ++x0) {
        int64_t lo0 = lo1 - x0 * L->axis[0].stride, hi0 = hi1 - x0 * L->axis[0].stride;
        if (kvc_lattice_clamp(L, 0, &lo0, &hi0) && lo0 <= 0 && 0 <= hi0) return 1;
      }
    }
  }
  return 0;
}

/* Whether some K row overlaps some V row, k and v aligned to their elements; extent_bytes is the
 * pool's extent. The set of deltas is symmetric, so the sign of v - k does not matter. */
KVC_HD int kvc_kv_rows_overlap(const kvc_pool_lattice_t *L, const void *k, const void *v, int64_t extent_bytes,
                               int64_t elem_bytes, int64_t head_dim) {
  const uintptr_t pk = (uintptr_t)k, pv = (uintptr_t)v;
  const uintptr_t dist = pk > pv ? pk - pv : pv - pk;
  if (dist >= (uintptr_t)extent_bytes) return 0; /* disjoint extents: separate pools or halves */
  const int64_t elems = (int64_t)dist / elem_bytes, reach = L->reach[3];
  if (elems - (head_dim - 1) > reach) return 0;
  return kvc_lattice_meets(L, elems - (head_dim - 1), elems > reach - (head_dim - 1) ? reach : elems + head_dim - 1);
}

/* Selection key: larger = kept first. Orders by score (NaN below -inf, -0 == +0) in the high 32
 * bits and by position in the low 32 bits, so equal scores prefer the later token. */
KVC_HD uint32_t kvc_score_bits(float s) {
  uint32_t u;
  if (s != s) return 0u;  /* NaN: below everything */
  if (s == 0.0f) s = 0.0f; /* fold -0 into +0 */
  memcpy(&u, &s, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

KVC_HD uint64_t kvc_select_key(float s, int32_t position) {
  return ((uint64_t)kvc_score_bits(s) << 32) | (uint32_t)position;
}

KVC_HD int kvc_is_protected(const uint32_t *bits, int64_t word0, int32_t t) {
  return (int)((bits[word0 + (t >> 5)] >> (t & 31)) & 1u);
}

/* Host-side conversions (the CUDA ops use the toolkit's intrinsics instead). */
static inline float kvc_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  float f;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    /* zero or subnormal: value = man * 2^-24 */
    f = (float)man * 5.9604644775390625e-08f;
    return sign ? -f : f;
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline float kvc_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* An fp8 e4m3 byte (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no inf; S.1111.111 is
 * NaN) as float, exactly. Normal numbers get float's exponent field directly (e + 120) and their
 * mantissa bits on top; subnormals (exponent 0) are m * 2^-9, an exact integer-to-float product,
 * so no float subnormal is ever formed (a flush-to-zero build computes the same). Host and device. */
KVC_HD float kvc_fp8_e4m3_to_f32(uint8_t x) {
  const uint32_t sign = (uint32_t)(x & 0x80u) << 24, e = (x >> 3) & 0xfu, m = x & 0x7u;
  float f;
  if (e == 0) {
    f = (float)m * 0.001953125f; /* 2^-9 */
    return sign ? -f : f;
  }
  const uint32_t u = sign | ((e == 15 && m == 7) ? 0x7fc00000u : ((e + 120u) << 23) | (m << 20));
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Element i of a cache or query array as double. */
static inline double kvc_load_as_double(const void *base, kvc_dtype_t dtype, int64_t i) {
  switch (dtype) {
    case KVC_DTYPE_F32: return ((const float *)base)[i];
    case KVC_DTYPE_F16: return kvc_f16_to_f32(((const uint16_t *)base)[i]);
    case KVC_DTYPE_BF16: return kvc_bf16_to_f32(((const uint16_t *)base)[i]);
    default: return kvc_fp8_e4m3_to_f32(((const uint8_t *)base)[i]);
  }
}

/* The cache descriptor with its page table replaced by the destination table of an out-of-place
 * compaction (kvc_compact_into): the same pools and layout, so kvc_seq_pages, kvc_page_checked and
 * kvc_slot_offset address the destination pages. */
KVC_HD kvc_paged_kv_t kvc_with_table(const kvc_paged_kv_t *c, const kvc_page_table_t *table) {
  kvc_paged_kv_t out = *c;
  out.page_table = table->page_table;
  out.page_indptr = table->page_indptr;
  out.max_pages = table->max_pages;
  return out;
}

#endif /* KVC_COMMON_H */
