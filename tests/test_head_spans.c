/*
 * test_head_spans.c - re-compression during decode on the CPU backend: per-head spans
 * (desc.spans_per_head) against the sorting oracle, identical per-head spans against per-sequence
 * ones, kvc_spans_after_compaction against spans recomputed from real keep indices, a two-event
 * decode scenario with H2O scores in the fixed-capacity score layout (desc.score_row_capacity)
 * against a from-scratch computation (tests/support/decode_events.c), and the bad inputs of the
 * new fields and call.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "decode_events.h"
#include "kvcompress.h"

Test(head_spans_cpu, random_per_head_spans_against_the_oracle) {
  char why[1024] = "";
  cr_assert_eq(kvc_test_head_spans_rounds(KVC_BACKEND_CPU, 20261201, 40, why, sizeof why), 0, "%s", why);
}

Test(head_spans_cpu, spans_after_a_real_compaction_and_after_a_second_one) {
  char why[1024] = "";
  cr_assert_eq(kvc_test_spans_after_compaction_rounds(KVC_BACKEND_CPU, 77, 24, why, sizeof why), 0, "%s", why);
}

Test(head_spans_cpu, two_events_with_accumulated_h2o_scores_equal_a_from_scratch_computation) {
  char why[1024] = "";
  for (uint64_t seed = 1; seed <= 4; ++seed)
    cr_assert_eq(kvc_test_two_event_decode(KVC_BACKEND_CPU, seed, why, sizeof why), 0, "seed %llu: %s",
                 (unsigned long long)seed, why);
}

/* ---- bad inputs ------------------------------------------------------------------------------- */

typedef struct {
  int32_t lens[2], budgets[2], indptr[5];
  kvc_span_t spans[4];
  kvc_plan_desc_t desc;
} bad_case_t;

/* Two sequences of 20 tokens, 2 KV heads, one FAIR span per (sequence, head). */
static void bad_case(bad_case_t *c) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  c->lens[0] = c->lens[1] = 20;
  c->budgets[0] = c->budgets[1] = 10;
  for (int i = 0; i < 5; ++i) c->indptr[i] = i;
  for (int i = 0; i < 4; ++i) c->spans[i] = (kvc_span_t){2 + i, 12 + i, KVC_SPAN_FAIR, 1.0f};
  d.num_kv_heads = 2, d.num_q_heads = 4, d.head_dim = 8, d.dtype = KVC_DTYPE_F32, d.batch = 2;
  d.seq_lens = c->lens, d.budgets = c->budgets, d.span_indptr = c->indptr, d.spans = c->spans;
  d.method = KVC_SCORE_KNORM, d.spans_per_head = 1, d.fairness = 1.0f;
  c->desc = d;
}

static void expect_ok(const kvc_plan_desc_t *d, kvc_context_t *ctx, kvc_plan_t *plan) {
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, ctx), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(*ctx, d, plan), KVC_SUCCESS, "%s", kvc_last_error(*ctx));
}

static void expect_invalid(const kvc_plan_desc_t *d, const char *needle) {
  kvc_context_t ctx = NULL;
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(ctx, d, &plan), KVC_ERROR_INVALID_VALUE, "expected INVALID_VALUE naming %s", needle);
  cr_assert(strstr(kvc_last_error(ctx), needle), "detail \"%s\" does not name %s", kvc_last_error(ctx), needle);
  cr_assert_null(plan);
  kvc_context_destroy(ctx);
}

