// test_kernels.cu - kernels of the emulator's self-tests, written as ordinary CUDA.
#include "cuda_compat.cuh"

#include "test_kernels.h"

namespace {
constexpr unsigned kFull = 0xffffffffu;
}

// ---- block reduction: warp shuffles, then shared memory across warps ----------------------------

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) block_reduce_sum(const float *in, float *out, int n) {
  __shared__ float warp_sums[BLOCK / 32];
  int i = blockIdx.x * BLOCK + threadIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float v = i < n ? in[i] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < BLOCK / 32 ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFull, v, o);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

int run_block_reduce(const float *in, float *block_sums, int n) {
  return KVC_LAUNCH(block_reduce_sum<256>, (n + 255) / 256, 256, 0, 0, in, block_sums, n);
}

// ---- block scan: warp scans with __shfl_up_sync, warp totals scanned by warp 0 ------------------

template <int BLOCK>
__global__ void block_scan(const int *in, int *incl, int *excl, int n) {
  __shared__ int warp_total[BLOCK / 32];
  int i = blockIdx.x * BLOCK + threadIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int v = i < n ? in[i] : 0, x = v;
  for (int d = 1; d < 32; d <<= 1) {
    int y = __shfl_up_sync(kFull, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) warp_total[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int t = lane < BLOCK / 32 ? warp_total[lane] : 0;
    for (int d = 1; d < 32; d <<= 1) {
      int y = __shfl_up_sync(kFull, t, d);
      if (lane >= d) t += y;
    }
    if (lane < BLOCK / 32) warp_total[lane] = t;
  }
  __syncthreads();
  if (warp > 0) x += warp_total[warp - 1];
  if (i < n) {
    incl[i] = x;
    excl[i] = x - v;
  }
}

int run_block_scan(const int *in, int *inclusive, int *exclusive, int n) {
  return KVC_LAUNCH(block_scan<256>, (n + 255) / 256, 256, 0, 0, in, inclusive, exclusive, n);
}

// ---- tiled transpose, padded tile against bank conflicts, ragged edges --------------------------

__global__ void transpose32(const float *in, float *out, int rows, int cols) {
  __shared__ float tile[32][33];
  int x = blockIdx.x * 32 + threadIdx.x, y = blockIdx.y * 32 + threadIdx.y;
  for (int j = 0; j < 32; j += 8)
    if (x < cols && y + j < rows) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + x];
  __syncthreads();
  x = blockIdx.y * 32 + threadIdx.x;
  y = blockIdx.x * 32 + threadIdx.y;
  for (int j = 0; j < 32; j += 8)
    if (x < rows && y + j < cols) out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + j];
}

int run_transpose(const float *in, float *out, int rows, int cols) {
  dim3 grid((cols + 31) / 32, (rows + 31) / 32);
  return KVC_LAUNCH(transpose32, grid, dim3(32, 8), 0, 0, in, out, rows, cols);
}

// ---- shared-memory histogram with atomics; fewer threads than bins ------------------------------

