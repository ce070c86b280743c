/*
 * cuda_compat.cuh - the first include of every kernel .cu. Under nvcc: the CUDA headers and two
 * macros that are plain CUDA. Under a host compiler (the CPU test build): the same CUDA headers,
 * then the SIMT emulator (tests/simt/simt.h), which defines the macros for itself.
 *
 *   KVC_DYNAMIC_SMEM(T, name);  declares `T *name`, the block's dynamic shared memory
 *   KVC_LAUNCH(kernel, grid, block, smem_bytes, stream, args...);  kernel<<<...>>>(args...)
 *   KVC_SET_MAX_DYNAMIC_SMEM(kernel, bytes)  lets `kernel` launch with more than 48 KiB of dynamic
 *                                            shared memory (a cudaError_t)
 *
 * A template kernel whose arguments hold commas goes in parentheses: KVC_LAUNCH((k<2, 3>), ...);
 * so does a braced grid or block: use dim3(x, y) instead of {x, y}.
 */
#ifndef KVC_CUDA_COMPAT_CUH
#define KVC_CUDA_COMPAT_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(__CUDACC__)
#define KVC_DYNAMIC_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char kvc_smem_##name[]; \
  T *name = reinterpret_cast<T *>(kvc_smem_##name)
#define KVC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define KVC_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(bytes))
#else
#include "simt.h"
#endif

/* Empty on the host, where the CUDA headers define __host__ and __device__ as nothing. */
#define KVC_DEVICE __device__
#define KVC_HOST_DEVICE __host__ __device__

#endif /* KVC_CUDA_COMPAT_CUH */
