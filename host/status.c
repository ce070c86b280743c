/* status.c - status names and sentences, error detail formatting, version. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

const char *kvc_status_name(kvc_status_t status) {
  switch (status) {
    case KVC_SUCCESS: return "KVC_SUCCESS";
    case KVC_ERROR_INVALID_VALUE: return "KVC_ERROR_INVALID_VALUE";
    case KVC_ERROR_NOT_SUPPORTED: return "KVC_ERROR_NOT_SUPPORTED";
    case KVC_ERROR_BUDGET: return "KVC_ERROR_BUDGET";
    case KVC_ERROR_WORKSPACE_TOO_SMALL: return "KVC_ERROR_WORKSPACE_TOO_SMALL";
    case KVC_ERROR_OUT_OF_MEMORY: return "KVC_ERROR_OUT_OF_MEMORY";
    case KVC_ERROR_NO_DEVICE: return "KVC_ERROR_NO_DEVICE";
    case KVC_ERROR_CUDA: return "KVC_ERROR_CUDA";
    case KVC_ERROR_INTERNAL: return "KVC_ERROR_INTERNAL";
  }
  return "KVC_UNKNOWN_STATUS";
}

const char *kvc_status_string(kvc_status_t status) {
  switch (status) {
    case KVC_SUCCESS: return "The call succeeded.";
    case KVC_ERROR_INVALID_VALUE: return "An argument or a metadata value is invalid.";
    case KVC_ERROR_NOT_SUPPORTED: return "The request is valid but not supported by this backend.";
    case KVC_ERROR_BUDGET: return "The protected tokens of a sequence exceed its budget.";
    case KVC_ERROR_WORKSPACE_TOO_SMALL: return "The workspace is smaller than the plan requires.";
    case KVC_ERROR_OUT_OF_MEMORY: return "A host or device allocation failed.";
    case KVC_ERROR_NO_DEVICE: return "No usable CUDA device, or the library was built without CUDA.";
    case KVC_ERROR_CUDA: return "A CUDA runtime call failed.";
    case KVC_ERROR_INTERNAL: return "An internal error occurred in libkvcompress.";
  }
  return "Unknown status code.";
}

unsigned kvc_version(void) { return KVC_VERSION_NUMBER; }
const char *kvc_version_string(void) { return KVC_VERSION_STRING; }

static kvc_status_t vformat(char *detail, size_t cap, kvc_status_t status, const char *fmt, va_list ap) {
  if (detail && cap) vsnprintf(detail, cap, fmt, ap);
  return status;
}

kvc_status_t kvc_fail(kvc_context_t ctx, kvc_status_t status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vformat(ctx ? ctx->detail : NULL, ctx ? sizeof ctx->detail : 0, status, fmt, ap);
  va_end(ap);
  return status;
}

kvc_status_t kvc_fail_detail(char *detail, size_t cap, kvc_status_t status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vformat(detail, cap, status, fmt, ap);
  va_end(ap);
  return status;
}
