/*
 * gather_cpu.c - the CPU backend's query gather and the reference of the CUDA kernel: observation
 * row r (sequence b, position p) of `queries` <- the packed q row kvc_packed_row gives, all heads
 * at once (a token's heads are contiguous in packed q). A row the packed rows cannot hold is
 * written as zeros, as on CUDA; the CPU entry point rejects such input before this runs.
 */
#include "common.h"
#include "ops.h"

kvc_status_t kvc_gather_cpu(const kvc_op_args_t *args, kvc_carver_t *ws) {
  (void)ws; /* no workspace */
  const kvc_plan_view_t *plan = &args->plan;
  const size_t elem = (size_t)kvc_dtype_size(plan->query_dtype);
  const size_t row_bytes = (size_t)plan->num_q_heads * (size_t)plan->head_dim * elem;
  const char *packed = (const char *)args->packed_q;
  char *out = (char *)args->gathered;
  for (int32_t b = 0; b < plan->batch; ++b)
    for (int32_t r = plan->obs_indptr[b]; r < plan->obs_indptr[b + 1]; ++r) {
      const int64_t from = kvc_packed_row(plan->seq_lens[b], args->qo_indptr[b], args->qo_indptr[b + 1],
                                          args->packed_tokens, plan->obs_pos[r]);
      if (from < 0) memset(out + (size_t)r * row_bytes, 0, row_bytes);
      else memcpy(out + (size_t)r * row_bytes, packed + (size_t)from * (size_t)args->packed_stride * elem, row_bytes);
    }
  return KVC_SUCCESS;
}
