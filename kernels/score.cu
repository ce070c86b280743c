/*
 * score.cu - CUDA score accumulation on the paged cache (the semantics of the scoring comment in
 * kvcompress.h; the same numbers as kernels/score_cpu.c, in fp32 instead of double).
 *
 * Attention methods (SNAPKV, H2O, TOVA) never materialise the [heads x window x n] attention
 * matrix. Three passes, each reading K tiles straight from the pages:
 *   1. softmax_partials: per (key chunk, sequence, KV head) and per observation query and q head
 *      of the group, an online-softmax (max, sum of exp) over the chunk's keys the query sees.
 *   2. softmax_lse: combines the chunks into one log2-sum-exp per (query, q head).
 *   3. head_attention: per (key tile, sequence, KV head) recomputes the logits, sums the
 *      probabilities over the domain's queries and divides by the number of queries that see
 *      the key: one value per (q head, key), [num_q_heads x total_tokens] floats.
 * Then write_scores pools (SNAPKV), reduces over the GQA group (or all q heads for TOVA), writes
 * +inf for unscored keys, and writes or accumulates the score layout. KNORM and STREAMING only
 * run write_scores.
 *
 * Large observation sets (a domain with more than plan.gemm_threshold queries, 128 by default:
 * H2O over the whole prompt, long SnapKV windows) skip passes 1-3 and take the GEMM path instead
 * (run_gemm_domains below): logits by tiles from tensor-core GEMMs through kernels/score_gemm.h
 * (cuBLAS), our kernels for the gather of key tiles from the pages, the normaliser and the
 * accumulation, with the same results in head_scores. The workspace stays bounded by the tile
 * shape (see kvc_plan_workspace_size in kvcompress.h).
 *
 * Logits are kept in base 2 (scale * log2(e) folded into the dot product) so exp2f serves.
 */
#include "cuda_compat.cuh"

#include <math.h>
#include <string.h>

#include <type_traits>

#include "common.h"
#include "launch.cuh"
#include "search.cuh"
#include "ops.h"
#include "score_gemm.h"

namespace {

constexpr int kThreads = 128;
/* Pass 1 splits a sequence into at most this many key chunks: enough blocks to fill the device
 * for one sequence and a few KV heads, with partials bounded by obs_total * num_q_heads * 64. */
constexpr int kMaxChunks = 64;
constexpr int kMinChunkKeys = 256;
constexpr float kLog2e = 1.4426950408889634f;

/* Tile shapes per head_dim specialisation (D = 0: any multiple of 8 up to 256, read at run time).
 * Tiles are fp32 in shared memory: K tile + query chunk stay under the 48 KB static limit. */
template <int D>
struct Tile {
  static constexpr int kMaxDim = D ? D : 256;
  static constexpr int kKeys = kMaxDim <= 128 ? 64 : 32;                          /* keys per tile  */
  static constexpr int kQueries = kMaxDim <= 64 ? 32 : kMaxDim <= 128 ? 16 : 8;   /* query rows     */
  static constexpr int kStride = kMaxDim + 4; /* floats per row: float4-aligned, no bank conflicts  */
  static constexpr int kQueryGroups = kThreads / kKeys;                           /* threads per key */
  static constexpr int kQueriesPerThread = kQueries / kQueryGroups;
  static_assert(kThreads % kKeys == 0 && kQueries % kQueryGroups == 0, "tile shape");
  /* pass 1 reduces (max, sum) pairs through the K tile's storage */
  static_assert(kQueries * kKeys * 2 <= kKeys * kStride, "reduction scratch fits the K tile");
};

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

/* Row-major [kKeys][kStride] fp32 copy of keys [t0, t0 + count) of (b, h); rows past count and rows
 * the table cannot hold (kvc_page_checked) read as zeros (the CUDA backend cannot validate it). */
template <typename T, int D>
__device__ void load_key_tile(float *tile, const kvc_paged_kv_t &cache, int32_t b, int32_t h, int32_t t0,
                              int32_t count, int32_t dim) {
  const T *pool = static_cast<const T *>(cache.k);
  for (int e = threadIdx.x; e < Tile<D>::kKeys * dim; e += kThreads) {
    int row = e / dim, col = e - row * dim;
    float value = 0.0f;
    if (row < count) {
      const int32_t t = t0 + row, page = kvc_page_checked(&cache, b, t);
      if (page >= 0) value = to_float(pool[kvc_slot_offset(&cache, page, t, h) + col]);
    }
    tile[row * Tile<D>::kStride + col] = value;
  }
}

/* Query rows [first, first + rows) of q head g into [kQueries][kStride] fp32; missing rows are 0. */
template <typename T, int D>
__device__ void load_query_chunk(float *chunk, const T *queries, int64_t first, int32_t rows, int32_t g,
                                 int32_t num_q_heads, int32_t dim) {
  for (int e = threadIdx.x; e < Tile<D>::kQueries * dim; e += kThreads) {
    int row = e / dim, col = e - row * dim;
    chunk[row * Tile<D>::kStride + col] =
        row < rows ? to_float(queries[((first + row) * num_q_heads + g) * dim + col]) : 0.0f;
  }
}

/* Dot products of this thread's key (tile row) with its query rows q = group + i * kQueryGroups. */
template <int D>
__device__ void tile_dots(const float *tile, const float *chunk, int key, int group, int dim,
                          float (&dots)[Tile<D>::kQueriesPerThread]) {
  using S = Tile<D>;
  const float4 *k4 = reinterpret_cast<const float4 *>(tile + key * S::kStride);
  const float4 *q4 = reinterpret_cast<const float4 *>(chunk);
#pragma unroll
  for (int i = 0; i < S::kQueriesPerThread; ++i) dots[i] = 0.0f;
#pragma unroll 4
  for (int d4 = 0; d4 < dim / 4; ++d4) {
    float4 k = k4[d4];
#pragma unroll
    for (int i = 0; i < S::kQueriesPerThread; ++i) {
      float4 q = q4[(group + i * S::kQueryGroups) * (S::kStride / 4) + d4];
      dots[i] += k.x * q.x + k.y * q.y + k.z * q.z + k.w * q.w;
    }
  }
}

__device__ inline void online_add(float &m, float &l, float s) {
  if (s > m) {
    l = l * exp2f(m - s) + 1.0f;
    m = s;
  } else {
    l += exp2f(s - m);
  }
}

__device__ inline void online_merge(float &m, float &l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m2 > m) {
    l = l * exp2f(m - m2) + l2;
    m = m2;
  } else {
    l += l2 * exp2f(m2 - m);
  }
}

