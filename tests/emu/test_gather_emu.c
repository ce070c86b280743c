/*
 * test_gather_emu.c - kvc_gather_queries on the CUDA backend (kernels/gather.cu through the SIMT
 * emulator) against the brute-force gather of gather_oracle.c and the CPU backend, byte for byte:
 * every case of gather_oracle.c (16-, 8-byte vectors), packed q one element off 16-byte alignment
 * (2-byte vectors), and the guarded rows: with a qo_indptr the CPU backend rejects (negative,
 * reversed, past num_tokens, more rows than tokens, too few rows for the window), every row the
 * packed rows cannot hold is zeros and every other row is still gathered, with nothing read
 * outside the packed array (the ASan build would report it). A misaligned pointer is an error.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gather_oracle.h"
#include "kvcompress.h"

typedef struct {
  kvc_context_t cpu, cuda;
  kvc_plan_desc_t desc;
  int32_t budgets[KVC_TEST_GATHER_MAX_BATCH], span_indptr[KVC_TEST_GATHER_MAX_BATCH + 1];
  kvc_span_t spans[2 * KVC_TEST_GATHER_MAX_BATCH];
  kvc_plan_t cpu_plan, cuda_plan;
  kvc_plan_info_t info;
  int32_t qo_indptr[KVC_TEST_GATHER_MAX_BATCH + 1];
  int64_t num_tokens, token_stride;
  size_t elem, out_bytes;
  unsigned char *packed, *got, *want;
} fixture_t;

static void fixture_init(fixture_t *f, const kvc_test_gather_case_t *c) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &f->cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &f->cuda), KVC_SUCCESS);
  f->desc = kvc_test_gather_desc(c, f->budgets, f->span_indptr, f->spans);
  cr_assert_eq(kvc_plan_create(f->cpu, &f->desc, &f->cpu_plan), KVC_SUCCESS, "%s", kvc_last_error(f->cpu));
  cr_assert_eq(kvc_plan_create(f->cuda, &f->desc, &f->cuda_plan), KVC_SUCCESS, "%s", kvc_last_error(f->cuda));
  cr_assert_eq(kvc_plan_get_info(f->cuda_plan, &f->info), KVC_SUCCESS);
  f->packed = kvc_test_packed_q_new(c, f->qo_indptr, &f->num_tokens, &f->token_stride, 0x6a7e);
  f->elem = c->dtype == KVC_DTYPE_F32 ? 4 : 2;
  f->out_bytes = (size_t)f->info.obs_total * (size_t)(c->num_q_heads * c->head_dim) * f->elem;
  f->got = malloc(f->out_bytes);
  f->want = malloc(f->out_bytes);
}

static void fixture_fini(fixture_t *f) {
  free(f->packed), free(f->got), free(f->want);
  kvc_plan_destroy(f->cpu_plan), kvc_plan_destroy(f->cuda_plan);
  kvc_context_destroy(f->cpu), kvc_context_destroy(f->cuda);
}

/* The CUDA gather of `packed` with `qo_indptr` against the oracle; queries start as garbage. */
static void check_cuda(fixture_t *f, const unsigned char *packed, const int32_t *qo_indptr, const char *what) {
  memset(f->got, 0xCD, f->out_bytes);
  const kvc_status_t status =
      kvc_gather_queries(f->cuda, f->cuda_plan, packed, f->num_tokens, f->token_stride, qo_indptr, f->got, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", what, kvc_status_name(status), kvc_last_error(f->cuda));
  kvc_test_gather_oracle(f->cuda_plan, &f->desc, packed, f->num_tokens, f->token_stride, qo_indptr, f->want);
  for (size_t i = 0; i < f->out_bytes; ++i)
    cr_assert_eq(f->got[i], f->want[i], "%s: byte %zu of queries: %02x, expected %02x", what, i, f->got[i], f->want[i]);
}

ParameterizedTestParameters(gather_emu, cuda_matches_oracle_and_cpu) {
  static kvc_test_gather_case_t cases[16];
  return cr_make_param_array(kvc_test_gather_case_t, cases, kvc_test_gather_cases(cases));
}

ParameterizedTest(kvc_test_gather_case_t *c, gather_emu, cuda_matches_oracle_and_cpu) {
  fixture_t f;
  fixture_init(&f, c);
  check_cuda(&f, f.packed, f.qo_indptr, c->name);
  unsigned char *cpu = malloc(f.out_bytes);
  cr_assert_eq(kvc_gather_queries(f.cpu, f.cpu_plan, f.packed, f.num_tokens, f.token_stride, f.qo_indptr, cpu, NULL),
               KVC_SUCCESS, "%s", kvc_last_error(f.cpu));
  cr_assert_eq(memcmp(cpu, f.got, f.out_bytes), 0, "%s: CPU and CUDA differ", c->name);
  free(cpu);
  fixture_fini(&f);
}

/* Packed q one element past a 16-byte boundary: the kernel falls back to element-wide vectors. */
Test(gather_emu, element_aligned_packed_q) {
  kvc_test_gather_case_t cases[16];
  kvc_test_gather_cases(cases);
  fixture_t f;
  fixture_init(&f, &cases[0]);
  const size_t bytes = (size_t)(f.num_tokens * f.token_stride) * f.elem;
  unsigned char *shifted = malloc(bytes + 16);
  memcpy(shifted + f.elem, f.packed, bytes);
  check_cuda(&f, shifted + f.elem, f.qo_indptr, "packed q one element off");
  cr_expect_eq(kvc_gather_queries(f.cuda, f.cuda_plan, shifted + 1, f.num_tokens, f.token_stride, f.qo_indptr, f.got,
                                  NULL),
               KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(f.cuda), "not aligned to its 2-byte elements"), "%s", kvc_last_error(f.cuda));
  free(shifted);
  fixture_fini(&f);
}

