/* pool.c - a CPU context's threads (kernels/ops.h): threads - 1 workers made with the pool, asleep
 * on a condition variable between calls; the caller of kvc_workers_run works as thread 0. Items are
 * handed out one at a time under the lock (they are coarse: a domain and KV head each). */
#include <pthread.h>
#include <stdlib.h>

#include "ops.h"

struct kvc_workers {
  pthread_mutex_t lock;
  pthread_cond_t wake, done;
  pthread_t *workers; /* threads - 1 */
  int32_t threads;
  int stop;
  uint64_t generation; /* bumped by each kvc_workers_run */
  /* the current run */
  kvc_workers_fn fn;
  void *arg;
  int64_t count, next;
  int32_t active;    /* threads of the run: workers 1 .. active - 1 take part */
  int32_t busy;      /* workers of the run not yet finished */
};

typedef struct {
  kvc_workers_t *pool;
  int32_t index;
} worker_start_t;

/* Takes items of the current run until none is left; called and returns with the lock held. */
static void work(kvc_workers_t *pool, int32_t thread) {
  while (pool->next < pool->count) {
    const int64_t item = pool->next++;
    pthread_mutex_unlock(&pool->lock);
    pool->fn(pool->arg, item, thread);
    pthread_mutex_lock(&pool->lock);
  }
}

static void *worker_main(void *p) {
  worker_start_t start = *(worker_start_t *)p;
  kvc_workers_t *pool = start.pool;
  free(p);
  pthread_mutex_lock(&pool->lock);
  uint64_t seen = 0; /* the pool's generation when it made this worker: a run may already have begun */
  for (;;) {
    while (!pool->stop && pool->generation == seen) pthread_cond_wait(&pool->wake, &pool->lock);
    if (pool->stop) break;
    seen = pool->generation;
    if (start.index >= pool->active) continue;
    work(pool, start.index);
    if (--pool->busy == 0) pthread_cond_signal(&pool->done);
  }
  pthread_mutex_unlock(&pool->lock);
  return NULL;
}

/* Stops and joins workers [0, started) and frees the pool. */
static void shut_down(kvc_workers_t *pool, int32_t started) {
  pthread_mutex_lock(&pool->lock);
  pool->stop = 1;
  pthread_cond_broadcast(&pool->wake);
  pthread_mutex_unlock(&pool->lock);
  for (int32_t i = 0; i < started; ++i) pthread_join(pool->workers[i], NULL);
  pthread_cond_destroy(&pool->done);
  pthread_cond_destroy(&pool->wake);
  pthread_mutex_destroy(&pool->lock);
  free(pool->workers);
  free(pool);
}

kvc_status_t kvc_workers_create(int32_t threads, kvc_workers_t **out) {
  *out = NULL;
  kvc_workers_t *pool = (kvc_workers_t *)calloc(1, sizeof *pool);
  if (!pool) return KVC_ERROR_OUT_OF_MEMORY;
  pool->workers = (pthread_t *)calloc((size_t)threads, sizeof(pthread_t));
  if (!pool->workers || pthread_mutex_init(&pool->lock, NULL) != 0) {
    free(pool->workers);
    free(pool);
    return KVC_ERROR_OUT_OF_MEMORY;
  }
  pthread_cond_init(&pool->wake, NULL);
  pthread_cond_init(&pool->done, NULL);
  pool->threads = threads;
  for (int32_t i = 1; i < threads; ++i) {
    worker_start_t *start = (worker_start_t *)malloc(sizeof *start);
    if (start) {
      start->pool = pool;
      start->index = i;
    }
    if (!start || pthread_create(&pool->workers[i - 1], NULL, worker_main, start) != 0) {
      free(start);
      shut_down(pool, i - 1);
      return KVC_ERROR_OUT_OF_MEMORY;
    }
  }
  *out = pool;
  return KVC_SUCCESS;
}

void kvc_workers_destroy(kvc_workers_t *pool) {
  if (pool) shut_down(pool, pool->threads - 1);
}

int32_t kvc_workers_threads(const kvc_workers_t *pool) { return pool ? pool->threads : 1; }

void kvc_workers_run(kvc_workers_t *pool, int32_t threads, int64_t count, kvc_workers_fn fn, void *arg) {
  pthread_mutex_lock(&pool->lock);
  pool->fn = fn;
  pool->arg = arg;
  pool->count = count;
  pool->next = 0;
  pool->active = threads < pool->threads ? threads : pool->threads;
  pool->busy = pool->active - 1;
  pool->generation++;
  pthread_cond_broadcast(&pool->wake);
  work(pool, 0);
  while (pool->busy > 0) pthread_cond_wait(&pool->done, &pool->lock);
  pthread_mutex_unlock(&pool->lock);
}