/* Last domain of sequence b starting at or before j (domains are sorted and disjoint), or -1. */
__device__ inline int32_t domain_of(const kvc_plan_view_t &plan, int32_t b, int32_t j) {
  int32_t lo = plan.domain_indptr[b], hi = plan.domain_indptr[b + 1] - 1, found = -1;
  while (lo <= hi) {
    int32_t mid = (lo + hi) / 2;
    if (plan.domains[mid].start <= j) {
      found = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return found >= 0 && j < plan.domains[found].end ? found : -1;
}

/* The scoring domain of observation query row `row` (its sequence by binary search over
 * obs_indptr, then the domain holding its position). */
__device__ inline const kvc_domain_t &domain_of_row(const kvc_plan_view_t &plan, int64_t row) {
  const int32_t b = last_offset_at_or_below(plan.obs_indptr, plan.batch, 1, row);
  return plan.domains[domain_of(plan, b, plan.obs_pos[row])];
}

/* Pass 1: grid (key chunk, KV head, sequence). partials[(row * num_q_heads + g) * num_chunks + chunk]
 * holds (max, sum of exp2) of the chunk's keys the query row sees, base-2 logits. */
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    softmax_partials_kernel(kvc_plan_view_t plan, kvc_paged_kv_t cache, const T *queries, float2 *partials,
                            int32_t chunk_keys, int32_t num_chunks) {
  using S = Tile<D>;
  __shared__ float4 tile4[S::kKeys * S::kStride / 4];
  __shared__ float4 chunk4[S::kQueries * S::kStride / 4];
  float *tile = reinterpret_cast<float *>(tile4), *chunk = reinterpret_cast<float *>(chunk4);
  const int32_t dim = D ? D : plan.head_dim, h = blockIdx.y, b = blockIdx.z;
  const int32_t n = plan.seq_lens[b], c0 = blockIdx.x * chunk_keys;
  if (c0 >= n) return;
  const int32_t c1 = min(n, c0 + chunk_keys);
  const int key = threadIdx.x % S::kKeys, group = threadIdx.x / S::kKeys;
  const float scale2 = plan.scale * kLog2e;

  for (int32_t d = plan.domain_indptr[b]; d < plan.domain_indptr[b + 1]; ++d) {
    const kvc_domain_t dom = plan.domains[d];
    const int32_t nq = dom.obs_end - dom.obs_begin;
    if (nq == 0 || nq > plan.gemm_threshold || dom.start >= c1 || dom.end <= c0) continue; /* GEMM path's */
    const int32_t key_lo = max(c0, dom.start), key_hi = min(c1, plan.obs_pos[dom.obs_end - 1] + 1);
    if (key_lo >= key_hi) continue; /* no query of the domain sees this chunk: nobody reads it */
    for (int32_t g = h * plan.group_size; g < (h + 1) * plan.group_size; ++g)
      for (int32_t i0 = 0; i0 < nq; i0 += S::kQueries) {
        const int32_t rows = min(S::kQueries, nq - i0);
        __syncthreads(); /* the previous round's readers are done with both buffers */
        load_query_chunk<T, D>(chunk, queries, dom.obs_begin + i0, rows, g, plan.num_q_heads, dim);
        float m[S::kQueriesPerThread], l[S::kQueriesPerThread];
        int32_t pos[S::kQueriesPerThread];
#pragma unroll
        for (int i = 0; i < S::kQueriesPerThread; ++i) {
          const int q = group + i * S::kQueryGroups;
          m[i] = -INFINITY;
          l[i] = 0.0f;
          pos[i] = q < rows ? plan.obs_pos[dom.obs_begin + i0 + q] : -1;
        }
        for (int32_t t0 = key_lo; t0 < key_hi; t0 += S::kKeys) {
          __syncthreads();
          load_key_tile<T, D>(tile, cache, b, h, t0, min(S::kKeys, key_hi - t0), dim);
          __syncthreads();
          float dots[S::kQueriesPerThread];
          tile_dots<D>(tile, chunk, key, group, dim, dots);
          const int32_t j = t0 + key;
#pragma unroll
          for (int i = 0; i < S::kQueriesPerThread; ++i)
            if (j < key_hi && j <= pos[i]) online_add(m[i], l[i], dots[i] * scale2);
        }
        /* combine the kKeys threads of each query row through the K tile's storage */
        float2 *scratch = reinterpret_cast<float2 *>(tile);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < S::kQueriesPerThread; ++i)
          scratch[(group + i * S::kQueryGroups) * S::kKeys + key] = make_float2(m[i], l[i]);
        __syncthreads();
        if ((int)threadIdx.x < rows) {
          float mq = -INFINITY, lq = 0.0f;
          for (int k = 0; k < S::kKeys; ++k) {
            float2 p = scratch[threadIdx.x * S::kKeys + k];
            online_merge(mq, lq, p.x, p.y);
          }
          int64_t row = dom.obs_begin + i0 + threadIdx.x;
          partials[(row * plan.num_q_heads + g) * num_chunks + blockIdx.x] = make_float2(mq, lq);
        }
      }
  }
}

/* Pass 2: lse[row * num_q_heads + g] = log2 of sum_j exp2(logit) over the keys the row sees.
 * Rows of GEMM-path domains (when `gemm_rows` says there are any) are left to that path. */
__global__ void __launch_bounds__(kThreads)
    softmax_lse_kernel(kvc_plan_view_t plan, const float2 *partials, float *lse, int32_t chunk_keys,
                       int32_t num_chunks, int gemm_rows) {
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= plan.obs_total * plan.num_q_heads) return;
  const int64_t row = idx / plan.num_q_heads;
  if (gemm_rows) {
    const kvc_domain_t &dom = domain_of_row(plan, row);
    if (dom.obs_end - dom.obs_begin > plan.gemm_threshold) return;
  }
  const int32_t first = plan.obs_lo[row] / chunk_keys, last = plan.obs_pos[row] / chunk_keys;
  float m = -INFINITY, l = 0.0f;
  for (int32_t c = first; c <= last; ++c) {
    float2 p = partials[idx * num_chunks + c];
    online_merge(m, l, p.x, p.y);
  }
  lse[idx] = m + log2f(l);
}

