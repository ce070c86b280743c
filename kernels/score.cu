/*
 * score.cu - CUDA score accumulation on the paged cache (the semantics of the scoring comment in
 * kvcompress.h; the same numbers as kernels/score_cpu.c, in fp32 instead of double).
 *
 * SNAPKV, H2O and TOVA are attention: computed like FlashAttention's forward pass, without ever
 * materialising the [heads x window x n] attention matrix or a logit in global memory. The rows of
 * the problem are (observation query, q head) pairs; the whole GQA group of a KV head is folded
 * into them, so a tile of keys is brought into shared memory once and serves every row of its KV
 * head. Tiles are 64 rows (keys, or rows) of head_dim elements; K rows are resolved through the
 * page table once per row and copied with 16-byte cp.async, double-buffered; logits come from
 * mma.sync m16n8k16 on tensor cores (f16/bf16, fp32 accumulation; fragments through ldmatrix), or
 * from fp32 FMAs in the same fragment layout for f32 caches (exact fp32, never TF32). A block is
 * 4 warps; warp w owns rows 16w .. 16w + 15 of a 64-row tile against all 64 keys.
 *   1. normaliser_kernel (skipped when the engine supplies `lse`): a block owns (64 rows of one
 *      (sequence, KV head), one split of the keys) and streams the split's K tiles once; each row
 *      keeps an online-softmax (max, sum of exp2) over the keys it sees. With one split it writes
 *      the row's log2-sum-exp; with several, (max, sum) partials that combine_normalisers_kernel
 *      merges in split order. Splits give short row sets (SnapKV's window) enough blocks to fill
 *      the device; long ones (H2O over the prompt) have enough rows. A split's K tiles are read
 *      once per block of 64 rows (G * window / 64 times: 4 for Llama-3.1-8B's SnapKV), by blocks
 *      next to each other in the grid, so all but the first read come from L2.
 *   2. column_sums_kernel: a block owns (64 keys, sequence, KV head) and keeps its K tile
 *      resident while the rows that see those keys stream through in tiles of 64 (per q head for
 *      SNAPKV and H2O; TOVA's single query rows of all q heads together, as TOVA averages over
 *      them); each key's sum of exp2(logit - lse) over a head's rows is reduced in a fixed order and
 *      divided by the number of the domain's queries that see the key: head_scores.
 *   3. write_scores_kernel: SNAPKV pooling, the group reduce (TOVA: the mean over all q heads),
 *      +inf for unscored keys, written or accumulated into the score layout. KNORM's norms (tiles
 *      by cp.async, scaled by the row's max-abs so no square overflows) and STREAMING's recency
 *      are computed there too.
 * Launches per call: at most 4, whatever n, batch, heads or layers. Every sum has a fixed order, so
 * the scores are the same bits on every run.
 *
 * Layers (kvc_score_layers, the first stage of kvc_compress_layers): every kernel takes the layer
 * as part of grid axis y, y = layer * (KV heads, or TOVA's one row set) + head, and reads its K
 * pool, queries and engine normalisers from the device arrays of kvc_layers_t (Layers below); the
 * normaliser workspace, the head scores and the scores are stacked per layer. The single-layer call
 * is the one-layer case, its pointers passed as they are.
 *
 * Non-finite data (kvcompress.h): a NaN or +-inf logit makes its row's normaliser NaN, so the
 * whole row contributes NaN; with the engine's normalisers a non-finite logit contributes NaN to
 * its key and a non-finite lse entry to the whole row. MAX pooling and MAX reduce keep NaN.
 *
 * Logits are in base 2 (scale * log2 e folded in) so exp2f serves; `lse` is natural-log
 * (multiplied by log2 e when read).
 *
 * FP8 keys (e4m3, vLLM's fp8 KV cache): the kernels are templated on the query type T and the key
 * element type K. K tiles land in shared memory as they lie in the cache (16-byte cp.async of the
 * fp8 bytes, double-buffered like any K tile), and one pass widens each landed tile into a T tile
 * (exactly: every e4m3 value is an f16, bf16 and f32 value; NaN stays NaN, e4m3 has no inf) that
 * ldmatrix and the mma read as before. The KV head's k_scale is folded into the logit scale:
 * s * fl(fl(scale * k_scale) * log2 e), where the CPU backend computes s * fl(scale * k_scale)
 * (kernels/score_cpu.c): the same association as for the other dtypes (s * fl(scale * log2 e)
 * against s * scale), so the two backends still differ by the fp32 rounding the tests bound, one
 * rounding more of a scale product (2^-24 relative) on each side. KNORM reads the fp8 bytes by
 * cp.async tiles too and multiplies the norm by k_scale (saturated at FLT_MAX like the norm).
 */
#include "cuda_compat.cuh"

#include <float.h>
#include <math.h>
#include <string.h>

#include <type_traits>

#include "common.h"
#include "launch.cuh"
#include "mma.cuh"
#include "ops.h"
#include "search.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 64;        /* keys of a K tile, rows of a query tile: 16 per warp        */
constexpr int kTileKeys = kTileRows; /* the same number, named for what the column index counts   */
/* Normaliser splits: enough blocks to fill any current GPU (a few per SM on 132 SMs), each split
 * long enough that its (max, sum) partial is cheap next to its keys. */
constexpr int64_t kTargetBlocks = 1024;
constexpr int32_t kMinSplitKeys = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int32_t kMaxGridY = 65535; /* blocks on grid axis y (and z) */

/* An fp8 e4m3 key element as the cache stores it (decoded by kvc_fp8_e4m3_to_f32). */
struct Fp8E4M3 {
  uint8_t bits;
};

/* Shared-memory rows of a tile: head_dim elements, padded with zeros to the mma k-step (16) for
 * 16-bit types, plus 16 bytes so that the 8 rows an ldmatrix (or a float4 load of 8 rows) reads
 * fall in distinct banks. fp8 rows (head_dim a multiple of 16 there) only land in shared memory
 * to be widened: the same rule keeps them whole 16-byte chunks. */
template <class T>
__host__ __device__ inline int32_t padded_dim(int32_t dim) {
  return std::is_same<T, float>::value ? dim : (dim + 15) / 16 * 16;
}
template <class T>
__host__ __device__ inline int32_t row_stride(int32_t dim) {
  return padded_dim<T>(dim) + 16 / (int32_t)sizeof(T);
}
/* Shared memory of an attention kernel, in this order: `compute` 64-row tiles of T (queries, and
 * the widened keys when K is not T), `landing` 64-row tiles of K (keys as cp.async lands them;
 * when K is T they are the compute tiles of the keys) and a table of 2 x 64 K row addresses. The
 * normaliser has 1 query tile and 2 landing tiles (double-buffered keys), the column sums 1 landing
 * tile (resident keys) and 2 query tiles; widening adds one compute tile to either. */
