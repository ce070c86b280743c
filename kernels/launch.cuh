/*
 * launch.cuh - the status an op returns once it has enqueued its kernels.
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

#endif /* KVC_LAUNCH_CUH */