/* Pass 2 with the engine's normalisers: lse2[idx] = lse[idx] * log2(e) (kvc_score's natural-log
 * convention to this file's base-2 logits). */
__global__ void __launch_bounds__(kThreads) import_lse_kernel(const float *lse, float *lse2, int64_t count) {
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx < count) lse2[idx] = lse[idx] * kLog2e;
}

/* Pass 3: grid (key tile, KV head, sequence). head_scores row (b, g) (score layout with num_q_heads
 * rows) gets, for every scored key j of a domain, sum_i a_gij / #(queries of the domain that see j). */
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    head_attention_kernel(kvc_plan_view_t plan, kvc_paged_kv_t cache, const T *queries, const float *lse,
                          float *head_scores) {
  using S = Tile<D>;
  __shared__ float4 tile4[S::kKeys * S::kStride / 4];
  __shared__ float4 chunk4[S::kQueries * S::kStride / 4];
  __shared__ float chunk_lse[S::kQueries];
  __shared__ float partial_sums[S::kQueryGroups][S::kKeys];
  float *tile = reinterpret_cast<float *>(tile4), *chunk = reinterpret_cast<float *>(chunk4);
  const int32_t dim = D ? D : plan.head_dim, h = blockIdx.y, b = blockIdx.z;
  const int32_t n = plan.seq_lens[b], t0 = blockIdx.x * S::kKeys;
  if (t0 >= n) return;
  const int32_t t1 = min(n, t0 + S::kKeys);
  const int key = threadIdx.x % S::kKeys, group = threadIdx.x / S::kKeys;
  const int32_t j = t0 + key;
  const float scale2 = plan.scale * kLog2e;
  load_key_tile<T, D>(tile, cache, b, h, t0, t1 - t0, dim);

  for (int32_t d = plan.domain_indptr[b]; d < plan.domain_indptr[b + 1]; ++d) {
    const kvc_domain_t dom = plan.domains[d];
    const int32_t nq = dom.obs_end - dom.obs_begin;
    const int32_t key_lo = max(t0, dom.start), key_hi = min(t1, dom.scored_end);
    if (nq == 0 || nq > plan.gemm_threshold || key_lo >= key_hi) continue; /* GEMM path's */
    const bool mine = j >= key_lo && j < key_hi;
    for (int32_t g = h * plan.group_size; g < (h + 1) * plan.group_size; ++g) {
      float sum = 0.0f;
      for (int32_t i0 = 0; i0 < nq; i0 += S::kQueries) {
        const int32_t rows = min(S::kQueries, nq - i0);
        __syncthreads(); /* the K tile is loaded; the previous chunk's readers are done */
        load_query_chunk<T, D>(chunk, queries, dom.obs_begin + i0, rows, g, plan.num_q_heads, dim);
        if ((int)threadIdx.x < rows) chunk_lse[threadIdx.x] = lse[(int64_t)(dom.obs_begin + i0 + threadIdx.x) * plan.num_q_heads + g];
        __syncthreads();
        float dots[S::kQueriesPerThread];
        tile_dots<D>(tile, chunk, key, group, dim, dots);
#pragma unroll
        for (int i = 0; i < S::kQueriesPerThread; ++i) {
          const int q = group + i * S::kQueryGroups;
          if (mine && q < rows && j <= plan.obs_pos[dom.obs_begin + i0 + q])
            sum += exp2f(dots[i] * scale2 - chunk_lse[q]);
        }
      }
      __syncthreads();
      partial_sums[group][key] = sum;
      __syncthreads();
      if (group == 0 && mine) {
        float total = 0.0f;
        for (int k = 0; k < S::kQueryGroups; ++k) total += partial_sums[k][key];
        /* the domain's queries are its last nq positions: those at or after j see j */
        const int32_t first_query = plan.obs_pos[dom.obs_begin];
        const int32_t seen_by = nq - max(0, j - first_query);
        head_scores[plan.num_q_heads * plan.token_offsets[b] + (int64_t)g * n + j] = total / (float)seen_by;
      }
    }
  }
}

