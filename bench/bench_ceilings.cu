/*
 * bench_ceilings - the two ceilings every other number of the run is compared with, measured in the
 * same run on the same device (METHOD.md: measure them, don't quote datasheets):
 *   copy: cudaMemcpy device-to-device of 1 GiB, bytes read + written over the median time (GB/s)
 *   gemm: a cuBLAS bf16 x bf16 -> bf16 GEMM, fp32 accumulation, m = n = k = 8192 (by default), on
 *         random data (not zeros), 2*m*n*k over the median time (TFLOP/s)
 * Output: {"record":"device",...} then {"record":"ceiling","kind":"copy","gbps":...} and
 *         {"record":"ceiling","kind":"gemm_bf16","tflops":...,"m":8192,...}
 *
 *   bench_ceilings [--gemm 8192] [--iters 20]
 */
#include <cublas_v2.h>

#include "bench_util.cuh"

int main(int argc, char **argv) {
  int size = 8192, iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--gemm")) size = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
    else {
      fprintf(stderr, "bench_ceilings: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  bench::print_device_and_copy_ceiling("bench_ceilings");

  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "bench_ceilings: cublasCreate failed\n");
    return 1;
  }
  cudaStream_t stream;
  KVC_BENCH_CHECK(cudaStreamCreate(&stream));
  cublasSetStream(handle, stream);
  const size_t elems = (size_t)size * size;
  void *a, *b, *c;
  KVC_BENCH_CHECK(cudaMalloc(&a, elems * 2));
  KVC_BENCH_CHECK(cudaMalloc(&b, elems * 2));
  KVC_BENCH_CHECK(cudaMalloc(&c, elems * 2));
  bench::fill_random(a, elems, KVC_DTYPE_BF16, 21u, stream);
  bench::fill_random(b, elems, KVC_DTYPE_BF16, 22u, stream);
  const float alpha = 1.0f, beta = 0.0f;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  bench::Stats s = bench::time_gpu(
      [&](cudaStream_t) {
        cublasStatus_t st = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, size, size, size, &alpha, a, CUDA_R_16BF,
                                         size, b, CUDA_R_16BF, size, &beta, c, CUDA_R_16BF, size,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) status = st;
      },
      stream, 3, iters, nullptr);
  if (status != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "bench_ceilings: cublasGemmEx failed (%d)\n", (int)status);
    return 1;
  }
  const double flops = 2.0 * size * (double)size * size;
  bench::Json()
      .add("record", "ceiling").add("bench", "bench_ceilings").add("kind", "gemm_bf16").add("m", size)
      .add("n", size).add("k", size).add_stats(s).add("tflops", flops / (s.median_ms * 1e-3) / 1e12)
      .print();
  cudaFree(a), cudaFree(b), cudaFree(c);
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  return 0;
}
