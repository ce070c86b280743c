/*
 * internal.h - the host layer's private types: the context, the plan, error reporting.
 */
#ifndef KVC_INTERNAL_H
#define KVC_INTERNAL_H

#include <stddef.h>

#include "kvcompress.h"
#include "ops.h"
#include "plan_view.h"

#define KVC_DETAIL_CAP 512

/* Sizes of the plan's metadata arrays (host/plan.c): they fix the layout of its blob. */
typedef struct {
  int64_t obs, domains, parts, protect_words, spans;
  int64_t span_rows; /* batch, or batch * num_kv_heads with per-head spans */
  int64_t key_scales; /* num_kv_heads */
} kvc_plan_counts_t;

struct kvc_context {
  kvc_backend_t backend; /* CPU or CUDA, never AUTO */
  int device;
  int32_t threads;             /* kvc_context_set_threads (1 by default)                            */
  kvc_workers_t *workers;      /* CPU: its threads - 1 workers (host/pool.c), NULL for one thread */
  char detail[KVC_DETAIL_CAP]; /* kvc_last_error */
};

struct kvc_plan {
  kvc_backend_t backend;
  int device;
  kvc_plan_view_t host;  /* arrays in host_blob                                    */
  kvc_plan_view_t view;  /* what ops get: == host on CPU, arrays in device_blob on CUDA */
  void *host_blob, *device_blob; /* device_blob: the plan's own device copy (KVC_PLAN_MEMORY_OWNED) */
  void *host_alloc;              /* the allocation host_blob sits in, page-aligned inside it         */
  kvc_plan_counts_t counts;      /* the layout of both blobs                                         */
  size_t blob_bytes;
  int view_on_device;            /* CUDA: `view` points into device memory (own blob or kvc_plan_upload's) */
  int32_t *span_quotas;     /* [total_spans]: FAIR -> q_p, PROTECT -> length      */
  int32_t *implicit_quotas; /* [span rows]: implicit partition's q_p or -1        */
  int32_t *outcomes;        /* [batch]: kvc_outcome_t of each sequence             */
  size_t workspace[KVC_OP_COMPRESS + 1];
};

/* Records a formatted detail on ctx (if not NULL) and returns `status`. */
kvc_status_t kvc_fail(kvc_context_t ctx, kvc_status_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Formats into a detail buffer; used by ops through kvc_op_args_t. */
kvc_status_t kvc_fail_detail(char *detail, size_t cap, kvc_status_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Clears ctx's detail and checks that plan is not NULL and was made for ctx's backend and device
 * (host/dispatch.c); `fn` names the caller in the detail. */
kvc_status_t kvc_check_plan_context(kvc_context_t ctx, kvc_plan_t plan, const char *fn);
/* The op table of a backend (host/dispatch.c). */
kvc_op_fn kvc_op_for(kvc_backend_t backend, kvc_op_t op);
/* Workspace the dispatch layer itself carves before the op: compaction's status array
 * (int32 [num_layers][batch], first, so it sits at offset 0 of the op's workspace) and the CPU's
 * page-id validation scratch. Either out-pointer may be NULL. */
void kvc_carve_dispatch(const kvc_plan_view_t *plan, kvc_backend_t backend, kvc_op_t op, int32_t num_layers,
                        kvc_carver_t *ws, int32_t **page_scratch, int32_t **compact_status);

/* The workspace of `op` over num_layers layers (host/plan.c): its size, and for COMPRESS where the
 * stacked keep and score layouts, the stages' shared scratch and compaction's status array lie. */
typedef struct {
  size_t bytes, keep_offset, scores_offset, stage_offset, status_offset;
} kvc_layout_t;
kvc_status_t kvc_plan_layout(kvc_plan_t plan, kvc_op_t op, int32_t num_layers, kvc_layout_t *out, char *detail,
                             size_t cap);

#endif /* KVC_INTERNAL_H */
