/*
 * select_cpu.c - the CPU backend's selection op, and the reference the CUDA kernel matches bit for
 * bit (selection semantics: the comment above kvc_plan_desc_t in kvcompress.h).
 *
 * Every token's 64-bit key (kvc_select_key: score bits, then position) is distinct, so "the top m
 * of a candidate set" is exactly the candidates whose key is >= the m-th largest key: no tie can
 * straddle the threshold. The m-th largest key is found by an MSB radix select over 8-bit digits,
 * O(count) per selection, so a row costs O(n) whatever its budget.
 */
#include "common.h"
#include "ops.h"

/* Per-row scratch, reused row after row (the CPU backend runs rows one at a time). */
typedef struct {
  uint64_t *candidates; /* keys of the tokens a selection chooses from */
  uint64_t *narrowed;   /* the radix select's surviving keys */
  unsigned char *kept;  /* 1 per token of the row once chosen */
} select_scratch_t;

/* The need-th largest of keys[0, count), 1 <= need <= count, keys distinct. */
static uint64_t kth_largest_key(const uint64_t *keys, int32_t count, int32_t need, uint64_t *narrowed) {
  const uint64_t *live = keys;
  uint64_t found = 0; /* the digits fixed so far */
  for (int shift = 56; shift >= 0; shift -= 8) {
    int32_t histogram[256] = {0};
    for (int32_t i = 0; i < count; ++i) histogram[(live[i] >> shift) & 0xffu]++;
    int digit = 255;
    while (histogram[digit] < need) need -= histogram[digit--];
    found |= (uint64_t)digit << shift;
    if (histogram[digit] == count) continue; /* every survivor shares the digit: nothing to drop */
    int32_t survivors = 0;
    for (int32_t i = 0; i < count; ++i)
      if (((live[i] >> shift) & 0xffu) == (uint64_t)digit) narrowed[survivors++] = live[i];
    live = narrowed;
    count = survivors;
  }
  return found;
}

/* Appends the not-yet-kept tokens of [from, to) to the candidates. */
static int32_t gather(const float *scores, const select_scratch_t *s, int32_t from, int32_t to, int32_t count) {
  for (int32_t t = from; t < to; ++t)
    if (!s->kept[t]) s->candidates[count++] = kvc_select_key(scores[t], t);
  return count;
}

/* Marks the top `need` of the gathered candidates as kept. */
static void keep_top(select_scratch_t *s, int32_t count, int32_t need) {
  if (need <= 0) return;
  uint64_t threshold = need < count ? kth_largest_key(s->candidates, count, need, s->narrowed) : 0;
  for (int32_t i = 0; i < count; ++i)
    if (s->candidates[i] >= threshold) s->kept[(uint32_t)s->candidates[i]] = 1; /* low half: position */
}

/* Selects row (b, h): `scores` and `keep` point at the row; its protected bits, partitions and
 * fill are span row r's. */
static void select_row(const kvc_plan_view_t *plan, int32_t b, int32_t r, const float *scores, int32_t *keep,
                       select_scratch_t *s) {
  const int32_t n = plan->seq_lens[b], k = plan->keep_lens[b];
  if (k == n) { /* budget >= length: the row keeps everything */
    for (int32_t t = 0; t < n; ++t) keep[t] = t;
    return;
  }
  const int64_t word0 = plan->protect_word_offsets[r];
  for (int32_t t = 0; t < n; ++t) s->kept[t] = (unsigned char)kvc_is_protected(plan->protect_bits, word0, t);
  /* Partitions are disjoint, so within one the only kept tokens are its protected ones. The
   * implicit partition (last) is every token outside the FAIR spans: the gaps between them. */
  for (int32_t p = plan->part_indptr[r]; p < plan->part_indptr[r + 1]; ++p) {
    const kvc_partition_t *part = &plan->parts[p];
    int32_t count = 0;
    if (part->implicit) {
      int32_t gap_start = 0;
      for (int32_t f = plan->part_indptr[r]; f < p; ++f) {
        count = gather(scores, s, gap_start, plan->parts[f].start, count);
        gap_start = plan->parts[f].end;
      }
      count = gather(scores, s, gap_start, n, count);
    } else {
      count = gather(scores, s, part->start, part->end, 0);
    }
    keep_top(s, count, part->quota - part->protected_count);
  }
  keep_top(s, gather(scores, s, 0, n, 0), plan->fill[r]);
  int32_t written = 0;
  for (int32_t t = 0; t < n; ++t)
    if (s->kept[t]) keep[written++] = t;
}

kvc_status_t kvc_select_cpu(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t *plan = &args->plan;
  const size_t max_n = (size_t)plan->max_seq_len;
  select_scratch_t scratch;
  scratch.candidates = (uint64_t *)kvc_carve(ws, sizeof(uint64_t) * max_n);
  scratch.narrowed = (uint64_t *)kvc_carve(ws, sizeof(uint64_t) * max_n);
  scratch.kept = (unsigned char *)kvc_carve(ws, max_n);
  if (!ws->base) return KVC_SUCCESS;

  const int32_t heads = plan->num_kv_heads;
  for (int64_t row = 0; row < (int64_t)args->num_layers * plan->batch; ++row) {
    const int64_t layer = row / plan->batch;
    const int32_t b = (int32_t)(row % plan->batch), k = plan->keep_lens[b];
    const float *scores = args->scores + layer * plan->score_elems;
    int32_t *keep = args->keep + heads * (layer * plan->total_kept + plan->keep_offsets[b]);
    /* TOVA gives every KV head the same scores, hence the same selection: select head 0's row
     * and copy it (the CUDA kernel does the same, so user-supplied scores that differ per head
     * are selected by head 0 on both backends). */
    const int shared = plan->method == KVC_SCORE_TOVA;
    for (int32_t h = 0; h < heads; ++h) {
      if (shared && h > 0)
        memcpy(keep + (int64_t)h * k, keep, sizeof(int32_t) * (size_t)k);
      else
        select_row(plan, b, kvc_span_row(plan, b, h), scores + kvc_score_row(plan, b, h), keep + (int64_t)h * k, &scratch);
    }
  }
  return KVC_SUCCESS;
}
