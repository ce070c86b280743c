/*
 * retention.cu - CUDA retention: per (sequence, KV head, user span) the number of kept indices
 * inside the span, in the count layout (kvc_retention in kvcompress.h; the same counts as
 * kernels/retention_cpu.c), for one layer or many. One thread per count of every layer: keep rows
 * are ascending, so a count is the difference of two binary searches in the row, O(log k) reads.
 */
#include "cuda_compat.cuh"

#include "common.h"
#include "launch.cuh"
#include "search.cuh"
#include "ops.h"

namespace {

constexpr int kThreads = 128;

/* Span row of count-layout element e: the last r with count_heads * span_indptr[r] <= e. */
__device__ int32_t span_row_of(const kvc_plan_view_t &plan, int64_t e) {
  return last_offset_at_or_below(plan.span_indptr, plan.batch * plan.span_heads, kvc_count_heads(&plan), e);
}

/* Layer l's keep and count layouts are the single-layer ones stacked: l * keep_elems, l * count_elems. */
__global__ void __launch_bounds__(kThreads)
    retention_kernel(kvc_plan_view_t plan, int32_t num_layers, const int32_t *keep, int32_t *counts) {
  const int32_t count_heads = kvc_count_heads(&plan);
  const int64_t all = blockIdx.x * (int64_t)kThreads + threadIdx.x, per_layer = count_heads * plan.total_spans;
  if (all >= num_layers * per_layer) return;
  const int64_t layer = all / per_layer, e = all - layer * per_layer;
  keep += layer * plan.num_kv_heads * plan.total_kept;
  const int32_t span_row = span_row_of(plan, e), b = span_row / plan.span_heads, first = plan.span_indptr[span_row];
  const int32_t spans = plan.span_indptr[span_row + 1] - first, k = plan.keep_lens[b];
  const int64_t r = e - (int64_t)count_heads * first;
  const int32_t copy = (int32_t)(r / spans), i = (int32_t)(r - (int64_t)copy * spans);
  const int32_t h = plan.span_heads > 1 ? span_row % plan.span_heads : copy;
  const int32_t *row = keep + plan.num_kv_heads * plan.keep_offsets[b] + (int64_t)h * k;
  const kvc_span_t span = plan.spans[first + i];
  counts[all] = kvc_count_below(row, k, span.end) - kvc_count_below(row, k, span.start);
}

}  // namespace

extern "C" kvc_status_t kvc_retention_cuda(const kvc_op_args_t *args, kvc_carver_t * /* no workspace */) {
  /* The sizing call is told apart by its missing arrays: with no workspace, the base of a run may
   * be NULL too. */
  const kvc_plan_view_t &plan = args->plan;
  const int64_t elems = (int64_t)args->num_layers * kvc_count_heads(&plan) * plan.total_spans;
  if (!args->keep || !args->counts || elems == 0) return KVC_SUCCESS;
  KVC_LAUNCH(retention_kernel, dim3((unsigned)((elems + kThreads - 1) / kThreads)), dim3(kThreads), 0,
             static_cast<cudaStream_t>(args->stream), plan, args->num_layers, args->keep, args->counts);
  return kvc_launch_status(args, "kvc_retention");
}
