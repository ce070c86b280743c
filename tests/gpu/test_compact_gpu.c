/*
 * test_compact_gpu.c - kvc_compact, kvc_retention and kvc_compress on a real device against the
 * CPU backend and the gather oracle of tests/support/compact_oracle.c, byte for byte over the
 * whole pools: every layout and dtype with a mixed batch, long rows (32k and 128k tokens, 8 heads)
 * where thousands of blocks run at once, so a missing cross-block ordering shows up as a
 * difference, and kvc_compress captured into a CUDA graph and replayed on fresh copies of the
 * cache. Skips without a device.
 */
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "kvcompress.h"
#include "gpu_util.h"
#include "test_util.h"

#define NUM_EXTRAS 2

/* A device copy of a test cache: pools and tables in device memory, the same strides. */
typedef struct {
  kvc_paged_kv_t desc;
  size_t pool_bytes;
} device_cache_t;

static device_cache_t device_cache_new(const kvc_test_cache_t *c) {
  device_cache_t d = {c->desc, c->pool_bytes};
  d.desc.k = kvc_gpu_upload(c->k, c->pool_bytes);
  d.desc.v = kvc_gpu_upload(c->v, c->pool_bytes);
  if (c->table_kind == KVC_TEST_DENSE)
    d.desc.page_table = kvc_gpu_upload(c->table, sizeof(int32_t) * (size_t)c->batch * (size_t)c->desc.max_pages);
  if (c->table_kind == KVC_TEST_CSR) {
    d.desc.page_table = kvc_gpu_upload(c->table, sizeof(int32_t) * (size_t)c->indptr[c->batch]);
    d.desc.page_indptr = kvc_gpu_upload(c->indptr, sizeof(int32_t) * (size_t)(c->batch + 1));
  }
  return d;
}

/* Refills the device pools from a host cache (for graph replays on fresh data). */
static void device_cache_refill(device_cache_t *d, const kvc_test_cache_t *c) {
  cr_assert_eq(cudaMemcpy(d->desc.k, c->k, c->pool_bytes, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaMemcpy(d->desc.v, c->v, c->pool_bytes, cudaMemcpyHostToDevice), cudaSuccess);
}

static void device_cache_download(const device_cache_t *d, kvc_test_cache_t *into) {
  kvc_gpu_download(into->k, d->desc.k, d->pool_bytes);
  kvc_gpu_download(into->v, d->desc.v, d->pool_bytes);
}

static void device_cache_free(device_cache_t *d) {
  cudaFree(d->desc.k);
  cudaFree(d->desc.v);
  cudaFree((void *)d->desc.page_table);
  cudaFree((void *)d->desc.page_indptr);
}

static void assert_same_bytes(const void *got, const void *want, size_t bytes, const char *what, const char *who) {
  const int64_t at = kvc_test_first_difference(got, want, bytes);
  cr_assert(at < 0, "%s: %s differs from the oracle at byte %lld: %02x, expected %02x", who, what, (long long)at,
            at < 0 ? 0 : ((const unsigned char *)got)[at], at < 0 ? 0 : ((const unsigned char *)want)[at]);
}

static kvc_plan_t make_plan(kvc_context_t ctx, kvc_plan_desc_t *d) {
  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, d, &plan);
  cr_assert_eq(status, KVC_SUCCESS, "plan: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  return plan;
}

static kvc_plan_desc_t compact_desc(int32_t heads, int32_t head_dim, kvc_dtype_t dtype, int32_t batch,
                                    const int32_t *seq_lens, const int32_t *budgets) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = d.num_kv_heads = heads;
  d.head_dim = head_dim;
  d.dtype = dtype;
  d.batch = batch;
  d.seq_lens = seq_lens;
  d.budgets = budgets;
  d.method = KVC_SCORE_STREAMING; /* every dtype, fp8 too */
  return d;
}

/* Compacts one batch on the device (with extras) and checks pools and extras against the oracle;
 * with `with_cpu` also against the CPU backend. */