template <class T, class K>
struct TileLayout {
  static constexpr bool kWiden = !std::is_same<T, K>::value;
  int32_t stride, landing_stride; /* elements of a T row, of a K row */
  int32_t compute, landing;       /* tiles of each */
  __host__ __device__ TileLayout(int32_t dim, int32_t queries, int32_t landing_tiles)
      : stride(row_stride<T>(dim)), landing_stride(row_stride<K>(dim)), compute(queries + (kWiden ? 1 : 0)),
        landing(landing_tiles) {}
  __host__ __device__ size_t compute_bytes() const { return (size_t)compute * kTileRows * stride * sizeof(T); }
  __host__ __device__ size_t landing_bytes() const { return (size_t)landing * kTileRows * landing_stride * sizeof(K); }
  __host__ __device__ size_t bytes() const { return compute_bytes() + landing_bytes() + 2 * kTileRows * sizeof(const K *); }
  __device__ T *compute_tile(unsigned char *smem, int32_t i) const {
    return reinterpret_cast<T *>(smem) + (size_t)i * kTileRows * stride;
  }
  __device__ K *landing_tile(unsigned char *smem, int32_t i) const {
    return reinterpret_cast<K *>(smem + compute_bytes()) + (size_t)i * kTileRows * landing_stride;
  }
  __device__ const K **row_table(unsigned char *smem) const {
    return reinterpret_cast<const K **>(smem + compute_bytes() + landing_bytes());
  }
};
template <class T, class K>
__host__ __device__ TileLayout<T, K> normaliser_layout(int32_t dim) {
  return TileLayout<T, K>(dim, 1, 2);
}
template <class T, class K>
__host__ __device__ TileLayout<T, K> column_sums_layout(int32_t dim) {
  return TileLayout<T, K>(dim, 2, 1);
}
template <class K>
size_t knorm_smem_bytes(int32_t dim) {
  return (size_t)kTileRows * row_stride<K>(dim) * sizeof(K) + kTileRows * sizeof(const K *);
}

__host__ __device__ inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* The layers of a call: the layer-batched call's device arrays of kvc_layers_t (read by the
 * kernels, never on the host), or, the arrays NULL, the single-layer call's own pointers. */
struct Layers {
  void *const *k;                        /* [count], or NULL: the single layer's below             */
  const void *const *queries;            /* [count] (NULL when the plan has no observation rows)   */
  const float *const *lse;               /* [count] (NULL entries: computed), or NULL as a whole   */
  void *one_k;
  const void *one_queries;
  const float *one_lse;
  int32_t count;
};

/* Layer l's inputs. `readable` is false for a layer of the layer-batched call whose K pool (where
 * the method reads K) or queries (where it reads them) is NULL or not 16-byte aligned, or whose lse
 * (where queries are read) is not float-aligned: the host never sees those pointers, so the kernels
 * read nothing of such a layer and score it as if every K element were NaN (kvcompress.h,
 * kvc_layers_t). The single-layer call's pointers were checked on the host. */
struct LayerInputs {
  void *k; /* kvc_paged_kv_t's type: the kernels only read it */
  const void *queries;
  const float *lse; /* the engine's normalisers, or NULL: computed */
  bool readable;
};

__device__ inline LayerInputs layer_inputs(const Layers &layers, const kvc_plan_view_t &plan, int32_t layer) {
  LayerInputs in;
  const bool batched = layers.k != nullptr;
  in.k = batched ? layers.k[layer] : layers.one_k;
  in.queries = batched ? (layers.queries ? layers.queries[layer] : nullptr) : layers.one_queries;
  in.lse = batched ? (layers.lse ? layers.lse[layer] : nullptr) : layers.one_lse;
  const bool reads_k = plan.method != KVC_SCORE_STREAMING;
  const bool reads_queries = reads_k && plan.method != KVC_SCORE_KNORM && plan.obs_total > 0;
  in.readable = (!reads_k || (in.k && aligned16(in.k))) &&
                (!reads_queries || (in.queries && aligned16(in.queries) && ((uintptr_t)in.lse & 3u) == 0));
  return in;
}

/* K row of token t of sequence b, KV head h, or NULL where the table cannot hold it (the CUDA
 * backend cannot validate tables; such a token reads as a zero key). */
template <class K>
__device__ inline const K *key_row(const kvc_paged_kv_t &cache, int32_t b, int32_t t, int32_t h) {
  const int32_t page = kvc_page_checked(&cache, b, t);
  return page >= 0 ? static_cast<const K *>(cache.k) + kvc_slot_offset(&cache, page, t, h) : nullptr;
}

/* A key element as float, exactly. */
__device__ inline float key_float(float x) { return x; }
__device__ inline float key_float(__half x) { return __half2float(x); }
__device__ inline float key_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline float key_float(Fp8E4M3 x) { return kvc_fp8_e4m3_to_f32(x.bits); }

/* The factor of KV head h's keys: k_scale for fp8 keys, exactly 1 (not read) for the others. */
template <class K>
__device__ inline float key_scale(const kvc_plan_view_t &plan, int32_t h) {
  if constexpr (std::is_same<K, Fp8E4M3>::value) return kvc_key_scale(&plan, h);
  else return 1.0f;
}

/* Two exact values of T as one 32-bit word of two T (the first in the low half). */
template <class T>
__device__ inline uint32_t pack2(float lo, float hi) {
  uint32_t word;
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    memcpy(&word, &pair, sizeof word);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    memcpy(&word, &pair, sizeof word);
  }
  return word;
}

/* The 16 fp8 key elements of `raw` widened to T at dst (16-byte aligned), in 16-byte stores. */
template <class T>
__device__ inline void widen16(T *dst, const uint4 raw) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  auto at = [&](int i) { return kvc_fp8_e4m3_to_f32((uint8_t)(words[i / 4] >> (8 * (i % 4)))); };
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int i = 0; i < 4; ++i) reinterpret_cast<float4 *>(dst)[i] = make_float4(at(4 * i), at(4 * i + 1), at(4 * i + 2), at(4 * i + 3));
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      reinterpret_cast<uint4 *>(dst)[i] = make_uint4(pack2<T>(at(8 * i), at(8 * i + 1)), pack2<T>(at(8 * i + 2), at(8 * i + 3)),
                                                     pack2<T>(at(8 * i + 4), at(8 * i + 5)), pack2<T>(at(8 * i + 6), at(8 * i + 7)));
  }
}

/* The keys of a landed tile as the compute tile the mma reads: the landed tile itself when K is T;
 * else widened into `widened` (16 fp8 bytes a thread at a time, consecutive threads on consecutive
 * chunks), followed by a barrier since every warp reads all of it. All threads call it. */
