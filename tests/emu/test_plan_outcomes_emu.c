/*
 * test_plan_outcomes_emu.c - plans with clamped and skipped sequences (budget_policy) on the CUDA
 * backend through the SIMT emulator, against the CPU backend: the same outcomes and new lengths,
 * the same keep rows from kvc_select on the same scores (rows of k = |P| and of k = n beside
 * compressed ones), and the same caches after kvc_compact, byte for byte over the whole pools
 * (skipped sequences untouched: the compaction oracle leaves rows with k = n as they were).
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "kvcompress.h"
#include "outcome_cases.h"
#include "test_util.h"

typedef struct {
  kvc_test_outcome_case_t c;
  kvc_budget_policy_t policy;
} policy_case_t;

ParameterizedTestParameters(plan_outcomes_emu, cuda_matches_cpu) {
  static policy_case_t cases[16];
  kvc_test_outcome_case_t base[8];
  const int count = kvc_test_outcome_cases(base);
  int n = 0;
  for (int i = 0; i < count; ++i)
    for (int p = KVC_BUDGET_CLAMP; p <= KVC_BUDGET_SKIP; ++p) cases[n++] = (policy_case_t){base[i], (kvc_budget_policy_t)p};
  return cr_make_param_array(policy_case_t, cases, n);
}

static kvc_plan_t make_plan(kvc_context_t ctx, const kvc_plan_desc_t *d) {
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, d, &plan), KVC_SUCCESS, "%s", kvc_last_error(ctx));
  return plan;
}

static void run_op(kvc_context_t ctx, kvc_plan_t plan, kvc_op_t op, const kvc_paged_kv_t *cache, const void *queries,
                   float *scores, int32_t *keep) {
  size_t bytes;
  cr_assert_eq(kvc_plan_workspace_size(plan, op, &bytes), KVC_SUCCESS);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = KVC_ERROR_INTERNAL;
  if (op == KVC_OP_SCORE) status = kvc_score(ctx, plan, cache, queries, NULL, scores, 0, ws, bytes, NULL);
  if (op == KVC_OP_SELECT) status = kvc_select(ctx, plan, scores, keep, ws, bytes, NULL);
  if (op == KVC_OP_COMPACT) status = kvc_compact(ctx, plan, cache, keep, NULL, 0, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "op %d: %s (%s)", (int)op, kvc_status_name(status), kvc_last_error(ctx));
  free(ws);
}

ParameterizedTest(policy_case_t *pc, plan_outcomes_emu, cuda_matches_cpu) {
  const kvc_test_outcome_case_t *c = &pc->c;
  kvc_context_t cpu = NULL, cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  const kvc_plan_desc_t d = kvc_test_outcome_desc(c, c->budgets, pc->policy);
  kvc_plan_t cpu_plan = make_plan(cpu, &d), cuda_plan = make_plan(cuda, &d);
  int32_t want_k[KVC_TEST_OUTCOME_MAX_BATCH], want_outcome[KVC_TEST_OUTCOME_MAX_BATCH];
  cr_assert_eq(kvc_test_outcome_expect(c, pc->policy, want_k, want_outcome), 0);
  int32_t outcome[KVC_TEST_OUTCOME_MAX_BATCH], lens[KVC_TEST_OUTCOME_MAX_BATCH];
  cr_assert_eq(kvc_plan_outcomes(cuda_plan, outcome), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_new_lengths(cuda_plan, lens), KVC_SUCCESS);
  for (int32_t b = 0; b < c->batch; ++b) {
    cr_expect_eq(outcome[b], want_outcome[b], "%s: sequence %d outcome", c->name, b);
    cr_expect_eq(lens[b], want_k[b], "%s: sequence %d new length", c->name, b);
  }

  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(cuda_plan, &info), KVC_SUCCESS);
  kvc_test_cache_t *before = kvc_test_cache_new(c->batch, c->seq_lens, 2, 16, KVC_DTYPE_F32, 8, KVC_TEST_HND,
                                                KVC_TEST_CSR, 3, 91);
  void *queries = kvc_test_queries_new(info.obs_total > 0 ? info.obs_total : 1, 4, 16, KVC_DTYPE_F32, 92);
  float *scores = malloc(sizeof(float) * (size_t)info.score_elems);
  run_op(cpu, cpu_plan, KVC_OP_SCORE, &before->desc, queries, scores, NULL);
  /* one set of scores for both: what differs is how each backend's select and compact treat rows
   * of k = |P| and k = n */
  int32_t *cpu_keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  int32_t *cuda_keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
  run_op(cpu, cpu_plan, KVC_OP_SELECT, NULL, NULL, scores, cpu_keep);
  run_op(cuda, cuda_plan, KVC_OP_SELECT, NULL, NULL, scores, cuda_keep);
  for (int64_t i = 0; i < info.keep_elems; ++i)
    cr_assert_eq(cuda_keep[i], cpu_keep[i], "%s: keep[%lld] CUDA %d, CPU %d", c->name, (long long)i, cuda_keep[i],
                 cpu_keep[i]);

  kvc_test_cache_t *want = kvc_test_cache_clone(before), *on_cpu = kvc_test_cache_clone(before),
                   *on_cuda = kvc_test_cache_clone(before);
  kvc_test_compact_oracle(before, want, want_k, cpu_keep, NULL, NULL, 0, NULL);
  run_op(cpu, cpu_plan, KVC_OP_COMPACT, &on_cpu->desc, NULL, NULL, cpu_keep);
  run_op(cuda, cuda_plan, KVC_OP_COMPACT, &on_cuda->desc, NULL, NULL, cuda_keep);
  cr_assert_eq(kvc_test_first_difference(on_cpu->k, want->k, before->pool_bytes), -1, "%s: CPU K pool", c->name);
  cr_assert_eq(kvc_test_first_difference(on_cpu->v, want->v, before->pool_bytes), -1, "%s: CPU V pool", c->name);
  cr_assert_eq(kvc_test_first_difference(on_cuda->k, want->k, before->pool_bytes), -1, "%s: CUDA K pool", c->name);
  cr_assert_eq(kvc_test_first_difference(on_cuda->v, want->v, before->pool_bytes), -1, "%s: CUDA V pool", c->name);

  kvc_test_cache_free(before), kvc_test_cache_free(want), kvc_test_cache_free(on_cpu), kvc_test_cache_free(on_cuda);
  free(queries), free(scores), free(cpu_keep), free(cuda_keep);
  kvc_plan_destroy(cpu_plan), kvc_plan_destroy(cuda_plan);
  kvc_context_destroy(cpu), kvc_context_destroy(cuda);
}
