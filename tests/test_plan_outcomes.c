/*
 * test_plan_outcomes.c - per-sequence outcomes of a plan (budget_policy, kvc_plan_outcomes) on the
 * CPU backend. In every case some sequence protects more tokens than its budget keeps:
 *   - KVC_BUDGET_FAIL (the default) fails the plan with KVC_ERROR_BUDGET naming the first one;
 *   - CLAMP and SKIP give the outcomes and new lengths the test derives from its own protected
 *     counts (outcome_cases.c), the same quotas as a plan whose budgets are those lengths, keep
 *     rows equal to the sorting oracle of such a plan, and kvc_compress leaves the cache the
 *     compaction oracle builds from those rows (skipped sequences: every byte untouched).
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "kvcompress.h"
#include "outcome_cases.h"
#include "select_oracle.h"
#include "test_util.h"

typedef struct {
  kvc_test_outcome_case_t c;
  kvc_budget_policy_t policy;
} policy_case_t;

ParameterizedTestParameters(plan_outcomes, policies) {
  static policy_case_t cases[16];
  kvc_test_outcome_case_t base[8];
  const int count = kvc_test_outcome_cases(base);
  int n = 0;
  for (int i = 0; i < count; ++i)
    for (int p = KVC_BUDGET_FAIL; p <= KVC_BUDGET_SKIP; ++p) cases[n++] = (policy_case_t){base[i], (kvc_budget_policy_t)p};
  return cr_make_param_array(policy_case_t, cases, n);
}

static kvc_context_t cpu_context(void) {
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  return ctx;
}

/* The first case: SNAPKV, window 64, lengths 300 / 100 / 40, budgets 75 / 25 / 10. */
static kvc_test_outcome_case_t window64_case(void) {
  kvc_test_outcome_case_t cases[8];
  kvc_test_outcome_cases(cases);
  return cases[0];
}

static void *workspace_for(kvc_plan_t plan, kvc_op_t op, size_t *bytes) {
  cr_assert_eq(kvc_plan_workspace_size(plan, op, bytes), KVC_SUCCESS);
  return kvc_test_workspace_new(*bytes);
}