template <class T, class K>
__device__ const T *ready_keys(const K *landed, T *widened, int32_t dim, int32_t stride, int32_t landing_stride) {
  if constexpr (!TileLayout<T, K>::kWiden) {
    return landed;
  } else {
    static_assert(sizeof(K) == 1, "widening reads 16 key elements a chunk");
    /* thread i takes chunk i % chunks of rows i / chunks, i / chunks + passes, ...: two divisions a
     * tile, none a chunk; not unrolled (a full unroll with a constant head_dim keeps several chunks
     * live beside the kernel's state and spills on sm_90) */
    const int32_t chunks = dim / 16, passes = kThreads / chunks, c = threadIdx.x % chunks;
    if (threadIdx.x < passes * chunks) {
#pragma unroll 1
      for (int32_t r = threadIdx.x / chunks; r < kTileRows; r += passes)
        widen16<T>(widened + r * stride + 16 * c, *reinterpret_cast<const uint4 *>(landed + r * landing_stride + 16 * c));
    }
    __syncthreads();
    return widened;
  }
}

/* Enqueues the block's cp.async copies of a 64-row tile: row r from row_of(r) (NULL: zeros), dim
 * elements, 16 bytes a copy, consecutive threads on consecutive chunks of a row. `dummy` is any
 * valid global address (not read). */
template <class T, class RowOf>
__device__ void stage_rows(T *tile, RowOf row_of, int32_t dim, int32_t stride, const T *dummy) {
  constexpr int kPerChunk = 16 / (int)sizeof(T);
  const int32_t chunks = dim / kPerChunk;
  for (int32_t e = threadIdx.x; e < kTileRows * chunks; e += kThreads) {
    const int32_t r = e / chunks, c = e - r * chunks;
    const T *row = row_of(r);
    cp_async_16(tile + r * stride + c * kPerChunk, row ? row + c * kPerChunk : dummy, row ? 16 : 0);
  }
}

/* The same from a table of row addresses in shared memory (K rows, resolved once per row). */
template <class T>
__device__ void stage_tile(T *tile, const T *const *src, int32_t dim, int32_t stride, const T *dummy) {
  stage_rows(tile, [src](int32_t r) { return src[r]; }, dim, stride, dummy);
}

/* The mma k-steps read columns [dim, padded_dim) of every tile: zeros, written once per block
 * (cp.async only ever writes [0, dim)). */
template <class T>
__device__ void zero_padding(T *tiles, int32_t count, int32_t dim, int32_t stride) {
  const int32_t pad = padded_dim<T>(dim) - dim;
  if (pad == 0) return;
  for (int32_t e = threadIdx.x; e < count * kTileRows * pad; e += kThreads) {
    const int32_t r = e / pad;
    tiles[r * stride + dim + (e - r * pad)] = T(0.0f);
  }
}

/* s[nt][i] = <q row, key> for this warp's 16 query rows (q_rows: row 0 of them) and the tile's 64
 * keys, in the mma accumulator layout: lane (g = lane / 4, t = lane % 4) holds rows g (i = 0, 1) and
 * g + 8 (i = 2, 3), keys 8 nt + 2t + (i % 2). Tensor cores for f16/bf16 (A by ldmatrix.x4 from the
 * row-major query tile, B by ldmatrix.x4 from the key tile, two n-tiles at a time). */
template <class T, int D>
__device__ void warp_logits(float (&s)[8][4], const T *q_rows, const T *keys, int32_t dim, int32_t stride) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;
  if constexpr (std::is_same<T, float>::value) {
    /* exact fp32: float4 FMAs over d, the same fragment layout */
    const int g = lane >> 2, t = lane & 3;
    const float *qa = q_rows + g * stride, *qb = q_rows + (g + 8) * stride;
#pragma unroll 2
    for (int32_t d = 0; d < dim; d += 4) {
      const float4 x = *reinterpret_cast<const float4 *>(qa + d), y = *reinterpret_cast<const float4 *>(qb + d);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float4 k = *reinterpret_cast<const float4 *>(keys + (8 * nt + 2 * t + i) * stride + d);
          s[nt][i] = fmaf(x.w, k.w, fmaf(x.z, k.z, fmaf(x.y, k.y, fmaf(x.x, k.x, s[nt][i]))));
          s[nt][2 + i] = fmaf(y.w, k.w, fmaf(y.z, k.z, fmaf(y.y, k.y, fmaf(y.x, k.x, s[nt][2 + i]))));
        }
    }
  } else {
    const int32_t steps = (D ? padded_dim<T>(D) : padded_dim<T>(dim)) / 16;
    const T *a_row = q_rows + (lane % 16) * stride + 8 * (lane / 16);
    const T *b_row = keys + ((lane % 8) + 8 * (lane / 16)) * stride + 8 * ((lane / 8) % 2);
#pragma unroll
    for (int32_t k = 0; k < steps; ++k) {
      uint32_t a[4];
      ldmatrix<4>(a, a_row + 16 * k);
#pragma unroll
      for (int np = 0; np < 4; ++np) { /* keys 16 np .. 16 np + 15: n-tiles 2 np and 2 np + 1 */
        uint32_t b[4];
        ldmatrix<4>(b, b_row + 16 * np * stride + 16 * k);
        const uint32_t lo[2] = {b[0], b[1]}, hi[2] = {b[2], b[3]};
        mma_m16n8k16<T>(s[2 * np], a, lo);
        mma_m16n8k16<T>(s[2 * np + 1], a, hi);
      }
    }
  }
}

__device__ inline bool is_finite(float x) { return fabsf(x) < INFINITY; }

/* max that keeps NaN (fmaxf drops it). */
__device__ inline float max_keep_nan(float a, float b) { return (a != a || a > b) ? a : b; }

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

/* How the normaliser splits the keys: blocks (row block rb, split s) at blockIdx.x = s * row_blocks
 * + (row_blocks - 1 - rb), so later (longer) rows start first; split s covers keys
 * [s * keys, (s + 1) * keys), a multiple of the tile. */
struct Splits {
  int32_t row_blocks; /* the most 64-row blocks of one (sequence, KV head)                        */
  int32_t count;      /* C of kvc_plan_workspace_size                                             */
  int32_t keys;
};

/* ---- pass 1: the normaliser ------------------------------------------------------------------
 * Rows of (sequence b, KV head h): pairs p = i * G + gi (observation row obs_indptr[b] + i, q head
 * h * G + gi), query-major so a block's rows have neighbouring positions. With one split, lse2[idx]
 * = log2 of the sum of exp2(logit) over the keys the row sees; else partials[idx * count + split] =
 * (max, sum) over the split's keys; idx = (layer * obs_total + row) * num_q_heads + g. Layers with
 * the engine's normalisers (or unreadable) have nothing to do. */