/* Score of key j from the per-q-head attention: pooled over the domain's scored keys (SNAPKV),
 * reduced over q heads [g0, g0 + count) (mean or max). */
__device__ float reduce_attention(const kvc_plan_view_t &plan, const float *head_row0, int32_t n,
                                  const kvc_domain_t &dom, int32_t j, int32_t g0, int32_t count, bool mean) {
  const int32_t half = plan.method == KVC_SCORE_SNAPKV ? plan.pool_kernel / 2 : 0;
  const int32_t lo = max(dom.start, j - half), hi = min(dom.scored_end - 1, j + half);
  const bool pool_max = plan.pool == KVC_POOL_MAX;
  float reduced = mean ? 0.0f : -INFINITY;
  for (int32_t g = g0; g < g0 + count; ++g) {
    const float *row = head_row0 + (int64_t)g * n;
    float pooled = pool_max ? -INFINITY : 0.0f;
    for (int32_t i = lo; i <= hi; ++i) pooled = pool_max ? fmaxf(pooled, row[i]) : pooled + row[i];
    if (!pool_max) pooled /= (float)(2 * half + 1); /* zero padding: AVG always divides by the kernel */
    reduced = mean ? reduced + pooled : fmaxf(reduced, pooled);
  }
  return mean ? reduced / (float)count : reduced;
}

