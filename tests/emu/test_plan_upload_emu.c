/*
 * test_plan_upload_emu.c - CUDA plans in a caller's device buffer (device_memory
 * KVC_PLAN_MEMORY_CALLER, kvc_plan_upload) through the SIMT emulator, which has no graphs. What a
 * graph replay needs is checked directly instead:
 *   - a plan uploaded into a buffer gives the result of a fresh (OWNED) plan of its event, and so
 *     does the plan the "graph" was captured with, whose by-value view still points at that
 *     buffer, once a later compatible event is uploaded into it: kvc_compress with the first
 *     plan then computes the later event (cache bytes and keep layout equal to a fresh plan's),
 *     while the events' own results differ (so a missing upload would show);
 *   - the by-value views of compatible plans in one buffer are identical byte for byte (the
 *     kernel arguments a graph freezes), those of an incompatible one are not;
 *   - an OWNED plan uploaded into a caller's buffer reads that buffer;
 *   - error paths: execute calls before the upload, a NULL, misaligned or short buffer, a plan of
 *     another backend; a failed upload leaves the plan as it was.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "internal.h" /* struct kvc_plan: the by-value view the kernels get */
#include "kvcompress.h"
#include "plan_events.h"
#include "test_util.h"

#define DTYPE KVC_DTYPE_BF16

typedef struct {
  kvc_context_t cuda, cpu;
  kvc_test_cache_t *before;
  void *queries;
  kvc_plan_info_t info;
  size_t ws_bytes;
} fixture_t;

typedef struct {
  kvc_test_cache_t *cache;
  int32_t *keep;
} result_t;

static kvc_plan_t event_plan(kvc_context_t ctx, int which, kvc_plan_memory_t memory) {
  kvc_test_event_t e;
  kvc_test_event(&e, which, DTYPE, memory);
  kvc_plan_t plan = NULL;
  cr_assert_eq(kvc_plan_create(ctx, &e.desc, &plan), KVC_SUCCESS, "event %d: %s", which, kvc_last_error(ctx));
  return plan;
}

static void fixture_init(fixture_t *f) {
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &f->cuda), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &f->cpu), KVC_SUCCESS);
  kvc_test_event_t e;
  kvc_test_event(&e, 0, DTYPE, KVC_PLAN_MEMORY_OWNED);
  kvc_plan_t plan = event_plan(f->cuda, 0, KVC_PLAN_MEMORY_OWNED);
  cr_assert_eq(kvc_plan_get_info(plan, &f->info), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &f->ws_bytes), KVC_SUCCESS);
  kvc_plan_destroy(plan);
  f->before = kvc_test_cache_new(KVC_TEST_EVENT_BATCH, e.seq_lens, KVC_TEST_EVENT_HEADS, KVC_TEST_EVENT_DIM, DTYPE, 16,
                                 KVC_TEST_NHD, KVC_TEST_DENSE, 2, 11);
  f->queries = kvc_test_queries_new(f->info.obs_total, 4 * KVC_TEST_EVENT_HEADS, KVC_TEST_EVENT_DIM, DTYPE, 12);
}

static void fixture_fini(fixture_t *f) {
  kvc_test_cache_free(f->before);
  free(f->queries);
  kvc_context_destroy(f->cuda);
  kvc_context_destroy(f->cpu);
}

/* kvc_compress with `plan` on a fresh copy of the cache. */
static result_t compress(fixture_t *f, kvc_plan_t plan) {
  result_t r = {kvc_test_cache_clone(f->before), malloc(sizeof(int32_t) * (size_t)f->info.keep_elems)};
  void *ws = kvc_test_workspace_new(f->ws_bytes);
  kvc_status_t status = kvc_compress(f->cuda, plan, &r.cache->desc, f->queries, NULL, ws, f->ws_bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "%s: %s", kvc_status_name(status), kvc_last_error(f->cuda));
  memcpy(r.keep, (char *)ws + f->info.keep_offset_bytes, sizeof(int32_t) * (size_t)f->info.keep_elems);
  free(ws);
  return r;
}

static int same_result(const fixture_t *f, const result_t *a, const result_t *b) {
  return memcmp(a->keep, b->keep, sizeof(int32_t) * (size_t)f->info.keep_elems) == 0 &&
         kvc_test_first_difference(a->cache->k, b->cache->k, f->before->pool_bytes) < 0 &&
         kvc_test_first_difference(a->cache->v, b->cache->v, f->before->pool_bytes) < 0;
}

static void result_free(result_t *r) {
  kvc_test_cache_free(r->cache);
  free(r->keep);
}

