/* device_emu.c - the device runtime under the SIMT emulator: one device whose memory is host
 * memory, so the CUDA backend's plan upload and kernels run on plain pointers. */
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "internal.h"

int kvc_device_count(char *detail, size_t cap) {
  (void)detail, (void)cap;
  return 1;
}

kvc_status_t kvc_device_enter(int device, int *previous, char *detail, size_t cap) {
  *previous = 0;
  return KVC_SUCCESS;
}

void kvc_device_restore(int previous) { (void)previous; }

kvc_status_t kvc_device_alloc(void **ptr, size_t bytes, char *detail, size_t cap) {
  *ptr = malloc(bytes ? bytes : 1);
  return *ptr ? KVC_SUCCESS
              : kvc_fail_detail(detail, cap, KVC_ERROR_OUT_OF_MEMORY, "emulated device alloc of %zu bytes failed", bytes);
}

void kvc_device_free(void *ptr) { free(ptr); }

kvc_status_t kvc_device_upload(void *dst, const void *src, size_t bytes, char *detail, size_t cap) {
  memcpy(dst, src, bytes);
  return KVC_SUCCESS;
}

/* The emulated stream runs each enqueued operation at once. */
kvc_status_t kvc_device_upload_async(void *dst, const void *src, size_t bytes, kvc_stream_t stream, char *detail,
                                     size_t cap) {
  memcpy(dst, src, bytes);
  return KVC_SUCCESS;
}
