/*
 * retention_cpu.c - the CPU backend's retention op and the reference of the CUDA kernel: per
 * (sequence, KV head, user span) the number of kept indices inside the span (count layout).
 * Keep rows are ascending, so each count is the difference of two binary searches:
 * O(spans * log k) per row.
 */
#include "common.h"
#include "ops.h"

kvc_status_t kvc_retention_cpu(const kvc_op_args_t *args, kvc_carver_t *ws) {
  /* No workspace. The sizing call is told apart by its missing arrays, not by ws->base: a
   * zero-byte workspace may legitimately be NULL when the op runs. */
  if (!args->keep || !args->counts) return KVC_SUCCESS;
  const kvc_plan_view_t *plan = &args->plan;
  const int32_t heads = plan->num_kv_heads, count_heads = kvc_count_heads(plan);
  for (int64_t row = 0; row < (int64_t)args->num_layers * plan->batch; ++row) {
    const int64_t layer = row / plan->batch;
    const int32_t b = (int32_t)(row % plan->batch), k = plan->keep_lens[b];
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t r = kvc_span_row(plan, b, h), first = plan->span_indptr[r], nspans = plan->span_indptr[r + 1] - first;
      const int32_t *keep = args->keep + heads * (layer * plan->total_kept + plan->keep_offsets[b]) + (int64_t)h * k;
      int32_t *counts = args->counts + count_heads * (layer * plan->total_spans + first) + (int64_t)(h % count_heads) * nspans;
      for (int32_t i = 0; i < nspans; ++i) {
        const kvc_span_t *span = &plan->spans[first + i];
        counts[i] = kvc_count_below(keep, k, span->end) - kvc_count_below(keep, k, span->start);
      }
    }
  }
  return KVC_SUCCESS;
}
