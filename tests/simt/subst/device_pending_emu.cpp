/*
 * device_pending_emu.cpp - host/device.h's pending-error check for the SIMT emulator build: the
 * emulated runtime's last error (simt::peek_last_error) stands in for the CUDA runtime's. Also a
 * test hook, kvc_emu_leave_pending_error, that leaves an error pending the way a caller's own
 * failed launch does (an emulated launch with a zero-sized block), for tests/emu.
 */
#include "cuda_compat.cuh"
#include "device.h"
#include "ops.h"

namespace {
__global__ void empty_kernel() {}
}  // namespace

extern "C" kvc_status_t kvc_device_check_pending(const char *fn, char *detail, size_t cap) {
  const cudaError_t err = cudaPeekAtLastError();
  if (err == cudaSuccess) return KVC_SUCCESS;
  return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA,
                         "%s: a CUDA error was already pending on this thread before libkvcompress enqueued anything "
                         "(left by earlier CUDA work, not ours): %s. Nothing was enqueued and the error is left "
                         "pending: read it with cudaGetLastError()", fn, cudaGetErrorString(err));
}

extern "C" int kvc_emu_leave_pending_error(void) {
  KVC_LAUNCH(empty_kernel, dim3(1), dim3(0), 0, nullptr);
  return (int)cudaPeekAtLastError();
}

extern "C" int kvc_emu_take_last_error(void) { return (int)cudaGetLastError(); }
