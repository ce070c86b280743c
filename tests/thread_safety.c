/*
 * thread_safety.c - the header's thread-safety promise: one plan shared read-only by several
 * threads, each with its own context and cache copy, gives results identical to a
 * single-threaded run; those contexts themselves score on 1, 2 or 3 threads (the plan is made on
 * a 3-thread context), so the library's own worker threads run under ThreadSanitizer too. A plain program (exit status 0 = pass) rather than a Criterion test, so
 * that it also runs under ThreadSanitizer, where Criterion's runner does not start.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

enum { THREADS = 4, BATCH = 3, KV_HEADS = 2, Q_HEADS = 4, HEAD_DIM = 32, ROUNDS = 3 };

typedef struct {
  kvc_plan_t plan;            /* shared, read-only */
  const kvc_test_cache_t *original;
  const void *queries;
  kvc_test_cache_t *cache;    /* this thread's copy */
  int32_t *keep;
  int64_t keep_elems;
  int32_t threads;            /* of this thread's context */
  kvc_status_t status;
} job_t;

static void *compress_job(void *arg) {
  job_t *job = (job_t *)arg;
  kvc_context_t ctx;
  job->status = kvc_context_create(KVC_BACKEND_CPU, 0, &ctx);
  if (job->status == KVC_SUCCESS) job->status = kvc_context_set_threads(ctx, job->threads);
  size_t bytes;
  kvc_plan_workspace_size(job->plan, KVC_OP_COMPRESS, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_plan_info_t info;
  kvc_plan_get_info(job->plan, &info);
  for (int round = 0; round < ROUNDS && job->status == KVC_SUCCESS; ++round) {
    kvc_test_cache_free(job->cache);
    job->cache = kvc_test_cache_clone(job->original);
    job->status = kvc_compress(ctx, job->plan, &job->cache->desc, job->queries, NULL, ws, bytes, NULL);
  }
  memcpy(job->keep, (char *)ws + info.keep_offset_bytes, sizeof(int32_t) * (size_t)job->keep_elems);
  free(ws);
  kvc_context_destroy(ctx);
  return NULL;
}

static int failures;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      fprintf(stderr, "thread_safety: %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                             \
      fputc('\n', stderr);                                      \
      failures++;                                               \
      return;                                                   \
    }                                                           \
  } while (0)

static void run_jobs(kvc_score_method_t method, float fairness) {
  int32_t lens[BATCH] = {300, 77, 513}, budgets[BATCH] = {150, 60, 100}, span_indptr[BATCH + 1] = {0, 2, 2, 3};
  kvc_span_t spans[3] = {{0, 100, KVC_SPAN_FAIR, 1.0f}, {100, 300, KVC_SPAN_FAIR, 1.0f}, {10, 20, KVC_SPAN_PROTECT, 1.0f}};
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = Q_HEADS, desc.num_kv_heads = KV_HEADS, desc.head_dim = HEAD_DIM, desc.dtype = KVC_DTYPE_F16;
  desc.batch = BATCH, desc.seq_lens = lens, desc.budgets = budgets, desc.span_indptr = span_indptr, desc.spans = spans;
  desc.method = method, desc.window = 16, desc.fairness = fairness;
  kvc_context_t ctx;
  kvc_plan_t plan;
  CHECK(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx) == KVC_SUCCESS, "context");
  CHECK(kvc_context_set_threads(ctx, 3) == KVC_SUCCESS, "%s", kvc_last_error(ctx));
  CHECK(kvc_plan_create(ctx, &desc, &plan) == KVC_SUCCESS, "%s", kvc_last_error(ctx));
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  kvc_test_cache_t *original =
      kvc_test_cache_new(BATCH, lens, KV_HEADS, HEAD_DIM, KVC_DTYPE_F16, 16, KVC_TEST_NHD, KVC_TEST_CSR, 3, 99);
  void *queries = kvc_test_queries_new(info.obs_total, Q_HEADS, HEAD_DIM, KVC_DTYPE_F16, 5);

  job_t reference = {plan, original, queries, NULL, malloc(sizeof(int32_t) * (size_t)info.keep_elems), info.keep_elems, 1, 0};
  compress_job(&reference); /* single-threaded run on this thread */
  CHECK(reference.status == KVC_SUCCESS, "single-threaded run: %s", kvc_status_name(reference.status));

  job_t jobs[THREADS];
  pthread_t threads[THREADS];
  for (int t = 0; t < THREADS; ++t) {
    jobs[t] = reference;
    jobs[t].cache = NULL;
    jobs[t].threads = 1 + t % 3;
    jobs[t].keep = malloc(sizeof(int32_t) * (size_t)info.keep_elems);
    CHECK(pthread_create(&threads[t], NULL, compress_job, &jobs[t]) == 0, "pthread_create");
  }
  for (int t = 0; t < THREADS; ++t) {
    pthread_join(threads[t], NULL);
    int same = jobs[t].status == KVC_SUCCESS &&
               !memcmp(jobs[t].keep, reference.keep, sizeof(int32_t) * (size_t)info.keep_elems) &&
               !memcmp(jobs[t].cache->k, reference.cache->k, original->pool_bytes) &&
               !memcmp(jobs[t].cache->v, reference.cache->v, original->pool_bytes);
    if (!same) fprintf(stderr, "thread_safety: method %d: thread %d differs from the single-threaded run\n", method, t);
    failures += !same;
    kvc_test_cache_free(jobs[t].cache);
    free(jobs[t].keep);
  }
  kvc_test_cache_free(reference.cache);
  free(reference.keep);
  free(queries);
  kvc_test_cache_free(original);
  kvc_plan_destroy(plan);
  kvc_context_destroy(ctx);
}

int main(void) {
  run_jobs(KVC_SCORE_SNAPKV, 1.0f);
  run_jobs(KVC_SCORE_H2O, 0.0f);
  run_jobs(KVC_SCORE_KNORM, 0.5f);
  run_jobs(KVC_SCORE_TOVA, 1.0f);
  printf("thread_safety: %d threads x 4 methods: %s\n", THREADS, failures ? "FAILED" : "identical to the single-threaded run");
  return failures != 0;
}
