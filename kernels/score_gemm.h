/*
 * score_gemm.h - the large-observation-set path of scoring: logits tiles through a GEMM library.
 *
 * kernels/score.cu scores a domain with more than `gemm_threshold` observation queries (default
 * KVC_GEMM_THRESHOLD; H2O over a whole prompt makes the work quadratic) by tiles: it gathers a
 * tile of keys of one (sequence, KV head) from the pages into a contiguous buffer (its own
 * kernel), has kvc_score_gemm_logits compute the logits of that tile against a block of
 * observation queries for every q head of the GQA group (one strided-batched GEMM: tensor cores
 * for f16/bf16 with fp32 accumulation, plain fp32 for f32, never TF32), and reduces the logits
 * with its own kernels (softmax normaliser, then the probability sums per key).
 *
 * Two implementations with the same signatures and results: kernels/score_gemm_cublas.cu (cuBLAS,
 * the CUDA backend) and tests/simt/subst/score_gemm_emu.cpp (a plain host GEMM with fp32
 * accumulation, for the SIMT emulator build). Plain C, no CUDA types: `blas` is a cublasHandle_t
 * made with the context (host/device.h), `stream` a cudaStream_t.
 *
 * Tile shape (bounded workspace, independent of sequence length): at most KVC_GEMM_TILE_KEYS keys
 * per tile and at most KVC_GEMM_TILE_ROWS logits rows (query rows x q heads of the group) per GEMM;
 * cuBLAS gets KVC_GEMM_BLAS_WORKSPACE bytes of the caller's workspace, so nothing allocates and the
 * calls can be captured in a CUDA graph. The exact workspace is stated in kvcompress.h
 * (kvc_plan_workspace_size).
 *
 * Tests force the path and small tiles through the environment, read once by kvc_plan_create into
 * the plan (the library keeps no mutable global state):
 *   KVC_SCORE_GEMM_THRESHOLD  domains with more observation queries than this take the GEMM path
 *                             (>= 0; default 128)
 *   KVC_SCORE_GEMM_KEYS       keys per tile (1 .. 65536; default 1024)
 *   KVC_SCORE_GEMM_ROWS       logits rows per GEMM (1 .. 4096; default 4096)
 */
#ifndef KVC_SCORE_GEMM_H
#define KVC_SCORE_GEMM_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_GEMM_THRESHOLD 128               /* observation queries of a domain, exclusive    */
#define KVC_GEMM_TILE_KEYS 1024              /* keys per tile                                  */
#define KVC_GEMM_TILE_ROWS 4096              /* logits rows per GEMM, and the most allowed     */
#define KVC_GEMM_MAX_TILE_KEYS 65536
#define KVC_GEMM_BLAS_WORKSPACE (4u << 20)   /* bytes handed to cuBLAS (cublasSetWorkspace)    */

/* One strided-batched product: for every batch item g < batch, query row r < rows, key t < keys,
 *     logit(g, r, t) = alpha * sum_{d < dim} q[g * q_batch_stride + r * q_row_stride + d]
 *                                           * k[t * k_row_stride + d]
 * in fp32 (inputs f32, f16 or bf16, both in `dtype`; strides in elements; the key tile is shared
 * by every batch item), stored at
 *     out[g * out_batch_stride + r * out_ld + t]      key_major == 0 (a row of keys per query)
 *     out[g * out_batch_stride + t * out_ld + r]      key_major == 1 (a row of queries per key)
 * All pointers are device memory. Enqueued on the stream given to kvc_score_gemm_bind. */
typedef struct {
  kvc_dtype_t dtype;
  int32_t batch, rows, keys, dim;
  const void *q;
  int64_t q_row_stride, q_batch_stride;
  const void *k;
  int64_t k_row_stride;
  float alpha;
  float *out;
  int64_t out_ld, out_batch_stride;
  int key_major;
} kvc_score_gemm_t;

/* Points `blas` at `stream` and at `workspace` (KVC_GEMM_BLAS_WORKSPACE bytes, 256-aligned, from
 * the caller's workspace) for the products that follow. Call once per execute call, before them.
 * KVC_ERROR_CUDA (detail set) if the library refuses; never allocates. */
kvc_status_t kvc_score_gemm_bind(void *blas, void *stream, void *workspace, size_t workspace_bytes, char *detail,
                                 size_t detail_cap);

/* Enqueues one product (see kvc_score_gemm_t). KVC_ERROR_CUDA (detail set) if the library
 * refuses the call; KVC_ERROR_NOT_SUPPORTED for a dtype other than f32, f16, bf16. */
kvc_status_t kvc_score_gemm_logits(void *blas, const kvc_score_gemm_t *gemm, char *detail, size_t detail_cap);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SCORE_GEMM_H */
