/*
 * test_head_spans_emu.c - re-compression during decode on the CUDA backend through the SIMT
 * emulator (kernels/select.cu with per-row partition tables, retention.cu's per-head count layout,
 * score.cu and compact.cu in the fixed-capacity score layout), against the same oracles as
 * tests/test_head_spans.c (tests/support/decode_events.c). Odd rounds of the random cases split
 * rows into segments of 128 tokens, so the multi-pass selection runs per (sequence, head) too.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "decode_events.h"
#include "kvcompress.h"
#include "select_oracle.h"
#include "test_util.h"

Test(head_spans_emu, random_per_head_spans_against_the_oracle) {
  char why[1024] = "";
  cr_assert_eq(kvc_test_head_spans_rounds(KVC_BACKEND_CUDA, 20261202, 16, why, sizeof why), 0, "%s", why);
}

Test(head_spans_emu, spans_after_a_real_compaction_and_after_a_second_one) {
  char why[1024] = "";
  cr_assert_eq(kvc_test_spans_after_compaction_rounds(KVC_BACKEND_CUDA, 78, 6, why, sizeof why), 0, "%s", why);
}

Test(head_spans_emu, two_events_with_accumulated_h2o_scores_equal_a_from_scratch_computation) {
  char why[1024] = "";
  for (uint64_t seed = 1; seed <= 2; ++seed)
    cr_assert_eq(kvc_test_two_event_decode(KVC_BACKEND_CUDA, seed, why, sizeof why), 0, "seed %llu: %s",
                 (unsigned long long)seed, why);
}

/* ---- per-head plans in the caller's device buffer (kvc_plan_upload) ------------------------------- */

/* Two sequences of 300 and 90 tokens, 2 KV heads, per-head spans shifted by `shift` (same row counts
 * whatever the shift, so the plans of different shifts are compatible). */
typedef struct {
  int32_t lens[2], budgets[2], indptr[5];
  kvc_span_t spans[8];
  kvc_plan_desc_t desc;
} upload_case_t;

static void upload_case(upload_case_t *c, int32_t shift, kvc_plan_memory_t memory) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  c->lens[0] = 300, c->lens[1] = 90, c->budgets[0] = 100, c->budgets[1] = 40;
  const kvc_span_t spans[8] = {{10 + shift, 80 + shift, KVC_SPAN_FAIR, 1.0f}, {100, 104, KVC_SPAN_PROTECT, 1.0f},
                               {5, 60 + shift, KVC_SPAN_FAIR, 2.0f},          {70 + shift, 200, KVC_SPAN_FAIR, 1.0f},
                               {0 + shift, 30 + shift, KVC_SPAN_FAIR, 1.0f},  {40, 42, KVC_SPAN_PROTECT, 1.0f},
                               {20 + shift, 50, KVC_SPAN_FAIR, 0.5f},         {60, 61, KVC_SPAN_PROTECT, 1.0f}};
  memcpy(c->spans, spans, sizeof spans);
  const int32_t indptr[5] = {0, 2, 4, 6, 8};
  memcpy(c->indptr, indptr, sizeof indptr);
  d.num_kv_heads = 2, d.num_q_heads = 4, d.head_dim = 64, d.batch = 2, d.method = KVC_SCORE_KNORM;
  d.seq_lens = c->lens, d.budgets = c->budgets, d.span_indptr = c->indptr, d.spans = c->spans;
  d.spans_per_head = 1, d.fairness = 1.0f, d.score_row_capacity = 320, d.device_memory = memory;
  c->desc = d;
}

static int32_t *select_with(kvc_context_t ctx, kvc_plan_t plan, const float *scores) {
  kvc_plan_info_t info;
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SELECT, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  cr_assert_eq(kvc_select(ctx, plan, scores, keep, ws, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  free(ws);
  return keep;
}

Test(head_spans_emu, per_head_plans_uploaded_into_one_buffer_select_like_their_own_copies) {
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), KVC_SUCCESS);
  upload_case_t first, moved, own;
  upload_case(&first, 0, KVC_PLAN_MEMORY_CALLER);
  upload_case(&moved, 7, KVC_PLAN_MEMORY_CALLER);
  upload_case(&own, 7, KVC_PLAN_MEMORY_OWNED);
  kvc_plan_t a = NULL, b = NULL, reference = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &first.desc, &a), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_plan_create(ctx, &moved.desc, &b), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_plan_create(ctx, &own.desc, &reference), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  int compatible = 0;
  cr_assert_eq(kvc_plan_compatible(a, b, &compatible), KVC_SUCCESS);
  cr_assert_eq(compatible, 1, "moved per-head spans, same row counts: the same shapes");
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_device_bytes(a, &bytes), KVC_SUCCESS);
  void *buffer = kvc_test_workspace_new(bytes);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(reference, &info), KVC_SUCCESS);
  float *scores = malloc(sizeof(float) * (size_t)info.score_elems);
  kvc_test_fill_scores(scores, info.score_elems, KVC_SCORES_FEW_VALUES, 99);
  cr_assert_eq(kvc_plan_upload(ctx, a, buffer, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  int32_t *keep_a = select_with(ctx, a, scores), *want_a = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  cr_assert_eq(kvc_test_select_oracle(a, &first.desc, scores, want_a), 0);
  cr_assert_eq(memcmp(keep_a, want_a, sizeof(int32_t) * (size_t)info.keep_elems), 0, "the uploaded plan vs the oracle");
  cr_assert_eq(kvc_plan_upload(ctx, b, buffer, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  int32_t *keep_b = select_with(ctx, b, scores), *keep_own = select_with(ctx, reference, scores);
  cr_assert_eq(memcmp(keep_b, keep_own, sizeof(int32_t) * (size_t)info.keep_elems), 0,
               "the second plan uploaded into the first's buffer selects differently from its own copy");
  cr_assert_neq(memcmp(keep_a, keep_b, sizeof(int32_t) * (size_t)info.keep_elems), 0, "the spans moved: keeps differ");
  free(keep_a), free(want_a), free(keep_b), free(keep_own), free(scores), free(buffer);
  kvc_plan_destroy(a), kvc_plan_destroy(b), kvc_plan_destroy(reference);
  kvc_context_destroy(ctx);
}
