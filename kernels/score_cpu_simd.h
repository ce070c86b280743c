/*
 * score_cpu_simd.h - the inner loops of CPU attention scoring for one instruction set: a block of
 * (observation row, q head) pairs of one domain and KV head against every key they see. Only
 * kernels/score_cpu.c includes it, once per instruction set it builds, after defining
 *   SIMD(name)          name with the instruction set's suffix
 *   SIMD_TARGET         the function attribute that enables the instruction set (may be empty)
 *   SIMD_LANES          floats per vector: 16 (AVX-512), 8 (AVX2), 4 (portable)
 *   SIMD_ACCUMULATORS   vector accumulators of the logit micro-kernel (24 with 32 registers, 12 with 16)
 *   SIMD_FMA(a, b, c)   a * b + c on vectors, rounded once (the portable build may round twice)
 *   SIMD_SPLAT(x), SIMD_SPLAT_INT(x)  a float / int32 vector of x in every lane
 *   SIMD_WIDEN_LOW(v), SIMD_WIDEN_HIGH(v)  the low / high half of a float vector as doubles
 *   SIMD_SUM_HALF(x)    the sum of a vector of LANES / 2 doubles (a fixed order)
 * and score_block_t, KEY_TILE and KEY_GROUP (score_cpu.c). Every build computes the same thing in
 * the same order; only the vector width, and so the order of the lane sums, differs.
 *
 * Lanes are pairs: vector v holds pairs v * LANES .. v * LANES + LANES - 1 of the block, in
 * (q head, row) order, rows ascending; padding lanes (past the last pair) have position -1 and see
 * nothing. A lane sees key j iff j <= its position (all keys of the domain start at or after lo).
 *
 * 1. Logits: keys are converted to float once per tile (KEY_TILE keys) and every vector of the
 *    block takes its logits against the tile, SIMD_ACCUMULATORS at a time (nv vectors x nk keys,
 *    each key broadcast, each dot product an FMA chain over d from 0: lane results do not depend
 *    on the vector width). scale * dot is stored per (vector, key) in the logits buffer; the
 *    running maximum and a non-finite flag (sum of 0 * logit: NaN iff a seen logit is NaN or
 *    +-inf) are kept per lane over the keys the lane sees.
 * 2. Per vector: p = exp(logit - max) in float (0 below e^-87.3, where float runs out), summed in
 *    double (per lane); a lane with a non-finite logit gets NaN for every key it sees. With the engine's
 *    normaliser (lse) p = exp(logit - lse) directly and step 2 is skipped.
 * 3. Per vector, per scored key it sees: sum over the lanes of each q head of p * (1 / sum), in
 *    double, added to that head's row (vectors ascending, so the order is fixed).
 */

typedef float SIMD(vf) __attribute__((vector_size(SIMD_LANES * 4)));
typedef int32_t SIMD(vi) __attribute__((vector_size(SIMD_LANES * 4)));
typedef uint32_t SIMD(vu) __attribute__((vector_size(SIMD_LANES * 4)));
typedef uint16_t SIMD(vh) __attribute__((vector_size(SIMD_LANES * 2)));
typedef uint8_t SIMD(vb) __attribute__((vector_size(SIMD_LANES)));
typedef double SIMD(vd) __attribute__((vector_size(SIMD_LANES * 4))); /* LANES / 2 doubles */

#define SIMD_INLINE static inline __attribute__((always_inline)) SIMD_TARGET