Test(head_spans_cpu, the_good_case_is_accepted) {
  bad_case_t c;
  bad_case(&c);
  kvc_context_t ctx = NULL;
  kvc_plan_t plan = NULL;
  expect_ok(&c.desc, &ctx, &plan);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  cr_assert_eq(info.total_spans, 4);
  cr_assert_eq(info.count_elems, 4, "per-head count layout: one count per span");
  int32_t quotas[4], implicit[4];
  cr_assert_eq(kvc_plan_span_quotas(plan, quotas, implicit), KVC_SUCCESS);
  for (int r = 0; r < 4; ++r) /* fairness 1: the 10 kept split evenly between the span and the rest */
    cr_assert(quotas[r] == 5 && implicit[r] == 5, "span row %d: quotas %d and %d", r, quotas[r], implicit[r]);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

Test(head_spans_cpu, unsorted_or_out_of_range_per_head_spans_name_the_span_and_head) {
  bad_case_t c;
  bad_case(&c);
  c.spans[3] = (kvc_span_t){4, 9, KVC_SPAN_FAIR, 1.0f};
  c.spans[2] = (kvc_span_t){8, 12, KVC_SPAN_FAIR, 1.0f};
  c.indptr[2] = 2, c.indptr[3] = 4, c.indptr[4] = 4; /* row 2 (sequence 1, head 0): [8,12) then [4,9) */
  expect_invalid(&c.desc, "spans[3] (sequence 1, KV head 0): start 4 is before the previous span's start 8");
  bad_case(&c);
  c.spans[1].end = 21;
  expect_invalid(&c.desc, "spans[1] (sequence 0, KV head 1)");
}

Test(head_spans_cpu, a_decreasing_span_indptr_is_named) {
  bad_case_t c;
  bad_case(&c);
  c.indptr[3] = 1; /* a per-sequence indptr would end here: row 3 runs backwards */
  expect_invalid(&c.desc, "span_indptr[3] = 1 is below span_indptr[2] = 2");
}

Test(head_spans_cpu, spans_per_head_must_be_0_or_1_and_refuses_span_local) {
  bad_case_t c;
  bad_case(&c);
  c.desc.spans_per_head = 2;
  expect_invalid(&c.desc, "spans_per_head is 2");
  bad_case(&c);
  c.desc.span_local = 1;
  expect_invalid(&c.desc, "spans_per_head is 1 with span_local 1");
}

Test(head_spans_cpu, tova_needs_identical_per_head_spans) {
  bad_case_t c;
  bad_case(&c);
  c.desc.method = KVC_SCORE_TOVA;
  expect_invalid(&c.desc, "the spans of sequence 0, KV head 1");
  c.spans[1] = c.spans[0], c.spans[3] = c.spans[2];
  kvc_context_t ctx = NULL;
  kvc_plan_t plan = NULL;
  expect_ok(&c.desc, &ctx, &plan);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

Test(head_spans_cpu, a_score_capacity_below_a_length_names_the_sequence) {
  bad_case_t c;
  bad_case(&c);
  c.lens[1] = 25;
  c.desc.score_row_capacity = 24;
  expect_invalid(&c.desc, "score_row_capacity is 24 but seq_lens[1] is 25");
  c.desc.score_row_capacity = -1;
  expect_invalid(&c.desc, "score_row_capacity is -1");
}

Test(head_spans_cpu, compatible_plans_differ_only_in_per_head_span_positions) {
  bad_case_t a, b;
  bad_case(&a), bad_case(&b);
  b.spans[3] = (kvc_span_t){0, 7, KVC_SPAN_FAIR, 3.0f}; /* moved, same row counts: the same shapes */
  kvc_context_t ctx = NULL;
  kvc_plan_t pa = NULL, pb = NULL, pc = NULL;
  expect_ok(&a.desc, &ctx, &pa);
  cr_assert_eq(kvc_plan_create(ctx, &b.desc, &pb), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  int same = -1;
  cr_assert_eq(kvc_plan_compatible(pa, pb, &same), KVC_SUCCESS);
  cr_assert_eq(same, 1);
  b.indptr[3] = 4; /* row 2 gets both of rows 2 and 3's spans, row 3 none */
  b.spans[3] = (kvc_span_t){14, 18, KVC_SPAN_FAIR, 1.0f};
  cr_assert_eq(kvc_plan_create(ctx, &b.desc, &pc), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_plan_compatible(pa, pc, &same), KVC_SUCCESS);
  cr_assert_eq(same, 0, "different spans per row are different shapes");
  kvc_plan_destroy(pc);
  b.indptr[3] = 3;
  b.desc.score_row_capacity = 32;
  cr_assert_eq(kvc_plan_create(ctx, &b.desc, &pc), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_plan_compatible(pa, pc, &same), KVC_SUCCESS);
  cr_assert_eq(same, 0, "a different score layout is a different shape");
  kvc_plan_destroy(pa), kvc_plan_destroy(pb), kvc_plan_destroy(pc);
  kvc_context_destroy(ctx);
}

Test(head_spans_cpu, the_helper_refuses_bad_keep_rows_and_null_arguments) {
  bad_case_t c;
  bad_case(&c);
  kvc_context_t ctx = NULL;
  kvc_plan_t plan = NULL;
  expect_ok(&c.desc, &ctx, &plan);
  int32_t keep[40], indptr[5];
  kvc_span_t spans[8];
  int64_t count = -1;
  for (int i = 0; i < 40; ++i) keep[i] = 2 * (i % 10);
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, keep, spans, 8, indptr, &count), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  cr_assert_eq(count, 4);
  cr_assert_eq(spans[0].start, 1); /* keep 0 2 4 .. 18: [2, 12) holds 2 4 6 8 10, slots 1..5 */
  cr_assert_eq(spans[0].end, 6);
  keep[25] = keep[24]; /* sequence 1, head 0, slot 5: not above slot 4 */
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, keep, spans, 8, indptr, &count), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "sequence 1, KV head 0: keep[5] = 8 is not above the previous"), "%s",
            kvc_last_error(ctx));
  keep[25] = 20;
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, keep, spans, 8, indptr, &count), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "keep[5] = 20 is out of range"), "%s", kvc_last_error(ctx));
  keep[25] = 10;
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, keep, spans, 3, indptr, &count), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "out_capacity is 3, the spans need 4"), "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, keep, spans, 8, NULL, &count), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "out_indptr is NULL"), "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, NULL, spans, 8, indptr, &count), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "keep is NULL"), "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_spans_after_compaction(ctx, plan, keep, spans, 8, indptr, NULL), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "out_count is NULL"), "%s", kvc_last_error(ctx));
  cr_assert_eq(kvc_spans_after_compaction(NULL, plan, keep, spans, 8, indptr, &count), KVC_ERROR_INVALID_VALUE);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}
