// simt_oob.cu - out-of-bounds reads that AddressSanitizer must report, with this file and line:
// `simt_oob global` reads past an input array (a missing bounds guard), `simt_oob smem` past the
// dynamic shared memory. Registered as expected-failure tests in ASan builds only.
#include "cuda_compat.cuh"

#include <cstdio>
#include <cstring>
#include <vector>

__global__ void copy_unguarded(const float *in, float *out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];  // missing `if (i < n)`
  (void)n;
}

__global__ void smem_overrun(float *out) {
  KVC_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x + 1];  // one past the end for the last thread
}

int main(int argc, char **argv) {
  const int n = 100, threads = 64;
  std::vector<float> in(n, 1.f), out(2 * threads);  // out is large enough: only `in` overflows
  if (argc == 2 && !strcmp(argv[1], "global")) {
    KVC_LAUNCH(copy_unguarded, (n + threads - 1) / threads, threads, 0, 0, in.data(), out.data(),
               n);
  } else if (argc == 2 && !strcmp(argv[1], "smem")) {
    KVC_LAUNCH(smem_overrun, 1, threads, threads * sizeof(float), 0, out.data());
  } else {
    fprintf(stderr, "usage: simt_oob global|smem\n");
    return 2;
  }
  puts("no out-of-bounds access was reported");
  return 0;
}