SIMD_INLINE SIMD(vf) SIMD(load)(const float *p) {
  SIMD(vf) v;
  memcpy(&v, p, sizeof v);
  return v;
}
SIMD_INLINE void SIMD(store)(float *p, SIMD(vf) v) { memcpy(p, &v, sizeof v); }
SIMD_INLINE SIMD(vf) SIMD(splat)(float x) { return (SIMD(vf))SIMD_SPLAT(x); }
SIMD_INLINE SIMD(vi) SIMD(splat_int)(int32_t x) { return (SIMD(vi))SIMD_SPLAT_INT(x); }
/* mask lanes (all ones) take a, the others b */
SIMD_INLINE SIMD(vf) SIMD(select)(SIMD(vi) mask, SIMD(vf) a, SIMD(vf) b) {
  return (SIMD(vf))(((SIMD(vi))a & mask) | ((SIMD(vi))b & ~mask));
}
SIMD_INLINE SIMD(vf) SIMD(keep)(SIMD(vi) mask, SIMD(vf) a) { return (SIMD(vf))((SIMD(vi))a & mask); }

/* e^x, x <= 88.7 (larger: +inf); relative error ~2 float ulps; 0 below -87.33 (e^x < FLT_MIN).
 * NaN lanes give a finite garbage value: callers mask or poison them. Cody-Waite reduction
 * x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-7 polynomial for e^r. */
SIMD_INLINE SIMD(vf) SIMD(exp)(SIMD(vf) x) {
  const SIMD(vf) lo = SIMD(splat)(-87.5f), hi = SIMD(splat)(88.7f), round = SIMD(splat)(12582912.0f); /* 1.5 * 2^23 */
  const SIMD(vi) underflow = x >= -87.33f, overflow = x > 88.7f;
  x = SIMD(select)(x > lo, x, lo);
  x = SIMD(select)(x < hi, x, hi);
  const SIMD(vf) n = SIMD_FMA(x, SIMD(splat)(1.44269504088896341f), round) - round;
  SIMD(vf) r = SIMD_FMA(n, SIMD(splat)(-0.693359375f), x);
  r = SIMD_FMA(n, SIMD(splat)(2.12194440e-4f), r);
  SIMD(vf) p = SIMD(splat)(1.9875691500e-4f);
  p = SIMD_FMA(p, r, SIMD(splat)(1.3981999507e-3f));
  p = SIMD_FMA(p, r, SIMD(splat)(8.3334519073e-3f));
  p = SIMD_FMA(p, r, SIMD(splat)(4.1665795894e-2f));
  p = SIMD_FMA(p, r, SIMD(splat)(1.6666665459e-1f));
  p = SIMD_FMA(p, r, SIMD(splat)(5.0000001201e-1f));
  p = SIMD_FMA(p, r * r, r) + 1.0f;
  const SIMD(vi) bits = (__builtin_convertvector(n, SIMD(vi)) + 127) << 23;
  const SIMD(vf) e = p * (SIMD(vf))bits;
  return SIMD(select)(overflow, SIMD(splat)(INFINITY), SIMD(keep)(underflow, e));
}

/* Sum over lanes first .. last - 1 of p * inv (inv: the low and high halves), in double: the
 * whole vector in SIMD_SUM_HALF's order, a part of it lane by lane. */
SIMD_INLINE double SIMD(lane_sum)(SIMD(vf) p, SIMD(vd) inv_low, SIMD(vd) inv_high, int32_t first, int32_t last) {
  const SIMD(vd) low = SIMD_WIDEN_LOW(p) * inv_low, high = SIMD_WIDEN_HIGH(p) * inv_high;
  if (first == 0 && last == SIMD_LANES) return SIMD_SUM_HALF(low + high);
  double t[SIMD_LANES], sum = 0.0;
  memcpy(t, &low, sizeof low);
  memcpy(t + SIMD_LANES / 2, &high, sizeof high);
  for (int32_t i = first; i < last; ++i) sum += t[i];
  return sum;
}

/* count elements of `in` (element offset `at` of a cache pool or query array) as floats into out,
 * exactly (every f16, bf16 and e4m3 value is a float). */
