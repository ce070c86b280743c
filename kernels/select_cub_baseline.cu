/*
 * select_cub.cu - the CUB baseline of select_cub.h: build the 64-bit selection keys (protected
 * tokens lifted above every score), sort each row descending with DeviceSegmentedRadixSort (keys
 * only: the position is the key's low half), take the first k, sort those indices ascending.
 */
#include <cub/device/device_segmented_radix_sort.cuh>

#include <climits>

#include "common.h"
#include "ops.h"
#include "select_cub.h"

namespace {

constexpr int kThreads = 256;
/* Above the score bits of +inf (0xff800000): protected tokens sort first, by position. */
constexpr uint64_t kProtectedScoreBits = 0xffffffffull << 32;

__global__ void make_keys_kernel(const float *scores, const uint32_t *protect_bits, int64_t total, int32_t n,
                                 uint64_t *keys) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int32_t t = (int32_t)(i % n);
    const bool lifted = protect_bits && kvc_is_protected(protect_bits, 0, t);
    keys[i] = lifted ? kProtectedScoreBits | (uint32_t)t : kvc_select_key(scores[i], t);
  }
}

/* offsets[r] = r * stride for r <= rows: segment boundaries of both sorts. */
__global__ void make_offsets_kernel(int32_t rows, int32_t stride, int32_t *offsets) {
  const int32_t r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r <= rows) offsets[r] = r * stride;
}

/* The first k of each sorted row, as positions. */
__global__ void take_top_kernel(const uint64_t *sorted, int32_t rows, int32_t n, int32_t k, int32_t *top) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)rows * k;
       i += (int64_t)gridDim.x * blockDim.x)
    top[i] = (int32_t)(uint32_t)sorted[(i / k) * n + i % k];
}

unsigned grid_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

extern "C" cudaError_t kvc_select_cub_baseline(void *workspace, size_t *workspace_bytes, const float *scores,
                                               const uint32_t *protect_bits, int32_t rows, int32_t n, int32_t k,
                                               int32_t *keep, cudaStream_t stream) {
  if (!workspace_bytes || rows < 1 || n < 1 || k < 1 || k > n || (int64_t)rows * n > INT_MAX)
    return cudaErrorInvalidValue;
  const int32_t total = rows * n, kept = rows * k;
  int index_bits = 1; /* the ascending sort only needs the bits of a position */
  while (index_bits < 31 && (1 << index_bits) < n) ++index_bits;

  size_t key_sort_bytes = 0, index_sort_bytes = 0;
  cudaError_t err = cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, key_sort_bytes, (const uint64_t *)nullptr, (uint64_t *)nullptr, total, rows, (const int32_t *)nullptr,
      (const int32_t *)nullptr, 0, 64, stream);
  if (err != cudaSuccess) return err;
  err = cub::DeviceSegmentedRadixSort::SortKeys(nullptr, index_sort_bytes, (const int32_t *)nullptr,
                                                (int32_t *)nullptr, kept, rows, (const int32_t *)nullptr,
                                                (const int32_t *)nullptr, 0, index_bits, stream);
  if (err != cudaSuccess) return err;

  kvc_carver_t ws = {static_cast<char *>(workspace), 0};
  uint64_t *keys = static_cast<uint64_t *>(kvc_carve(&ws, sizeof(uint64_t) * (size_t)total));
  uint64_t *sorted = static_cast<uint64_t *>(kvc_carve(&ws, sizeof(uint64_t) * (size_t)total));
  int32_t *top = static_cast<int32_t *>(kvc_carve(&ws, sizeof(int32_t) * (size_t)kept));
  int32_t *row_offsets = static_cast<int32_t *>(kvc_carve(&ws, sizeof(int32_t) * (size_t)(rows + 1)));
  int32_t *keep_offsets = static_cast<int32_t *>(kvc_carve(&ws, sizeof(int32_t) * (size_t)(rows + 1)));
  const size_t sort_bytes = key_sort_bytes > index_sort_bytes ? key_sort_bytes : index_sort_bytes;
  void *sort_temp = kvc_carve(&ws, sort_bytes);
  if (!workspace) {
    *workspace_bytes = ws.used;
    return cudaSuccess;
  }
  if (*workspace_bytes < ws.used) return cudaErrorInvalidValue;

  make_keys_kernel<<<grid_for(total), kThreads, 0, stream>>>(scores, protect_bits, total, n, keys);
  make_offsets_kernel<<<grid_for(rows + 1), kThreads, 0, stream>>>(rows, n, row_offsets);
  make_offsets_kernel<<<grid_for(rows + 1), kThreads, 0, stream>>>(rows, k, keep_offsets);
  size_t temp_bytes = sort_bytes;
  err = cub::DeviceSegmentedRadixSort::SortKeysDescending(sort_temp, temp_bytes, keys, sorted, total, rows,
                                                          row_offsets, row_offsets + 1, 0, 64, stream);
  if (err != cudaSuccess) return err;
  take_top_kernel<<<grid_for(kept), kThreads, 0, stream>>>(sorted, rows, n, k, top);
  temp_bytes = sort_bytes;
  err = cub::DeviceSegmentedRadixSort::SortKeys(sort_temp, temp_bytes, top, keep, kept, rows, keep_offsets,
                                                keep_offsets + 1, 0, index_bits, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}
