/*
 * search.cuh - the sequence an element of a flat, per-sequence layout belongs to.
 */
#ifndef KVC_SEARCH_CUH
#define KVC_SEARCH_CUH

#include <stdint.h>

#include "cuda_compat.cuh"

/* The last b in [0, count) with scale * offsets[b] <= value; offsets ascending, offsets[0] <= value.
 * E.g. the sequence of keep element i: last_offset_at_or_below(keep_offsets, batch, heads, i). */
template <typename Offset>
__device__ inline int32_t last_offset_at_or_below(const Offset *offsets, int32_t count, int64_t scale, int64_t value) {
  int32_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (scale * (int64_t)offsets[mid] <= value) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

#endif /* KVC_SEARCH_CUH */
