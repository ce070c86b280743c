/*
 * test_select_gpu.c - kvc_select on a real device at n = 32k, 128k and 1M against the CPU backend
 * (bit for bit) and the sorting oracle of tests/support/select_oracle.c; plain top-k rows also
 * against the CUB baseline (kernels/select_cub.h). Same cases as tests/emu/test_select_emu.c at
 * long context: random and adversarial scores, FAIR spans with fairness 0 / 0.5 / 1, k = |P|,
 * batches mixing short and long rows, TOVA. Skips without a device.
 */
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "select_cub.h"
#include "select_oracle.h"
#include "gpu_util.h"
#include "test_util.h"

static void assert_same(const int32_t *got, const int32_t *want, int64_t count, const char *what,
                        const kvc_test_select_case_t *c) {
  for (int64_t i = 0; i < count; ++i)
    cr_assert_eq(got[i], want[i], "%s (%s scores, fairness %.2f, n[0] %d): keep element %lld is %d, expected %d", what,
                 kvc_test_pattern_name(c->pattern), (double)c->fairness, c->seq_lens[0], (long long)i, got[i], want[i]);
}

/* Selects c on the device and on the CPU; compares both with the oracle. With `cub`, the case is a
 * uniform plain top-k batch (one n, one k, sinks and recents only) also checked against the CUB
 * baseline. */