template <class T, class K, int D>
__global__ void __launch_bounds__(kThreads)
    normaliser_kernel(kvc_plan_view_t plan, kvc_paged_kv_t cache, Layers layers, Splits splits, float2 *partials,
                      float *lse2) {
  KVC_DYNAMIC_SMEM(unsigned char, smem);
  const int32_t dim = D ? D : plan.head_dim, G = plan.group_size;
  const TileLayout<T, K> layout = normaliser_layout<T, K>(dim);
  const int32_t stride = layout.stride, landing_stride = layout.landing_stride;
  T *const q_tile = layout.compute_tile(smem, 0);
  T *const widened = layout.compute_tile(smem, 1); /* K != T only */
  K *const k_tiles = layout.landing_tile(smem, 0); /* two buffers of kTileRows * landing_stride */
  const K **const k_src = layout.row_table(smem); /* [2][64] */
  /* each row's idx (above), -1 past the last pair: computed once, so neither a 64-bit division
   * nor the layer stays live to the end of the kernel (either spilled on sm_90) */
  __shared__ int64_t out_index[kTileRows];
  const int32_t h = blockIdx.y % plan.num_kv_heads, layer = blockIdx.y / plan.num_kv_heads, b = blockIdx.z;
  const LayerInputs in = layer_inputs(layers, plan, layer);
  if (!in.readable || in.lse) return;
  cache.k = in.k; /* the descriptor every K row of the layer is resolved through */
  const T *const queries = static_cast<const T *>(in.queries);
  const int32_t split = blockIdx.x / splits.row_blocks, rb = splits.row_blocks - 1 - blockIdx.x % splits.row_blocks;
  const int32_t obs0 = plan.obs_indptr[b];
  const int64_t pairs = (int64_t)(plan.obs_indptr[b + 1] - obs0) * G, p0 = (int64_t)rb * kTileRows;
  if (p0 >= pairs) return;
  const int64_t p_last = min(pairs, p0 + kTileRows) - 1;
  /* positions and domain starts ascend with the rows: the first and last rows bound the keys */
  const int32_t key_lo = max(split * splits.keys, plan.obs_lo[obs0 + p0 / G]);
  const int32_t key_hi = min((split + 1) * splits.keys, plan.obs_pos[obs0 + p_last / G] + 1);
  if (key_lo >= key_hi) return;
  const int32_t first_key = key_lo / kTileKeys * kTileKeys, tiles = (key_hi - first_key + kTileKeys - 1) / kTileKeys;
  const K *const k_pool = static_cast<const K *>(cache.k);

  zero_padding<T>(q_tile, layout.compute, dim, stride); /* fp8 rows: whole chunks, no padding */
  if constexpr (!TileLayout<T, K>::kWiden) zero_padding<T>(k_tiles, layout.landing, dim, stride);
  /* the block's queries (rows past the last pair are zeros) and the first K tile, one group */
  stage_rows(q_tile, [&](int32_t r) -> const T * {
    const int64_t p = p0 + r;
    return p < pairs ? queries + ((int64_t)(obs0 + p / G) * plan.num_q_heads + h * G + p % G) * dim : nullptr;
  }, dim, stride, queries);
  if (threadIdx.x < kTileRows) {
    const int32_t j = first_key + threadIdx.x;
    k_src[threadIdx.x] = j < key_hi ? key_row<K>(cache, b, j, h) : nullptr;
    const int64_t p = p0 + threadIdx.x;
    out_index[threadIdx.x] = p < pairs ? ((int64_t)layer * plan.obs_total + obs0 + p / G) * plan.num_q_heads + h * G + p % G : -1;
  }
  __syncthreads();
  stage_tile<K>(k_tiles, k_src, dim, landing_stride, k_pool);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane & 3;
  const float scale2 = plan.scale * key_scale<K>(plan, h) * kLog2e; /* (scale * k_scale) * log2 e */
  int32_t lo[2], pos[2];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  bool bad[2] = {false, false};
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t p = p0 + 16 * warp + (lane >> 2) + 8 * rr;
    const int32_t row = obs0 + (int32_t)(p / G);
    lo[rr] = p < pairs ? plan.obs_lo[row] : INT32_MAX; /* a missing row sees nothing */
    pos[rr] = p < pairs ? plan.obs_pos[row] : -1;
  }

  for (int32_t t = 0; t < tiles; ++t) {
    const int32_t next = first_key + (t + 1) * kTileKeys;
    if (t + 1 < tiles && threadIdx.x < kTileRows) {
      const int32_t j = next + threadIdx.x;
      k_src[((t + 1) & 1) * kTileRows + threadIdx.x] = j < key_hi ? key_row<K>(cache, b, j, h) : nullptr;
    }
    __syncthreads(); /* the row table is written; every warp is done with the buffers refilled next */
    if (t + 1 < tiles)
      stage_tile<K>(k_tiles + ((t + 1) & 1) * kTileRows * landing_stride, k_src + ((t + 1) & 1) * kTileRows, dim,
                    landing_stride, k_pool);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads(); /* tile t has landed, all of it */
    const T *keys = ready_keys<T, K>(k_tiles + (t & 1) * kTileRows * landing_stride, widened, dim, stride, landing_stride);

    float s[8][4];
    warp_logits<T, D>(s, q_tile + 16 * warp * stride, keys, dim, stride);
    const int32_t j0 = first_key + t * kTileKeys + 2 * quad;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int32_t j = j0 + 8 * nt + i;
          const bool seen = j >= lo[rr] && j <= pos[rr];
          const float v = s[nt][2 * rr + i] * scale2;
          bad[rr] = bad[rr] || (seen && !is_finite(v));
          s[nt][2 * rr + i] = seen ? v : -INFINITY;
          tile_max = fmaxf(tile_max, s[nt][2 * rr + i]);
        }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_m = fmaxf(m[rr], tile_max);
      if (new_m == -INFINITY) continue; /* nothing seen yet: the same for the row's 4 lanes */
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) sum += exp2f(s[nt][2 * rr + i] - new_m);
      l[rr] = l[rr] * exp2f(m[rr] - new_m) + sum;
      m[rr] = new_m;
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float sum = bad[rr] ? NAN : l[rr]; /* a non-finite logit poisons the row */
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t idx = out_index[16 * warp + (lane >> 2) + 8 * rr];
    if (quad != 0 || idx < 0) continue;
    if (splits.count == 1) lse2[idx] = m[rr] + log2f(sum);
    else partials[idx * splits.count + split] = make_float2(m[rr], sum);
  }
}

/* lse2[idx] from the (max, sum) partials of the splits the row's keys [lo, pos] fall in, merged in
 * split order; an empty partial (sum 0) is skipped, a NaN one poisons. Grid y: the layer. */
