/*
 * compact_cpu.c - the CPU backend's compaction op and the reference of the CUDA kernel: for every
 * (sequence b, KV head h) with k_b < n_b and j < k_b, slot j <- slot keep[j] for K, V and every
 * extra per-token array, in place; or, out of place (kvc_compact_into), destination slot j <- source
 * slot keep[j] in the destination pages, the extras still in place.
 *
 * In place is safe in ascending j because keep is strictly ascending, so keep[j'] >= j' > j for
 * every later j': the write to slot j never lands on a source still to be read.
 */
#include "common.h"
#include "ops.h"

/* Every keep row must be what kvc_select writes: strictly ascending inside [0, n). Checked for the
 * whole batch, every layer, before anything moves, so a bad array fails without touching the cache:
 * an index past n would reach a page the sequence does not own. */
static kvc_status_t check_keep(const kvc_op_args_t *args) {
  const kvc_plan_view_t *plan = &args->plan;
  const char *fn = args->num_layers > 1 ? (args->dst_table ? "kvc_compact_layers_into" : "kvc_compact_layers")
                                        : (args->dst_table ? "kvc_compact_into" : "kvc_compact");
  for (int64_t row = 0; row < (int64_t)args->num_layers * plan->batch; ++row) {
    const int64_t layer = row / plan->batch;
    const int32_t b = (int32_t)(row % plan->batch), n = plan->seq_lens[b], k = plan->keep_lens[b];
    if (k == n) continue; /* untouched: its keep rows are not read */
    for (int32_t h = 0; h < plan->num_kv_heads; ++h) {
      const int32_t *keep =
          args->keep + plan->num_kv_heads * (layer * plan->total_kept + plan->keep_offsets[b]) + (int64_t)h * k;
      for (int32_t j = 0; j < k; ++j)
        if (keep[j] < 0 || keep[j] >= n || (j > 0 && keep[j] <= keep[j - 1])) {
          if (args->num_layers > 1)
            return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INVALID_VALUE,
                                   "%s: keep[%d] of layer %lld, sequence %d, head %d is %d: each keep row must be "
                                   "strictly ascending inside [0, %d) (use the output of kvc_select)",
                                   fn, j, (long long)layer, b, h, keep[j], n);
          return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INVALID_VALUE,
                                 "%s: keep[%d] of sequence %d, head %d is %d: each keep row must be strictly "
                                 "ascending inside [0, %d) (use the output of kvc_select)",
                                 fn, j, b, h, keep[j], n);
        }
    }
  }
  return KVC_SUCCESS;
}

/* Moves one row's kept tokens to its front in one pool: slot j of `to` (the sequence's destination
 * pages; its source pages in place) <- slot keep[j] of `from` (keep NULL: slot j, a plain copy). */
static void compact_pool(char *pool, const kvc_paged_kv_t *from, const kvc_paged_kv_t *to, int32_t b, int32_t h,
                         const int32_t *keep, int32_t k, size_t elem_bytes) {
  const size_t row_bytes = (size_t)from->head_dim * elem_bytes;
  const int32_t *from_pages = kvc_seq_pages(from, b), *to_pages = kvc_seq_pages(to, b);
  for (int32_t j = 0; j < k; ++j) {
    const int32_t source = keep ? keep[j] : j;
    if (source == j && from == to) continue;
    const int64_t at = kvc_slot_offset(to, kvc_page_of(to, to_pages, b, j), j, h);
    const int64_t src = kvc_slot_offset(from, kvc_page_of(from, from_pages, b, source), source, h);
    memcpy(pool + at * (int64_t)elem_bytes, pool + src * (int64_t)elem_bytes, row_bytes);
  }
}

kvc_status_t kvc_compact_cpu(const kvc_op_args_t *args, kvc_carver_t *ws) {
  /* No workspace of its own (the dispatch layer carves the status array and the page check's
   * scratch). The sizing call is told apart by its missing arrays, not by ws->base: a zero-byte
   * workspace may legitimately be NULL when the op runs. */
  if (!args->keep) return KVC_SUCCESS;
  kvc_status_t status = check_keep(args);
  if (status != KVC_SUCCESS) return status;
  const kvc_plan_view_t *plan = &args->plan;
  const kvc_paged_kv_t *c = args->cache;
  /* out of place: the destination pages are disjoint from every source page (checked by the
   * dispatch layer), so rows are copied in any order and a sequence that keeps all is copied too */
  const kvc_paged_kv_t dst = args->dst_table ? kvc_with_table(c, args->dst_table) : *c;
  const kvc_paged_kv_t *to = args->dst_table ? &dst : c;
  const size_t elem_bytes = (size_t)kvc_dtype_size(c->dtype);
  const int32_t heads = plan->num_kv_heads;
  /* the dispatch layer refused every bad table, so every sequence of every layer is compacted */
  memset(args->compact_status, 0, sizeof(int32_t) * (size_t)args->num_layers * (size_t)plan->batch);
  for (int64_t row = 0; row < (int64_t)args->num_layers * plan->batch; ++row) {
    const int64_t layer = row / plan->batch;
    const int32_t b = (int32_t)(row % plan->batch), n = plan->seq_lens[b], k = plan->keep_lens[b];
    if (k == n && to == c) continue;
    char *k_pool = (char *)(args->layers ? args->layers->k[layer] : c->k);
    char *v_pool = (char *)(args->layers ? args->layers->v[layer] : c->v);
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t *keep =
          k == n ? NULL : args->keep + heads * (layer * plan->total_kept + plan->keep_offsets[b]) + (int64_t)h * k;
      compact_pool(k_pool, c, to, b, h, keep, k, elem_bytes);
      compact_pool(v_pool, c, to, b, h, keep, k, elem_bytes);
      for (int32_t e = 0; e < args->num_extras && keep; ++e) {
        float *extra = args->extras[e] + layer * plan->score_elems + kvc_score_row(plan, b, h);
        for (int32_t j = 0; j < k; ++j) extra[j] = extra[keep[j]];
      }
    }
  }
  return KVC_SUCCESS;
}