static void check_device_compaction(const kvc_test_cache_t *before, int32_t heads, const int32_t *budgets,
                                    int32_t pattern_shift, int with_cpu, const char *who) {
  const kvc_paged_kv_t *c = &before->desc;
  kvc_plan_desc_t d = compact_desc(heads, c->head_dim, c->dtype, before->batch, before->seq_lens, budgets);
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t plan = make_plan(cuda, &d);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_new(before->batch, before->seq_lens, budgets, heads, pattern_shift, 17, &keep_elems);
  float **extras = kvc_test_extras_new(NUM_EXTRAS, info.score_elems, 18);
  float **expected_extras = kvc_test_extras_clone(extras, NUM_EXTRAS, info.score_elems);
  kvc_test_cache_t *expected = kvc_test_cache_clone(before), *got = kvc_test_cache_clone(before);
  kvc_test_compact_oracle(before, expected, budgets, keep, extras, expected_extras, NUM_EXTRAS, NULL);

  device_cache_t dev = device_cache_new(before);
  int32_t *dev_keep = kvc_gpu_upload(keep, sizeof(int32_t) * (size_t)keep_elems);
  const size_t extra_bytes = sizeof(float) * (size_t)info.score_elems;
  float *dev_extras[NUM_EXTRAS];
  for (int e = 0; e < NUM_EXTRAS; ++e) dev_extras[e] = kvc_gpu_upload(extras[e], extra_bytes);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_gpu_upload(NULL, bytes);
  kvc_status_t status = kvc_compact(cuda, plan, &dev.desc, dev_keep, dev_extras, NUM_EXTRAS, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", who, kvc_status_name(status), kvc_last_error(cuda));
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess, "%s: %s", who, cudaGetErrorString(cudaGetLastError()));
  device_cache_download(&dev, got);
  assert_same_bytes(got->k, expected->k, before->pool_bytes, "K pool", who);
  assert_same_bytes(got->v, expected->v, before->pool_bytes, "V pool", who);
  float *got_extra = malloc(extra_bytes);
  for (int e = 0; e < NUM_EXTRAS; ++e) {
    kvc_gpu_download(got_extra, dev_extras[e], extra_bytes);
    assert_same_bytes(got_extra, expected_extras[e], extra_bytes, "an extra", who);
  }
  if (with_cpu) {
    kvc_context_t cpu = NULL;
    cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
    kvc_plan_t cpu_plan = make_plan(cpu, &d);
    kvc_test_cache_t *host = kvc_test_cache_clone(before);
    size_t cpu_bytes = 0;
    cr_assert_eq(kvc_plan_workspace_size(cpu_plan, KVC_OP_COMPACT, &cpu_bytes), KVC_SUCCESS);
    void *cpu_ws = kvc_test_workspace_new(cpu_bytes);
    cr_assert_eq(kvc_compact(cpu, cpu_plan, &host->desc, keep, NULL, 0, cpu_ws, cpu_bytes, NULL), KVC_SUCCESS);
    assert_same_bytes(got->k, host->k, before->pool_bytes, "K pool (vs the CPU backend)", who);
    assert_same_bytes(got->v, host->v, before->pool_bytes, "V pool (vs the CPU backend)", who);
    free(cpu_ws);
    kvc_test_cache_free(host);
    kvc_plan_destroy(cpu_plan);
    kvc_context_destroy(cpu);
  }
  free(got_extra);
  for (int e = 0; e < NUM_EXTRAS; ++e) cudaFree(dev_extras[e]);
  cudaFree(dev_keep);
  cudaFree(ws);
  device_cache_free(&dev);
  kvc_test_cache_free(expected);
  kvc_test_cache_free(got);
  kvc_test_extras_free(extras, NUM_EXTRAS);
  kvc_test_extras_free(expected_extras, NUM_EXTRAS);
  free(keep);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cuda);
}