ParameterizedTest(policy_case_t *pc, plan_outcomes, policies) {
  const kvc_test_outcome_case_t *c = &pc->c;
  const char *policy_names[] = {"fail", "clamp", "skip"};
  const char *who = policy_names[pc->policy];
  kvc_context_t ctx = cpu_context();
  int32_t want_k[KVC_TEST_OUTCOME_MAX_BATCH], want_outcome[KVC_TEST_OUTCOME_MAX_BATCH];
  const int feasible = kvc_test_outcome_expect(c, pc->policy, want_k, want_outcome) == 0;

  kvc_plan_desc_t d = kvc_test_outcome_desc(c, c->budgets, pc->policy);
  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, &d, &plan);
  if (!feasible) {
    char needle[64];
    snprintf(needle, sizeof needle, "sequence %d protects %d tokens", c->first_over_budget,
             kvc_test_outcome_protected(c, c->first_over_budget));
    cr_assert_eq(status, KVC_ERROR_BUDGET, "%s %s: %s", c->name, who, kvc_status_name(status));
    cr_assert_null(plan);
    cr_assert(strstr(kvc_last_error(ctx), needle), "%s: detail \"%s\" lacks \"%s\"", c->name, kvc_last_error(ctx), needle);
    cr_assert(strstr(kvc_last_error(ctx), "budget_policy"), "the detail names the way out: %s", kvc_last_error(ctx));
    kvc_context_destroy(ctx);
    return;
  }
  cr_assert_eq(status, KVC_SUCCESS, "%s %s: %s (%s)", c->name, who, kvc_status_name(status), kvc_last_error(ctx));

  /* outcomes and new lengths */
  int32_t outcome[KVC_TEST_OUTCOME_MAX_BATCH], new_lens[KVC_TEST_OUTCOME_MAX_BATCH];
  cr_assert_eq(kvc_plan_outcomes(plan, outcome), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_new_lengths(plan, new_lens), KVC_SUCCESS);
  for (int32_t b = 0; b < c->batch; ++b) {
    cr_expect_eq(outcome[b], want_outcome[b], "%s %s: sequence %d outcome %d, expected %d", c->name, who, b, outcome[b],
                 want_outcome[b]);
    cr_expect_eq(new_lens[b], want_k[b], "%s %s: sequence %d new length %d, expected %d", c->name, who, b, new_lens[b],
                 want_k[b]);
  }

  /* the reference: the same batch with the outcome's keep lengths as budgets, under FAIL */
  kvc_plan_desc_t ref_desc = kvc_test_outcome_desc(c, want_k, KVC_BUDGET_FAIL);
  kvc_plan_t ref = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &ref_desc, &ref), KVC_SUCCESS, "reference plan: %s", kvc_last_error(ctx));
  kvc_plan_info_t info, ref_info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_get_info(ref, &ref_info), KVC_SUCCESS);
  cr_assert_eq(info.keep_elems, ref_info.keep_elems);
  cr_assert_eq(info.obs_total, ref_info.obs_total);
  int32_t quotas[KVC_TEST_OUTCOME_MAX_SPANS + 1], ref_quotas[KVC_TEST_OUTCOME_MAX_SPANS + 1];
  int32_t implicit[KVC_TEST_OUTCOME_MAX_BATCH], ref_implicit[KVC_TEST_OUTCOME_MAX_BATCH];
  cr_assert_eq(kvc_plan_span_quotas(plan, quotas, implicit), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_span_quotas(ref, ref_quotas, ref_implicit), KVC_SUCCESS);
  for (int64_t i = 0; i < info.total_spans; ++i) cr_expect_eq(quotas[i], ref_quotas[i], "%s %s: span %lld quota", c->name, who, (long long)i);
  for (int32_t b = 0; b < c->batch; ++b) cr_expect_eq(implicit[b], ref_implicit[b], "%s %s: implicit quota of %d", c->name, who, b);

  /* score, then select against the sorting oracle of the reference */
  kvc_test_cache_t *before = kvc_test_cache_new(c->batch, c->seq_lens, 2, 16, KVC_DTYPE_F32, 16, KVC_TEST_NHD,
                                                KVC_TEST_DENSE, 2, 77);
  void *queries = kvc_test_queries_new(info.obs_total > 0 ? info.obs_total : 1, 4, 16, KVC_DTYPE_F32, 78);
  float *scores = malloc(sizeof(float) * (size_t)info.score_elems);
  size_t bytes;
  void *ws = workspace_for(plan, KVC_OP_SCORE, &bytes);
  cr_assert_eq(kvc_score(ctx, plan, &before->desc, queries, NULL, scores, 0, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  free(ws);
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems), *want_keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  ws = workspace_for(plan, KVC_OP_SELECT, &bytes);
  cr_assert_eq(kvc_select(ctx, plan, scores, keep, ws, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  free(ws);
  cr_assert_eq(kvc_test_select_oracle(ref, &ref_desc, scores, want_keep), 0);
  for (int64_t i = 0; i < info.keep_elems; ++i)
    cr_assert_eq(keep[i], want_keep[i], "%s %s: keep[%lld] = %d, oracle %d", c->name, who, (long long)i, keep[i],
                 want_keep[i]);

  /* kvc_compress: the compaction oracle's cache, skipped / within-budget sequences untouched */
  kvc_test_cache_t *got = kvc_test_cache_clone(before), *want = kvc_test_cache_clone(before);
  kvc_test_compact_oracle(before, want, want_k, want_keep, NULL, NULL, 0, NULL);
  ws = workspace_for(plan, KVC_OP_COMPRESS, &bytes);
  cr_assert_eq(kvc_compress(ctx, plan, &got->desc, queries, NULL, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(ctx));
  cr_assert_eq(memcmp((char *)ws + info.keep_offset_bytes, want_keep, sizeof(int32_t) * (size_t)info.keep_elems), 0,
               "%s %s: the keep layout kvc_compress leaves", c->name, who);
  cr_assert_eq(kvc_test_first_difference(got->k, want->k, before->pool_bytes), -1, "%s %s: K pool", c->name, who);
  cr_assert_eq(kvc_test_first_difference(got->v, want->v, before->pool_bytes), -1, "%s %s: V pool", c->name, who);
  free(ws);

  kvc_test_cache_free(before), kvc_test_cache_free(got), kvc_test_cache_free(want);
  free(queries), free(scores), free(keep), free(want_keep);
  kvc_plan_destroy(plan);
  kvc_plan_destroy(ref);
  kvc_context_destroy(ctx);
}

/* Without an over-budget sequence every policy gives the same plan: COMPRESSED / WITHIN_BUDGET. */
Test(plan_outcomes, no_conflict_is_policy_independent) {
  kvc_context_t ctx = cpu_context();
  kvc_test_outcome_case_t c = window64_case();
  c.budgets[1] = 64, c.budgets[2] = 40; /* exactly the protected counts; 40 = n */
  for (int p = KVC_BUDGET_FAIL; p <= KVC_BUDGET_SKIP; ++p) {
    kvc_plan_desc_t d = kvc_test_outcome_desc(&c, c.budgets, (kvc_budget_policy_t)p);
    kvc_plan_t plan = NULL;
    cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "policy %d: %s", p, kvc_last_error(ctx));
    int32_t outcome[3], lens[3];
    cr_assert_eq(kvc_plan_outcomes(plan, outcome), KVC_SUCCESS);
    cr_assert_eq(kvc_plan_new_lengths(plan, lens), KVC_SUCCESS);
    cr_expect_eq(outcome[0], KVC_OUTCOME_COMPRESSED);
    cr_expect_eq(outcome[1], KVC_OUTCOME_COMPRESSED);
    cr_expect_eq(outcome[2], KVC_OUTCOME_WITHIN_BUDGET);
    cr_expect(lens[0] == 75 && lens[1] == 64 && lens[2] == 40, "policy %d: lengths %d %d %d", p, lens[0], lens[1], lens[2]);
    kvc_plan_destroy(plan);
  }
  kvc_context_destroy(ctx);
}

Test(plan_outcomes, bad_arguments) {
  kvc_context_t ctx = cpu_context();
  const kvc_test_outcome_case_t c = window64_case();
  kvc_plan_desc_t d = kvc_test_outcome_desc(&c, c.budgets, (kvc_budget_policy_t)3);
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "budget_policy is 3"), "%s", kvc_last_error(ctx));
  d.budget_policy = (kvc_budget_policy_t)-1;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_ERROR_INVALID_VALUE);
  cr_assert(strstr(kvc_last_error(ctx), "budget_policy is -1"), "%s", kvc_last_error(ctx));
  d.budget_policy = KVC_BUDGET_CLAMP;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS);
  int32_t outcome[3];
  cr_expect_eq(kvc_plan_outcomes(NULL, outcome), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_outcomes(plan, NULL), KVC_ERROR_INVALID_VALUE);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

/* The default is today's behaviour: KVC_PLAN_DESC_INIT and kvc_plan_desc_init say FAIL. */
Test(plan_outcomes, default_policy_fails) {
  kvc_plan_desc_t a = KVC_PLAN_DESC_INIT, b;
  memset(&b, 0x5a, sizeof b);
  kvc_plan_desc_init(&b);
  cr_expect_eq(a.budget_policy, KVC_BUDGET_FAIL);
  cr_expect_eq(b.budget_policy, KVC_BUDGET_FAIL);
  cr_expect_eq(KVC_OUTCOME_COMPRESSED, 0);
  cr_expect_eq(KVC_OUTCOME_WITHIN_BUDGET, 1);
  cr_expect_eq(KVC_OUTCOME_CLAMPED, 2);
  cr_expect_eq(KVC_OUTCOME_SKIPPED, 3);
}
