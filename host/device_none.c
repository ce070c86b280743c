/* device_none.c - the device runtime of a build without CUDA: there is no device. */
#include "device.h"
#include "internal.h"

int kvc_device_count(char *detail, size_t cap) {
  kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "libkvcompress was built without CUDA");
  return 0;
}

kvc_status_t kvc_device_check_pending(const char *fn, char *detail, size_t cap) {
  (void)fn, (void)detail, (void)cap;
  return KVC_SUCCESS;
}

kvc_status_t kvc_device_enter(int device, int *previous, char *detail, size_t cap) {
  *previous = 0;
  return kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "libkvcompress was built without CUDA");
}

void kvc_device_restore(int previous) { (void)previous; }

kvc_status_t kvc_device_alloc(void **ptr, size_t bytes, char *detail, size_t cap) {
  *ptr = NULL;
  return kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "libkvcompress was built without CUDA");
}

void kvc_device_free(void *ptr) { (void)ptr; }

kvc_status_t kvc_device_upload(void *dst, const void *src, size_t bytes, char *detail, size_t cap) {
  return kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "libkvcompress was built without CUDA");
}

kvc_status_t kvc_device_upload_async(void *dst, const void *src, size_t bytes, kvc_stream_t stream, char *detail,
                                     size_t cap) {
  return kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "libkvcompress was built without CUDA");
}
