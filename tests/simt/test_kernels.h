// test_kernels.h - launchers of the self-test kernels (test_kernels.cu). Pointers are host memory,
// which is device memory in the emulator. Each returns the errors the launch reported.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

struct AtomicCounters {
  int i, imax, imin, cas;
  unsigned u, umax, bits_or, bits_and, exch_seen;
  unsigned long long ull, ullmax;
  float f;
  double d;
};

int run_block_reduce(const float *in, float *block_sums, int n);           // 256 threads a block
int run_block_scan(const int *in, int *inclusive, int *exclusive, int n);  // per 256-element block
int run_transpose(const float *in, float *out, int rows, int cols);        // 32x32 tiles, (32, 8)
int run_histogram(const unsigned *in, int n, unsigned *hist64);
// n < 256 threads stay; the block has 256. sums[t] = in[0] + ... + in[t]; ballots[w] = live lanes.
int run_early_exit(const int *in, int *sums, unsigned *ballots, int n);
int run_partial_masks(int *out);  // 8 x 64 results, see the kernel
int run_shfl_types(__half *h, __nv_bfloat16 *b, double *d, unsigned long long *u);  // 32 each
int run_grid_ids(unsigned *ids, unsigned *dims);  // grid (3, 2, 2), block (4, 3, 2)
int run_reverse_half(const float *in, __half *h, __nv_bfloat16 *b, int n, unsigned short *poison);
int run_sync_votes(const int *pred, int n, int *out);  // count, and, or
int run_static_smem_first_read(int *first_read, int blocks);
int run_phase_log(int *log, int *pos, int blocks);  // 3 barrier phases a block
int run_neighbour_copy(const int *in, int *out, int blocks, bool with_barrier);
int run_divergent_barrier(int *lines);
int run_deadlock(int *out, int blocks);
int run_warp_mismatch(int *out);  // half a warp shuffles, the other half votes, both full mask
int run_atomics(AtomicCounters *c, int blocks, int threads);
int run_args_once(int *out, int *counter);  // template kernel with commas; (*counter)++ as arg
int run_config(int grid_x, int block_x, int block_y, size_t smem);
// One block filling `bytes` of dynamic shared memory, after raising its kernel's limit if asked.
int run_big_dynamic_smem(int *out, size_t bytes, bool raise_limit);