SIMD_INLINE void SIMD(widen)(const void *in, kvc_dtype_t dtype, int64_t at, int32_t count, float *restrict out) {
  int32_t d = 0;
  switch (dtype) {
    case KVC_DTYPE_F32:
      memcpy(out, (const float *)in + at, sizeof(float) * (size_t)count);
      return;
    case KVC_DTYPE_BF16:
      for (; d + SIMD_LANES <= count; d += SIMD_LANES) {
        SIMD(vh) h;
        memcpy(&h, (const uint16_t *)in + at + d, sizeof h);
        SIMD(store)(out + d, (SIMD(vf))(__builtin_convertvector(h, SIMD(vu)) << 16));
      }
      for (; d < count; ++d) out[d] = kvc_bf16_to_f32(((const uint16_t *)in)[at + d]);
      return;
    case KVC_DTYPE_F16:
      /* exact: magnitude bits moved to float position and scaled by 2^112 (subnormals included);
       * exponent 31 (inf, NaN) mapped to float's 255 */
      for (; d + SIMD_LANES <= count; d += SIMD_LANES) {
        SIMD(vh) h;
        memcpy(&h, (const uint16_t *)in + at + d, sizeof h);
        const SIMD(vu) u = __builtin_convertvector(h, SIMD(vu)), magnitude = (u & 0x7fffu) << 13;
        const SIMD(vf) finite = (SIMD(vf))magnitude * 0x1p112f;
        const SIMD(vi) special = (SIMD(vi))((u & 0x7c00u) == 0x7c00u);
        const SIMD(vf) value = SIMD(select)(special, (SIMD(vf))(magnitude | 0x7f800000u), finite);
        SIMD(store)(out + d, (SIMD(vf))((SIMD(vu))value | ((u & 0x8000u) << 16)));
      }
      for (; d < count; ++d) out[d] = kvc_f16_to_f32(((const uint16_t *)in)[at + d]);
      return;
    default: /* KVC_DTYPE_FP8_E4M3, the same trick: magnitude bits to float position, times 2^120;
              * S.1111.111 is NaN (e4m3 has no inf) */
      for (; d + SIMD_LANES <= count; d += SIMD_LANES) {
        SIMD(vb) x;
        memcpy(&x, (const uint8_t *)in + at + d, sizeof x);
        const SIMD(vu) u = __builtin_convertvector(x, SIMD(vu)), magnitude = (u & 0x7fu) << 20;
        const SIMD(vi) nan = (SIMD(vi))((u & 0x7fu) == 0x7fu);
        const SIMD(vf) value = SIMD(select)(nan, SIMD(splat)(NAN), (SIMD(vf))magnitude * 0x1p120f);
        SIMD(store)(out + d, (SIMD(vf))((SIMD(vu))value | ((u & 0x80u) << 24)));
      }
      for (; d < count; ++d) out[d] = kvc_fp8_e4m3_to_f32(((const uint8_t *)in)[at + d]);
      return;
  }
}

/* Logits of vectors v0 .. v0 + NV - 1 against keys k0 .. k0 + NK - 1 of the tile (NV, NK
 * constants after inlining), stored, with each lane's maximum and non-finite flag updated over
 * the keys it sees. */
