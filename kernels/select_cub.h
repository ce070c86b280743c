/*
 * select_cub.h - a sort-based top-k baseline built on cub::DeviceSegmentedRadixSort: the second
 * oracle of the GPU selection tests and the peer the selection benchmark has to beat. Not part of
 * the library's dispatch nor of the emulator build (CUB cannot run there).
 *
 * Semantics it shares with kvc_select: per row, every protected token plus the top (k - |P|) of the
 * others by the selection key (score descending, equal scores by position descending, NaN below
 * -inf, -0 == +0), indices ascending. No quotas: a sort offers no cheap way to honour them.
 */
#ifndef KVC_SELECT_CUB_H
#define KVC_SELECT_CUB_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * `rows` rows of `n` scores each, contiguous (device memory); `keep` gets `k` ascending indices per
 * row, contiguous (device memory). `protect_bits` (device, ceil(n / 32) words, bit t = token t) is
 * shared by every row, or NULL; it must protect at most k tokens. Two-phase like CUB: with
 * workspace == NULL only *workspace_bytes is set. Enqueues on `stream`; never synchronises.
 * cudaErrorInvalidValue if 1 <= k <= n, rows >= 1 or rows * n < 2^31 does not hold.
 */
cudaError_t kvc_select_cub_baseline(void *workspace, size_t *workspace_bytes, const float *scores,
                                            const uint32_t *protect_bits, int32_t rows, int32_t n, int32_t k,
                                            int32_t *keep, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* KVC_SELECT_CUB_H */
