/*
 * test_gather_gpu.c - kvc_gather_queries on a real device against the brute-force gather of
 * gather_oracle.c, byte for byte: every case of gather_oracle.c, the guarded rows of a qo_indptr
 * the CPU backend rejects (zeros where the packed rows cannot hold a position), and long
 * sequences (4k+ tokens, packed as last chunks of 1k+, 32 query heads of 128 dims, window 64).
 * Skips without a device.
 */
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

#include "gather_oracle.h"
#include "gpu_util.h"
#include "kvcompress.h"

/* Gathers `c` with `qo` (host; the case's own qo_indptr when NULL) on the device and compares. */
static void check_case(kvc_context_t ctx, const kvc_test_gather_case_t *c, const int32_t *qo, const char *what) {
  int32_t budgets[KVC_TEST_GATHER_MAX_BATCH], span_indptr[KVC_TEST_GATHER_MAX_BATCH + 1];
  kvc_span_t spans[2 * KVC_TEST_GATHER_MAX_BATCH];
  kvc_plan_desc_t d = kvc_test_gather_desc(c, budgets, span_indptr, spans);
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &d, &plan), KVC_SUCCESS, "%s: %s", what, kvc_last_error(ctx));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  int32_t own_qo[KVC_TEST_GATHER_MAX_BATCH + 1];
  int64_t tokens, stride;
  void *packed = kvc_test_packed_q_new(c, own_qo, &tokens, &stride, 0x6a7f);
  if (!qo) qo = own_qo;
  const size_t elem = c->dtype == KVC_DTYPE_F32 ? 4 : 2;
  const size_t packed_bytes = (size_t)(tokens * stride) * elem;
  const size_t out_bytes = (size_t)info.obs_total * (size_t)(c->num_q_heads * c->head_dim) * elem;
  void *dev_packed = kvc_gpu_upload(packed, packed_bytes);
  int32_t *dev_qo = kvc_gpu_upload(qo, sizeof(int32_t) * (size_t)(c->batch + 1));
  void *dev_out = kvc_gpu_upload(NULL, out_bytes);
  cr_assert_eq(cudaMemset(dev_out, 0xCD, out_bytes), cudaSuccess);
  kvc_status_t status = kvc_gather_queries(ctx, plan, dev_packed, tokens, stride, dev_qo, dev_out, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s: %s", what, kvc_last_error(ctx));
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess, "%s: %s", what, cudaGetErrorString(cudaGetLastError()));
  unsigned char *got = malloc(out_bytes), *want = malloc(out_bytes);
  kvc_gpu_download(got, dev_out, out_bytes);
  kvc_test_gather_oracle(plan, &d, packed, tokens, stride, qo, want);
  for (size_t i = 0; i < out_bytes; ++i)
    cr_assert_eq(got[i], want[i], "%s: byte %zu of queries: %02x, expected %02x", what, i, got[i], want[i]);
  free(got), free(want), free(packed);
  cudaFree(dev_packed), cudaFree(dev_qo), cudaFree(dev_out);
  kvc_plan_destroy(plan);
}

Test(gather_gpu, every_case_and_guarded_rows) {
  kvc_gpu_require_device();
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), KVC_SUCCESS);
  kvc_test_gather_case_t cases[16];
  const int count = kvc_test_gather_cases(cases);
  for (int i = 0; i < count; ++i) check_case(ctx, &cases[i], NULL, cases[i].name);
  const int32_t bad[][4] = {{-5, 100, 140, 147}, {0, 100, 90, 147}, {0, 100, 140, 160}, {0, 100, 110, 117}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) check_case(ctx, &cases[0], bad[i], "guarded qo_indptr");
  kvc_context_destroy(ctx);
}

Test(gather_gpu, long_sequences) {
  kvc_gpu_require_device();
  kvc_context_t ctx = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx), KVC_SUCCESS);
  kvc_test_gather_case_t c;
  memset(&c, 0, sizeof c);
  strcpy(c.name, "long_sequences");
  c.method = KVC_SCORE_SNAPKV, c.dtype = KVC_DTYPE_BF16, c.window = 64, c.num_q_heads = 32, c.num_kv_heads = 8;
  c.head_dim = 128, c.batch = KVC_TEST_GATHER_MAX_BATCH;
  for (int32_t b = 0; b < c.batch; ++b) c.seq_lens[b] = 4096 + 513 * b, c.packed_lens[b] = 1024 + 77 * b;
  check_case(ctx, &c, NULL, c.name);
  kvc_context_destroy(ctx);
}
