/* gpu_util.c - see gpu_util.h. */
#include "gpu_util.h"

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>

void kvc_gpu_require_device(void) {
  int count = 0; /* without a driver the call fails and leaves the count unset */
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) cr_skip("no CUDA device");
}

void *kvc_gpu_upload(const void *host, size_t bytes) {
  void *dev = NULL;
  cr_assert_eq(cudaMalloc(&dev, bytes ? bytes : 1), cudaSuccess);
  if (host && bytes) cr_assert_eq(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return dev;
}

void kvc_gpu_download(void *host, const void *device, size_t bytes) {
  cr_assert_eq(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}