SIMD_INLINE void SIMD(logit_tile)(const score_block_t *blk, int32_t v0, const int NV, const int NK, int32_t t0,
                                  int32_t k0) {
  const int32_t D = blk->dim;
  const float *restrict keys = blk->tile + (int64_t)k0 * D;
  SIMD(vf) acc[4][24];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 24
    for (int k = 0; k < NK; ++k) acc[v][k] = (SIMD(vf)){0};
  for (int32_t d = 0; d < D; ++d) {
    SIMD(vf) q[4];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) q[v] = SIMD(load)(blk->qpack + ((int64_t)(v0 + v) * D + d) * SIMD_LANES);
#pragma GCC unroll 24
    for (int k = 0; k < NK; ++k) {
      const SIMD(vf) key = SIMD(splat)(keys[(int64_t)k * D + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[v][k] = SIMD_FMA(q[v], key, acc[v][k]);
    }
  }
  const SIMD(vf) scale = SIMD(splat)(blk->scale), zero = (SIMD(vf)){0};
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    float *lane_max = blk->lane_max + (int64_t)(v0 + v) * SIMD_LANES, *lane_bad = blk->lane_bad + (int64_t)(v0 + v) * SIMD_LANES;
    SIMD(vi) pos;
    memcpy(&pos, blk->lane_pos + (int64_t)(v0 + v) * SIMD_LANES, sizeof pos);
    SIMD(vf) max = SIMD(load)(lane_max), bad = SIMD(load)(lane_bad);
    float *out = blk->logits + ((int64_t)(v0 + v) * blk->logits_keys + t0 + k0) * SIMD_LANES;
#pragma GCC unroll 24
    for (int k = 0; k < NK; ++k) {
      const SIMD(vf) logit = acc[v][k] * scale;
      SIMD(store)(out + (int64_t)k * SIMD_LANES, logit);
      const SIMD(vi) sees = pos >= SIMD(splat_int)(blk->lo + t0 + k0 + k);
      max = SIMD(select)(sees & (logit > max), logit, max);
      bad += SIMD(keep)(sees, logit * zero);
    }
    SIMD(store)(lane_max, max);
    SIMD(store)(lane_bad, bad);
  }
}

/* Keys [t0, t0 + count) of the block (relative to lo) as floats in the tile, zero keys after them
 * up to a multiple of KEY_GROUP. */
SIMD_INLINE void SIMD(load_tile)(const score_block_t *blk, int32_t t0, int32_t count, int32_t padded) {
  const int32_t D = blk->dim;
  for (int32_t k = 0; k < count; ++k)
    SIMD(widen)(blk->cache->k, blk->cache->dtype, blk->key_offset[t0 + k], D, blk->tile + (int64_t)k * D);
  memset(blk->tile + (int64_t)count * D, 0, sizeof(float) * (size_t)(padded - count) * (size_t)D);
}

/* Step 1 for the whole block. */
SIMD_INLINE void SIMD(block_logits)(const score_block_t *blk) {
  for (int32_t t0 = 0; t0 < blk->keys; t0 += KEY_TILE) {
    const int32_t count = blk->keys - t0 < KEY_TILE ? blk->keys - t0 : KEY_TILE;
    SIMD(load_tile)(blk, t0, count, (count + KEY_GROUP - 1) / KEY_GROUP * KEY_GROUP);
    for (int32_t v0 = 0; v0 < blk->vectors; v0 += 4) {
      const int32_t nv = blk->vectors - v0 < 4 ? blk->vectors - v0 : 4;
      int32_t seen = 0; /* keys of this tile any lane of the group sees, rounded up to a KEY_GROUP */
      for (int32_t v = v0; v < v0 + nv; ++v) seen = blk->vector_keys[v] - t0 > seen ? blk->vector_keys[v] - t0 : seen;
      seen = (seen < count ? seen : count);
      seen = (seen + KEY_GROUP - 1) / KEY_GROUP * KEY_GROUP;
      const int nk = SIMD_ACCUMULATORS / nv; /* divides KEY_GROUP */
      for (int32_t k0 = 0; k0 < seen; k0 += nk) switch (nv) {
          case 1: SIMD(logit_tile)(blk, v0, 1, SIMD_ACCUMULATORS, t0, k0); break;
          case 2: SIMD(logit_tile)(blk, v0, 2, SIMD_ACCUMULATORS / 2, t0, k0); break;
          case 3: SIMD(logit_tile)(blk, v0, 3, SIMD_ACCUMULATORS / 3, t0, k0); break;
          default: SIMD(logit_tile)(blk, v0, 4, SIMD_ACCUMULATORS / 4, t0, k0); break;
        }
    }
  }
}

