// test_matrix_kernels.cu - kernels of the self-tests of the warp-level matrix instructions and
// cp.async (kernels/mma.cuh), written as ordinary CUDA. Launchers: test_matrix_kernels.h.
#include "cuda_compat.cuh"

#include "mma.cuh"
#include "test_matrix_kernels.h"

namespace {

uint32_t pack(uint16_t lo, uint16_t hi) { return (uint32_t)lo | (uint32_t)hi << 16; }

}  // namespace

// ---- mma from fragments built by the PTX ISA's index formulas ----------------------------------
// One problem per warp: a (16x16 row-major bits), b (16x8, row k, column n), c and d (16x8 f32).

template <class T>
__global__ void mma_fragments(const uint16_t *a, const uint16_t *b, const float *c, float *d) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane >> 2, tig = lane % 4;
  a += warp * 256, b += warp * 128, c += warp * 128, d += warp * 128;
  uint32_t fa[4], fb[2];
  float acc[4];
  for (int r = 0; r < 4; ++r) {  // a_i, i = 2r + half: row groupID (+8 for i in 2,3,6,7), column
    uint16_t e[2];               // 2 threadID_in_group + (i & 1) (+8 for i >= 4)
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * r + half;
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      e[half] = a[row * 16 + col];
    }
    fa[r] = pack(e[0], e[1]);
  }
  for (int r = 0; r < 2; ++r) {  // b_i: row 2 threadID_in_group + (i & 1) (+8 for i >= 2), column groupID
    uint16_t e[2];
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * r + half;
      e[half] = b[(tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)) * 8 + group];
    }
    fb[r] = pack(e[0], e[1]);
  }
  for (int i = 0; i < 4; ++i) acc[i] = c[(i < 2 ? group : group + 8) * 8 + tig * 2 + (i & 1)];
  mma_m16n8k16<T>(acc, fa, fb);
  for (int i = 0; i < 4; ++i) d[(i < 2 ? group : group + 8) * 8 + tig * 2 + (i & 1)] = acc[i];
}

int run_mma_fragments(bool bf16, const uint16_t *a, const uint16_t *b, const float *c, float *d, int warps) {
  return bf16 ? KVC_LAUNCH(mma_fragments<__nv_bfloat16>, 1, 32 * warps, 0, 0, a, b, c, d)
              : KVC_LAUNCH(mma_fragments<__half>, 1, 32 * warps, 0, 0, a, b, c, d);
}

// ---- S = Q K^T + C through shared memory, ldmatrix.x4 and two mma: the scoring kernels' pattern ----
// Per warp: q [16][16] and k [16 keys][16] (bits, row-major), c and s [16][16] f32 (row, key).
// Shared rows are padded to 24 elements (48 bytes) so rows are not contiguous.

