/*
 * score_gemm_emu.cpp - kernels/score_gemm.h for the SIMT emulator build (kvcompress_emu), where
 * "device" memory is host memory: a plain host GEMM with the signature and the results of
 * kernels/score_gemm_cublas.cu. Inputs are widened to fp32 exactly (f16 and bf16 fit), products
 * are exact in fp32 like a tensor core's, sums are fp32 (8 interleaved partial sums: the order of
 * a GEMM's fp32 accumulation is unspecified on the GPU too), then scaled by alpha.
 */
#include <vector>

#include "common.h"
#include "ops.h"
#include "score_gemm.h"

namespace {

void widen(const void *base, kvc_dtype_t dtype, int64_t first, int32_t count, float *out) {
  for (int32_t d = 0; d < count; ++d) out[d] = (float)kvc_load_as_double(base, dtype, first + d);
}

float dot(const float *x, const float *y, int32_t dim) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t d = 0;
  for (; d + 8 <= dim; d += 8)
    for (int i = 0; i < 8; ++i) acc[i] += x[d + i] * y[d + i];
  for (; d < dim; ++d) acc[d % 8] += x[d] * y[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

extern "C" kvc_status_t kvc_score_gemm_bind(void *blas, void *stream, void *workspace, size_t workspace_bytes,
                                            char *detail, size_t detail_cap) {
  (void)stream;
  if (!blas)
    return kvc_fail_detail(detail, detail_cap, KVC_ERROR_INTERNAL, "kvc_score: the context has no cuBLAS handle");
  if (!workspace || workspace_bytes < KVC_GEMM_BLAS_WORKSPACE)
    return kvc_fail_detail(detail, detail_cap, KVC_ERROR_INTERNAL, "kvc_score: GEMM workspace of %zu bytes",
                           workspace_bytes);
  return KVC_SUCCESS;
}

extern "C" kvc_status_t kvc_score_gemm_logits(void *blas, const kvc_score_gemm_t *g, char *detail,
                                              size_t detail_cap) {
  (void)blas;
  if (g->dtype != KVC_DTYPE_F32 && g->dtype != KVC_DTYPE_F16 && g->dtype != KVC_DTYPE_BF16)
    return kvc_fail_detail(detail, detail_cap, KVC_ERROR_NOT_SUPPORTED, "kvc_score: no GEMM for dtype %d",
                           (int)g->dtype);
  const int32_t dim = g->dim;
  std::vector<float> keys((size_t)g->keys * dim), query(dim);
  for (int32_t t = 0; t < g->keys; ++t) widen(g->k, g->dtype, t * g->k_row_stride, dim, &keys[(size_t)t * dim]);
  for (int32_t b = 0; b < g->batch; ++b)
    for (int32_t r = 0; r < g->rows; ++r) {
      widen(g->q, g->dtype, b * g->q_batch_stride + r * g->q_row_stride, dim, query.data());
      float *out = g->out + b * g->out_batch_stride;
      for (int32_t t = 0; t < g->keys; ++t) {
        const float logit = g->alpha * dot(query.data(), &keys[(size_t)t * dim], dim);
        if (g->key_major) out[t * g->out_ld + r] = logit;
        else out[r * g->out_ld + t] = logit;
      }
    }
  return KVC_SUCCESS;
}
