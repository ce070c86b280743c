/*
 * test_plan_graph_gpu.c - one CUDA graph of kvc_compress replayed for every compatible event: the
 * graph is captured once with the first event's plan (device_memory CALLER, uploaded into one
 * buffer); each later event builds its plan, checks kvc_plan_compatible, uploads it into that
 * buffer on the graph's stream (from pageable memory, and from a page-locked image) and replays
 * the graph. Every replay must equal a fresh (OWNED) plan's direct kvc_compress of that event, byte
 * for byte (cache pools and the keep layout), while the events' results differ from each other.
 * SnapKV (window 64: several normaliser splits) and H2O with a long window (one split per row
 * block) through the tensor-core scoring kernels.
 * Skips without a device.
 */
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "gpu_util.h"
#include "kvcompress.h"
#include "plan_events.h"
#include "test_util.h"

#define DTYPE KVC_DTYPE_BF16

typedef struct {
  kvc_context_t ctx;
  kvc_test_cache_t *before; /* one page per sequence: no tables to copy to the device */
  kvc_paged_kv_t device;    /* the same descriptor with device pools, at fixed addresses */
  void *queries, *workspace;
  size_t ws_bytes, keep_bytes, keep_offset;
  cudaStream_t stream;
} rig_t;

typedef struct {
  int32_t *keep;
  kvc_test_cache_t *cache;
} result_t;

/* Event `which` of plan_events.c, made H2O over a long window when `long_window`. */
static kvc_plan_t event_plan(kvc_context_t ctx, int which, kvc_plan_memory_t memory, int long_window) {
  kvc_test_event_t e;
  kvc_test_event(&e, which, DTYPE, memory);
  if (long_window) e.desc.method = KVC_SCORE_H2O, e.desc.window = 160; /* several query tiles a key tile */
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &e.desc, &plan), KVC_SUCCESS, "event %d: %s", which, kvc_last_error(ctx));
  return plan;
}

static void rig_init(rig_t *r, int long_window) {
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &r->ctx), KVC_SUCCESS);
  kvc_test_event_t e;
  kvc_test_event(&e, 0, DTYPE, KVC_PLAN_MEMORY_OWNED);
  kvc_plan_t plan = event_plan(r->ctx, 0, KVC_PLAN_MEMORY_OWNED, long_window);
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(plan, &info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &r->ws_bytes), KVC_SUCCESS);
  r->keep_bytes = sizeof(int32_t) * (size_t)info.keep_elems;
  r->keep_offset = info.keep_offset_bytes;
  kvc_plan_destroy(plan);
  r->before = kvc_test_cache_new(KVC_TEST_EVENT_BATCH, e.seq_lens, KVC_TEST_EVENT_HEADS, KVC_TEST_EVENT_DIM, DTYPE, 200,
                                 KVC_TEST_HND, KVC_TEST_CONTIG, 1, 21);
  r->device = r->before->desc;
  r->device.k = kvc_gpu_upload(NULL, r->before->pool_bytes);
  r->device.v = kvc_gpu_upload(NULL, r->before->pool_bytes);
  const size_t q_bytes = (size_t)info.obs_total * 4 * KVC_TEST_EVENT_HEADS * KVC_TEST_EVENT_DIM * 2;
  void *host_q = kvc_test_queries_new(info.obs_total, 4 * KVC_TEST_EVENT_HEADS, KVC_TEST_EVENT_DIM, DTYPE, 22);
  r->queries = kvc_gpu_upload(host_q, q_bytes);
  free(host_q);
  r->workspace = kvc_gpu_upload(NULL, r->ws_bytes);
  cr_assert_eq(cudaStreamCreateWithFlags(&r->stream, cudaStreamNonBlocking), cudaSuccess);
}

static void rig_fini(rig_t *r) {
  cudaFree(r->device.k), cudaFree(r->device.v), cudaFree(r->queries), cudaFree(r->workspace);
  cudaStreamDestroy(r->stream);
  kvc_test_cache_free(r->before);
  kvc_context_destroy(r->ctx);
}

