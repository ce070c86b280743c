/* context.c - contexts: backend choice and the per-context last-error detail. */
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
  *out = ctx;
  return KVC_SUCCESS;
}

kvc_status_t kvc_context_destroy(kvc_context_t ctx) {
  free(ctx);
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