/* Final pass: grid (block of kThreads keys, KV head row set, sequence); TOVA has one row set that
 * writes every KV head. Writes (or adds) each key's score; +inf for keys no domain scores. */
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    write_scores_kernel(kvc_plan_view_t plan, kvc_paged_kv_t cache, const float *head_scores, float *scores,
                        int accumulate) {
  using S = Tile<D>;
  __shared__ float4 tile4[S::kKeys * S::kStride / 4];
  __shared__ float norms[kThreads];
  const int32_t h = blockIdx.y, b = blockIdx.z, n = plan.seq_lens[b], j0 = blockIdx.x * kThreads;
  if (j0 >= n) return;
  const int32_t j = j0 + threadIdx.x;
  const kvc_score_method_t method = plan.method;
  if (method == KVC_SCORE_KNORM) {
    /* coalesced tile loads, then one thread per key sums its row */
    float *tile = reinterpret_cast<float *>(tile4);
    const int32_t dim = D ? D : plan.head_dim;
    for (int32_t s0 = j0; s0 < min(n, j0 + kThreads); s0 += S::kKeys) {
      __syncthreads();
      load_key_tile<T, D>(tile, cache, b, h, s0, min(S::kKeys, n - s0), dim);
      __syncthreads();
      if (threadIdx.x < S::kKeys) {
        const float4 *k4 = reinterpret_cast<const float4 *>(tile + threadIdx.x * S::kStride);
        float sum = 0.0f;
        for (int d4 = 0; d4 < dim / 4; ++d4) sum += k4[d4].x * k4[d4].x + k4[d4].y * k4[d4].y + k4[d4].z * k4[d4].z + k4[d4].w * k4[d4].w;
        norms[s0 - j0 + threadIdx.x] = sqrtf(sum);
      }
    }
    __syncthreads();
  }
  if (j >= n) return;

  const int32_t d = domain_of(plan, b, j);
  float value = INFINITY;
  int32_t first_row = h, rows = 1;
  if (method == KVC_SCORE_TOVA) first_row = 0, rows = plan.num_kv_heads;
  if (d >= 0 && j < plan.domains[d].scored_end) {
    const kvc_domain_t dom = plan.domains[d];
    const float *head_row0 = head_scores + plan.num_q_heads * plan.token_offsets[b];
    switch (method) {
      case KVC_SCORE_SNAPKV:
      case KVC_SCORE_H2O:
        value = reduce_attention(plan, head_row0, n, dom, j, h * plan.group_size, plan.group_size,
                                 plan.group_reduce == KVC_REDUCE_MEAN);
        break;
      case KVC_SCORE_TOVA: value = reduce_attention(plan, head_row0, n, dom, j, 0, plan.num_q_heads, true); break;
      case KVC_SCORE_KNORM: value = -norms[threadIdx.x]; break;
      case KVC_SCORE_STREAMING:
        value = plan.span_local ? (float)((double)(j - dom.start) / (double)(dom.end - dom.start)) : (float)j;
        break;
    }
  }
  for (int32_t r = first_row; r < first_row + rows; ++r) {
    float *out = scores + plan.num_kv_heads * plan.token_offsets[b] + (int64_t)r * n + j;
    *out = accumulate ? *out + value : value;
  }
}

/* ---- the GEMM path: domains with more than plan.gemm_threshold observation queries ------------
 * Per (sequence, domain, KV head), over tiles of at most gemm_tile_keys keys from the domain's
 * start, and blocks of at most R = max(1, gemm_tile_rows / group) queries (those that see the
 * tile's first key):
 *   pass 1  keys up to the last query: gather the tile, logits [group][R][keys] by GEMM (alpha =
 *           scale * log2 e), gemm_row_stats_kernel folds each row's (max, sum of exp2) over the
 *           keys it sees into a running pair (slot 0 of the row's partials) and, at the tile that
 *           holds the row's own position, writes its log2-sum-exp;
 *   pass 2  the scored keys: gather again, logits [group][keys][R] (key-major), and
 *           gemm_key_sums_kernel sums exp2(logit - lse) over the rows that see each key into the
 *           key's head_scores entry (first block writes, later ones add, the last divides by the
 *           number of queries that see the key), exactly what head_attention_kernel produces.
 * The logits tile is the only O(keys x rows) buffer, and it is bounded by the tile shape. */

constexpr int kGemmThreads = 256;
constexpr int kGemmWarps = kGemmThreads / 32;

/* Keys [t0, t0 + count) of (b, h) from the pages into tile[count][dim], in the cache dtype (bits
 * copied); a row the table cannot hold reads as zeros, like load_key_tile. */
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_keys_kernel(kvc_paged_kv_t cache, int32_t b, int32_t h, int32_t t0, int32_t count, int32_t dim, T *tile) {
  using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
  const Bits *pool = static_cast<const Bits *>(cache.k);
  Bits *out = reinterpret_cast<Bits *>(tile);
  const int64_t total = (int64_t)count * dim;
  for (int64_t e = (int64_t)blockIdx.x * kThreads + threadIdx.x; e < total; e += (int64_t)gridDim.x * kThreads) {
    const int32_t row = (int32_t)(e / dim), col = (int32_t)(e - (int64_t)row * dim), t = t0 + row;
    const int32_t page = kvc_page_checked(&cache, b, t);
    out[e] = page >= 0 ? pool[kvc_slot_offset(&cache, page, t, h) + col] : Bits(0);
  }
}

/* Pass 1, one warp per logits row (q head g0 + gg, query row0 + r at position pos0 + r) of
 * logits[heads][rows][keys]: the row sees keys [t0, min(t0 + keys, pos + 1)). `init`: the tile is
 * the domain's first. state[idx * state_stride] carries (max, sum) between tiles. */
