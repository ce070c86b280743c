/* context.c - contexts: backend choice, the CUDA context's cuBLAS handle, the CPU context's
 * threads and the per-context last-error detail. */
#include <stdlib.h>

#include "device.h"
#include "internal.h"

kvc_status_t kvc_context_create(kvc_backend_t backend, int device, kvc_context_t *out) {
  if (!out) return KVC_ERROR_INVALID_VALUE;
  *out = NULL;
  if (backend != KVC_BACKEND_AUTO && backend != KVC_BACKEND_CPU && backend != KVC_BACKEND_CUDA)
    return KVC_ERROR_INVALID_VALUE;
  if (device < 0) return KVC_ERROR_INVALID_VALUE;
  if (backend != KVC_BACKEND_CPU) {
    int count = kvc_device_count();
    if (backend == KVC_BACKEND_AUTO) {
      backend = count > device ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU;
    } else if (count == 0) {
      return KVC_ERROR_NO_DEVICE;
    } else if (device >= count) {
      return KVC_ERROR_INVALID_VALUE;
    }
  }
  kvc_context_t ctx = (kvc_context_t)calloc(1, sizeof *ctx);
  if (!ctx) return KVC_ERROR_OUT_OF_MEMORY;
  ctx->backend = backend;
  ctx->device = backend == KVC_BACKEND_CUDA ? device : 0;
  ctx->threads = 1;
  if (backend == KVC_BACKEND_CUDA) {
    /* the cuBLAS handle (scoring's GEMM path): made here so that execute calls never allocate */
    int previous;
    kvc_status_t status = kvc_device_enter(device, &previous, ctx->detail, sizeof ctx->detail);
    if (status == KVC_SUCCESS) {
      status = kvc_blas_create(&ctx->blas, ctx->detail, sizeof ctx->detail);
      kvc_device_restore(previous);
    }
    if (status != KVC_SUCCESS) {
      free(ctx);
      return status;
    }
  }
  *out = ctx;
  return KVC_SUCCESS;
}

kvc_status_t kvc_context_destroy(kvc_context_t ctx) {
  if (ctx) kvc_workers_destroy(ctx->workers);
  if (ctx && ctx->blas) {
    int previous;
    if (kvc_device_enter(ctx->device, &previous, NULL, 0) == KVC_SUCCESS) {
      kvc_blas_destroy(ctx->blas);
      kvc_device_restore(previous);
    }
  }
  free(ctx);
  return KVC_SUCCESS;
}

kvc_status_t kvc_context_set_threads(kvc_context_t ctx, int32_t threads) {
  if (!ctx) return KVC_ERROR_INVALID_VALUE;
  ctx->detail[0] = '\0';
  if (threads < 1 || threads > KVC_MAX_THREADS)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "kvc_context_set_threads: threads is %d, must be in [1, %d]", threads,
                    KVC_MAX_THREADS);
  if (ctx->backend != KVC_BACKEND_CPU && threads != 1)
    return kvc_fail(ctx, KVC_ERROR_NOT_SUPPORTED,
                    "kvc_context_set_threads: threads is %d, but only a CPU context runs on host threads", threads);
  if (threads == ctx->threads) return KVC_SUCCESS;
  kvc_workers_destroy(ctx->workers);
  ctx->workers = NULL;
  ctx->threads = 1;
  if (threads > 1) {
    kvc_status_t status = kvc_workers_create(threads, &ctx->workers);
    if (status != KVC_SUCCESS)
      return kvc_fail(ctx, status, "kvc_context_set_threads: could not start %d threads; the context keeps 1", threads);
    ctx->threads = threads;
  }
  return KVC_SUCCESS;
}

kvc_status_t kvc_context_threads(kvc_context_t ctx, int32_t *out) {
  if (!ctx || !out) return KVC_ERROR_INVALID_VALUE;
  *out = ctx->threads;
  return KVC_SUCCESS;
}

kvc_status_t kvc_context_backend(kvc_context_t ctx, kvc_backend_t *out) {
  if (!ctx || !out) return KVC_ERROR_INVALID_VALUE;
  *out = ctx->backend;
  return KVC_SUCCESS;
}

const char *kvc_last_error(kvc_context_t ctx) {
  return ctx ? ctx->detail : "kvc_last_error: ctx is NULL (no context to hold an error)";
}