__global__ void histogram64(const unsigned *in, int n, unsigned *hist) {
  __shared__ unsigned bins[64];
  for (int b = threadIdx.x; b < 64; b += blockDim.x) bins[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    atomicAdd(&bins[in[i] % 64], 1u);
  __syncthreads();
  for (int b = threadIdx.x; b < 64; b += blockDim.x) atomicAdd(&hist[b], bins[b]);
}

int run_histogram(const unsigned *in, int n, unsigned *hist64) {
  return KVC_LAUNCH(histogram64, 5, 24, 0, 0, in, n, hist64);
}

// ---- threads that exit before barriers and warp votes -------------------------------------------

__global__ void early_exit_sum(const int *in, int *sums, unsigned *ballots, int n) {
  __shared__ int s[256];
  int t = threadIdx.x;
  if (t >= n) return;
  s[t] = in[t];
  __syncthreads();
  int acc = 0;
  for (int k = 0; k <= t; ++k) acc += s[k];
  __syncthreads();
  sums[t] = acc;
  unsigned live = __ballot_sync(__activemask(), 1);
  if (t % 32 == 0) ballots[t / 32] = live;
}

int run_early_exit(const int *in, int *sums, unsigned *ballots, int n) {
  return KVC_LAUNCH(early_exit_sum, 1, 256, 0, 0, in, sums, ballots, n);
}

// ---- partial masks and widths; two warps of 32 --------------------------------------------------

__global__ void partial_masks(int *out) {
  int t = threadIdx.x, lane = t % 32, v = 100 + t;
  // 0: the two half-warps at different ops with disjoint masks, at the same time
  if (lane < 16)
    out[t] = __shfl_xor_sync(0x0000ffffu, v, 1);
  else
    out[t] = __shfl_down_sync(0xffff0000u, v, 2);
  out += 64;
  // 1: even lanes only
  out[t] = lane % 2 == 0 ? (int)__ballot_sync(0x55555555u, lane % 4 == 0) : 0;
  out += 64;
  // 2: width 8, everyone reads lane 3 of its segment
  out[t] = __shfl_sync(kFull, v, 3, 8);
  out += 64;
  // 3: width 16: the first lane of each segment keeps its own value
  out[t] = __shfl_up_sync(kFull, v, 1, 16);
  out += 64;
  // 4: reading lane 9, outside the mask: undefined (poison here)
  out[t] = lane < 8 ? __shfl_sync(0x000000ffu, v, 9) : 0;
  out += 64;
  // 5: votes on the upper half
  out[t] = lane >= 16
               ? __any_sync(0xffff0000u, lane == 20) * 2 + __all_sync(0xffff0000u, lane >= 16)
               : -5;
  out += 64;
  // 6: xor 16 within width 16: earlier segments are readable, later ones give the own value
  out[t] = __shfl_xor_sync(kFull, v, 16, 16);
  out += 64;
  // 7: __syncwarp with disjoint masks at two sites
  if (lane < 16)
    __syncwarp(0x0000ffffu);
  else
    __syncwarp(0xffff0000u);
  out[t] = 1;
}

int run_partial_masks(int *out) { return KVC_LAUNCH(partial_masks, 1, 64, 0, 0, out); }

// ---- shuffles of 16- and 64-bit types -----------------------------------------------------------

__global__ void shfl_types(__half *h, __nv_bfloat16 *b, double *d, unsigned long long *u) {
  int lane = threadIdx.x, src = (lane + 1) % 32;
  h[lane] = __shfl_sync(kFull, __float2half((float)lane), src);
  b[lane] = __shfl_sync(kFull, __float2bfloat16((float)lane), src);
  d[lane] = __shfl_sync(kFull, lane + 0.5, src);
  u[lane] = __shfl_sync(kFull, (unsigned long long)lane << 40, src);
}

int run_shfl_types(__half *h, __nv_bfloat16 *b, double *d, unsigned long long *u) {
  return KVC_LAUNCH(shfl_types, 1, 32, 0, 0, h, b, d, u);
}

// ---- a 3-D grid of 3-D blocks -------------------------------------------------------------------

__global__ void grid_ids(unsigned *ids, unsigned *dims) {
  unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned size = blockDim.x * blockDim.y * blockDim.z;
  unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  ids[block * size + t] = block * 1000 + t;
  if (block == 0 && t == 0) {
    dims[0] = gridDim.x, dims[1] = gridDim.y, dims[2] = gridDim.z;
    dims[3] = blockDim.x, dims[4] = blockDim.y, dims[5] = blockDim.z;
  }
}

int run_grid_ids(unsigned *ids, unsigned *dims) {
  return KVC_LAUNCH(grid_ids, dim3(3, 2, 2), dim3(4, 3, 2), 0, 0, ids, dims);
}

// ---- dynamic shared memory as half: reverse each block's segment --------------------------------

__global__ void reverse_half(const float *in, __half *oh, __nv_bfloat16 *ob, int n,
                             unsigned short *poison) {
  KVC_DYNAMIC_SMEM(__half, buf);  // blockDim.x halves, then one never written
  int base = blockIdx.x * blockDim.x, t = threadIdx.x;
  if (t == 0) poison[blockIdx.x] = __half_as_ushort(buf[blockDim.x]);
  __syncthreads();
  if (base + t < n) buf[t] = __float2half(in[base + t]);
  __syncthreads();
  int src = blockDim.x - 1 - t;
  if (base + t < n && base + src < n) {
    oh[base + t] = buf[src];
    ob[base + t] = __float2bfloat16(__half2float(buf[src]));
  }
}

int run_reverse_half(const float *in, __half *h, __nv_bfloat16 *b, int n, unsigned short *poison) {
  return KVC_LAUNCH(reverse_half, (n + 63) / 64, 64, 65 * sizeof(__half), 0, in, h, b, n, poison);
}

// ---- __syncthreads_count / _and / _or -----------------------------------------------------------

__global__ void sync_votes(const int *pred, int n, int *out) {
  int t = threadIdx.x;
  if (t >= n) return;  // exited threads take no part
  int c = __syncthreads_count(pred[t]);
  int a = __syncthreads_and(pred[t]);
  int o = __syncthreads_or(pred[t] && t == 5);
  int none = __syncthreads_or(0);
  if (t == 0) out[0] = c, out[1] = a, out[2] = o, out[3] = none;
}

int run_sync_votes(const int *pred, int n, int *out) {
  return KVC_LAUNCH(sync_votes, 1, 96, 0, 0, pred, n, out);
}

// ---- static __shared__ is fresh (poisoned) in every block ---------------------------------------

__global__ void static_smem_first_read(int *first_read) {
  __shared__ int s[4];
  if (threadIdx.x == 0) first_read[blockIdx.x] = s[1];
  __syncthreads();
  s[threadIdx.x % 4] = 42;
}

int run_static_smem_first_read(int *first_read, int blocks) {
  return KVC_LAUNCH(static_smem_first_read, blocks, 8, 0, 0, first_read);
}

// ---- barrier phases, logged in execution order; `mine` must stay per block ----------------------

__global__ void phase_log(int *log, int *pos) {
  __shared__ int mine;
  if (threadIdx.x == 0) mine = blockIdx.x;
  for (int phase = 0; phase < 3; ++phase) {
    __syncthreads();
    if (threadIdx.x == 0)
      log[atomicAdd(pos, 1)] = blockIdx.x * 10 + phase + (mine != (int)blockIdx.x) * 1000;
  }
}

int run_phase_log(int *log, int *pos, int blocks) {
  return KVC_LAUNCH(phase_log, blocks, 64, 0, 0, log, pos);
}

// ---- a missing barrier: each thread reads its left neighbour's element --------------------------

template <bool SYNC>
__global__ void neighbour_copy(const int *in, int *out) {
  __shared__ int s[128];
  int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  s[t] = in[base + t];
  if (SYNC) __syncthreads();
  out[base + t] = s[t ? t - 1 : 0];
}

int run_neighbour_copy(const int *in, int *out, int blocks, bool with_barrier) {
  return with_barrier ? KVC_LAUNCH(neighbour_copy<true>, blocks, 128, 0, 0, in, out)
                      : KVC_LAUNCH(neighbour_copy<false>, blocks, 128, 0, 0, in, out);
}

// ---- a divergent barrier: two call sites in one phase; lines[] gets the two lines ---------------

__global__ void divergent_barrier(int *lines) {
  if (threadIdx.x < 16)
    lines[0] = (__syncthreads(), __LINE__);  // the barrier's line, as the report must show it
  else
    lines[1] = (__syncthreads(), __LINE__);
}

int run_divergent_barrier(int *lines) { return KVC_LAUNCH(divergent_barrier, 1, 32, 0, 0, lines); }

// ---- a deadlock: half a warp in a full-mask shuffle, the other half at a barrier ----------------

__global__ void deadlock(int *out) {
  if (threadIdx.x < 16)
    out[threadIdx.x] = __shfl_sync(kFull, (int)threadIdx.x, 0);
  else
    __syncthreads();
}

int run_deadlock(int *out, int blocks) { return KVC_LAUNCH(deadlock, blocks, 32, 0, 0, out); }

// ---- lanes of one mask at different warp ops ----------------------------------------------------

__global__ void warp_mismatch(int *out) {
  if (threadIdx.x < 16)
    out[threadIdx.x] = __shfl_sync(kFull, 1, 0);
  else
    out[threadIdx.x] = (int)__ballot_sync(kFull, 1);
}

int run_warp_mismatch(int *out) { return KVC_LAUNCH(warp_mismatch, 1, 32, 0, 0, out); }

// ---- atomics on global memory from every thread of the grid -------------------------------------

__global__ void atomics(AtomicCounters *c) {
  int id = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&c->i, 1);
  atomicAdd(&c->u, 2u);
  atomicAdd(&c->ull, 1ull << 33);
  atomicAdd(&c->f, 0.5f);
  atomicAdd(&c->d, 0.25);
  atomicMax(&c->imax, id);
  atomicMin(&c->imin, -id);
  atomicMax(&c->umax, (unsigned)id * 3u);
  atomicMax(&c->ullmax, (unsigned long long)id << 34);
  int old;
  do old = c->cas;
  while (atomicCAS(&c->cas, old, old + 1) != old);
  atomicOr(&c->bits_or, 1u << (id % 32));
  atomicAnd(&c->bits_and, ~(1u << (id % 16)));
  unsigned prev = atomicExch(&c->exch_seen, (unsigned)id + 1);
  if (prev == 0 && id != 0) atomicAdd(&c->exch_seen, 1000000u);  // only the first sees 0
}