static void check_case(const kvc_test_select_case_t *c, int cub) {
  kvc_gpu_require_device();
  kvc_plan_desc_t desc = kvc_test_select_case_desc(c);
  kvc_context_t cpu = NULL, cuda = NULL;
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(cpu, &desc, &cpu_plan), KVC_SUCCESS, "%s", kvc_last_error(cpu));
  cr_assert_eq(kvc_plan_create(cuda, &desc, &cuda_plan), KVC_SUCCESS, "%s", kvc_last_error(cuda));
  kvc_plan_info_t info;
  kvc_plan_get_info(cpu_plan, &info);

  const size_t score_bytes = sizeof(float) * (size_t)info.score_elems,
               keep_bytes = sizeof(int32_t) * (size_t)info.keep_elems;
  float *scores = malloc(score_bytes);
  int32_t *want = malloc(keep_bytes), *cpu_keep = malloc(keep_bytes), *cuda_keep = malloc(keep_bytes);
  kvc_test_fill_scores(scores, info.score_elems, c->pattern, c->seed);
  cr_assert_eq(kvc_test_select_oracle(cpu_plan, &desc, scores, want), 0);

  size_t bytes = 0;
  kvc_plan_workspace_size(cpu_plan, KVC_OP_SELECT, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  cr_assert_eq(kvc_select(cpu, cpu_plan, scores, cpu_keep, ws, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(cpu));
  free(ws);
  assert_same(cpu_keep, want, info.keep_elems, "CPU vs oracle", c);

  float *dev_scores = kvc_gpu_upload(scores, score_bytes);
  int32_t *dev_keep = kvc_gpu_upload(NULL, keep_bytes);
  kvc_plan_workspace_size(cuda_plan, KVC_OP_SELECT, &bytes);
  void *dev_ws = kvc_gpu_upload(NULL, bytes);
  cudaEvent_t start, stop;
  cudaEventCreate(&start), cudaEventCreate(&stop);
  cudaEventRecord(start, NULL);
  kvc_status_t status = kvc_select(cuda, cuda_plan, dev_scores, dev_keep, dev_ws, bytes, NULL);
  cudaEventRecord(stop, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s", kvc_last_error(cuda));
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, start, stop);
  cr_assert_eq(cudaMemcpy(cuda_keep, dev_keep, keep_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  assert_same(cuda_keep, cpu_keep, info.keep_elems, "CUDA vs CPU", c);
  cr_log_info("select n[0] %d, %d rows, %s scores, fairness %.2f: %.3f ms (first call)", c->seq_lens[0],
              c->batch * c->num_kv_heads, kvc_test_pattern_name(c->pattern), (double)c->fairness, ms);

  if (cub) {
    const int32_t n = c->seq_lens[0], k = c->budgets[0] < n ? c->budgets[0] : n, words = (n + 31) / 32;
    uint32_t *bits = calloc((size_t)words, sizeof(uint32_t));
    for (int32_t t = 0; t < n; ++t)
      if (t < c->sink || t >= n - c->recent) bits[t / 32] |= 1u << (t % 32);
    uint32_t *dev_bits = kvc_gpu_upload(bits, sizeof(uint32_t) * (size_t)words);
    size_t cub_bytes = 0;
    const int32_t rows = c->batch * c->num_kv_heads;
    cr_assert_eq(kvc_select_cub_baseline(NULL, &cub_bytes, dev_scores, dev_bits, rows, n, k, dev_keep, NULL),
                 cudaSuccess);
    void *cub_ws = kvc_gpu_upload(NULL, cub_bytes);
    cudaMemset(dev_keep, 0xff, keep_bytes);
    cr_assert_eq(kvc_select_cub_baseline(cub_ws, &cub_bytes, dev_scores, dev_bits, rows, n, k, dev_keep, NULL),
                 cudaSuccess);
    cr_assert_eq(cudaMemcpy(cuda_keep, dev_keep, keep_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    assert_same(cuda_keep, cpu_keep, info.keep_elems, "CUB baseline vs CPU", c);
    cudaFree(cub_ws), cudaFree(dev_bits);
    free(bits);
  }

  cudaFree(dev_scores), cudaFree(dev_keep), cudaFree(dev_ws);
  cudaEventDestroy(start), cudaEventDestroy(stop);
  free(scores), free(want), free(cpu_keep), free(cuda_keep);
  kvc_plan_destroy(cpu_plan), kvc_plan_destroy(cuda_plan);
  kvc_context_destroy(cpu), kvc_context_destroy(cuda);
}

static const kvc_score_pattern_t kPatterns[] = {KVC_SCORES_RANDOM, KVC_SCORES_FEW_VALUES, KVC_SCORES_SPECIAL,
                                                KVC_SCORES_EQUAL, KVC_SCORES_NAN};

/* Plain top-k with 4 sinks and 64 recents, every pattern; also against CUB. */
static void plain_topk(int32_t n, int32_t batch, int32_t heads, double keep_fraction) {
  const int32_t lens[] = {n, n, n, n};
  for (int i = 0; i < 5; ++i) {
    kvc_test_select_case_t c =
        kvc_test_select_case(KVC_SCORE_KNORM, heads, batch, lens, keep_fraction, 68, kPatterns[i], 1000 + i);
    c.sink = 4, c.recent = 64;
    check_case(&c, 1);
  }
}

Test(select_gpu, plain_topk_32k) { plain_topk(32768, 4, 8, 0.25); }
Test(select_gpu, plain_topk_128k) { plain_topk(131072, 2, 8, 0.1); }
Test(select_gpu, plain_topk_1m) { plain_topk(1 << 20, 1, 2, 0.5); }

/* FAIR spans (with gaps) and PROTECT spans, fairness 0 / 0.5 / 1, random and tied scores. */
static void fair_spans(int32_t n, int32_t heads, int32_t fair) {
  const float fairness[] = {0.0f, 0.5f, 1.0f};
  const int32_t lens[] = {n, n / 3 + 1};
  for (int f = 0; f < 3; ++f)
    for (int p = 0; p < 2; ++p) {
      kvc_test_select_case_t c =
          kvc_test_select_case(KVC_SCORE_KNORM, heads, 2, lens, 0.2, 64, kPatterns[p], 2000 + 10 * f + p);
      c.fairness = fairness[f];
      kvc_test_select_case_add_spans(&c, fair, 8, 0);
      check_case(&c, 0);
    }
}

Test(select_gpu, fair_spans_32k) { fair_spans(32768, 8, 6); }
Test(select_gpu, fair_spans_128k) { fair_spans(131072, 4, 40); }
Test(select_gpu, fair_spans_1m) { fair_spans(1 << 20, 1, 3); }

/* k = |P| on long rows, next to short rows and rows kept whole. */
Test(select_gpu, budget_edges_and_mixed_rows) {
  const int32_t lens[] = {1, 100, 512, 513, 32768, 131072, 5000};
  kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 8, 7, lens, 0.3, 64, KVC_SCORES_FEW_VALUES, 3000);
  c.sink = 32, c.recent = 32;
  c.budgets[4] = 64;   /* = |P| */
  c.budgets[6] = 5000; /* k = n */
  c.fairness = 0.5f;
  check_case(&c, 0);
}

/* TOVA: one selection per sequence, copied to every KV head. */
Test(select_gpu, tova_shared_heads_128k) {
  const int32_t lens[] = {131072, 300};
  for (int p = 0; p < 3; ++p) {
    kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_TOVA, 8, 2, lens, 0.1, 16, kPatterns[p], 4000 + p);
    c.fairness = 1.0f;
    kvc_test_select_case_add_spans(&c, 3, 2, 1);
    check_case(&c, 0);
  }
}

/* Rows split into segments of 64 tokens (KVC_SELECT_SEGMENT, read at plan creation): hundreds of
 * blocks add into one row's histograms and race for its last arrival, on real hardware. */
Test(select_gpu, split_rows_many_segments_per_row) {
  setenv("KVC_SELECT_SEGMENT", "64", 1);
  const int32_t lens[] = {32768, 5000, 300};
  const float fairness[] = {0.0f, 1.0f};
  for (int f = 0; f < 2; ++f)
    for (int p = 0; p < 3; ++p) {
      kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 8, 3, lens, 0.2, 64, kPatterns[p], 5000 + 10 * f + p);
      c.fairness = fairness[f];
      kvc_test_select_case_add_spans(&c, 5, 3, 0);
      check_case(&c, 0);
    }
}

/* kvc_select_layers over 8 layers of 32k-token rows == one CPU kvc_select per layer. */
Test(select_gpu, layers_in_one_call_32k) {
  kvc_gpu_require_device();
  enum { L = 8 };
  const int32_t lens[] = {32768, 4096};
  kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 8, 2, lens, 0.25, 64, KVC_SCORES_FEW_VALUES, 6000);
  c.fairness = 0.5f;
  kvc_test_select_case_add_spans(&c, 4, 2, 0);
  kvc_plan_desc_t desc = kvc_test_select_case_desc(&c);
  kvc_context_t cpu = NULL, cuda = NULL;
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(cpu, &desc, &cpu_plan), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_create(cuda, &desc, &cuda_plan), KVC_SUCCESS);
  kvc_plan_info_t info;
  kvc_plan_get_info(cpu_plan, &info);
  const size_t score_bytes = sizeof(float) * (size_t)info.score_elems * L;
  const size_t keep_bytes = sizeof(int32_t) * (size_t)info.keep_elems * L;
  float *scores = malloc(score_bytes);
  int32_t *want = malloc(keep_bytes), *got = malloc(keep_bytes);
  for (int l = 0; l < L; ++l)
    kvc_test_fill_scores(scores + (size_t)l * info.score_elems, info.score_elems,
                         l % 2 ? KVC_SCORES_RANDOM : KVC_SCORES_FEW_VALUES, 6000 + l);
  size_t bytes = 0;
  kvc_plan_workspace_size(cpu_plan, KVC_OP_SELECT, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  for (int l = 0; l < L; ++l)
    cr_assert_eq(kvc_select(cpu, cpu_plan, scores + (size_t)l * info.score_elems, want + (size_t)l * info.keep_elems, ws,
                            bytes, NULL),
                 KVC_SUCCESS);
  free(ws);
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(cuda_plan, KVC_OP_SELECT, L, &layout), KVC_SUCCESS);
  float *dev_scores = kvc_gpu_upload(scores, score_bytes);
  int32_t *dev_keep = kvc_gpu_upload(NULL, keep_bytes);
  void *dev_ws = kvc_gpu_upload(NULL, layout.workspace_bytes);
  cr_assert_eq(kvc_select_layers(cuda, cuda_plan, L, dev_scores, dev_keep, dev_ws, layout.workspace_bytes, NULL),
               KVC_SUCCESS, "%s", kvc_last_error(cuda));
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  kvc_gpu_download(got, dev_keep, keep_bytes);
  assert_same(got, want, info.keep_elems * L, "kvc_select_layers vs CPU per layer", &c);
  cudaFree(dev_scores), cudaFree(dev_keep), cudaFree(dev_ws);
  free(scores), free(want), free(got);
  kvc_plan_destroy(cpu_plan), kvc_plan_destroy(cuda_plan);
  kvc_context_destroy(cpu), kvc_context_destroy(cuda);
}
