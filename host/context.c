/* context.c - contexts: backend choice, the CPU context's threads and the per-context last-error
 * detail. */
#include <stdlib.h>

#include "device.h"
#include "internal.h"

/* Creation writes its reasons into `detail` (cap bytes, may be NULL): there is no context yet to
 * hold them, and the library keeps no global state. */
static kvc_status_t create(kvc_backend_t backend, int device, kvc_context_t *out, char *detail, size_t cap) {
  const char *fn = "kvc_context_create";
  if (!out) return kvc_fail_detail(detail, cap, KVC_ERROR_INVALID_VALUE, "%s: out is NULL", fn);
  *out = NULL;
  if (backend != KVC_BACKEND_AUTO && backend != KVC_BACKEND_CPU && backend != KVC_BACKEND_CUDA)
    return kvc_fail_detail(detail, cap, KVC_ERROR_INVALID_VALUE, "%s: backend is %d, not a kvc_backend_t", fn,
                           (int)backend);
  if (device < 0)
    return kvc_fail_detail(detail, cap, KVC_ERROR_INVALID_VALUE, "%s: device is %d, must be >= 0", fn, device);
  if (backend != KVC_BACKEND_CPU) {
    char why[KVC_DETAIL_CAP] = "";
    int count = kvc_device_count(why, sizeof why);
    if (backend == KVC_BACKEND_AUTO) {
      backend = count > device ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU;
    } else if (count == 0) {
      return kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "%s: backend CUDA, device %d: no usable device (%s)",
                             fn, device, why);
    } else if (device >= count) {
      return kvc_fail_detail(detail, cap, KVC_ERROR_INVALID_VALUE,
                             "%s: backend CUDA, device %d: there are %d devices (ordinals 0 to %d)", fn, device,
                             count, count - 1);
    }
  }
  kvc_context_t ctx = (kvc_context_t)calloc(1, sizeof *ctx);
  if (!ctx) return kvc_fail_detail(detail, cap, KVC_ERROR_OUT_OF_MEMORY, "%s: out of host memory", fn);
  ctx->backend = backend;
  ctx->device = backend == KVC_BACKEND_CUDA ? device : 0;
  ctx->threads = 1;
  *out = ctx;
  return KVC_SUCCESS;
}

kvc_status_t kvc_context_create(kvc_backend_t backend, int device, kvc_context_t *out) {
  return create(backend, device, out, NULL, 0);
}

kvc_status_t kvc_context_create_with_detail(kvc_backend_t backend, int device, kvc_context_t *out, char *detail,
                                            size_t detail_bytes) {
  if (detail && detail_bytes) detail[0] = '\0';
  return create(backend, device, out, detail, detail_bytes);
}

kvc_status_t kvc_context_destroy(kvc_context_t ctx) {
  if (ctx) kvc_workers_destroy(ctx->workers);
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
  return ctx ? ctx->detail
             : "kvc_last_error: ctx is NULL (no context to hold an error; for a failed kvc_context_create use "
               "kvc_context_create_with_detail)";
}