__global__ void __launch_bounds__(kThreads)
    combine_normalisers_kernel(kvc_plan_view_t plan, Layers layers, Splits splits, const float2 *partials, float *lse2) {
  const int64_t rows = plan.obs_total * plan.num_q_heads, in_layer = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const LayerInputs in = layer_inputs(layers, plan, blockIdx.y);
  if (in_layer >= rows || !in.readable || in.lse) return;
  const int64_t row = in_layer / plan.num_q_heads, idx = blockIdx.y * rows + in_layer;
  const int32_t first = plan.obs_lo[row] / splits.keys, last = plan.obs_pos[row] / splits.keys;
  float m = -INFINITY, l = 0.0f;
  for (int32_t c = first; c <= last; ++c) {
    const float2 p = partials[idx * splits.count + c];
    if (p.y == 0.0f) continue;
    const float new_m = fmaxf(m, p.x);
    l = l * exp2f(m - new_m) + p.y * exp2f(p.x - new_m);
    m = new_m;
  }
  lse2[idx] = m + log2f(l);
}

/* ---- pass 2: the column sums -----------------------------------------------------------------
 * Rows that see a key of [j0, j1): a contiguous run [r_lo, r_hi) of the sequence's observation
 * rows (positions and domain starts ascend). They are taken as groups of rows, 64 at a time:
 * per q head (SNAPKV, H2O: group gi = q head h * G + gi, rows r_lo ..), or all (row, q head)
 * pairs in one group (TOVA, which averages over the q heads anyway). */
struct RowGroups {
  int32_t r_lo, rows;   /* observation rows r_lo .. r_lo + rows - 1                             */
  int32_t G, per_head;
  __device__ int32_t count() const { return per_head ? G : 1; }
  __device__ int64_t size() const { return per_head ? rows : (int64_t)rows * G; }
  /* Row i of group gi: its observation row and q head within the KV head's group. */
  __device__ void at(int32_t gi, int64_t i, int32_t *row, int32_t *head) const {
    *row = r_lo + (int32_t)(per_head ? i : i / G);
    *head = per_head ? gi : (int32_t)(i % G);
  }
};

/* head_scores: the layers' [num_q_heads][total_tokens] arrays stacked; lse2: the normaliser pass's
 * (kernels of layers without the engine's normalisers). */
template <class T, class K, int D>
__global__ void __launch_bounds__(kThreads)
    column_sums_kernel(kvc_plan_view_t plan, kvc_paged_kv_t cache, Layers layers, const float *lse2,
                       float *head_scores) {
  KVC_DYNAMIC_SMEM(unsigned char, smem);
  __shared__ float divisor[kTileKeys];       /* 0: the key is not scored                     */
  __shared__ float warp_sums[kWarps][kTileKeys];
  const int32_t dim = D ? D : plan.head_dim, G = plan.group_size;
  const TileLayout<T, K> layout = column_sums_layout<T, K>(dim);
  const int32_t stride = layout.stride;
  T *const q_tiles = layout.compute_tile(smem, 0); /* two buffers of kTileRows * stride */
  T *const widened = layout.compute_tile(smem, 2); /* K != T only */
  K *const k_tile = layout.landing_tile(smem, 0);
  const K **const k_src = layout.row_table(smem);
  const int32_t h = blockIdx.y % plan.num_kv_heads, layer = blockIdx.y / plan.num_kv_heads, b = blockIdx.z;
  const int32_t n = plan.seq_lens[b], j0 = blockIdx.x * kTileKeys;
  const LayerInputs in = layer_inputs(layers, plan, layer);
  if (j0 >= n || !in.readable) return;
  const int32_t j1 = min(n, j0 + kTileKeys);
  cache.k = in.k; /* the descriptor every K row of the layer is resolved through */
  const T *const queries = static_cast<const T *>(in.queries);
  /* the engine's normalisers are natural-log; this file's are base 2 */
  const float *const lse = in.lse ? in.lse : lse2 + (int64_t)layer * plan.obs_total * plan.num_q_heads;
  const float lse_to_base2 = in.lse ? kLog2e : 1.0f;

  bool scored = false;
  if (threadIdx.x < kTileKeys) {
    const int32_t j = j0 + threadIdx.x, d = j < n ? domain_of(plan, b, j) : -1;
    float div = 0.0f;
    if (d >= 0 && j < plan.domains[d].scored_end) {
      /* the domain's queries are its last nq positions: those at or after j see j */
      const kvc_domain_t dom = plan.domains[d];
      div = (float)(dom.obs_end - dom.obs_begin - max(0, j - plan.obs_pos[dom.obs_begin]));
      scored = true;
    }
    divisor[threadIdx.x] = div;
    k_src[threadIdx.x] = j < n ? key_row<K>(cache, b, j, h) : nullptr;
  }
  zero_padding<T>(q_tiles, layout.compute, dim, stride); /* fp8 rows: whole chunks, no padding */
  if constexpr (!TileLayout<T, K>::kWiden) zero_padding<T>(k_tile, layout.landing, dim, stride);
  if (!__syncthreads_or(scored)) return; /* e.g. a tile of SnapKV's window */

  RowGroups groups;
  {
    const int32_t obs0 = plan.obs_indptr[b], obs1 = plan.obs_indptr[b + 1];
    groups.r_lo = obs0 + kvc_count_below(plan.obs_pos + obs0, obs1 - obs0, j0);
    groups.rows = kvc_count_below(plan.obs_lo + groups.r_lo, obs1 - groups.r_lo, j1);
    groups.G = G;
    groups.per_head = plan.method != KVC_SCORE_TOVA;
  }
  const int64_t stages_per_group = (groups.size() + kTileRows - 1) / kTileRows;
  const int64_t stages = stages_per_group * groups.count();
  if (stages == 0) return;

  /* Rows [64 st, 64 st + 64) of group gi into a query tile (zeros past the group's end). */
  auto stage_queries = [&](int64_t stage, T *tile) {
    const int32_t gi = (int32_t)(stage / stages_per_group);
    const int64_t i0 = (stage % stages_per_group) * kTileRows;
    stage_rows(tile, [&](int32_t r) -> const T * {
      if (i0 + r >= groups.size()) return nullptr;
      int32_t obs, head;
      groups.at(gi, i0 + r, &obs, &head);
      return queries + ((int64_t)obs * plan.num_q_heads + h * G + head) * dim;
    }, dim, stride, queries);
  };
  stage_tile<K>(k_tile, k_src, dim, layout.landing_stride, static_cast<const K *>(cache.k));
  stage_queries(0, q_tiles);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane & 3;
  const float scale2 = plan.scale * key_scale<K>(plan, h) * kLog2e; /* (scale * k_scale) * log2 e */
  const T *keys = nullptr;
  float sums[8][2];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) sums[nt][0] = sums[nt][1] = 0.0f;

  for (int64_t st = 0; st < stages; ++st) {
    __syncthreads(); /* every warp is done with the query tile refilled next */
    if (st + 1 < stages) stage_queries(st + 1, q_tiles + ((st + 1) & 1) * kTileRows * stride);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads(); /* the K tile and query tile st have landed */
    if (st == 0) /* the same for every thread */
      keys = ready_keys<T, K>(k_tile, widened, dim, stride, layout.landing_stride);

    float s[8][4];
    warp_logits<T, D>(s, q_tiles + (st & 1) * kTileRows * stride + 16 * warp * stride, keys, dim, stride);
    const int32_t gi = (int32_t)(st / stages_per_group);
    const int64_t i0 = (st % stages_per_group) * kTileRows + 16 * warp + (lane >> 2);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      if (i0 + 8 * rr >= groups.size()) continue;
      int32_t obs, head;
      groups.at(gi, i0 + 8 * rr, &obs, &head);
      const int32_t lo = plan.obs_lo[obs], pos = plan.obs_pos[obs];
      float row_lse = lse[(int64_t)obs * plan.num_q_heads + h * G + head] * lse_to_base2;
      if (!is_finite(row_lse)) row_lse = NAN; /* a poisoned row (or engine lse) poisons its keys */
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int32_t j = j0 + 8 * nt + 2 * quad + i;
          const float v = s[nt][2 * rr + i] * scale2;
          const float p = is_finite(v) ? exp2f(v - row_lse) : NAN;
          if (j >= lo && j <= pos && j < j1) sums[nt][i] += p;
        }
    }
    if ((st + 1) % stages_per_group == 0) { /* the group is complete: reduce it in a fixed order */
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float x = sums[nt][i];
          x += __shfl_xor_sync(0xffffffffu, x, 4);
          x += __shfl_xor_sync(0xffffffffu, x, 8);
          x += __shfl_xor_sync(0xffffffffu, x, 16);
          if (lane < 4) warp_sums[warp][8 * nt + 2 * quad + i] = x;
          sums[nt][i] = 0.0f;
        }
      __syncthreads();
      if (threadIdx.x < kTileKeys && divisor[threadIdx.x] > 0.0f) {
        const int32_t head_row = groups.per_head ? h * G + gi : h;
        const float total = ((warp_sums[0][threadIdx.x] + warp_sums[1][threadIdx.x]) + warp_sums[2][threadIdx.x]) +
                            warp_sums[3][threadIdx.x];
        const int64_t layer_at = blockIdx.y / plan.num_kv_heads; /* not `layer`: as at the normaliser's end */
        head_scores[plan.num_q_heads * (layer_at * plan.total_tokens + plan.token_offsets[b]) + (int64_t)head_row * n +
                    j0 + threadIdx.x] =
            total / divisor[threadIdx.x];
      }
    }
  }
  cp_async_wait<0>();
}