static void refill(rig_t *r) {
  cr_assert_eq(cudaMemcpy(r->device.k, r->before->k, r->before->pool_bytes, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaMemcpy(r->device.v, r->before->v, r->before->pool_bytes, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaMemset(r->workspace, 0xA5, r->ws_bytes), cudaSuccess); /* garbage, as the API allows */
}

static result_t download(rig_t *r) {
  cr_assert_eq(cudaStreamSynchronize(r->stream), cudaSuccess, "%s", cudaGetErrorString(cudaGetLastError()));
  result_t out = {malloc(r->keep_bytes), kvc_test_cache_clone(r->before)};
  kvc_gpu_download(out.keep, (char *)r->workspace + r->keep_offset, r->keep_bytes);
  kvc_gpu_download(out.cache->k, r->device.k, r->before->pool_bytes);
  kvc_gpu_download(out.cache->v, r->device.v, r->before->pool_bytes);
  return out;
}

static int same(const rig_t *r, const result_t *a, const result_t *b) {
  return memcmp(a->keep, b->keep, r->keep_bytes) == 0 &&
         kvc_test_first_difference(a->cache->k, b->cache->k, r->before->pool_bytes) < 0 &&
         kvc_test_first_difference(a->cache->v, b->cache->v, r->before->pool_bytes) < 0;
}

static void result_free(result_t *x) {
  free(x->keep);
  kvc_test_cache_free(x->cache);
}

static void replay_every_event(int long_window) {
  kvc_gpu_require_device();
  rig_t r;
  rig_init(&r, long_window);
  enum { EVENTS = 3 };
  result_t fresh[EVENTS];
  for (int w = 0; w < EVENTS; ++w) {
    kvc_plan_t plan = event_plan(r.ctx, w, KVC_PLAN_MEMORY_OWNED, long_window);
    refill(&r);
    kvc_status_t status = kvc_compress(r.ctx, plan, &r.device, r.queries, NULL, r.workspace, r.ws_bytes, r.stream);
    cr_assert_eq(status, KVC_SUCCESS, "event %d: %s", w, kvc_last_error(r.ctx));
    fresh[w] = download(&r);
    kvc_plan_destroy(plan);
  }
  cr_assert(!same(&r, &fresh[0], &fresh[1]), "events 0 and 1 must give different results");

  kvc_plan_t captured = event_plan(r.ctx, 0, KVC_PLAN_MEMORY_CALLER, long_window);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_device_bytes(captured, &bytes), KVC_SUCCESS);
  void *buffer = kvc_gpu_upload(NULL, bytes);
  cr_assert_eq(kvc_plan_upload(r.ctx, captured, buffer, bytes, r.stream), KVC_SUCCESS, "%s", kvc_last_error(r.ctx));
  cr_assert_eq(cudaStreamSynchronize(r.stream), cudaSuccess);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(r.stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  kvc_status_t status = kvc_compress(r.ctx, captured, &r.device, r.queries, NULL, r.workspace, r.ws_bytes, r.stream);
  cr_assert_eq(cudaStreamEndCapture(r.stream, &graph), cudaSuccess);
  cr_assert_eq(status, KVC_SUCCESS, "captured kvc_compress: %s", kvc_last_error(r.ctx));
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

  const int order[] = {0, 1, 2, 1, 0};
  for (size_t i = 0; i < sizeof order / sizeof order[0]; ++i) {
    const int w = order[i];
    kvc_plan_t plan = event_plan(r.ctx, w, KVC_PLAN_MEMORY_CALLER, long_window);
    int compatible = 0;
    cr_assert_eq(kvc_plan_compatible(captured, plan, &compatible), KVC_SUCCESS);
    cr_assert(compatible, "event %d", w);
    const void *image = NULL;
    size_t image_bytes = 0;
    const int pinned = i % 2 == 1;
    cr_assert_eq(kvc_plan_host_image(plan, &image, &image_bytes), KVC_SUCCESS);
    if (pinned) cr_assert_eq(cudaHostRegister((void *)image, image_bytes, cudaHostRegisterDefault), cudaSuccess);
    refill(&r);
    cr_assert_eq(kvc_plan_upload(r.ctx, plan, buffer, bytes, r.stream), KVC_SUCCESS, "%s", kvc_last_error(r.ctx));
    cr_assert_eq(cudaGraphLaunch(exec, r.stream), cudaSuccess);
    result_t got = download(&r);
    cr_expect(same(&r, &got, &fresh[w]), "replay %zu (event %d, %s image) differs from a fresh plan", i, w,
              pinned ? "page-locked" : "pageable");
    result_free(&got);
    if (pinned) cr_assert_eq(cudaHostUnregister((void *)image), cudaSuccess);
    kvc_plan_destroy(plan); /* after the stream passed the upload (download synchronised) */
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  for (int w = 0; w < EVENTS; ++w) result_free(&fresh[w]);
  kvc_plan_destroy(captured);
  cudaFree(buffer);
  rig_fini(&r);
}

Test(plan_graph_gpu, snapkv_replays_every_compatible_event) { replay_every_event(0); }
Test(plan_graph_gpu, h2o_long_window_replays_every_compatible_event) { replay_every_event(1); }