template <class T>
__global__ void qk_through_ldmatrix(const uint16_t *q, const uint16_t *k, const float *c, float *s) {
  constexpr int kStride = 24;
  __shared__ __align__(16) uint16_t q_tile[4][16 * kStride], k_tile[4][16 * kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane >> 2, tig = lane % 4;
  for (int e = lane; e < 256; e += 32) {
    q_tile[warp][(e / 16) * kStride + e % 16] = q[warp * 256 + e];
    k_tile[warp][(e / 16) * kStride + e % 16] = k[warp * 256 + e];
  }
  __syncwarp();
  uint32_t fa[4], fb[4];
  ldmatrix<4>(fa, &q_tile[warp][(lane % 16) * kStride + 8 * (lane / 16)]);
  ldmatrix<4>(fb, &k_tile[warp][((lane % 8) + 8 * (lane / 16)) * kStride + 8 * ((lane / 8) % 2)]);
  for (int n = 0; n < 2; ++n) {  // keys 8n .. 8n + 7
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = c[warp * 256 + (group + (i >= 2 ? 8 : 0)) * 16 + 8 * n + 2 * tig + (i & 1)];
    const uint32_t b[2] = {fb[2 * n], fb[2 * n + 1]};
    mma_m16n8k16<T>(acc, fa, b);
    for (int i = 0; i < 4; ++i) s[warp * 256 + (group + (i >= 2 ? 8 : 0)) * 16 + 8 * n + 2 * tig + (i & 1)] = acc[i];
  }
}

int run_qk_through_ldmatrix(bool bf16, const uint16_t *q, const uint16_t *k, const float *c, float *s, int warps) {
  return bf16 ? KVC_LAUNCH(qk_through_ldmatrix<__nv_bfloat16>, 1, 32 * warps, 0, 0, q, k, c, s)
              : KVC_LAUNCH(qk_through_ldmatrix<__half>, 1, 32 * warps, 0, 0, q, k, c, s);
}

// ---- ldmatrix .x1 / .x2 / .x4 on rows stored out of order --------------------------------------
// Element (matrix i, row r, column c) is id = 64 i + 8 r + c; row (i, r) is stored at shared slot
// slot_of[8 i + r] (16 bytes each). Lane l passes row (l / 8, l % 8) when l < 8 N, else slot 0.
// out[lane * 4 + i] = register i.

template <int N>
__global__ void ldmatrix_layout(const int *slot_of, uint32_t *out) {
  __shared__ __align__(16) uint16_t rows[32][8];
  const int lane = threadIdx.x;
  for (int row = 0; row < 8; ++row) rows[slot_of[lane]][row] = (uint16_t)(8 * lane + row);
  __syncwarp();
  uint32_t r[N];
  ldmatrix<N>(r, rows[lane < 8 * N ? slot_of[lane] : 0]);
  for (int i = 0; i < N; ++i) out[lane * 4 + i] = r[i];
}

int run_ldmatrix_layout(int count, const int *slot_of, uint32_t *out) {
  switch (count) {
    case 1: return KVC_LAUNCH(ldmatrix_layout<1>, 1, 32, 0, 0, slot_of, out);
    case 2: return KVC_LAUNCH(ldmatrix_layout<2>, 1, 32, 0, 0, slot_of, out);
    default: return KVC_LAUNCH(ldmatrix_layout<4>, 1, 32, 0, 0, slot_of, out);
  }
}

// ---- cp.async groups: what each thread sees before and after each wait ---------------------------
// 64 threads; thread t copies 16-byte chunk t of src0, src1, src2 into three shared buffers, one
// group each (src2's chunk with src_bytes[t] bytes, the rest zero-filled). seen[t] records, as
// 4-word snapshots of the thread's own chunk: buf0 before any wait, buf0 and buf1 after wait<2>,
// buf1 after wait<1>, buf2 after wait<0>, then the right neighbour's buf2 chunk after a barrier.

__global__ void cp_async_groups(const uint4 *src0, const uint4 *src1, const uint4 *src2, const int *src_bytes,
                                uint4 *seen) {
  __shared__ uint4 buf[3][64];
  const int t = threadIdx.x;
  cp_async_16(&buf[0][t], &src0[t], 16);
  cp_async_commit();
  cp_async_16(&buf[1][t], &src1[t], 16);
  cp_async_commit();
  cp_async_16(&buf[2][t], &src2[t], src_bytes[t]);
  cp_async_commit();
  uint4 *mine = seen + t * 6;
  mine[0] = buf[0][t];
  cp_async_wait<2>();
  mine[1] = buf[0][t];
  mine[2] = buf[1][t];
  cp_async_wait<1>();
  mine[3] = buf[1][t];
  cp_async_wait<0>();
  mine[4] = buf[2][t];
  __syncthreads();
  mine[5] = buf[2][(t + 1) % 64];
}

int run_cp_async_groups(const void *src0, const void *src1, const void *src2, const int *src_bytes, void *seen) {
  return KVC_LAUNCH(cp_async_groups, 1, 64, 0, 0, static_cast<const uint4 *>(src0), static_cast<const uint4 *>(src1),
                    static_cast<const uint4 *>(src2), src_bytes, static_cast<uint4 *>(seen));
}

// ---- a double-buffered cp.async pipeline, as the scoring kernels run theirs --------------------
// 128 threads, `tiles` tiles of 128 floats x 4 (one 16-byte chunk per thread). Tile i+1 is in
// flight while tile i is summed; thread t sums chunk (7 t) % 128 of each tile, written by another
// thread: that needs every thread's wait and then a barrier (BARRIER false leaves the barrier
// out). sums[t] = sum over tiles of the 4 floats of its chunk.

template <bool BARRIER>
__global__ void cp_async_pipeline(const float4 *in, int tiles, float *sums) {
  __shared__ float4 buf[2][128];
  const int t = threadIdx.x, read = (7 * t) % 128;
  float sum = 0.0f;
  cp_async_16(&buf[0][t], &in[t], 16);
  cp_async_commit();
  for (int i = 0; i < tiles; ++i) {
    __syncthreads();  // everyone is done with the buffer the next copy overwrites
    if (i + 1 < tiles) cp_async_16(&buf[(i + 1) % 2][t], &in[(i + 1) * 128 + t], 16);
    cp_async_commit();
    cp_async_wait<1>();
    if (BARRIER) __syncthreads();
    const float4 v = buf[i % 2][read];
    sum += v.x + v.y + v.z + v.w;
  }
  cp_async_wait<0>();
  sums[t] = sum;
}

int run_cp_async_pipeline(const float *in, int tiles, float *sums, bool with_barrier) {
  const float4 *in4 = reinterpret_cast<const float4 *>(in);
  return with_barrier ? KVC_LAUNCH(cp_async_pipeline<true>, 1, 128, 0, 0, in4, tiles, sums)
                      : KVC_LAUNCH(cp_async_pipeline<false>, 1, 128, 0, 0, in4, tiles, sums);
}

// ---- misuse the emulator reports ----------------------------------------------------------------

// Each of the 32 threads issues and commits a copy but never waits: it reads the old contents,
// and its exit is reported.
__global__ void cp_async_never_waited(const uint4 *src, uint4 *seen) {
  __shared__ uint4 buf[32];
  cp_async_16(&buf[threadIdx.x], &src[threadIdx.x], 16);
  cp_async_commit();
  seen[threadIdx.x] = buf[threadIdx.x];
}

int run_cp_async_never_waited(const void *src, void *seen) {
  return KVC_LAUNCH(cp_async_never_waited, 1, 32, 0, 0, static_cast<const uint4 *>(src), static_cast<uint4 *>(seen));
}

// A copy whose destination is global memory (thread 0 only).
__global__ void cp_async_to_global(const uint4 *src, uint4 *dst) {
  if (threadIdx.x == 0) {
    cp_async_16(dst, src, 16);
    cp_async_commit();
    cp_async_wait<0>();
  }
}

int run_cp_async_to_global(const void *src, void *dst) {
  return KVC_LAUNCH(cp_async_to_global, 1, 32, 0, 0, static_cast<const uint4 *>(src), static_cast<uint4 *>(dst));
}

// ldmatrix after half the warp has exited.
__global__ void ldmatrix_half_warp(uint32_t *out) {
  __shared__ __align__(16) uint16_t rows[8][8];
  if (threadIdx.x >= 16) return;
  rows[threadIdx.x % 8][threadIdx.x / 8] = 1;
  uint32_t r[1];
  ldmatrix<1>(r, rows[threadIdx.x % 8]);
  out[threadIdx.x] = r[0];
}

int run_ldmatrix_half_warp(uint32_t *out) { return KVC_LAUNCH(ldmatrix_half_warp, 1, 32, 0, 0, out); }
