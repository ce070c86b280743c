/*
 * score_gemm_cublas.cu - kernels/score_gemm.h through cuBLAS (the CUDA backend). Not compiled by
 * the SIMT emulator; its substitute is tests/simt/subst/score_gemm_emu.cpp.
 *
 * One cublasGemmStridedBatchedEx per product, fp32 output and CUBLAS_COMPUTE_32F: f16 and bf16
 * inputs run on tensor cores (their products are exact in fp32, the sums are fp32); f32 inputs
 * are a plain fp32 GEMM (CUBLAS_COMPUTE_32F never down-converts to TF32, whatever the handle's
 * math mode). The key tile is shared by the batch (stride 0). The handle's workspace is a slice of
 * the caller's workspace (kvc_score_gemm_bind), so no call allocates and all can be captured.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "ops.h"
#include "score_gemm.h"

namespace {

kvc_status_t blas_fail(char *detail, size_t cap, const char *what, cublasStatus_t status) {
  return kvc_fail_detail(detail, cap, status == CUBLAS_STATUS_NOT_SUPPORTED ? KVC_ERROR_NOT_SUPPORTED : KVC_ERROR_CUDA,
                         "kvc_score: %s failed: %s (%s)", what, cublasGetStatusName(status),
                         cublasGetStatusString(status));
}

}  // namespace

extern "C" kvc_status_t kvc_score_gemm_bind(void *blas, void *stream, void *workspace, size_t workspace_bytes,
                                            char *detail, size_t detail_cap) {
  if (!blas)
    return kvc_fail_detail(detail, detail_cap, KVC_ERROR_INTERNAL, "kvc_score: the context has no cuBLAS handle");
  cublasHandle_t handle = static_cast<cublasHandle_t>(blas);
  /* cublasSetStream resets the workspace to the handle's own pool: set ours after it */
  cublasStatus_t status = cublasSetStream(handle, static_cast<cudaStream_t>(stream));
  if (status != CUBLAS_STATUS_SUCCESS) return blas_fail(detail, detail_cap, "cublasSetStream", status);
  status = cublasSetWorkspace(handle, workspace, workspace_bytes);
  if (status != CUBLAS_STATUS_SUCCESS) return blas_fail(detail, detail_cap, "cublasSetWorkspace", status);
  return KVC_SUCCESS;
}

extern "C" kvc_status_t kvc_score_gemm_logits(void *blas, const kvc_score_gemm_t *g, char *detail,
                                              size_t detail_cap) {
  cudaDataType_t type;
  switch (g->dtype) {
    case KVC_DTYPE_F32: type = CUDA_R_32F; break;
    case KVC_DTYPE_F16: type = CUDA_R_16F; break;
    case KVC_DTYPE_BF16: type = CUDA_R_16BF; break;
    default:
      return kvc_fail_detail(detail, detail_cap, KVC_ERROR_NOT_SUPPORTED, "kvc_score: no GEMM for dtype %d",
                             (int)g->dtype);
  }
  cublasHandle_t handle = static_cast<cublasHandle_t>(blas);
  const float alpha = g->alpha, beta = 0.0f;
  /* Column-major view: the key tile is a dim x keys matrix (ld k_row_stride), a query block a
   * dim x rows matrix (ld q_row_stride). key_major 0 wants C = K^T Q (keys x rows, ld out_ld:
   * out[r * ld + t]); key_major 1 wants C = Q^T K (rows x keys: out[t * ld + r]). */
  const void *a, *b;
  long long lda, ldb, stride_a, stride_b;
  int m, n;
  if (!g->key_major) {
    a = g->k, lda = g->k_row_stride, stride_a = 0, m = g->keys;
    b = g->q, ldb = g->q_row_stride, stride_b = g->q_batch_stride, n = g->rows;
  } else {
    a = g->q, lda = g->q_row_stride, stride_a = g->q_batch_stride, m = g->rows;
    b = g->k, ldb = g->k_row_stride, stride_b = 0, n = g->keys;
  }
  cublasStatus_t status = cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, g->dim, &alpha, a, type, (int)lda, stride_a, b, type, (int)ldb, stride_b,
      &beta, g->out, CUDA_R_32F, (int)g->out_ld, (long long)g->out_batch_stride, g->batch, CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT);
  if (status != CUBLAS_STATUS_SUCCESS) return blas_fail(detail, detail_cap, "cublasGemmStridedBatchedEx", status);
  return KVC_SUCCESS;
}
