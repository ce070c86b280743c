/*
 * launch.cuh - the status an op returns once it has enqueued its kernels, and the resident block
 * count its grids are sized by.
 */
#ifndef KVC_LAUNCH_CUH
#define KVC_LAUNCH_CUH

#include "cuda_compat.cuh"
#include "ops.h"

/* A bad launch configuration is reported by cudaGetLastError at once; a fault inside a kernel
 * surfaces at the caller's next synchronising call (execute calls never synchronise). The
 * dispatcher (host/dispatch.c, run_op) has refused to start an op while an error of the caller's
 * was pending, so an error read here came from this op's launches, and reading it clears it: it is
 * reported through the returned status. (A sticky error, e.g. an earlier kernel's fault that
 * surfaced while this op enqueued, cannot be cleared and fails every later call; its string says
 * which it is.) */
static inline kvc_status_t kvc_launch_status(const kvc_op_args_t *args, const char *op) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return KVC_SUCCESS;
  return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_CUDA, "%s: kernel launch failed: %s", op,
                         cudaGetErrorString(err));
}

/* Blocks of `kernel` (at `threads` threads and `smem` bytes of dynamic shared memory) resident at
 * once on the current device: SM count times the occupancy the runtime reports. The SIMT emulator
 * stands for a small device of 4 SMs of 2048 threads. */
template <typename Kernel>
kvc_status_t kvc_resident_blocks(Kernel kernel, int threads, size_t smem, int32_t *blocks, const char *what,
                                 char *detail, size_t cap) {
#if defined(KVC_SIMT)
  (void)kernel, (void)smem, (void)what, (void)detail, (void)cap;
  *blocks = 4 * (2048 / threads);
  return KVC_SUCCESS;
#else
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA, "kvc_plan_create: %s kernel geometry: %s", what,
                           cudaGetErrorString(err));
  }
  *blocks = sms * (per_sm > 0 ? per_sm : 1);
  return KVC_SUCCESS;
#endif
}

#endif /* KVC_LAUNCH_CUH */
