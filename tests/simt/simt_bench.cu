// simt_bench.cu - cost of the emulator's context switches: per thread per __syncthreads, per lane
// per warp shuffle, per thread of a block that only starts and exits, and per launch.
// Run: simt_bench (the numbers depend on the machine; see README.md).
#include "cuda_compat.cuh"

#include <chrono>
#include <cstdio>
#include <vector>

__global__ void barrier_loop(int iters, float *sink) {
  float acc = (float)threadIdx.x;
  for (int i = 0; i < iters; ++i) {
    acc += 1.f;
    __syncthreads();
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

__global__ void shfl_loop(int iters, float *sink) {
  float acc = (float)threadIdx.x;
  for (int i = 0; i < iters; ++i) acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

__global__ void empty_kernel() {}

template <class F>
double seconds(F fn) {
  auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main() {
  const int threads = 256, blocks = 16, iters = 2000;
  std::vector<float> sink(4096);
  KVC_LAUNCH(barrier_loop, 1, threads, 0, 0, 10, sink.data());  // warm-up: stacks, worker thread

  double t = seconds([&] { KVC_LAUNCH(barrier_loop, blocks, threads, 0, 0, iters, sink.data()); });
  printf(
      "__syncthreads:   %6.1f ns per thread per barrier (%d blocks x %d threads x %d barriers)\n",
      t * 1e9 / ((double)blocks * threads * iters), blocks, threads, iters);

  t = seconds([&] { KVC_LAUNCH(shfl_loop, blocks, threads, 0, 0, iters, sink.data()); });
  printf("__shfl_xor_sync: %6.1f ns per lane per shuffle\n",
         t * 1e9 / ((double)blocks * threads * iters));

  const int many = 4096;
  t = seconds([&] { KVC_LAUNCH(empty_kernel, many, threads, 0, 0); });
  printf("empty block:     %6.1f ns per thread (start and exit, %d blocks)\n",
         t * 1e9 / ((double)many * threads), many);

  const int launches = 2000;
  t = seconds([&] {
    for (int i = 0; i < launches; ++i) KVC_LAUNCH(empty_kernel, 1, 32, 0, 0);
  });
  printf("launch:          %6.1f us per launch of one 32-thread block\n", t * 1e6 / launches);
  return simt::launch_errors() != 0;
}
