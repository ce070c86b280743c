/*
 * spans.c - kvc_spans_after_compaction: the next event's per-head spans from a compaction's keep
 * layout. Host only; reads the plan's host copy of its spans (one row per sequence or per
 * (sequence, KV head)) and the caller's host keep layout.
 */
#include <stdint.h>

#include "common.h"
#include "internal.h"

kvc_status_t kvc_spans_after_compaction(kvc_context_t ctx, kvc_plan_t plan, const int32_t *keep, kvc_span_t *out_spans,
                                        int64_t out_capacity, int32_t *out_indptr, int64_t *out_count) {
  const char *fn = "kvc_spans_after_compaction";
  kvc_status_t status = kvc_check_plan_context(ctx, plan, fn);
  if (status != KVC_SUCCESS) return status;
  if (!keep) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: keep is NULL", fn);
  if (!out_count) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: out_count is NULL", fn);
  if (out_spans && !out_indptr)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: out_spans is given but out_indptr is NULL", fn);
  const kvc_plan_view_t *v = &plan->host;
  const int32_t heads = v->num_kv_heads;

  /* First pass: check every keep row and count the spans that keep a token. */
  int64_t count = 0;
  for (int32_t b = 0; b < v->batch; ++b) {
    const int32_t n = v->seq_lens[b], k = v->keep_lens[b];
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t *row = keep + heads * v->keep_offsets[b] + (int64_t)h * k;
      for (int32_t j = 0; j < k; ++j)
        if (row[j] < 0 || row[j] >= n || (j > 0 && row[j] <= row[j - 1]))
          return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                          "%s: keep row of sequence %d, KV head %d: keep[%d] = %d is %s (a keep row is strictly "
                          "ascending in [0, seq_lens[%d] = %d))",
                          fn, b, h, j, row[j], row[j] < 0 || row[j] >= n ? "out of range" : "not above the previous",
                          b, n);
      const int32_t r = kvc_span_row(v, b, h);
      for (int32_t i = v->span_indptr[r]; i < v->span_indptr[r + 1]; ++i)
        count += kvc_count_below(row, k, v->spans[i].end) > kvc_count_below(row, k, v->spans[i].start);
    }
  }
  if (count > INT32_MAX)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: the per-head spans would number %lld, past the int32 span_indptr of a plan", fn, (long long)count);
  *out_count = count;
  if (!out_spans) return KVC_SUCCESS;
  if (out_capacity < count)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: out_capacity is %lld, the spans need %lld (ask with out_spans NULL)",
                    fn, (long long)out_capacity, (long long)count);

  /* Second pass: write them; compaction is monotone, so order and disjointness carry over. */
  int64_t written = 0;
  out_indptr[0] = 0;
  for (int32_t b = 0; b < v->batch; ++b) {
    const int32_t k = v->keep_lens[b];
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t *row = keep + heads * v->keep_offsets[b] + (int64_t)h * k;
      const int32_t r = kvc_span_row(v, b, h);
      for (int32_t i = v->span_indptr[r]; i < v->span_indptr[r + 1]; ++i) {
        const int32_t start = kvc_count_below(row, k, v->spans[i].start), end = kvc_count_below(row, k, v->spans[i].end);
        if (end == start) continue;
        out_spans[written] = v->spans[i];
        out_spans[written].start = start;
        out_spans[written].end = end;
        written++;
      }
      out_indptr[(int64_t)b * heads + h + 1] = (int32_t)written;
    }
  }
  return KVC_SUCCESS;
}