Test(compact_gpu, every_layout_and_dtype) {
  kvc_gpu_require_device();
  const int32_t seq_lens[] = {37, 300, 1110, 700, 1500, 64, 129, 1}, budgets[] = {1, 299, 1080, 350, 150, 100, 129, 1};
  const int32_t head_dims[] = {64, 40, 128, 24};
  for (int layout = 0; layout < 2; ++layout)
    for (int table = 0; table < 3; ++table)
      for (int dtype = 0; dtype < 4; ++dtype) {
        kvc_test_cache_t *cache = kvc_test_cache_new(8, seq_lens, 2, head_dims[dtype], (kvc_dtype_t)dtype, 16,
                                                     (kvc_test_layout_t)layout, (kvc_test_table_t)table, 3,
                                                     (uint64_t)(100 + layout * 12 + table * 4 + dtype));
        char who[64];
        snprintf(who, sizeof who, "layout %d table %d dtype %d", layout, table, dtype);
        check_device_compaction(cache, 2, budgets, layout + table + dtype, 1, who);
        kvc_test_cache_free(cache);
      }
}

/* One long sequence, Llama-like 8 KV heads x 128 bf16, NHD pages of 16: kept 90 %, 50 % and 10 %
 * at 32k (every keep pattern across the heads) and 10 % at 128k. */
Test(compact_gpu, long_rows, .timeout = 300) {
  kvc_gpu_require_device();
  const struct {
    int32_t n, budget;
  } cases[] = {{32768, 29491}, {32768, 16384}, {32768, 3277}, {131072, 13107}};
  for (int i = 0; i < 4; ++i) {
    kvc_test_cache_t *cache =
        kvc_test_cache_new(1, &cases[i].n, 8, 128, KVC_DTYPE_BF16, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 5, 200 + i);
    char who[64];
    snprintf(who, sizeof who, "n %d, budget %d", cases[i].n, cases[i].budget);
    check_device_compaction(cache, 8, &cases[i].budget, i, 0, who);
    kvc_test_cache_free(cache);
  }
}

Test(compact_gpu, retention_counts) {
  kvc_gpu_require_device();
  const int32_t seq_lens[] = {37, 3000, 700}, budgets[] = {20, 1500, 70}, span_indptr[] = {0, 2, 5, 6};
  const kvc_span_t spans[] = {{0, 10, KVC_SPAN_FAIR, 1}, {10, 37, KVC_SPAN_FAIR, 1}, {0, 1000, KVC_SPAN_FAIR, 1},
                              {500, 503, KVC_SPAN_PROTECT, 1}, {1000, 3000, KVC_SPAN_FAIR, 2},
                              {100, 600, KVC_SPAN_FAIR, 1}};
  kvc_plan_desc_t d = compact_desc(4, 64, KVC_DTYPE_F16, 3, seq_lens, budgets);
  d.span_indptr = span_indptr;
  d.spans = spans;
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t plan = make_plan(cuda, &d);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_new(3, seq_lens, budgets, 4, 0, 3, &keep_elems);
  int32_t *want = malloc(sizeof(int32_t) * (size_t)info.count_elems), *got = malloc(sizeof(int32_t) * (size_t)info.count_elems);
  kvc_test_retention_oracle(3, seq_lens, budgets, 4, span_indptr, spans, keep, want);
  int32_t *dev_keep = kvc_gpu_upload(keep, sizeof(int32_t) * (size_t)keep_elems);
  int32_t *dev_counts = kvc_gpu_upload(NULL, sizeof(int32_t) * (size_t)info.count_elems);
  cr_assert_eq(kvc_retention(cuda, plan, dev_keep, dev_counts, NULL, 0, NULL), KVC_SUCCESS, "%s", kvc_last_error(cuda));
  kvc_gpu_download(got, dev_counts, sizeof(int32_t) * (size_t)info.count_elems);
  for (int64_t i = 0; i < info.count_elems; ++i) cr_assert_eq(got[i], want[i], "count %lld", (long long)i);
  cudaFree(dev_keep);
  cudaFree(dev_counts);
  free(keep);
  free(want);
  free(got);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cuda);
}

