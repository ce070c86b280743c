/*
 * fuzz_plan.c - libFuzzer target for kvc_plan_create on arbitrary descriptors, with int32
 * extremes (INT32_MIN, -1, 0, INT32_MAX, ...) in every integer field and floats one ulp past their
 * bounds. Any status is fine; a crash, a sanitizer report or a violated invariant of an accepted
 * plan (lengths, positions, quotas, and sizes that did not wrap) is a bug.
 */
#include <math.h>
#include <stdlib.h>

#include "fuzz_input.h"
#include "kvcompress.h"

enum { MAX_BATCH = 6, MAX_SPANS = 24, MAX_HEADS = 4, MAX_ROWS = MAX_BATCH * MAX_HEADS };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fuzz_input_t in = {data, size, 0};
  static kvc_context_t ctx;
  if (!ctx && kvc_context_create(KVC_BACKEND_CPU, 0, &ctx) != KVC_SUCCESS) abort();

  int32_t seq_lens[MAX_BATCH], budgets[MAX_BATCH], span_indptr[MAX_ROWS + 1];
  kvc_span_t spans[MAX_SPANS];
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  if (fuzz_u8(&in) == 0xFF) d.struct_size -= 4;
  d.num_kv_heads = fuzz_i32_extreme(&in, fuzz_int(&in, 1, 4));
  int32_t group = fuzz_int(&in, 1, 4); /* usually a valid GQA group; raw values test the checks */
  d.num_q_heads = d.num_kv_heads > 0 && d.num_kv_heads < 64 && group > 0 && group < 64 ? d.num_kv_heads * group : group;
  if (fuzz_u8(&in) % 8 == 0) d.num_q_heads = d.num_kv_heads; /* with extreme heads: GQA group 1 */
  d.num_q_heads = fuzz_i32_extreme(&in, d.num_q_heads);
  d.head_dim = fuzz_i32_extreme(&in, fuzz_int(&in, 1, 260));
  d.dtype = (kvc_dtype_t)fuzz_i32_extreme(&in, fuzz_int(&in, 0, 3));
  d.batch = fuzz_int(&in, 1, MAX_BATCH);
  if (d.batch < 1 || d.batch > MAX_BATCH) d.batch = 1 + (d.batch & 3); /* arrays are MAX_BATCH long */
  if (fuzz_u8(&in) % 64 == 0) d.batch = fuzz_u8(&in) % 2 ? INT32_MIN : 0; /* refused before any array is read */
  d.method = (kvc_score_method_t)fuzz_i32_extreme(&in, fuzz_int(&in, 0, 4));
  d.window = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 80));
  d.pool_kernel = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 9));
  d.pool = (kvc_pool_t)fuzz_i32_extreme(&in, fuzz_int(&in, 0, 1));
  d.group_reduce = (kvc_reduce_t)fuzz_i32_extreme(&in, fuzz_int(&in, 0, 1));
  d.scale = fuzz_float(&in, 0.0f, 1.0f);
  d.span_local = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 1));
  d.sink_tokens = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 8));
  d.recent_tokens = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 8));
  d.fairness = fuzz_float(&in, 0.0f, 1.0f);
  int total = 0;
  span_indptr[0] = 0;
  int64_t asked = 0; /* tokens */
  for (int32_t b = 0; b < d.batch && b < MAX_BATCH; ++b) {
    seq_lens[b] = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 3000));
    budgets[b] = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 3000));
    asked += seq_lens[b] > 0 ? seq_lens[b] : 0;
    int count = fuzz_u8(&in) % 5;
    for (int i = 0; i < count && total < MAX_SPANS; ++i, ++total) {
      spans[total].start = fuzz_i32_extreme(&in, fuzz_int(&in, -1, 3000));
      spans[total].end = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 3001));
      spans[total].kind = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 1));
      spans[total].weight = fuzz_float(&in, 0.0f, 4.0f);
    }
    span_indptr[b + 1] = total;
  }
  /* Long sequences cost the plan O(tokens): keep each run fast, except where the plan must refuse
   * them before that work (more than 2^48 (query head, token) pairs, see kvc_plan_create). */
  if (!(d.num_q_heads > 0 && (__int128)asked * d.num_q_heads > ((__int128)1 << 48)))
    for (int32_t b = 0; b < d.batch && b < MAX_BATCH; ++b)
      if (seq_lens[b] > 100000) seq_lens[b] %= 100000; /* negatives stay */
  if (d.batch >= 1 && fuzz_u8(&in) == 0xEE) span_indptr[fuzz_u8(&in) % (d.batch + 1)] += fuzz_int(&in, -3, 3);
  d.budget_policy = (kvc_budget_policy_t)fuzz_int(&in, 0, 2); /* read after the above: older inputs mean FAIL */
  /* read last (older inputs: 0, 0): per-head spans re-cut the same spans into batch * heads rows at
   * fuzzed boundaries (an extreme value tests the 0/1 check), and a fixed score row capacity */
  d.spans_per_head = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 1));
  d.score_row_capacity = fuzz_i32_extreme(&in, fuzz_int(&in, 0, 3200));
  /* the arrays hold MAX_HEADS heads' rows: other head counts fuzz per-sequence spans only */
  if (d.spans_per_head == 1 && (d.num_kv_heads < 1 || d.num_kv_heads > MAX_HEADS)) d.spans_per_head = 0;
  const int32_t span_rows = d.spans_per_head == 1 && d.batch >= 1 ? d.batch * d.num_kv_heads : d.batch;
  if (d.spans_per_head == 1 && d.num_kv_heads > 1 && d.batch >= 1) {
    for (int32_t r = 1; r < span_rows; ++r) span_indptr[r] = fuzz_int(&in, 0, total); /* may run backwards */
    span_indptr[0] = 0, span_indptr[span_rows] = total;
  }
  d.seq_lens = seq_lens, d.budgets = budgets, d.span_indptr = span_indptr, d.spans = spans;
  /* span_indptr entries may now point past the spans array: only the bounded, validated prefix
   * may be read. Clamp the last entry so the array bound itself is always honest. */
  if (d.batch >= 1 && (span_indptr[span_rows] > MAX_SPANS || span_indptr[span_rows] < 0)) span_indptr[span_rows] = total;

  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, &d, &plan);
  if (status != KVC_SUCCESS) {
    if (plan || kvc_last_error(ctx)[0] == '\0') abort(); /* failures leave NULL and a detail */
    return 0;
  }
  /* invariants of an accepted plan */
  kvc_plan_info_t info;
  int32_t new_lens[MAX_BATCH], outcomes[MAX_BATCH], indptr[MAX_BATCH + 1], implicit[MAX_ROWS], quotas[MAX_SPANS + 1];
  if (kvc_plan_get_info(plan, &info) || kvc_plan_new_lengths(plan, new_lens) || kvc_plan_outcomes(plan, outcomes))
    abort();
  int64_t tokens = 0, kept = 0;
  for (int32_t b = 0; b < d.batch; ++b) {
    const int32_t n = seq_lens[b], k = budgets[b] < n ? budgets[b] : n;
    switch (outcomes[b]) { /* each outcome's keep length, and only the policy's own outcomes */
      case KVC_OUTCOME_COMPRESSED: if (new_lens[b] != k || k == n) abort(); break;
      case KVC_OUTCOME_WITHIN_BUDGET: if (new_lens[b] != n || k != n) abort(); break;
      case KVC_OUTCOME_CLAMPED: if (d.budget_policy != KVC_BUDGET_CLAMP || new_lens[b] <= k || new_lens[b] > n) abort(); break;
      case KVC_OUTCOME_SKIPPED: if (d.budget_policy != KVC_BUDGET_SKIP || new_lens[b] != n || k == n) abort(); break;
      default: abort();
    }
    tokens += seq_lens[b], kept += new_lens[b];
  }
  if (info.total_tokens != tokens || info.total_kept != kept) abort();
  int32_t *positions = malloc(sizeof(int32_t) * (size_t)(info.obs_total + 1));
  kvc_plan_obs_positions(plan, indptr, positions);
  for (int32_t b = 0; b < d.batch; ++b)
    for (int32_t i = indptr[b]; i < indptr[b + 1]; ++i)
      if (positions[i] < 0 || positions[i] >= seq_lens[b] || (i > indptr[b] && positions[i] <= positions[i - 1])) abort();
  free(positions);
  kvc_plan_span_quotas(plan, quotas, implicit);
  for (int32_t r = 0; r < span_rows; ++r) { /* per span row: a sequence, or a (sequence, head) */
    int64_t fair_quota = implicit[r] > 0 ? implicit[r] : 0;
    for (int32_t i = span_indptr[r]; i < span_indptr[r + 1]; ++i) {
      if (quotas[i] < 0 || quotas[i] > spans[i].end - spans[i].start) abort();
      if (spans[i].kind == KVC_SPAN_FAIR) fair_quota += quotas[i];
    }
    if (fair_quota > new_lens[r / (span_rows / d.batch)]) abort(); /* quotas never exceed the budget */
  }
  /* sizes are exact products, never wrapped: the layouts' element counts, and a compress
   * workspace holding at least the keep and score layouts */
  const __int128 score_elems = d.score_row_capacity > 0 ? (__int128)d.batch * d.num_kv_heads * d.score_row_capacity
                                                         : (__int128)d.num_kv_heads * tokens;
  if ((__int128)info.score_elems != score_elems ||
      (__int128)info.keep_elems != (__int128)d.num_kv_heads * kept)
    abort();
  size_t sizes[KVC_OP_COMPRESS + 1];
  for (int op = KVC_OP_SCORE; op <= KVC_OP_COMPRESS; ++op)
    if (kvc_plan_workspace_size(plan, (kvc_op_t)op, &sizes[op])) abort();
  if ((__int128)sizes[KVC_OP_COMPRESS] < 4 * ((__int128)info.score_elems + info.keep_elems) ||
      sizes[KVC_OP_COMPRESS] < sizes[KVC_OP_SCORE] || sizes[KVC_OP_COMPRESS] < sizes[KVC_OP_COMPACT])
    abort();
  kvc_plan_destroy(plan);
  return 0;
}