__global__ void __launch_bounds__(kGemmThreads)
    gemm_row_stats_kernel(const float *logits, int32_t heads, int32_t rows, int32_t keys, int32_t t0, int32_t pos0,
                          int64_t row0, int32_t g0, int32_t num_q_heads, int init, float2 *state, int32_t state_stride,
                          float *lse) {
  const int64_t warp = (int64_t)blockIdx.x * kGemmWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= (int64_t)heads * rows) return; /* whole warps: `warp` is uniform across its lanes */
  const int32_t gg = (int32_t)(warp / rows), r = (int32_t)(warp - (int64_t)gg * rows), pos = pos0 + r;
  const int32_t seen = min(keys, pos + 1 - t0);
  const float *row = logits + ((int64_t)gg * rows + r) * keys;
  float m = -INFINITY, l = 0.0f;
  for (int32_t t = lane; t < seen; t += 32) online_add(m, l, row[t]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), l2 = __shfl_xor_sync(0xffffffffu, l, offset);
    online_merge(m, l, m2, l2);
  }
  if (lane == 0) {
    const int64_t idx = (row0 + r) * num_q_heads + g0 + gg;
    if (!init) {
      const float2 carried = state[idx * state_stride];
      online_merge(m, l, carried.x, carried.y);
    }
    if (pos < t0 + keys) lse[idx] = m + log2f(l); /* the tile holding the row's own position: done */
    else state[idx * state_stride] = make_float2(m, l);
  }
}

/* Pass 2, grid (key groups of kGemmWarps, heads): one warp per key t0 + t of logits[heads][keys][rows]
 * sums exp2(logit - lse) over the rows that see it (position pos0 + r >= key) into head_row0[g][key]
 * (head_scores row set of the sequence, rows of n). `first`: this query block is the tile's first
 * (write, else add); `last`: divide by the number of the domain's queries that see the key. */
__global__ void __launch_bounds__(kGemmThreads)
    gemm_key_sums_kernel(const float *logits, int32_t rows, int32_t keys, int32_t t0, int32_t pos0, int64_t row0,
                         int32_t g0, int32_t num_q_heads, const float *lse, float *head_row0, int32_t n, int first,
                         int last, int32_t first_query, int32_t nq) {
  __shared__ float row_lse[KVC_GEMM_TILE_ROWS];
  const int32_t gg = blockIdx.y;
  for (int32_t r = threadIdx.x; r < rows; r += kGemmThreads) row_lse[r] = lse[(row0 + r) * num_q_heads + g0 + gg];
  __syncthreads();
  const int32_t t = blockIdx.x * kGemmWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (t >= keys) return; /* whole warps */
  const int32_t j = t0 + t;
  const float *column = logits + ((int64_t)gg * keys + t) * rows;
  float sum = 0.0f;
  for (int32_t r = max(0, j - pos0) + lane; r < rows; r += 32) sum += exp2f(column[r] - row_lse[r]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) {
    float *out = head_row0 + (int64_t)(g0 + gg) * n + j;
    float value = first ? sum : *out + sum;
    if (last) value /= (float)(nq - max(0, j - first_query)); /* queries are the domain's last nq positions */
    *out = value;
  }
}

/* Workspace of the GEMM path (carved only when some domain takes it). */
struct GemmBuffers {
  void *blas_workspace;
  void *keys;     /* [tile_keys][head_dim], cache dtype */
  float *logits;  /* group * tile_queries * tile_keys   */
  int32_t tile_keys, tile_queries;
};

/* Tile shape of a plan: keys per tile and queries (per q head) per GEMM, each capped by what the
 * plan can use, so small plans carve small tiles. */
inline void gemm_tile_shape(const kvc_plan_view_t &plan, int32_t *tile_keys, int32_t *tile_queries) {
  *tile_keys = min(plan.gemm_tile_keys, plan.max_seq_len);
  *tile_queries = min(max(1, plan.gemm_tile_rows / plan.group_size), plan.max_obs_per_domain);
}

