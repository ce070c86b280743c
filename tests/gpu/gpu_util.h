/* gpu_util.h - what every GPU test needs: skip without a device, device copies of host data. */
#ifndef KVC_GPU_UTIL_H
#define KVC_GPU_UTIL_H

#include <stddef.h>

/* cr_skip()s the calling test when no CUDA device is usable. */
void kvc_gpu_require_device(void);
/* cudaMalloc(bytes) filled from `host` (left uninitialised when host is NULL); asserts success. */
void *kvc_gpu_upload(const void *host, size_t bytes);
void kvc_gpu_download(void *host, const void *device, size_t bytes);

#endif
