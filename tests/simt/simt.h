// simt.h - runs CUDA kernel source on the CPU with g++ (see README.md in this folder).
//
// A launch runs on the calling thread, block after block; each block's threads are fibers switched
// only at synchronisation points: __syncthreads and its variants, warp shuffles / votes and
// __syncwarp. Include it through kernels/cuda_compat.cuh, after the CUDA headers, which on the host
// define __global__ / __device__ / __shared__ as empty and provide dim3, uint3, __half, ...
#pragma once

#if defined(__CUDACC__)
#error "simt.h is the host emulator; nvcc builds use the real CUDA runtime"
#endif

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- options and error state --------------------------------------------------------------------

namespace simt {

// Thread and block order: 0 = round robin (the default, or SIMT_SEED unset / 0), otherwise a
// seeded shuffle. Overrides SIMT_SEED.
void set_seed(unsigned long long seed);
// Number of blocks in flight, interleaved at their barriers (SIMT_INTERLEAVE; default 1).
void set_interleave(int blocks);

// Errors (divergent barrier, deadlock, mismatched warp op, invalid configuration) reported on
// stderr by the most recent launch, and by all launches of this process.
int last_launch_errors();
int launch_errors();
// The CUDA-like sticky error of the launches: cudaErrorInvalidConfiguration / cudaErrorInvalidValue
// for a rejected launch, cudaErrorLaunchFailure for an error found while running. get_last_error
// returns and clears it. In emulated code cudaGetLastError, cudaPeekAtLastError and
// cudaGetErrorString map to these three, so the emulated build needs no CUDA runtime library.
cudaError_t get_last_error();
// The kernel's dynamic shared memory limit (default 48 KiB, at most 227 KiB: cudaErrorInvalidValue).
cudaError_t set_max_dynamic_smem(const void *kernel, size_t bytes);
cudaError_t peek_last_error();
const char *error_string(cudaError_t error);

// Byte pattern of fresh shared memory (static and dynamic, at every block start) and of a shuffle
// read from a lane outside the mask: NaN for f32/f64/f16/bf16, -1 for signed integers.
inline constexpr unsigned char kPoison = 0xFF;

namespace detail {

// Block barriers, then warp ops.
enum class Op : unsigned char {
  SyncThreads,
  SyncCount,
  SyncAnd,
  SyncOr,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  SyncWarp,
  Mma,      // warp-wide matrix instructions: value points at the lane's operands
  Ldmatrix
};

int block_sync(Op op, int pred, const char *file, int line);
unsigned long long warp_op(Op op, unsigned mask, unsigned long long value, int arg, int width,
                           const char *file, int line);
unsigned active_mask();
extern unsigned char *dyn_smem;

struct LaunchSpec {
  const void *entry;  // the kernel function, for its attributes
  dim3 grid, block;
  size_t smem;
  const char *kernel, *file;  // kernel expression and launch site, for reports
  int line;
  void (*body)(void *ctx);  // runs the kernel as the current fiber
  void *ctx;
  void *(*tls_anchor)();  // an address inside the launching module's TLS (see simt.cpp)
};
int launch(const LaunchSpec &spec);

// Static __shared__ variables are thread_local; this anchor locates their module's TLS block.
[[maybe_unused]] static thread_local unsigned char tls_anchor;
static inline void *tls_anchor_address() { return &tls_anchor; }

template <class... P>
class Launcher {
 public:
  Launcher(void (*kernel)(P...), const LaunchSpec &spec) : kernel_(kernel), spec_(spec) {}
  // Parameters have the kernel's own types: arguments are converted once, as a CUDA launch does,
  // and every thread gets its own copy. Returns the number of errors reported.
  int operator()(P... args) {
    auto run = [&] { kernel_(args...); };
    spec_.body = [](void *ctx) { (*static_cast<decltype(run) *>(ctx))(); };
    spec_.ctx = &run;
    return launch(spec_);
  }

 private:
  void (*kernel_)(P...);
  LaunchSpec spec_;
};

template <class... P>
Launcher<P...> make_launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t /* launches are synchronous */, const char *name,
                             const char *file, int line) {
  return Launcher<P...>(kernel, {reinterpret_cast<const void *>(kernel), grid, block, smem, name, file, line,
                                 nullptr, nullptr, &tls_anchor_address});
}

template <class T>
unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp op on a >8-byte type");
  unsigned long long u = 0;
  std::memcpy(&u, &v, sizeof v);
  return u;
}

template <class T>
T from_bits(unsigned long long u) {
  T v;
  std::memcpy(static_cast<void *>(&v), &u, sizeof v);  // __half's member is protected
  return v;
}

}  // namespace detail
}  // namespace simt