int run_atomics(AtomicCounters *c, int blocks, int threads) {
  return KVC_LAUNCH(atomics, blocks, threads, 0, 0, c);
}

// ---- launch details: a template kernel with commas; arguments evaluated once --------------------

template <int A, int B>
__global__ void add_ab(int *out, int base) {
  out[threadIdx.x] = base + A * 10 + B;
}

int run_args_once(int *out, int *counter) {
  return KVC_LAUNCH((add_ab<2, 3>), 1, 4, 0, nullptr, out, (*counter)++);
}

__global__ void noop() {}

int run_config(int grid_x, int block_x, int block_y, size_t smem) {
  return KVC_LAUNCH(noop, grid_x, dim3(block_x, block_y), smem, 0);
}

// ---- dynamic shared memory above 48 KiB needs the kernel's opt-in ------------------------------

__global__ void fill_dynamic_smem(int *out, int words) {
  KVC_DYNAMIC_SMEM(int, buf);
  for (int i = threadIdx.x; i < words; i += blockDim.x) buf[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) *out = buf[words - 1];
}

int run_big_dynamic_smem(int *out, size_t bytes, bool raise_limit) {
  if (raise_limit && KVC_SET_MAX_DYNAMIC_SMEM(fill_dynamic_smem, bytes) != cudaSuccess) return -1;
  return KVC_LAUNCH(fill_dynamic_smem, 1, 64, bytes, 0, out, (int)(bytes / sizeof(int)));
}