/* ---- pass 3: pooling, group reduce, the score layout ------------------------------------------ */

/* Over q-head rows [g0, g0 + count) of head_scores: SNAPKV pools each over the domain's scored
 * keys; the sum (mean) or maximum over the rows, NaN kept. */
__device__ float reduce_heads(const kvc_plan_view_t &plan, const float *head_row0, int32_t n, const kvc_domain_t &dom,
                              int32_t j, int32_t g0, int32_t count, bool mean) {
  const int32_t half = plan.method == KVC_SCORE_SNAPKV ? plan.pool_kernel / 2 : 0;
  const int32_t lo = max(dom.start, j - half), hi = min(dom.scored_end - 1, j + half);
  const bool pool_max = plan.pool == KVC_POOL_MAX;
  float reduced = mean ? 0.0f : -INFINITY;
  for (int32_t g = g0; g < g0 + count; ++g) {
    const float *row = head_row0 + (int64_t)g * n;
    float pooled = pool_max ? -INFINITY : 0.0f;
    for (int32_t i = lo; i <= hi; ++i) pooled = pool_max ? max_keep_nan(pooled, row[i]) : pooled + row[i];
    if (!pool_max && half > 0) pooled /= (float)(2 * half + 1); /* zero padding: AVG divides by the kernel */
    reduced = mean ? reduced + pooled : max_keep_nan(reduced, pooled);
  }
  return reduced;
}

/* ||row||_2 of dim elements, by the 2 lanes (lane ^ 1) that share the row, each summing half: scaled
 * by the power of two of the row's max-abs, so no square overflows or underflows to 0; at most
 * FLT_MAX for a finite row (as the CPU backend stores it), inf / NaN when the row has one. Both
 * lanes must call it (it shuffles). */
template <class K>
__device__ float pair_norm(const K *row, int32_t dim) {
  const int32_t half = dim / 2, d0 = (threadIdx.x & 1) * half;
  float top = 0.0f;
  for (int32_t d = d0; d < d0 + half; ++d) top = max_keep_nan(top, fabsf(key_float(row[d])));
  top = max_keep_nan(top, __shfl_xor_sync(0xffffffffu, top, 1));
  const int exponent = is_finite(top) && top > 0.0f ? ilogbf(top) : 0;
  float squares = 0.0f;
  for (int32_t d = d0; d < d0 + half; ++d) {
    const float x = ldexpf(key_float(row[d]), -exponent);
    squares = fmaf(x, x, squares);
  }
  squares += __shfl_xor_sync(0xffffffffu, squares, 1);
  return is_finite(top) && top > 0.0f ? fminf(ldexpf(sqrtf(squares), exponent), FLT_MAX) : top;
}

/* blockIdx.y read anew (volatile: not merged with the first read), so that a value derived from it
 * need not stay live in a register across a long loop. */
__device__ __forceinline__ uint32_t reread_block_y() {
#if defined(__CUDACC__)
  uint32_t y;
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(y));
  return y;
#else
  return blockIdx.y;
#endif
}

/* Grid (block of kThreads keys, layer * row sets + KV head row set, sequence); TOVA has one row set
 * that writes every KV head. Writes (or adds) each key's score; +inf for keys no domain scores, NaN
 * for those it scores in an unreadable layer. K: the cache's element type (only KNORM reads keys). */