/* An emulated device buffer: device memory is host memory, aligned like cudaMalloc's. */
static void *device_buffer(size_t bytes) { return kvc_test_workspace_new(bytes); }

static void upload(fixture_t *f, kvc_plan_t plan, void *buffer, size_t bytes) {
  kvc_status_t status = kvc_plan_upload(f->cuda, plan, buffer, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "upload: %s (%s)", kvc_status_name(status), kvc_last_error(f->cuda));
}

Test(plan_upload_emu, later_events_replay_through_the_first_plan) {
  fixture_t f;
  fixture_init(&f);
  enum { EVENTS = 3 }; /* the base and the two compatible events of plan_events.c */
  result_t fresh[EVENTS];
  for (int w = 0; w < EVENTS; ++w) {
    cr_assert(kvc_test_event_replays(w));
    kvc_plan_t plan = event_plan(f.cuda, w, KVC_PLAN_MEMORY_OWNED);
    fresh[w] = compress(&f, plan);
    kvc_plan_destroy(plan);
  }
  cr_assert(!same_result(&f, &fresh[0], &fresh[1]), "events 0 and 1 must give different results");

  kvc_plan_t captured = event_plan(f.cuda, 0, KVC_PLAN_MEMORY_CALLER);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_device_bytes(captured, &bytes), KVC_SUCCESS);
  cr_assert_gt(bytes, 0);
  void *buffer = device_buffer(bytes);
  upload(&f, captured, buffer, bytes);
  result_t r = compress(&f, captured);
  cr_expect(same_result(&f, &r, &fresh[0]), "the uploaded base plan differs from a fresh one");
  result_free(&r);

  for (int w = 1; w < EVENTS; ++w) {
    kvc_plan_t next = event_plan(f.cuda, w, KVC_PLAN_MEMORY_CALLER);
    int compatible = 0;
    cr_assert_eq(kvc_plan_compatible(captured, next, &compatible), KVC_SUCCESS);
    cr_assert(compatible, "event %d", w);
    upload(&f, next, buffer, bytes);
    cr_expect_eq(memcmp(&captured->view, &next->view, sizeof captured->view), 0,
                 "event %d: the by-value views in one buffer differ", w);
    r = compress(&f, captured); /* the replay: the first plan's arguments, the new metadata */
    cr_expect(same_result(&f, &r, &fresh[w]), "event %d through the first plan differs from a fresh plan", w);
    result_free(&r);
    r = compress(&f, next);
    cr_expect(same_result(&f, &r, &fresh[w]), "event %d's own plan differs from a fresh plan", w);
    result_free(&r);
    kvc_plan_destroy(next);
  }

  /* an incompatible event in the same buffer: its view differs (other totals) */
  kvc_plan_t longer = event_plan(f.cuda, 3, KVC_PLAN_MEMORY_CALLER);
  size_t longer_bytes = 0;
  cr_assert_eq(kvc_plan_device_bytes(longer, &longer_bytes), KVC_SUCCESS);
  void *longer_buffer = device_buffer(longer_bytes);
  upload(&f, longer, longer_buffer, longer_bytes);
  upload(&f, captured, longer_buffer, longer_bytes); /* same buffer, so pointers match where layouts do */
  cr_expect_neq(memcmp(&captured->view, &longer->view, sizeof captured->view), 0);
  kvc_plan_destroy(longer);
  free(longer_buffer);

  for (int w = 0; w < EVENTS; ++w) result_free(&fresh[w]);
  kvc_plan_destroy(captured);
  free(buffer);
  fixture_fini(&f);
}

/* An OWNED plan uploaded into a caller's buffer reads that buffer from then on. */
Test(plan_upload_emu, owned_plan_reads_the_callers_buffer) {
  fixture_t f;
  fixture_init(&f);
  kvc_plan_t base = event_plan(f.cuda, 0, KVC_PLAN_MEMORY_OWNED), moved = event_plan(f.cuda, 1, KVC_PLAN_MEMORY_OWNED);
  result_t want0 = compress(&f, base), want1 = compress(&f, moved);
  size_t bytes;
  cr_assert_eq(kvc_plan_device_bytes(moved, &bytes), KVC_SUCCESS);
  void *buffer = device_buffer(bytes);
  upload(&f, moved, buffer, bytes);
  result_t r = compress(&f, moved);
  cr_expect(same_result(&f, &r, &want1));
  result_free(&r);
  upload(&f, base, buffer, bytes); /* overwrite the buffer `moved` now reads */
  r = compress(&f, moved);
  cr_expect(same_result(&f, &r, &want0), "the OWNED plan did not read the caller's buffer");
  result_free(&r);
  result_free(&want0), result_free(&want1);
  kvc_plan_destroy(base), kvc_plan_destroy(moved);
  free(buffer);
  fixture_fini(&f);
}