template <typename T>
kvc_status_t run_gemm_domains(const kvc_op_args_t *args, const GemmBuffers &buf, float2 *state, int32_t state_stride,
                              float *lse, float *head_scores) {
  const kvc_plan_view_t &plan = args->plan, &host = *args->host_plan;
  const kvc_paged_kv_t cache = *args->cache;
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  const int32_t group = plan.group_size, num_q_heads = plan.num_q_heads, dim = plan.head_dim;
  const T *queries = static_cast<const T *>(args->queries);
  T *keys = static_cast<T *>(buf.keys);
  kvc_status_t status =
      kvc_score_gemm_bind(args->blas, args->stream, buf.blas_workspace, KVC_GEMM_BLAS_WORKSPACE, args->detail,
                          args->detail_cap);
  if (status != KVC_SUCCESS) return status;
  kvc_score_gemm_t gemm;
  memset(&gemm, 0, sizeof gemm);
  gemm.dtype = plan.dtype;
  gemm.batch = group;
  gemm.dim = dim;
  gemm.q_row_stride = (int64_t)num_q_heads * dim;
  gemm.q_batch_stride = dim;
  gemm.k = keys;
  gemm.k_row_stride = dim;
  gemm.alpha = plan.scale * kLog2e;
  gemm.out = buf.logits;

  for (int32_t b = 0; b < host.batch; ++b) {
    float *head_row0 = head_scores + num_q_heads * host.token_offsets[b];
    for (int32_t d = host.domain_indptr[b]; d < host.domain_indptr[b + 1]; ++d) {
      const kvc_domain_t dom = host.domains[d];
      const int32_t nq = dom.obs_end - dom.obs_begin;
      if (nq <= plan.gemm_threshold) continue;
      const int32_t first_query = host.obs_pos[dom.obs_begin], queries_end = host.obs_pos[dom.obs_end - 1] + 1;
      for (int32_t h = 0; h < plan.num_kv_heads; ++h) {
        const int32_t g0 = h * group;
        for (int pass = args->lse ? 1 : 0; pass < 2; ++pass) { /* pass 0 computes what `lse` gives */
          const int32_t key_end = pass == 0 ? queries_end : dom.scored_end;
          for (int32_t t0 = dom.start; t0 < key_end; t0 += buf.tile_keys) {
            const int32_t tile = min(buf.tile_keys, key_end - t0);
            const int64_t elems = (int64_t)tile * dim;
            KVC_LAUNCH((gather_keys_kernel<T>), dim3((unsigned)((elems + kThreads - 1) / kThreads)), dim3(kThreads), 0,
                       stream, cache, b, h, t0, tile, dim, keys);
            const int32_t i_first = max(0, t0 - first_query); /* queries at or after the tile's first key */
            for (int32_t i0 = i_first; i0 < nq; i0 += buf.tile_queries) {
              const int32_t rows = min(buf.tile_queries, nq - i0);
              const int64_t row0 = dom.obs_begin + i0;
              gemm.rows = rows;
              gemm.keys = tile;
              gemm.q = queries + (row0 * num_q_heads + g0) * dim;
              gemm.key_major = pass;
              gemm.out_ld = pass == 0 ? tile : rows;
              gemm.out_batch_stride = (int64_t)rows * tile;
              status = kvc_score_gemm_logits(args->blas, &gemm, args->detail, args->detail_cap);
              if (status != KVC_SUCCESS) return status;
              if (pass == 0) {
                const int64_t warps = (int64_t)group * rows;
                KVC_LAUNCH(gemm_row_stats_kernel, dim3((unsigned)((warps + kGemmWarps - 1) / kGemmWarps)),
                           dim3(kGemmThreads), 0, stream, buf.logits, group, rows, tile, t0, first_query + i0, row0,
                           g0, num_q_heads, (int)(t0 == dom.start), state, state_stride, lse);
              } else {
                KVC_LAUNCH(gemm_key_sums_kernel, dim3((unsigned)((tile + kGemmWarps - 1) / kGemmWarps), group),
                           dim3(kGemmThreads), 0, stream, buf.logits, rows, tile, t0, first_query + i0, row0, g0,
                           num_q_heads, lse, head_row0, host.seq_lens[b], (int)(i0 == i_first),
                           (int)(i0 + rows == nq), first_query, nq);
              }
            }
          }
        }
      }
    }
  }
  return KVC_SUCCESS;
}

/* What one execute call runs, beyond the plan. */
struct ScoreLaunch {
  float2 *partials;
  float *lse, *head_scores;
  int32_t chunk_keys, num_chunks;
  bool fused;     /* some domain with queries takes the fused kernels (passes 1-3)  */
  bool gemm;      /* some domain takes the GEMM path (then `buffers` is carved)       */
  GemmBuffers buffers;
};

