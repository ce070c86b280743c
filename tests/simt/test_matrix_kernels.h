// test_matrix_kernels.h - launchers of the self-test kernels of the warp-level matrix
// instructions and cp.async (test_matrix_kernels.cu). Pointers are host memory, which is device
// memory in the emulator. Each returns the errors the launch reported.
#pragma once

#include <stdint.h>

// One block of `warps` warps, one problem each: d = a * b + c with a [16][16], b [16][8] (k, n)
// as f16 or bf16 bits, c and d [16][8] f32; fragments built by the PTX ISA's index formulas.
int run_mma_fragments(bool bf16, const uint16_t *a, const uint16_t *b, const float *c, float *d, int warps);
// One block of `warps` warps: s = q k^T + c, q and k [16][16] bits, c and s [16][16] f32, through
// shared memory, ldmatrix.x4 and two mma per warp.
int run_qk_through_ldmatrix(bool bf16, const uint16_t *q, const uint16_t *k, const float *c, float *s, int warps);
// ldmatrix.x<count> on 32 rows of 8 ids stored at slots slot_of[32]; out [32 lanes][4 registers].
int run_ldmatrix_layout(int count, const int *slot_of, uint32_t *out);
// 64 threads, three 16-byte chunks each (src0..2: 64 x 16 bytes; src_bytes[64] for src2);
// seen: 64 x 6 x 16 bytes of snapshots (see the kernel).
int run_cp_async_groups(const void *src0, const void *src1, const void *src2, const int *src_bytes, void *seen);
// in: tiles x 512 floats; sums[128].
int run_cp_async_pipeline(const float *in, int tiles, float *sums, bool with_barrier);
// 32 threads: src and seen 32 x 16 bytes.
int run_cp_async_never_waited(const void *src, void *seen);
int run_cp_async_to_global(const void *src, void *dst);
int run_ldmatrix_half_warp(uint32_t *out);