template <class K>
__global__ void __launch_bounds__(kThreads)
    write_scores_kernel(kvc_plan_view_t plan, kvc_paged_kv_t cache, Layers layers, const float *head_scores,
                        float *scores, int accumulate) {
  KVC_DYNAMIC_SMEM(K, smem); /* KNORM: one key tile and its row table */
  __shared__ float norms[kThreads];
  const kvc_score_method_t method = plan.method;
  const int32_t row_sets = method == KVC_SCORE_TOVA ? 1 : plan.num_kv_heads;
  const int32_t h = blockIdx.y % row_sets, layer = blockIdx.y / row_sets, b = blockIdx.z, n = plan.seq_lens[b];
  const int32_t j0 = blockIdx.x * kThreads;
  if (j0 >= n) return;
  const int32_t j = j0 + threadIdx.x;
  const LayerInputs in = layer_inputs(layers, plan, layer);
  cache.k = in.k; /* the descriptor every K row of the layer is resolved through */
  if (method == KVC_SCORE_KNORM && in.readable) {
    const int32_t dim = plan.head_dim, stride = row_stride<K>(dim);
    const K **const k_src = reinterpret_cast<const K **>(smem + kTileRows * stride);
    for (int32_t t0 = j0; t0 < min(n, j0 + kThreads); t0 += kTileKeys) {
      __syncthreads(); /* the previous tile's readers are done */
      if (threadIdx.x < kTileKeys)
        k_src[threadIdx.x] = t0 + (int32_t)threadIdx.x < n ? key_row<K>(cache, b, t0 + threadIdx.x, h) : nullptr;
      __syncthreads();
      stage_tile<K>(smem, k_src, dim, stride, static_cast<const K *>(cache.k));
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float norm = pair_norm<K>(smem + (threadIdx.x / 2) * stride, dim); /* 2 lanes per key */
      /* fp8 keys: k_scale * ||k||, saturated like the norm (NaN stays NaN; e4m3 has no inf) */
      if constexpr (std::is_same<K, Fp8E4M3>::value)
        norm = is_finite(norm) ? fminf(norm * key_scale<K>(plan, h), FLT_MAX) : norm;
      if ((threadIdx.x & 1) == 0) norms[t0 - j0 + threadIdx.x / 2] = norm;
    }
    __syncthreads();
  }
  if (j >= n) return;
  /* The head and layer again, from a fresh read of the block index: kept live across KNORM's
   * staging loop, ptxas spilled one of them to local memory (f16 / bf16 keys). */
  const uint32_t block_y = reread_block_y();
  const int32_t row_h = (int32_t)(block_y % (uint32_t)row_sets), row_layer = (int32_t)(block_y / (uint32_t)row_sets);

  const int32_t d = domain_of(plan, b, j);
  float value = INFINITY;
  int32_t first_row = row_h, rows = 1;
  if (method == KVC_SCORE_TOVA) first_row = 0, rows = plan.num_kv_heads;
  if (d >= 0 && j < plan.domains[d].scored_end && !in.readable) {
    value = NAN;
  } else if (d >= 0 && j < plan.domains[d].scored_end) {
    const kvc_domain_t dom = plan.domains[d];
    const float *head_row0 = head_scores + plan.num_q_heads * (row_layer * plan.total_tokens + plan.token_offsets[b]);
    const bool mean = plan.group_reduce == KVC_REDUCE_MEAN;
    switch (method) {
      case KVC_SCORE_SNAPKV:
      case KVC_SCORE_H2O: {
        const float reduced = reduce_heads(plan, head_row0, n, dom, j, row_h * plan.group_size, plan.group_size, mean);
        value = mean ? reduced / (float)plan.group_size : reduced;
        break;
      }
      case KVC_SCORE_TOVA: /* head_scores row h holds the sum over KV head h's q heads */
        value = reduce_heads(plan, head_row0, n, dom, j, 0, plan.num_kv_heads, true) / (float)plan.num_q_heads;
        break;
      case KVC_SCORE_KNORM: value = -norms[threadIdx.x]; break;
      case KVC_SCORE_STREAMING:
        value = plan.span_local ? (float)((double)(j - dom.start) / (double)(dom.end - dom.start)) : (float)j;
        break;
    }
  }
  for (int32_t r = first_row; r < first_row + rows; ++r) {
    float *out = scores + row_layer * plan.score_elems + kvc_score_row(&plan, b, r) + j;
    *out = accumulate ? *out + value : value;
  }
}

/* ---- the launcher ------------------------------------------------------------------------------ */

/* The normaliser's split of the keys (see Splits): C = min(ceil(1024 / R), ceil(n_max / 512)) splits
 * for R row blocks in all, each a multiple of 64 keys. */
Splits normaliser_splits(const kvc_plan_view_t &host) {
  int64_t row_blocks = 0, most = 1;
  for (int32_t b = 0; b < host.batch; ++b) {
    const int64_t blocks = ((int64_t)(host.obs_indptr[b + 1] - host.obs_indptr[b]) * host.group_size + kTileRows - 1) /
                           kTileRows;
    row_blocks += blocks;
    most = blocks > most ? blocks : most;
  }
  row_blocks *= host.num_kv_heads;
  const int64_t n_max = host.max_seq_len, by_blocks = (kTargetBlocks + row_blocks - 1) / (row_blocks ? row_blocks : 1);
  const int64_t by_keys = (n_max + kMinSplitKeys - 1) / kMinSplitKeys;
  int64_t count = by_blocks < by_keys ? by_blocks : by_keys;
  count = count < 1 ? 1 : count;
  const int64_t keys = ((n_max + count - 1) / count + kTileKeys - 1) / kTileKeys * kTileKeys;
  Splits s;
  s.row_blocks = (int32_t)most;
  s.keys = (int32_t)keys;
  s.count = (int32_t)((n_max + keys - 1) / keys);
  return s;
}

/* What one execute call runs, beyond the plan. The workspace arrays are stacked per layer. */
struct ScoreRun {
  bool attention;
  Layers layers;
  Splits splits;
  float2 *partials; /* splits.count > 1 */
  float *lse2, *head_scores;
};

/* Dynamic shared memory above the default 48 KiB needs the kernel's opt-in. */
template <class Kernel>
kvc_status_t allow_smem(const kvc_op_args_t *args, Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return KVC_SUCCESS;
  cudaError_t err = KVC_SET_MAX_DYNAMIC_SMEM(kernel, bytes);
  if (err == cudaSuccess) return KVC_SUCCESS;
  return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_CUDA,
                         "kvc_score: raising a kernel's shared memory to %zu bytes failed: %s", bytes,
                         cudaGetErrorString(err));
}

template <class T, class K, int D>
kvc_status_t launch_attention(const kvc_op_args_t *args, const ScoreRun &run) {
  const kvc_plan_view_t &plan = args->plan;
  const kvc_paged_kv_t cache = *args->cache;
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  const unsigned layer_heads = (unsigned)(run.layers.count * plan.num_kv_heads);
  /* only the single-layer call knows on the host that the engine gave every normaliser */
  if (args->layers || !args->lse) {
    const size_t smem = normaliser_layout<T, K>(plan.head_dim).bytes();
    kvc_status_t status = allow_smem(args, normaliser_kernel<T, K, D>, smem);
    if (status != KVC_SUCCESS) return status;
    const Splits &s = run.splits;
    KVC_LAUNCH((normaliser_kernel<T, K, D>), dim3((unsigned)(s.count * s.row_blocks), layer_heads, plan.batch),
               dim3(kThreads), smem, stream, plan, cache, run.layers, s, run.partials, run.lse2);
    if (s.count > 1) {
      const int64_t rows = plan.obs_total * plan.num_q_heads;
      KVC_LAUNCH(combine_normalisers_kernel, dim3((unsigned)((rows + kThreads - 1) / kThreads), run.layers.count),
                 dim3(kThreads), 0, stream, plan, run.layers, s, run.partials, run.lse2);
    }
  }
  const size_t smem = column_sums_layout<T, K>(plan.head_dim).bytes();
  kvc_status_t status = allow_smem(args, column_sums_kernel<T, K, D>, smem);
  if (status != KVC_SUCCESS) return status;
  KVC_LAUNCH((column_sums_kernel<T, K, D>), dim3((plan.max_seq_len + kTileKeys - 1) / kTileKeys, layer_heads,
                                                 plan.batch),
             dim3(kThreads), smem, stream, plan, cache, run.layers, run.lse2, run.head_scores);
  return KVC_SUCCESS;
}