Test(plan_upload_emu, errors) {
  fixture_t f;
  fixture_init(&f);
  kvc_plan_t plan = event_plan(f.cuda, 0, KVC_PLAN_MEMORY_CALLER), cpu_plan = event_plan(f.cpu, 0, KVC_PLAN_MEMORY_OWNED);
  size_t bytes = 0;
  cr_assert_eq(kvc_plan_device_bytes(plan, &bytes), KVC_SUCCESS);
  const void *image = NULL;
  size_t image_bytes = 0;
  cr_assert_eq(kvc_plan_host_image(plan, &image, &image_bytes), KVC_SUCCESS);
  cr_expect_eq(image_bytes, bytes);
  char *buffer = device_buffer(bytes + 256);
  void *ws = kvc_test_workspace_new(f.ws_bytes);
  kvc_test_cache_t *cache = kvc_test_cache_clone(f.before);

  /* every execute call refuses a CALLER plan that was never uploaded, and touches nothing */
  float *scores = malloc(sizeof(float) * (size_t)f.info.score_elems);
  int32_t *keep = calloc((size_t)f.info.keep_elems, sizeof(int32_t)), *counts = calloc((size_t)f.info.count_elems, 4);
  const kvc_status_t calls[] = {
      kvc_compress(f.cuda, plan, &cache->desc, f.queries, NULL, ws, f.ws_bytes, NULL),
      kvc_score(f.cuda, plan, &cache->desc, f.queries, NULL, scores, 0, ws, f.ws_bytes, NULL),
      kvc_select(f.cuda, plan, scores, keep, ws, f.ws_bytes, NULL),
      kvc_compact(f.cuda, plan, &cache->desc, keep, NULL, 0, ws, f.ws_bytes, NULL),
      kvc_retention(f.cuda, plan, keep, counts, ws, f.ws_bytes, NULL)};
  for (size_t i = 0; i < sizeof calls / sizeof calls[0]; ++i) cr_expect_eq(calls[i], KVC_ERROR_INVALID_VALUE, "call %zu", i);
  cr_expect(strstr(kvc_last_error(f.cuda), "call kvc_plan_upload first"), "%s", kvc_last_error(f.cuda));
  cr_expect_eq(kvc_test_first_difference(cache->k, f.before->k, f.before->pool_bytes), -1);

  struct {
    void *buffer;
    size_t bytes;
    kvc_status_t status;
    const char *needle;
  } bad[] = {{NULL, bytes, KVC_ERROR_INVALID_VALUE, "device_buffer is NULL"},
             {buffer + 16, bytes, KVC_ERROR_INVALID_VALUE, "not 256-byte aligned"},
             {buffer, bytes - 1, KVC_ERROR_WORKSPACE_TOO_SMALL, "the plan needs"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
    cr_expect_eq(kvc_plan_upload(f.cuda, plan, bad[i].buffer, bad[i].bytes, NULL), bad[i].status, "case %zu", i);
    cr_expect(strstr(kvc_last_error(f.cuda), bad[i].needle), "case %zu: %s", i, kvc_last_error(f.cuda));
  }
  cr_expect_eq(kvc_compress(f.cuda, plan, &cache->desc, f.queries, NULL, ws, f.ws_bytes, NULL), KVC_ERROR_INVALID_VALUE,
               "a failed upload must leave the plan without a device copy");
  cr_expect_eq(kvc_plan_upload(f.cuda, cpu_plan, buffer, bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect(strstr(kvc_last_error(f.cuda), "the plan was made for backend 1"), "%s", kvc_last_error(f.cuda));
  cr_expect_eq(kvc_plan_upload(f.cpu, plan, buffer, bytes, NULL), KVC_ERROR_INVALID_VALUE);
  cr_expect_eq(kvc_plan_upload(f.cuda, plan, buffer, bytes, NULL), KVC_SUCCESS, "%s", kvc_last_error(f.cuda));
  cr_expect_eq(kvc_compress(f.cuda, plan, &cache->desc, f.queries, NULL, ws, f.ws_bytes, NULL), KVC_SUCCESS, "%s",
               kvc_last_error(f.cuda));

  free(scores), free(keep), free(counts), free(ws), free(buffer);
  kvc_test_cache_free(cache);
  kvc_plan_destroy(plan), kvc_plan_destroy(cpu_plan);
  fixture_fini(&f);
}
