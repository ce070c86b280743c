/* device_cuda.c - the device runtime through the CUDA runtime API (plan upload, device choice). */
#include <cuda_runtime_api.h>

#include "device.h"
#include "internal.h"

int kvc_device_count(char *detail, size_t cap) {
  int count = 0; /* with no driver the call fails and leaves the count unset */
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError(); /* ours: do not leave it pending for the caller */
    kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "cudaGetDeviceCount: %s: %s", cudaGetErrorName(err),
                    cudaGetErrorString(err));
    return 0;
  }
  if (count == 0) kvc_fail_detail(detail, cap, KVC_ERROR_NO_DEVICE, "cudaGetDeviceCount reports 0 devices");
  return count;
}

kvc_status_t kvc_device_check_pending(const char *fn, char *detail, size_t cap) {
  cudaError_t err = cudaPeekAtLastError();
  if (err == cudaSuccess) return KVC_SUCCESS;
  return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA,
                         "%s: a CUDA error was already pending on this thread before libkvcompress enqueued anything "
                         "(left by earlier CUDA work, not ours): %s: %s. Nothing was enqueued and the error is left "
                         "pending: read it with cudaGetLastError()", fn, cudaGetErrorName(err), cudaGetErrorString(err));
}

kvc_status_t kvc_device_enter(int device, int *previous, char *detail, size_t cap) {
  cudaError_t err = cudaGetDevice(previous);
  if (err == cudaSuccess && *previous != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError(); /* reported here: not left pending as if it were the caller's */
    return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA, "cudaSetDevice(%d): %s", device, cudaGetErrorString(err));
  }
  return KVC_SUCCESS;
}

void kvc_device_restore(int previous) {
  int current = previous;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous) cudaSetDevice(previous);
}

kvc_status_t kvc_device_alloc(void **ptr, size_t bytes, char *detail, size_t cap) {
  cudaError_t err = cudaMalloc(ptr, bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return kvc_fail_detail(detail, cap, KVC_ERROR_OUT_OF_MEMORY, "cudaMalloc(%zu bytes) failed", bytes);
  }
  if (err != cudaSuccess)
    return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA, "cudaMalloc(%zu bytes): %s", bytes, cudaGetErrorString(err));
  return KVC_SUCCESS;
}

void kvc_device_free(void *ptr) { cudaFree(ptr); }

kvc_status_t kvc_device_upload(void *dst, const void *src, size_t bytes, char *detail, size_t cap) {
  cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
  if (err != cudaSuccess)
    return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA, "cudaMemcpy(plan upload, %zu bytes): %s", bytes,
                           cudaGetErrorString(err));
  return KVC_SUCCESS;
}

kvc_status_t kvc_device_upload_async(void *dst, const void *src, size_t bytes, kvc_stream_t stream, char *detail,
                                     size_t cap) {
  cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream);
  if (err != cudaSuccess)
    return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA, "cudaMemcpyAsync(plan upload, %zu bytes): %s", bytes,
                           cudaGetErrorString(err));
  return KVC_SUCCESS;
}