/* kvc_compress captured on a stream into a CUDA graph, replayed twice on fresh copies of the cache:
 * each replay equals the CPU backend's kvc_compress (cache bytes and the keep layout left in the
 * workspace). STREAMING with span-local fair eviction: exact scores on both backends. */
Test(compact_gpu, compress_in_a_cuda_graph) {
  kvc_gpu_require_device();
  const int32_t seq_lens[] = {5000, 1200, 300}, budgets[] = {1000, 1100, 300}, span_indptr[] = {0, 2, 4, 5};
  const kvc_span_t spans[] = {{0, 1000, KVC_SPAN_FAIR, 1}, {1000, 5000, KVC_SPAN_FAIR, 1},
                              {0, 600, KVC_SPAN_FAIR, 1}, {600, 1200, KVC_SPAN_FAIR, 3}, {0, 300, KVC_SPAN_FAIR, 1}};
  kvc_plan_desc_t d = compact_desc(8, 128, KVC_DTYPE_BF16, 3, seq_lens, budgets);
  d.span_indptr = span_indptr;
  d.spans = spans;
  d.span_local = 1;
  d.sink_tokens = 4;
  d.fairness = 1.0f;
  kvc_test_cache_t *before =
      kvc_test_cache_new(3, seq_lens, 8, 128, KVC_DTYPE_BF16, 16, KVC_TEST_HND, KVC_TEST_CSR, 4, 300);

  /* the CPU backend's result */
  kvc_context_t cpu = NULL, cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t cpu_plan = make_plan(cpu, &d), plan = make_plan(cuda, &d);
  kvc_plan_info_t info, cpu_info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_get_info(cpu_plan, &cpu_info), KVC_SUCCESS);
  kvc_test_cache_t *want = kvc_test_cache_clone(before), *got = kvc_test_cache_clone(before);
  size_t cpu_bytes = 0, bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(cpu_plan, KVC_OP_COMPRESS, &cpu_bytes), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes), KVC_SUCCESS);
  void *cpu_ws = kvc_test_workspace_new(cpu_bytes);
  cr_assert_eq(kvc_compress(cpu, cpu_plan, &want->desc, NULL, NULL, cpu_ws, cpu_bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(cpu));

  device_cache_t dev = device_cache_new(before);
  void *ws = kvc_gpu_upload(NULL, bytes);
  cudaStream_t stream;
  cr_assert_eq(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  kvc_status_t status = kvc_compress(cuda, plan, &dev.desc, NULL, NULL, ws, bytes, (kvc_stream_t)stream);
  cr_assert_eq(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cr_assert_eq(status, KVC_SUCCESS, "captured kvc_compress: %s (%s)", kvc_status_name(status), kvc_last_error(cuda));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  const size_t keep_bytes = sizeof(int32_t) * (size_t)info.keep_elems;
  int32_t *keep = malloc(keep_bytes);
  for (int replay = 0; replay < 2; ++replay) {
    device_cache_refill(&dev, before);
    cr_assert_eq(cudaMemset(ws, 0xA5, bytes), cudaSuccess); /* the workspace starts as garbage */
    cr_assert_eq(cudaGraphLaunch(exec, stream), cudaSuccess);
    cr_assert_eq(cudaStreamSynchronize(stream), cudaSuccess, "replay %d: %s", replay,
                 cudaGetErrorString(cudaGetLastError()));
    device_cache_download(&dev, got);
    kvc_gpu_download(keep, (char *)ws + info.keep_offset_bytes, keep_bytes);
    assert_same_bytes(keep, (char *)cpu_ws + cpu_info.keep_offset_bytes, keep_bytes, "keep layout", "graph replay");
    assert_same_bytes(got->k, want->k, before->pool_bytes, "K pool", "graph replay");
    assert_same_bytes(got->v, want->v, before->pool_bytes, "V pool", "graph replay");
  }
  free(keep);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  cudaFree(ws);
  device_cache_free(&dev);
  free(cpu_ws);
  kvc_test_cache_free(before);
  kvc_test_cache_free(want);
  kvc_test_cache_free(got);
  kvc_plan_destroy(cpu_plan);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cpu);
  kvc_context_destroy(cuda);
}

/* A page shared by two sequences and one used twice by a third, on the device: those sequences
 * keep every byte, the others compact as the oracle says, and the status array in the workspace
 * flags exactly the three with KVC_COMPACT_SHARED_PAGE. */
Test(compact_gpu, shared_pages_flagged_in_the_status_array) {
  kvc_gpu_require_device();
  const int32_t seq_lens[] = {3000, 4000, 2500, 5000, 700}, budgets[] = {1000, 900, 2400, 100, 699};
  kvc_test_cache_t *before =
      kvc_test_cache_new(5, seq_lens, 8, 128, KVC_DTYPE_BF16, 16, KVC_TEST_NHD, KVC_TEST_DENSE, 3, 400);
  kvc_test_cache_t *corrupt = kvc_test_cache_clone(before), *expected = kvc_test_cache_clone(before);
  const int32_t cols = before->desc.max_pages;
  corrupt->table[1 * cols + 7] = corrupt->table[3 * cols + 100]; /* sequences 1 and 3 share a page */
  corrupt->table[2 * cols + 50] = corrupt->table[2 * cols + 3];  /* sequence 2 uses a page twice */
  const unsigned char skip[] = {0, 1, 1, 1, 0};
  kvc_plan_desc_t d = compact_desc(8, 128, KVC_DTYPE_BF16, 5, seq_lens, budgets);
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t plan = make_plan(cuda, &d);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_new(5, seq_lens, budgets, 8, 1, 41, &keep_elems);
  kvc_test_compact_oracle(before, expected, budgets, keep, NULL, NULL, 0, skip);
  device_cache_t dev = device_cache_new(corrupt);
  int32_t *dev_keep = kvc_gpu_upload(keep, sizeof(int32_t) * (size_t)keep_elems);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPACT, &bytes), KVC_SUCCESS);
  void *ws = kvc_gpu_upload(NULL, bytes);
  cr_assert_eq(cudaMemset(ws, 0xA5, bytes), cudaSuccess);
  cr_assert_eq(kvc_compact(cuda, plan, &dev.desc, dev_keep, NULL, 0, ws, bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(cuda));
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  int32_t status[5];
  kvc_gpu_download(status, (char *)ws + info.compact_status_offset_bytes, sizeof status);
  for (int b = 0; b < 5; ++b)
    cr_assert_eq(status[b], skip[b] ? KVC_COMPACT_SHARED_PAGE : KVC_COMPACT_OK, "status[%d] is %d", b, status[b]);
  device_cache_download(&dev, corrupt);
  assert_same_bytes(corrupt->k, expected->k, before->pool_bytes, "K pool", "shared pages");
  assert_same_bytes(corrupt->v, expected->v, before->pool_bytes, "V pool", "shared pages");
  cudaFree(ws);
  cudaFree(dev_keep);
  device_cache_free(&dev);
  free(keep);
  kvc_test_cache_free(before);
  kvc_test_cache_free(corrupt);
  kvc_test_cache_free(expected);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cuda);
}

