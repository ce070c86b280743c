/*
 * mma.cuh - the warp-level instructions the tensor-core kernels use, behind one small interface:
 * under nvcc each function is its PTX instruction (inline asm, sm_80 and later); under the SIMT
 * emulator (tests/simt) it is the emulator's implementation of that instruction, which lays out
 * every fragment exactly as the PTX ISA defines it and has its own self-tests.
 *
 *   mma_m16n8k16<T>(d, a, b)   mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32: d += a * b for the
 *                              warp (T = __half or __nv_bfloat16; fp32 accumulators, in place)
 *   ldmatrix<N>(r, row)        ldmatrix.sync.aligned.m8n8.xN.shared.b16: N 8x8 matrices of 16-bit
 *                              elements; lane 8i + j passes row j of matrix i (16-byte aligned)
 *   cp_async_16(smem, src, n)  cp.async.cg.shared.global, 16 bytes: the first n (0 or 16) bytes of
 *                              src, zeros for the rest; src is not read when n is 0
 *   cp_async_commit()          cp.async.commit_group
 *   cp_async_wait<N>()         cp.async.wait_group N: the thread's own copies of all but the N
 *                              newest groups have landed (other threads see them after a barrier)
 *
 * Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
 * type"), with g = lane / 4 and t = lane % 4, each 32-bit register holding two elements, the lower
 * index in the low half:
 *   a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..2t+1)   a[2] = A(g, 2t+8..)   a[3] = A(g+8, 2t+8..)
 *   b[0] = B(2t..2t+1, g)   b[1] = B(2t+8..2t+9, g)            (B is K x N, k the first index)
 *   d[0], d[1] = D(g, 2t), D(g, 2t+1)   d[2], d[3] = D(g+8, 2t), D(g+8, 2t+1)
 * ldmatrix gives lane t the elements (t / 4, 2 (t % 4)) and (t / 4, 2 (t % 4) + 1) of each matrix:
 * on a row-major 16x16 tile, x4 with lane l at row l % 16, column 8 (l / 16) is exactly a[0..3];
 * on a tile of keys (row n, column k), x4 with lane l at row (l % 8) + 8 (l / 16), column
 * 8 ((l / 8) % 2) gives b[0..1] of two n-tiles of 8.
 */
#ifndef KVC_MMA_CUH
#define KVC_MMA_CUH

#include <stdint.h>

#include <type_traits>

#include "cuda_compat.cuh"

#if defined(__CUDACC__)

template <class T>
__device__ inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16");
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int N>
__device__ inline void ldmatrix(uint32_t (&r)[N], const void *row) {
  const uint32_t address = (uint32_t)__cvta_generic_to_shared(row);
  if constexpr (N == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ inline void cp_async_16(void *smem, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
               "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else /* the SIMT emulator; the trailing defaults name the caller in its reports */

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16");
  simt::mma_m16n8k16(std::is_same<T, __half>::value ? simt::MmaType::F16 : simt::MmaType::BF16, d, a, b, d, file,
                     line);
}

template <int N>
inline void ldmatrix(uint32_t (&r)[N], const void *row, const char *file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(N == 1 || N == 2 || N == 4, ".x1, .x2 or .x4");
  simt::ldmatrix(N, r, row, file, line);
}

inline void cp_async_16(void *smem, const void *src, int src_bytes, const char *file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  simt::cp_async_16(smem, src, src_bytes, file, line);
}

inline void cp_async_commit(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::cp_async_commit(file, line);
}

template <int N>
inline void cp_async_wait(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::cp_async_wait(N, file, line);
}

#endif

#endif /* KVC_MMA_CUH */