/* Steps 2 and 3 for vector v. */
SIMD_INLINE void SIMD(vector_attention)(const score_block_t *blk, int32_t v) {
  const int32_t keys = blk->vector_keys[v], scored = keys < blk->scored ? keys : blk->scored;
  float *row = blk->logits + (int64_t)v * blk->logits_keys * SIMD_LANES;
  SIMD(vi) pos;
  memcpy(&pos, blk->lane_pos + (int64_t)v * SIMD_LANES, sizeof pos);
  const SIMD(vf) bad = SIMD(load)(blk->lane_bad + (int64_t)v * SIMD_LANES);
  SIMD(vd) inv_low, inv_high;
  if (blk->lse) { /* the engine's normaliser */
    const SIMD(vf) lse = SIMD(load)(blk->lane_lse + (int64_t)v * SIMD_LANES);
    for (int32_t i = 0; i < scored; ++i) {
      const SIMD(vi) sees = pos >= SIMD(splat_int)(blk->lo + i);
      SIMD(store)(row + (int64_t)i * SIMD_LANES, SIMD(keep)(sees, SIMD(exp)(SIMD(load)(row + (int64_t)i * SIMD_LANES) - lse) + bad));
    }
    inv_low = inv_high = SIMD_WIDEN_LOW(SIMD(splat)(1.0f));
  } else {
    const SIMD(vf) max = SIMD(load)(blk->lane_max + (int64_t)v * SIMD_LANES);
    SIMD(vd) sum_low = SIMD_WIDEN_LOW((SIMD(vf)){0}), sum_high = sum_low;
    for (int32_t i = 0; i < keys; ++i) {
      const SIMD(vi) sees = pos >= SIMD(splat_int)(blk->lo + i);
      const SIMD(vf) p = SIMD(keep)(sees, SIMD(exp)(SIMD(load)(row + (int64_t)i * SIMD_LANES) - max) + bad);
      SIMD(store)(row + (int64_t)i * SIMD_LANES, p);
      sum_low += SIMD_WIDEN_LOW(p);
      sum_high += SIMD_WIDEN_HIGH(p);
    }
    /* 1 / sum where the lane is a pair with finite logits (sum >= 1: its maximum gives e^0); 0
     * for padding (sum 0); 1 where the lane is poisoned (its p are already NaN) */
    double sum[SIMD_LANES], inv[SIMD_LANES];
    memcpy(sum, &sum_low, sizeof sum_low);
    memcpy(sum + SIMD_LANES / 2, &sum_high, sizeof sum_high);
    for (int32_t l = 0; l < SIMD_LANES; ++l) inv[l] = sum[l] != sum[l] ? 1.0 : sum[l] > 0.0 ? 1.0 / sum[l] : 0.0;
    memcpy(&inv_low, inv, sizeof inv_low);
    memcpy(&inv_high, inv + SIMD_LANES / 2, sizeof inv_high);
  }
  /* the lanes of each q head: a whole vector, or the pieces of up to LANES heads */
  const int32_t first = v * SIMD_LANES;
  for (int32_t l0 = 0; l0 < SIMD_LANES;) {
    const int32_t head = (first + l0) / blk->rows_per_head;
    int32_t l1 = (head + 1) * blk->rows_per_head - first;
    l1 = l1 < SIMD_LANES ? l1 : SIMD_LANES;
    if (head >= blk->group) break; /* padding */
    double *restrict out = blk->heads + (int64_t)head * blk->heads_stride;
    for (int32_t i = 0; i < scored; ++i)
      out[i] += SIMD(lane_sum)(SIMD(load)(row + (int64_t)i * SIMD_LANES), inv_low, inv_high, l0, l1);
    l0 = l1;
  }
}

static SIMD_TARGET void SIMD(score_block)(const score_block_t *blk) {
  SIMD(block_logits)(blk);
  for (int32_t v = 0; v < blk->vectors; ++v) SIMD(vector_attention)(blk, v);
}

#undef SIMD_INLINE
