/*
 * device.h - the few device-runtime calls the host layer makes (plan upload, device selection).
 * Three implementations: host/device_cuda.c (the CUDA runtime), host/device_none.c (a build without
 * CUDA: no device) and tests/simt/device_emu.c (the SIMT emulator: device memory is host memory).
 * Only plan creation/upload/destruction and context creation/destruction call these; execute calls
 * never do.
 */
#ifndef KVC_DEVICE_H
#define KVC_DEVICE_H

#include <stddef.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable devices; when 0 (none, no driver, or no CUDA build) the reason goes to detail. */
int kvc_device_count(char *detail, size_t cap);
/* KVC_ERROR_CUDA, with a detail naming `fn`, if an error is pending in the CUDA runtime of the
 * calling thread before the library enqueues anything (left by the caller's earlier CUDA work).
 * It only peeks: the error stays pending for the caller. */
kvc_status_t kvc_device_check_pending(const char *fn, char *detail, size_t cap);
/* Makes `device` current; *previous gets the caller's current device (for kvc_device_restore). */
kvc_status_t kvc_device_enter(int device, int *previous, char *detail, size_t cap);
void kvc_device_restore(int previous);
kvc_status_t kvc_device_alloc(void **ptr, size_t bytes, char *detail, size_t cap);
void kvc_device_free(void *ptr);
/* Synchronous host-to-device copy. */
kvc_status_t kvc_device_upload(void *dst, const void *src, size_t bytes, char *detail, size_t cap);
/* Host-to-device copy enqueued on `stream` (kvc_plan_upload); `src` must stay valid until the
 * stream passes it. Never synchronises the device. */
kvc_status_t kvc_device_upload_async(void *dst, const void *src, size_t bytes, kvc_stream_t stream, char *detail,
                                     size_t cap);

#ifdef __cplusplus
}
#endif

#endif /* KVC_DEVICE_H */