// ---- built-in variables -------------------------------------------------------------------------
// Real globals that the scheduler keeps current (not macros: host code may reuse the names).

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
inline constexpr int warpSize = 32;

#undef __shared__
#define __shared__ static thread_local  // the launch lends the module's TLS block to each block
#define __launch_bounds__(...)

#define KVC_DYNAMIC_SMEM(T, name) T *name = reinterpret_cast<T *>(::simt::detail::dyn_smem)
#define KVC_LAUNCH(kernel, grid, block, smem, stream, ...)                                    \
  ::simt::detail::make_launcher(kernel, grid, block, smem, static_cast<cudaStream_t>(stream), \
                                #kernel, __FILE__, __LINE__)(__VA_ARGS__)

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): a launch with
// more than 48 KiB of dynamic shared memory fails unless its kernel was given at least that much.
#define KVC_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  ::simt::set_max_dynamic_smem(reinterpret_cast<const void *>(kernel), (bytes))

#define cudaGetLastError ::simt::get_last_error
#define cudaPeekAtLastError ::simt::peek_last_error
#define cudaGetErrorString ::simt::error_string

// ---- barriers and warp ops ----------------------------------------------------------------------
// The trailing file/line default to the caller's location, for divergence and deadlock reports.

#define SIMT_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(SIMT_SITE) {
  ::simt::detail::block_sync(::simt::detail::Op::SyncThreads, 0, file, line);
}
inline int __syncthreads_count(int pred, SIMT_SITE) {
  return ::simt::detail::block_sync(::simt::detail::Op::SyncCount, pred, file, line);
}
inline int __syncthreads_and(int pred, SIMT_SITE) {
  return ::simt::detail::block_sync(::simt::detail::Op::SyncAnd, pred, file, line);
}
inline int __syncthreads_or(int pred, SIMT_SITE) {
  return ::simt::detail::block_sync(::simt::detail::Op::SyncOr, pred, file, line);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, SIMT_SITE) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_op(Op::ShflIdx, mask, to_bits(var), src_lane, width, file, line));
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, SIMT_SITE) {
  using namespace ::simt::detail;
  int d = static_cast<int>(delta);
  return from_bits<T>(warp_op(Op::ShflUp, mask, to_bits(var), d, width, file, line));
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, SIMT_SITE) {
  using namespace ::simt::detail;
  int d = static_cast<int>(delta);
  return from_bits<T>(warp_op(Op::ShflDown, mask, to_bits(var), d, width, file, line));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, SIMT_SITE) {
  using namespace ::simt::detail;
  return from_bits<T>(warp_op(Op::ShflXor, mask, to_bits(var), lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, SIMT_SITE) {
  using namespace ::simt::detail;
  return static_cast<unsigned>(warp_op(Op::Ballot, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, SIMT_SITE) {
  using namespace ::simt::detail;
  return static_cast<int>(warp_op(Op::Any, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, SIMT_SITE) {
  using namespace ::simt::detail;
  return static_cast<int>(warp_op(Op::All, mask, pred != 0, 0, 32, file, line));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, SIMT_SITE) {
  ::simt::detail::warp_op(::simt::detail::Op::SyncWarp, mask, 0, 0, 32, file, line);
}
// No divergence tracking: the warp's lanes that have not exited.
inline unsigned __activemask() { return ::simt::detail::active_mask(); }

// ---- warp-level matrix instructions and asynchronous copies -------------------------------------
// What kernels/mma.cuh calls under the emulator in place of the PTX instructions, with the same
// operands. Fragments are laid out exactly as the PTX ISA defines them for each lane (see
// simt.cpp). mma and ldmatrix are .sync.aligned: every lane of the warp must execute the same one
// (an exited lane, or lanes at different ones, is reported).

namespace simt {

enum class MmaType : int { F16 = 0, BF16 = 1 };

// mma.sync.aligned.m16n8k16.row.col.f32.<type>.<type>.f32 {d}, {a}, {b}, {c}: the warp's
// D (16x8) = A (16x16) * B (16x8) + C. Products are exact (f16 and bf16 products fit fp32); each
// D element is the sum of its 16 products and C, rounded to fp32 once.
void mma_m16n8k16(MmaType type, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                  SIMT_SITE);
// ldmatrix.sync.aligned.m8n8.x<count>.shared.b16 {r}, [row]: count (1, 2, 4) 8x8 matrices of
// 16-bit elements; lane 8i + r gives the 16-byte aligned address of row r of matrix i; lane t gets
// elements (t / 4, 2 (t % 4)) and (t / 4, 2 (t % 4) + 1) of matrix i in r[i] (low half first).
void ldmatrix(int count, uint32_t *r, const void *row, SIMT_SITE);
// cp.async.cg.shared.global [smem], [global], 16, src_bytes: the first src_bytes (0..16) bytes of
// global, then zeros, to the 16 bytes at smem. The source is read now; shared memory is written
// only when a cp.async.wait_group that covers the copy's group runs (the latest the PTX ISA
// allows), so a read of the destination before the wait (or, by another thread, before the wait
// and a barrier) sees the old contents. A thread that exits with copies not waited for is
// reported.
void cp_async_16(void *smem, const void *global, int src_bytes, SIMT_SITE);
// cp.async.commit_group: the copies issued since the previous commit become one group.
void cp_async_commit(SIMT_SITE);
// cp.async.wait_group pending: completes the oldest committed groups until at most `pending`
// remain (copies not yet committed are not waited for).
void cp_async_wait(int pending, SIMT_SITE);

}  // namespace simt

#undef SIMT_SITE

// ---- intrinsics without a host version ----------------------------------------------------------

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }
inline int __clzll(long long x) {
  return x ? __builtin_clzll(static_cast<unsigned long long>(x)) : 64;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = (x >> 16) | (x << 16);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  return ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
}

// The device versions are approximations; the host ones are exact, so compare with a tolerance.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline unsigned __float_as_uint(float x) {
  return ::simt::detail::from_bits<unsigned>(::simt::detail::to_bits(x));
}
inline float __uint_as_float(unsigned x) { return ::simt::detail::from_bits<float>(x); }
inline int __float_as_int(float x) { return static_cast<int>(__float_as_uint(x)); }
inline float __int_as_float(int x) { return __uint_as_float(static_cast<unsigned>(x)); }

template <class T>
T __ldg(const T *p) {
  return *p;
}

// min / max as nvcc provides them to host and device code: the usual arithmetic conversions, and
// fmin / fmax for floating point.
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  const C x = static_cast<C>(a), y = static_cast<C>(b);
  if constexpr (std::is_floating_point_v<C>)
    return std::fmin(x, y);
  else
    return y < x ? y : x;
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  const C x = static_cast<C>(a), y = static_cast<C>(b);
  if constexpr (std::is_floating_point_v<C>)
    return std::fmax(x, y);
  else
    return x < y ? y : x;
}

// Fibers switch only at the sync points above, so a plain read-modify-write is atomic here.
namespace simt::detail {
template <class T, class F>
T rmw(T *address, F update) {
  T old = *address;
  *address = update(old);
  return old;
}
}  // namespace simt::detail

// SIMT_ATOMIC(name, T, new value from the old one `o` and the operand `v`)
#define SIMT_ATOMIC(name, T, expr)                                    \
  inline T name(T *address, T v) {                                    \
    return ::simt::detail::rmw(address, [v](T o) { return (expr); }); \
  }
#define SIMT_ATOMIC_INTEGER(T)                                                      \
  SIMT_ATOMIC(atomicMax, T, o < v ? v : o)                                          \
  SIMT_ATOMIC(atomicMin, T, v < o ? v : o)                                          \
  SIMT_ATOMIC(atomicExch, T, ((void)o, v))                                          \
  SIMT_ATOMIC(atomicOr, T, o | v)                                                   \
  SIMT_ATOMIC(atomicAnd, T, o &v)                                                   \
  inline T atomicCAS(T *address, T compare, T v) {                                  \
    return ::simt::detail::rmw(address, [=](T o) { return o == compare ? v : o; }); \
  }
SIMT_ATOMIC_INTEGER(int)
SIMT_ATOMIC_INTEGER(unsigned)
SIMT_ATOMIC_INTEGER(unsigned long long)
SIMT_ATOMIC(atomicMax, long long, o < v ? v : o)
SIMT_ATOMIC(atomicMin, long long, v < o ? v : o)
// signed addition wraps, as on the device
SIMT_ATOMIC(atomicAdd, int, static_cast<int>(static_cast<unsigned>(o) + static_cast<unsigned>(v)))
SIMT_ATOMIC(atomicAdd, unsigned, o + v)
SIMT_ATOMIC(atomicAdd, unsigned long long, o + v)
SIMT_ATOMIC(atomicAdd, float, o + v)
SIMT_ATOMIC(atomicAdd, double, o + v)
SIMT_ATOMIC(atomicExch, float, ((void)o, v))
#undef SIMT_ATOMIC_INTEGER
#undef SIMT_ATOMIC

// One OS thread runs every fiber: there is nothing to fence, and nothing to wait for.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __nanosleep(unsigned) {}
