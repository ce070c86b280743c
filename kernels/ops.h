/*
 * ops.h - the internal interface between the host layer and the ops. Every op exists twice with
 * the same signature: kernels/<op>_cpu.c (the CPU backend and the reference) and kernels/<op>.cu
 * (the CUDA launcher). host/dispatch.c is the one place that picks between them.
 *
 * Workspace: an op is called once with a carver whose base is NULL to size its workspace (it
 * carves every buffer it needs and returns without touching any data), and once with the
 * caller's buffer to run; so sizing and carving are the same code and cannot drift apart.
 */
#ifndef KVC_OPS_H
#define KVC_OPS_H

#include <stddef.h>

#include "plan_view.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_WORKSPACE_ALIGN 256

/* CUDA selection: the bounds of the segment length (kvc_plan_view_t.select_segment). A row of at
 * most the segment is staged whole in one block's shared memory, 4 bytes a token. */
#define KVC_SELECT_MIN_SEGMENT 4096
#define KVC_SELECT_MAX_SEGMENT 16384

typedef struct {
  char *base;  /* NULL while sizing */
  size_t used; /* bytes carved so far (aligned) */
} kvc_carver_t;

/* Next KVC_WORKSPACE_ALIGN-aligned piece of `bytes`; NULL while sizing. A total that would pass
 * SIZE_MAX saturates there for good (the plan rejects such a workspace, so an op never runs on a
 * saturated carver): the sum of an op's pieces cannot wrap around to a small size. */
static inline void *kvc_carve(kvc_carver_t *c, size_t bytes) {
  if (c->used > (size_t)-1 - (KVC_WORKSPACE_ALIGN - 1)) {
    c->used = (size_t)-1;
    return NULL;
  }
  size_t at = (c->used + KVC_WORKSPACE_ALIGN - 1) / KVC_WORKSPACE_ALIGN * KVC_WORKSPACE_ALIGN;
  if (bytes > (size_t)-1 - at) {
    c->used = (size_t)-1;
    return NULL;
  }
  c->used = at + bytes;
  return c->base ? (void *)(c->base + at) : NULL;
}

/* Everything an op may need; each op reads only its own fields. Pointers follow the backend's
 * memory space (host on CPU, device on CUDA) except `cache` and `extras` themselves, which are
 * host structs/arrays (their contents point into the backend's memory). */
typedef struct {
  kvc_plan_view_t plan;
  const kvc_paged_kv_t *cache;
  const void *queries;
  const float *lse; /* [obs_total][num_q_heads] natural-log normalisers, or NULL: compute them */
  float *scores;
  int accumulate;
  int32_t *keep;
  float *const *extras;
  int32_t num_extras;
  int32_t *counts;
  /* Layers: the call covers num_layers layers (1 for the single-layer calls). Scores, keep, counts
   * and extras are then the single-layer layouts stacked (layer l at l * elems). `layers` (NULL for
   * the single-layer calls, whose pools are cache->k / cache->v, queries and lse the fields above)
   * holds the per-layer pointer arrays in the backend's memory (device on CUDA: kernels read them,
   * host code must not); the score ops then take queries and lse from it too. */
  int32_t num_layers;
  const kvc_layers_t *layers;
  int32_t *compact_status; /* compact: int32 [num_layers][batch] status array (host/dispatch.c carves it) */
  const kvc_page_table_t *dst_table; /* compact: the destination pages (kvc_compact_into; host struct, its
                                       arrays in the backend's memory), or NULL: in place           */
  /* kvc_gather_queries: observation rows of `queries` layout gathered from the engine's packed q */
  const void *packed_q;      /* [packed_tokens] rows of packed_stride elements, heads contiguous  */
  int64_t packed_tokens, packed_stride;
  const int32_t *qo_indptr;  /* [batch+1] packed rows per sequence                              */
  void *gathered;            /* [obs_total][num_q_heads][head_dim]                              */
  void *stream;  /* cudaStream_t on CUDA */
  const kvc_plan_view_t *host_plan; /* the plan with host arrays (== &plan on CPU): what host code
                                       of a CUDA op may read (e.g. to enqueue per-domain work).
                                       A captured graph freezes what it reads: kvc_plan_compatible
                                       (host/plan.c) must compare every array read here.         */
  struct kvc_workers *workers; /* CPU: the context's threads (NULL: only the caller's), see below */
  char *detail;  /* error detail buffer of the context, detail_cap bytes */
  size_t detail_cap;
} kvc_op_args_t;

typedef kvc_status_t (*kvc_op_fn)(const kvc_op_args_t *args, kvc_carver_t *ws);

/* The CPU context's thread pool (host/pool.c): kvc_workers_run calls fn(arg, item, thread) once for
 * every item in [0, count) on `threads` threads (the caller is thread 0, the others are the pool's
 * sleeping workers), items handed out in order from a shared counter, and returns when all are
 * done. thread < threads indexes per-thread scratch. fn must not call the pool. */
#define KVC_MAX_THREADS 256
typedef struct kvc_workers kvc_workers_t;
typedef void (*kvc_workers_fn)(void *arg, int64_t item, int32_t thread);
kvc_status_t kvc_workers_create(int32_t threads, kvc_workers_t **out);
void kvc_workers_destroy(kvc_workers_t *pool);
int32_t kvc_workers_threads(const kvc_workers_t *pool); /* 1 for NULL */
void kvc_workers_run(kvc_workers_t *pool, int32_t threads, int64_t count, kvc_workers_fn fn, void *arg);

/* Formats an op's failure into args->detail (host/status.c); declared here for the C++/CUDA ops. */
kvc_status_t kvc_fail_detail(char *detail, size_t cap, kvc_status_t status, const char *fmt, ...);

kvc_status_t kvc_score_cpu(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_select_cpu(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_compact_cpu(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_retention_cpu(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_gather_cpu(const kvc_op_args_t *args, kvc_carver_t *ws);

/* Geometry of the CUDA ops on the current device, asked once per plan by kvc_plan_create: blocks of
 * the op's multi-block kernels resident at once (queried from the runtime; a fixed small device in
 * the SIMT emulator). kvc_select_cuda_geometry also raises the selection kernels' dynamic shared
 * memory limit to what its longest staged row needs. */
kvc_status_t kvc_select_cuda_geometry(int32_t *resident_blocks, char *detail, size_t cap);
kvc_status_t kvc_compact_cuda_geometry(int32_t *resident_blocks, char *detail, size_t cap);

kvc_status_t kvc_score_cuda(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_select_cuda(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_compact_cuda(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_retention_cuda(const kvc_op_args_t *args, kvc_carver_t *ws);
kvc_status_t kvc_gather_cuda(const kvc_op_args_t *args, kvc_carver_t *ws);

#ifdef __cplusplus
}
#endif

#endif /* KVC_OPS_H */