/* qo_indptr tables the CPU backend rejects: CUDA zeros exactly the rows it cannot find. The first
 * case has sequences of 100, 40 and 7 tokens (window 16) packed as 147 rows. */
Test(gather_emu, guarded_rows_are_zeros) {
  kvc_test_gather_case_t cases[16];
  kvc_test_gather_cases(cases);
  fixture_t f;
  fixture_init(&f, &cases[0]);
  cr_assert_eq(f.num_tokens, 147);
  const int32_t tables[][4] = {
      {-5, 100, 140, 147}, /* sequence 0 starts before the array                          */
      {0, 100, 90, 147},   /* sequence 1 reversed; sequence 2 then has 57 rows for 7 tokens */
      {0, 100, 140, 160},  /* sequence 2 runs past num_tokens                              */
      {0, 100, 110, 117},  /* sequence 1: 10 rows, positions [30, 40), window from 24      */
      {0, 90, 130, 137},   /* sequence 0: 90 rows, positions [10, 100): all rows found     */
      {0, 0, 0, 0},        /* nothing packed                                              */
  };
  for (size_t i = 0; i < sizeof tables / sizeof tables[0]; ++i) {
    char what[48];
    snprintf(what, sizeof what, "qo_indptr table %zu", i);
    check_cuda(&f, f.packed, tables[i], what);
  }
  /* the oracle does zero some rows and keep others in these tables (the test can fail) */
  kvc_test_gather_oracle(f.cuda_plan, &f.desc, f.packed, f.num_tokens, f.token_stride, tables[3], f.want);
  const size_t row = f.out_bytes / (size_t)f.info.obs_total;
  unsigned char zeros[2048] = {0};
  cr_assert(row <= sizeof zeros);
  cr_expect_neq(memcmp(f.want, zeros, row), 0, "sequence 0's rows are found");
  cr_expect_eq(memcmp(f.want + 16 * row, zeros, row), 0, "sequence 1's first row is not");
  fixture_fini(&f);
}