template <typename T, int D>
kvc_status_t launch_score(const kvc_op_args_t *args, const ScoreLaunch &run) {
  const kvc_plan_view_t &plan = args->plan;
  const kvc_paged_kv_t cache = *args->cache;
  const T *queries = static_cast<const T *>(args->queries);
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  const int64_t rows = plan.obs_total * plan.num_q_heads;
  if ((run.fused || run.gemm) && args->lse)
    KVC_LAUNCH(import_lse_kernel, dim3((unsigned)((rows + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
               args->lse, run.lse, rows);
  if (run.fused) {
    if (!args->lse) {
      KVC_LAUNCH((softmax_partials_kernel<T, D>), dim3(run.num_chunks, plan.num_kv_heads, plan.batch),
                 dim3(kThreads), 0, stream, plan, cache, queries, run.partials, run.chunk_keys, run.num_chunks);
      KVC_LAUNCH(softmax_lse_kernel, dim3((unsigned)((rows + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
                 plan, run.partials, run.lse, run.chunk_keys, run.num_chunks, (int)run.gemm);
    }
    const int32_t tiles = (plan.max_seq_len + Tile<D>::kKeys - 1) / Tile<D>::kKeys;
    KVC_LAUNCH((head_attention_kernel<T, D>), dim3(tiles, plan.num_kv_heads, plan.batch), dim3(kThreads), 0, stream,
               plan, cache, queries, run.lse, run.head_scores);
  }
  if (run.gemm) {
    /* the running (max, sum) of a GEMM row lives in its first partials slot */
    kvc_status_t status = run_gemm_domains<T>(args, run.buffers, run.partials, run.num_chunks, run.lse, run.head_scores);
    if (status != KVC_SUCCESS) return status;
  }
  const int32_t row_sets = plan.method == KVC_SCORE_TOVA ? 1 : plan.num_kv_heads;
  KVC_LAUNCH((write_scores_kernel<T, D>), dim3((plan.max_seq_len + kThreads - 1) / kThreads, row_sets, plan.batch),
             dim3(kThreads), 0, stream, plan, cache, run.head_scores, args->scores, args->accumulate);
  return KVC_SUCCESS;
}

template <typename T>
kvc_status_t launch_for_dim(const kvc_op_args_t *args, const ScoreLaunch &run) {
  switch (args->plan.head_dim) {
    case 64: return launch_score<T, 64>(args, run);
    case 128: return launch_score<T, 128>(args, run);
    case 256: return launch_score<T, 256>(args, run);
    default: return launch_score<T, 0>(args, run);
  }
}

}  // namespace

extern "C" kvc_status_t kvc_score_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan;
  const bool attention =
      plan.method == KVC_SCORE_SNAPKV || plan.method == KVC_SCORE_H2O || plan.method == KVC_SCORE_TOVA;
  if (plan.head_dim % 8 != 0 || plan.head_dim > 256)
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                           "kvc_score: head_dim %d is not supported on CUDA (multiples of 8 up to 256)", plan.head_dim);
  ScoreLaunch run;
  memset(&run, 0, sizeof run);
  /* Which domains take which path: the GEMM path those with more than gemm_threshold queries;
   * when it takes every domain with queries, the fused passes are skipped and the partials shrink
   * to the one running (max, sum) slot per row the GEMM path needs. */
  run.gemm = attention && plan.obs_total > 0 && plan.max_obs_per_domain > plan.gemm_threshold;
  run.fused = attention && plan.obs_total > 0;
  if (run.gemm) {
    if (!args->host_plan)
      return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INTERNAL, "kvc_score: no host plan");
    const kvc_plan_view_t &host = *args->host_plan;
    run.fused = false;
    for (int32_t d = 0; d < host.domain_indptr[host.batch] && !run.fused; ++d) {
      const int32_t nq = host.domains[d].obs_end - host.domains[d].obs_begin;
      run.fused = nq > 0 && nq <= plan.gemm_threshold;
    }
  }
  /* key chunks of pass 1: at least kMinChunkKeys keys, at most kMaxChunks per sequence */
  run.chunk_keys = (plan.max_seq_len + kMaxChunks - 1) / kMaxChunks;
  run.chunk_keys = run.chunk_keys < kMinChunkKeys ? kMinChunkKeys : run.chunk_keys;
  run.num_chunks = run.fused ? (plan.max_seq_len + run.chunk_keys - 1) / run.chunk_keys : 1;
  const size_t query_heads = attention ? (size_t)plan.obs_total * (size_t)plan.num_q_heads : 0;
  run.partials = static_cast<float2 *>(kvc_carve(ws, sizeof(float2) * query_heads * (size_t)run.num_chunks));
  run.lse = static_cast<float *>(kvc_carve(ws, sizeof(float) * query_heads));
  if (run.gemm) {
    GemmBuffers &buf = run.buffers;
    gemm_tile_shape(plan, &buf.tile_keys, &buf.tile_queries);
    buf.blas_workspace = kvc_carve(ws, KVC_GEMM_BLAS_WORKSPACE);
    buf.keys = kvc_carve(ws, (size_t)buf.tile_keys * (size_t)plan.head_dim * (size_t)kvc_dtype_size(plan.dtype));
    buf.logits = static_cast<float *>(kvc_carve(
        ws, sizeof(float) * (size_t)plan.group_size * (size_t)buf.tile_queries * (size_t)buf.tile_keys));
  }
  run.head_scores = static_cast<float *>(
      kvc_carve(ws, attention ? sizeof(float) * (size_t)plan.num_q_heads * (size_t)plan.total_tokens : 0));
  if (!ws->base) return KVC_SUCCESS;

  kvc_status_t status = KVC_SUCCESS;
  switch (plan.dtype) {
    case KVC_DTYPE_F32: status = launch_for_dim<float>(args, run); break;
    case KVC_DTYPE_F16: status = launch_for_dim<__half>(args, run); break;
    case KVC_DTYPE_BF16: status = launch_for_dim<__nv_bfloat16>(args, run); break;
    default:
      /* FP8 caches are only scored by STREAMING, which reads no K: any instantiation serves */
      if (plan.method != KVC_SCORE_STREAMING)
        return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                               "kvc_score: dtype %d can only be scored by STREAMING", (int)plan.dtype);
      status = launch_score<float, 0>(args, run);
  }
  if (status != KVC_SUCCESS) return status;
  return kvc_launch_status(args, "kvc_score");
}
