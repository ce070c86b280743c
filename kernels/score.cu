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
 * Logits are kept in base 2 (scale * log2(e) folded into the dot product) so exp2f serves.
 */
#include "cuda_compat.cuh"

#include <math.h>

#include "common.h"
#include "ops.h"

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
 * on a page id outside [0, num_pages) read as zeros (the CUDA backend cannot validate the table). */
template <typename T, int D>
__device__ void load_key_tile(float *tile, const kvc_paged_kv_t &cache, const int32_t *pages, int32_t b,
                              int32_t h, int32_t t0, int32_t count, int32_t dim) {
  const T *pool = static_cast<const T *>(cache.k);
  for (int e = threadIdx.x; e < Tile<D>::kKeys * dim; e += kThreads) {
    int row = e / dim, col = e - row * dim;
    float value = 0.0f;
    if (row < count) {
      int32_t t = t0 + row, page = kvc_page_of(&cache, pages, b, t);
      if (page >= 0 && page < cache.num_pages) value = to_float(pool[kvc_slot_offset(&cache, page, t, h) + col]);
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
  const int32_t *pages = kvc_seq_pages(&cache, b);
  const int key = threadIdx.x % S::kKeys, group = threadIdx.x / S::kKeys;
  const float scale2 = plan.scale * kLog2e;

  for (int32_t d = plan.domain_indptr[b]; d < plan.domain_indptr[b + 1]; ++d) {
    const kvc_domain_t dom = plan.domains[d];
    const int32_t nq = dom.obs_end - dom.obs_begin;
    if (nq == 0 || dom.start >= c1 || dom.end <= c0) continue;
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
          load_key_tile<T, D>(tile, cache, pages, b, h, t0, min(S::kKeys, key_hi - t0), dim);
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

/* Pass 2: lse[row * num_q_heads + g] = log2 of sum_j exp2(logit) over the keys the row sees. */
__global__ void __launch_bounds__(kThreads)
    softmax_lse_kernel(kvc_plan_view_t plan, const float2 *partials, float *lse, int32_t chunk_keys,
                       int32_t num_chunks) {
  const int64_t idx = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (idx >= plan.obs_total * plan.num_q_heads) return;
  const int64_t row = idx / plan.num_q_heads;
  const int32_t first = plan.obs_lo[row] / chunk_keys, last = plan.obs_pos[row] / chunk_keys;
  float m = -INFINITY, l = 0.0f;
  for (int32_t c = first; c <= last; ++c) {
    float2 p = partials[idx * num_chunks + c];
    online_merge(m, l, p.x, p.y);
  }
  lse[idx] = m + log2f(l);
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
  load_key_tile<T, D>(tile, cache, kvc_seq_pages(&cache, b), b, h, t0, t1 - t0, dim);

  for (int32_t d = plan.domain_indptr[b]; d < plan.domain_indptr[b + 1]; ++d) {
    const kvc_domain_t dom = plan.domains[d];
    const int32_t nq = dom.obs_end - dom.obs_begin;
    const int32_t key_lo = max(t0, dom.start), key_hi = min(t1, dom.scored_end);
    if (nq == 0 || key_lo >= key_hi) continue;
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
    const int32_t dim = D ? D : plan.head_dim, *pages = kvc_seq_pages(&cache, b);
    for (int32_t s0 = j0; s0 < min(n, j0 + kThreads); s0 += S::kKeys) {
      __syncthreads();
      load_key_tile<T, D>(tile, cache, pages, b, h, s0, min(S::kKeys, n - s0), dim);
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

template <typename T, int D>
void launch_score(const kvc_op_args_t *args, float2 *partials, float *lse, float *head_scores, int32_t chunk_keys,
                  int32_t num_chunks) {
  const kvc_plan_view_t &plan = args->plan;
  const kvc_paged_kv_t cache = *args->cache;
  const T *queries = static_cast<const T *>(args->queries);
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  const bool attention =
      plan.method == KVC_SCORE_SNAPKV || plan.method == KVC_SCORE_H2O || plan.method == KVC_SCORE_TOVA;
  if (attention && plan.obs_total > 0) {
    KVC_LAUNCH((softmax_partials_kernel<T, D>), dim3(num_chunks, plan.num_kv_heads, plan.batch), dim3(kThreads), 0,
               stream, plan, cache, queries, partials, chunk_keys, num_chunks);
    const int64_t rows = plan.obs_total * plan.num_q_heads;
    KVC_LAUNCH(softmax_lse_kernel, dim3((unsigned)((rows + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
               plan, partials, lse, chunk_keys, num_chunks);
    const int32_t tiles = (plan.max_seq_len + Tile<D>::kKeys - 1) / Tile<D>::kKeys;
    KVC_LAUNCH((head_attention_kernel<T, D>), dim3(tiles, plan.num_kv_heads, plan.batch), dim3(kThreads), 0, stream,
               plan, cache, queries, lse, head_scores);
  }
  const int32_t row_sets = plan.method == KVC_SCORE_TOVA ? 1 : plan.num_kv_heads;
  KVC_LAUNCH((write_scores_kernel<T, D>), dim3((plan.max_seq_len + kThreads - 1) / kThreads, row_sets, plan.batch),
             dim3(kThreads), 0, stream, plan, cache, head_scores, args->scores, args->accumulate);
}

template <typename T>
void launch_for_dim(const kvc_op_args_t *args, float2 *partials, float *lse, float *head_scores, int32_t chunk_keys,
                    int32_t num_chunks) {
  switch (args->plan.head_dim) {
    case 64: launch_score<T, 64>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
    case 128: launch_score<T, 128>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
    case 256: launch_score<T, 256>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
    default: launch_score<T, 0>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
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
  /* key chunks of pass 1: at least kMinChunkKeys keys, at most kMaxChunks per sequence */
  int32_t chunk_keys = (plan.max_seq_len + kMaxChunks - 1) / kMaxChunks;
  chunk_keys = chunk_keys < kMinChunkKeys ? kMinChunkKeys : chunk_keys;
  const int32_t num_chunks = (plan.max_seq_len + chunk_keys - 1) / chunk_keys;
  const size_t query_heads = attention ? (size_t)plan.obs_total * (size_t)plan.num_q_heads : 0;
  float2 *partials = static_cast<float2 *>(kvc_carve(ws, sizeof(float2) * query_heads * (size_t)num_chunks));
  float *lse = static_cast<float *>(kvc_carve(ws, sizeof(float) * query_heads));
  float *head_scores = static_cast<float *>(
      kvc_carve(ws, attention ? sizeof(float) * (size_t)plan.num_q_heads * (size_t)plan.total_tokens : 0));
  if (!ws->base) return KVC_SUCCESS;

  switch (plan.dtype) {
    case KVC_DTYPE_F32: launch_for_dim<float>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
    case KVC_DTYPE_F16: launch_for_dim<__half>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
    case KVC_DTYPE_BF16: launch_for_dim<__nv_bfloat16>(args, partials, lse, head_scores, chunk_keys, num_chunks); break;
    default:
      /* FP8 caches are only scored by STREAMING, which reads no K: any instantiation serves */
      if (plan.method != KVC_SCORE_STREAMING)
        return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                               "kvc_score: dtype %d can only be scored by STREAMING", (int)plan.dtype);
      launch_score<float, 0>(args, partials, lse, head_scores, chunk_keys, num_chunks);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_CUDA, "kvc_score: kernel launch failed: %s",
                           cudaGetErrorString(err));
  return KVC_SUCCESS;
}