/* T: the queries' type, K: the keys' element type. */
template <class T, class K>
kvc_status_t launch_score(const kvc_op_args_t *args, const ScoreRun &run) {
  const kvc_plan_view_t &plan = args->plan;
  if (run.attention) {
    kvc_status_t status;
    if constexpr (std::is_same<T, float>::value) { /* the exact path: one instantiation serves */
      status = launch_attention<T, K, 0>(args, run);
    } else {
      switch (plan.head_dim) {
        case 64: status = launch_attention<T, K, 64>(args, run); break;
        case 128: status = launch_attention<T, K, 128>(args, run); break;
        case 256: status = launch_attention<T, K, 256>(args, run); break;
        default: status = launch_attention<T, K, 0>(args, run);
      }
    }
    if (status != KVC_SUCCESS) return status;
  }
  const size_t smem = plan.method == KVC_SCORE_KNORM ? knorm_smem_bytes<K>(plan.head_dim) : 0;
  kvc_status_t status = allow_smem(args, write_scores_kernel<K>, smem);
  if (status != KVC_SUCCESS) return status;
  const int32_t row_sets = plan.method == KVC_SCORE_TOVA ? 1 : plan.num_kv_heads;
  KVC_LAUNCH((write_scores_kernel<K>),
             dim3((plan.max_seq_len + kThreads - 1) / kThreads, (unsigned)(run.layers.count * row_sets), plan.batch),
             dim3(kThreads), smem, static_cast<cudaStream_t>(args->stream), plan, *args->cache, run.layers,
             run.head_scores, args->scores, args->accumulate);
  return KVC_SUCCESS;
}

}  // namespace

extern "C" kvc_status_t kvc_score_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan;
  if (plan.head_dim % 8 != 0 || plan.head_dim > 256)
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                           "kvc_score: head_dim %d is not supported on CUDA (multiples of 8 up to 256)", plan.head_dim);
  const int32_t num_layers = args->num_layers;
  if ((int64_t)num_layers * plan.num_kv_heads > kMaxGridY)
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                           "%d layers x %d KV heads: the CUDA score kernels put (layer, KV head) on a grid "
                           "axis of at most %d blocks", num_layers, plan.num_kv_heads, kMaxGridY);
  ScoreRun run;
  memset(&run, 0, sizeof run);
  run.attention = (plan.method == KVC_SCORE_SNAPKV || plan.method == KVC_SCORE_H2O || plan.method == KVC_SCORE_TOVA) &&
                  plan.obs_total > 0;
  if (run.attention) {
    if (!args->host_plan)
      return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INTERNAL, "kvc_score: no host plan");
    run.splits = normaliser_splits(*args->host_plan);
    const size_t rows = (size_t)num_layers * (size_t)plan.obs_total * (size_t)plan.num_q_heads;
    if (run.splits.count > 1)
      run.partials = static_cast<float2 *>(kvc_carve(ws, sizeof(float2) * rows * (size_t)run.splits.count));
    run.lse2 = static_cast<float *>(kvc_carve(ws, sizeof(float) * rows));
    run.head_scores = static_cast<float *>(
        kvc_carve(ws, sizeof(float) * (size_t)num_layers * (size_t)plan.num_q_heads * (size_t)plan.total_tokens));
  }
  if (!ws->base) return KVC_SUCCESS;
  run.layers.count = num_layers;
  if (args->layers) {
    run.layers.k = args->layers->k;
    run.layers.queries = args->layers->queries;
    run.layers.lse = args->layers->lse;
  } else {
    run.layers.one_k = args->cache->k;
    run.layers.one_queries = args->queries;
    run.layers.one_lse = args->lse;
  }

  /* the kernels copy K rows and queries 16 bytes at a time (the layer-batched call's pointers are
   * checked by the kernels, layer_inputs) */
  const bool reads_keys = run.attention || plan.method == KVC_SCORE_KNORM, layered = args->layers != nullptr;
  const kvc_paged_kv_t &c = *args->cache;
  const int64_t row_bytes = kvc_dtype_size(plan.dtype);
  const long long page_bytes = c.stride_page * row_bytes, token_bytes = c.stride_token * row_bytes,
                  head_bytes = c.stride_head * row_bytes;
  if (reads_keys && layered && (page_bytes % 16 || token_bytes % 16 || head_bytes % 16))
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                           "kvc_score_layers: on CUDA the K strides in bytes (page %lld, token %lld, head %lld) must "
                           "be multiples of 16 bytes", page_bytes, token_bytes, head_bytes);
  if (reads_keys && !layered && (!aligned16(c.k) || page_bytes % 16 || token_bytes % 16 || head_bytes % 16 ||
                                 (run.attention && !aligned16(args->queries))))
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_NOT_SUPPORTED,
                           "kvc_score: on CUDA the K pool (%p), its strides in bytes (page %lld, token %lld, head "
                           "%lld) and the queries (%p) must be multiples of 16 bytes",
                           c.k, page_bytes, token_bytes, head_bytes, args->queries);
  kvc_status_t status;
  switch (plan.dtype) {
    case KVC_DTYPE_F32: status = launch_score<float, float>(args, run); break;
    case KVC_DTYPE_F16: status = launch_score<__half, __half>(args, run); break;
    case KVC_DTYPE_BF16: status = launch_score<__nv_bfloat16, __nv_bfloat16>(args, run); break;
    default: /* FP8 keys with the plan's query type (KNORM and STREAMING have no queries: any serves) */
      switch (plan.query_dtype) {
        case KVC_DTYPE_F32: status = launch_score<float, Fp8E4M3>(args, run); break;
        case KVC_DTYPE_BF16: status = launch_score<__nv_bfloat16, Fp8E4M3>(args, run); break;
        default: status = launch_score<__half, Fp8E4M3>(args, run);
      }
  }
  if (status != KVC_SUCCESS) return status;
  return kvc_launch_status(args, "kvc_score");
}