/* kvc_compact_layers over 4 layers (device arrays of the layers' pools) captured in a CUDA graph and
 * replayed on fresh pools: every layer as the oracle says, the [4][batch] status array all zeros. */
Test(compact_gpu, compact_layers_in_a_cuda_graph) {
  kvc_gpu_require_device();
  enum { L = 4 };
  const int32_t seq_lens[] = {32768, 4096, 700}, budgets[] = {8000, 4000, 700};
  kvc_test_cache_t *base =
      kvc_test_cache_new(3, seq_lens, 8, 128, KVC_DTYPE_F16, 16, KVC_TEST_HND, KVC_TEST_CSR, 3, 410);
  kvc_test_cache_t *before[L], *expected[L], *got[L];
  device_cache_t dev[L];
  void *k[L], *v[L];
  int64_t keep_elems = 0;
  int32_t *keep = NULL;
  for (int l = 0; l < L; ++l) {
    int32_t *layer_keep = kvc_test_keep_new(3, seq_lens, budgets, 8, l, 42 + l, &keep_elems);
    if (!keep) keep = malloc(sizeof(int32_t) * (size_t)keep_elems * L);
    memcpy(keep + (size_t)l * keep_elems, layer_keep, sizeof(int32_t) * (size_t)keep_elems);
    free(layer_keep);
    before[l] = kvc_test_cache_clone(base);
    for (size_t i = 0; i < before[l]->pool_bytes; i += 97) before[l]->k[i] ^= (unsigned char)(l + 1); /* per layer */
    expected[l] = kvc_test_cache_clone(before[l]);
    got[l] = kvc_test_cache_clone(before[l]);
    kvc_test_compact_oracle(before[l], expected[l], budgets, keep + (size_t)l * keep_elems, NULL, NULL, 0, NULL);
    dev[l] = device_cache_new(before[l]);
    k[l] = dev[l].desc.k;
    v[l] = dev[l].desc.v;
  }
  kvc_plan_desc_t d = compact_desc(8, 128, KVC_DTYPE_F16, 3, seq_lens, budgets);
  kvc_context_t cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_plan_t plan = make_plan(cuda, &d);
  kvc_workspace_layout_t layout;
  cr_assert_eq(kvc_plan_workspace_layout(plan, KVC_OP_COMPACT, L, &layout), KVC_SUCCESS);
  void *ws = kvc_gpu_upload(NULL, layout.workspace_bytes);
  void **dev_k = kvc_gpu_upload(k, sizeof k), **dev_v = kvc_gpu_upload(v, sizeof v);
  int32_t *dev_keep = kvc_gpu_upload(keep, sizeof(int32_t) * (size_t)keep_elems * L);
  kvc_paged_kv_t shared = dev[0].desc;
  shared.k = shared.v = NULL;
  const kvc_layers_t layers = {L, dev_k, dev_v, NULL, NULL};
  cudaStream_t stream;
  cr_assert_eq(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  kvc_status_t status = kvc_compact_layers(cuda, plan, &shared, &layers, dev_keep, NULL, 0, ws, layout.workspace_bytes,
                                           (kvc_stream_t)stream);
  cr_assert_eq(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  cr_assert_eq(status, KVC_SUCCESS, "captured kvc_compact_layers: %s (%s)", kvc_status_name(status),
               kvc_last_error(cuda));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  int32_t flags[L * 3];
  for (int replay = 0; replay < 2; ++replay) {
    for (int l = 0; l < L; ++l) device_cache_refill(&dev[l], before[l]);
    cr_assert_eq(cudaMemset(ws, 0xA5, layout.workspace_bytes), cudaSuccess);
    cr_assert_eq(cudaGraphLaunch(exec, stream), cudaSuccess);
    cr_assert_eq(cudaStreamSynchronize(stream), cudaSuccess, "%s", cudaGetErrorString(cudaGetLastError()));
    kvc_gpu_download(flags, (char *)ws + layout.status_offset_bytes, sizeof flags);
    for (int i = 0; i < L * 3; ++i) cr_assert_eq(flags[i], 0, "replay %d: status[%d] is %d", replay, i, flags[i]);
    for (int l = 0; l < L; ++l) {
      device_cache_download(&dev[l], got[l]);
      assert_same_bytes(got[l]->k, expected[l]->k, base->pool_bytes, "K pool", "kvc_compact_layers");
      assert_same_bytes(got[l]->v, expected[l]->v, base->pool_bytes, "V pool", "kvc_compact_layers");
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  cudaFree(ws), cudaFree(dev_k), cudaFree(dev_v), cudaFree(dev_keep);
  for (int l = 0; l < L; ++l) {
    device_cache_free(&dev[l]);
    kvc_test_cache_free(before[l]), kvc_test_cache_free(expected[l]), kvc_test_cache_free(got[l]);
  }
  free(keep);
  kvc_test_cache_free(base);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cuda);
}
