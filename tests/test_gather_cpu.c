/*
 * test_gather_cpu.c - kvc_gather_queries on the CPU backend against the brute-force gather of
 * gather_oracle.c (whole prefills, last prefill chunks inside a fused qkv tensor, decode rows,
 * H2O over the whole prompt, span_local rows spread over the sequence), and every check of
 * qo_indptr and the other arguments: the right status, a detail naming the argument and value,
 * and `queries` untouched.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gather_oracle.h"
#include "kvcompress.h"

typedef struct {
  kvc_context_t ctx;
  kvc_plan_desc_t desc;
  int32_t budgets[KVC_TEST_GATHER_MAX_BATCH], span_indptr[KVC_TEST_GATHER_MAX_BATCH + 1];
  kvc_span_t spans[2 * KVC_TEST_GATHER_MAX_BATCH];
  kvc_plan_t plan;
  kvc_plan_info_t info;
  int32_t qo_indptr[KVC_TEST_GATHER_MAX_BATCH + 1];
  int64_t num_tokens, token_stride;
  void *packed;
  size_t out_bytes;
  unsigned char *got, *want;
} fixture_t;

static void fixture_init(fixture_t *f, const kvc_test_gather_case_t *c) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &f->ctx), KVC_SUCCESS);
  f->desc = kvc_test_gather_desc(c, f->budgets, f->span_indptr, f->spans);
  cr_assert_eq(kvc_plan_create(f->ctx, &f->desc, &f->plan), KVC_SUCCESS, "%s: %s", c->name, kvc_last_error(f->ctx));
  cr_assert_eq(kvc_plan_get_info(f->plan, &f->info), KVC_SUCCESS);
  f->packed = kvc_test_packed_q_new(c, f->qo_indptr, &f->num_tokens, &f->token_stride, 0x9a7e);
  f->out_bytes = (size_t)f->info.obs_total * (size_t)(c->num_q_heads * c->head_dim) * (c->dtype == KVC_DTYPE_F32 ? 4 : 2);
  f->got = malloc(f->out_bytes + 1);
  f->want = malloc(f->out_bytes + 1);
  memset(f->got, 0xCD, f->out_bytes + 1);
}

static void fixture_fini(fixture_t *f) {
  free(f->packed), free(f->got), free(f->want);
  kvc_plan_destroy(f->plan);
  kvc_context_destroy(f->ctx);
}

ParameterizedTestParameters(gather_cpu, matches_brute_force) {
  static kvc_test_gather_case_t cases[16];
  return cr_make_param_array(kvc_test_gather_case_t, cases, kvc_test_gather_cases(cases));
}

ParameterizedTest(kvc_test_gather_case_t *c, gather_cpu, matches_brute_force) {
  fixture_t f;
  fixture_init(&f, c);
  cr_assert_gt(f.info.obs_total, 0);
  const kvc_status_t status = kvc_gather_queries(f.ctx, f.plan, f.packed, f.num_tokens,
                                                 c->stride_extra ? f.token_stride : 0, f.qo_indptr, f.got, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", c->name, kvc_status_name(status), kvc_last_error(f.ctx));
  kvc_test_gather_oracle(f.plan, &f.desc, f.packed, f.num_tokens, f.token_stride, f.qo_indptr, f.want);
  for (size_t i = 0; i < f.out_bytes; ++i)
    cr_assert_eq(f.got[i], f.want[i], "%s: byte %zu of queries: %02x, expected %02x", c->name, i, f.got[i], f.want[i]);
  cr_assert_eq(f.got[f.out_bytes], 0xCD, "%s: wrote past obs_total rows", c->name);
  fixture_fini(&f);
}

/* Each bad argument of the first case (sequences of 100, 40 and 7 tokens, window 16). */
Test(gather_cpu, bad_arguments) {
  kvc_test_gather_case_t cases[16];
  kvc_test_gather_cases(cases);
  fixture_t f;
  fixture_init(&f, &cases[0]);
  const int64_t row = (int64_t)cases[0].num_q_heads * cases[0].head_dim;
  struct {
    int32_t qo[4];
    int64_t num_tokens, token_stride;
    int null_arg; /* 1 packed_q, 2 qo_indptr, 3 queries */
    const char *needle;
  } bad[] = {
      {{-1, 100, 140, 147}, 147, 0, 0, "qo_indptr[0] is -1"},
      {{0, 100, 90, 147}, 147, 0, 0, "qo_indptr[2] = 90 is below qo_indptr[1] = 100"},
      {{0, 100, 140, 148}, 147, 0, 0, "qo_indptr[3] = 148 is past num_tokens = 147"},
      {{0, 100, 140, 148}, 148, 0, 0, "sequence 2 has 8 packed rows (qo_indptr [140, 148)) but only 7 tokens"},
      {{0, 100, 110, 117}, 117, 0, 0, "sequence 1's 10 packed rows (qo_indptr [100, 110)) hold its positions [30, 40), "
                                      "but its observation queries start at position 24"},
      {{0, 100, 140, 147}, -1, 0, 0, "num_tokens is -1"},
      {{0, 100, 140, 147}, 147, row - 1, 0, "token_stride is"},
      {{0, 100, 140, 147}, INT64_MAX / 4, 0, 0, "overflows a 64-bit byte offset"},
      {{0, 100, 140, 147}, 147, 0, 1, "packed_q is NULL"},
      {{0, 100, 140, 147}, 147, 0, 2, "qo_indptr is NULL"},
      {{0, 100, 140, 147}, 147, 0, 3, "queries is NULL"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
    const kvc_status_t status =
        kvc_gather_queries(f.ctx, f.plan, bad[i].null_arg == 1 ? NULL : f.packed, bad[i].num_tokens,
                           bad[i].token_stride, bad[i].null_arg == 2 ? NULL : bad[i].qo,
                           bad[i].null_arg == 3 ? NULL : f.got, NULL);
    cr_expect_eq(status, KVC_ERROR_INVALID_VALUE, "case %zu: %s", i, kvc_status_name(status));
    cr_expect(strstr(kvc_last_error(f.ctx), bad[i].needle), "case %zu: \"%s\" lacks \"%s\"", i, kvc_last_error(f.ctx),
              bad[i].needle);
    for (size_t j = 0; j <= f.out_bytes; ++j) cr_assert_eq(f.got[j], 0xCD, "case %zu wrote queries byte %zu", i, j);
  }
  cr_expect_eq(kvc_gather_queries(NULL, f.plan, f.packed, 147, 0, f.qo_indptr, f.got, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_gather_queries(f.ctx, NULL, f.packed, 147, 0, f.qo_indptr, f.got, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(f.ctx), "plan is NULL"), "%s", kvc_last_error(f.ctx));
  fixture_fini(&f);
}

/* KNORM and STREAMING have no observation queries: nothing is read, NULL pointers are fine. */
Test(gather_cpu, no_observation_rows) {
  kvc_test_gather_case_t cases[16];
  kvc_test_gather_cases(cases);
  cases[0].method = KVC_SCORE_KNORM;
  fixture_t f;
  fixture_init(&f, &cases[0]);
  cr_assert_eq(f.info.obs_total, 0);
  cr_expect_eq(kvc_gather_queries(f.ctx, f.plan, NULL, 0, 0, NULL, NULL, NULL), KVC_SUCCESS, "%s", kvc_last_error(f.ctx));
  fixture_fini(&f);
}
