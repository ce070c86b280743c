/*
 * device_memory.cuh - the device-scope acquire/release operations the multi-block kernels
 * synchronise through (compaction's flags, selection's arrival counters), and the streaming global
 * loads and stores of compaction's copy, behind one small interface.
 *
 * Under nvcc they are cuda::atomic_ref operations at thread_scope_device: ld.acquire.gpu,
 * st.release.gpu and atom.acq_rel.gpu, which order memory for every thread of the device without
 * the system-scope fences (membar.sys) a __threadfence_system or a volatile flag would need.
 *
 * kvc_load_streaming / kvc_store_streaming are ld.global.cg / st.global.cg (__ldcg, __stcg): global
 * accesses cached in L2 only, for data a kernel touches once (compaction moves each byte once);
 * they also tell the compiler the address is global, which pointers read from a device array of
 * layer pools do not.
 *
 * Under the SIMT emulator one OS thread runs every fiber and switches only at barriers and warp
 * operations, so a plain access is already atomic and ordered: the emulator side is plain loads,
 * stores and read-modify-writes. The kernels must therefore never spin on these without passing a
 * barrier (the emulator would not switch to the block they wait for); see the protocols in
 * compact.cu and select.cu.
 */
#ifndef KVC_DEVICE_MEMORY_CUH
#define KVC_DEVICE_MEMORY_CUH

#include "cuda_compat.cuh"

#if defined(__CUDACC__)
#include <cuda/atomic>

template <typename T>
__device__ inline T kvc_load_acquire(const T *address) {
  return cuda::atomic_ref<T, cuda::thread_scope_device>(*const_cast<T *>(address)).load(cuda::memory_order_acquire);
}

template <typename T>
__device__ inline void kvc_store_release(T *address, T value) {
  cuda::atomic_ref<T, cuda::thread_scope_device>(*address).store(value, cuda::memory_order_release);
}

/* Adds `value`; returns the previous value. Acquire and release: what the caller wrote before is
 * published with it, and what earlier callers published is visible after it. */
template <typename T>
__device__ inline T kvc_fetch_add_acq_rel(T *address, T value) {
  return cuda::atomic_ref<T, cuda::thread_scope_device>(*address).fetch_add(value, cuda::memory_order_acq_rel);
}

template <typename T>
__device__ inline T kvc_load_streaming(const T *address) {
  return __ldcg(address);
}

template <typename T>
__device__ inline void kvc_store_streaming(T *address, T value) {
  __stcg(address, value);
}
#else
template <typename T>
inline T kvc_load_acquire(const T *address) {
  return *address;
}

template <typename T>
inline void kvc_store_release(T *address, T value) {
  *address = value;
}

template <typename T>
inline T kvc_fetch_add_acq_rel(T *address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
inline T kvc_load_streaming(const T *address) {
  return *address;
}

template <typename T>
inline void kvc_store_streaming(T *address, T value) {
  *address = value;
}
#endif

#endif /* KVC_DEVICE_MEMORY_CUH */
