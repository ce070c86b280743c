/*
 * gather.cu - CUDA query gather (kvc_gather_queries in kvcompress.h; byte for byte what
 * kernels/gather_cpu.c does): observation row r (sequence b, position p) of `queries` <- the
 * packed q row kvc_packed_row gives, or zeros where the packed rows cannot hold p (qo_indptr is
 * device memory, so it is guarded here instead of validated on the host).
 *
 * One warp per observation row: its lanes find the row's source once (the sequence by a binary
 * search of obs_indptr, then two qo_indptr entries) and copy the row, num_q_heads * head_dim
 * elements contiguous in both arrays, in vectors of up to 16 bytes (the widest the pointers and
 * the packed token stride allow), 512 coalesced bytes per warp instruction. Pure data movement:
 * nothing is staged through shared memory because nothing is reused.
 */
#include "cuda_compat.cuh"

#include "common.h"
#include "launch.cuh"
#include "ops.h"
#include "search.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(kvc_plan_view_t plan, const char *packed, int64_t packed_tokens, int64_t packed_stride_bytes,
                  const int32_t *qo_indptr, char *queries, int32_t lanes) {
  const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (r >= plan.obs_total) return;
  const int32_t b = last_offset_at_or_below(plan.obs_indptr, plan.batch, 1, r);
  const int64_t from = kvc_packed_row(plan.seq_lens[b], qo_indptr[b], qo_indptr[b + 1], packed_tokens, plan.obs_pos[r]);
  const Vec *src = from >= 0 ? reinterpret_cast<const Vec *>(packed + from * packed_stride_bytes) : nullptr;
  Vec *dst = reinterpret_cast<Vec *>(queries) + r * lanes;
  for (int32_t lane = threadIdx.x % 32; lane < lanes; lane += 32) dst[lane] = src ? src[lane] : Vec{};
}

/* Widest vector (16, 8, 4, 2 or 1 bytes) dividing the row, the packed token stride and both pointers. */
int vector_bytes(uint64_t row_bytes, uint64_t stride_bytes, const void *packed, const void *queries) {
  const uint64_t bits = row_bytes | stride_bytes | (uint64_t)reinterpret_cast<uintptr_t>(packed) |
                        (uint64_t)reinterpret_cast<uintptr_t>(queries);
  int bytes = 16;
  while (bits % bytes) bytes /= 2;
  return bytes;
}

template <typename Vec>
void launch(const kvc_op_args_t *args, int64_t row_bytes, int64_t stride_bytes) {
  const kvc_plan_view_t &plan = args->plan;
  const unsigned blocks = (unsigned)((plan.obs_total + kRowsPerBlock - 1) / kRowsPerBlock);
  KVC_LAUNCH(gather_kernel<Vec>, dim3(blocks), dim3(kThreads), 0, args->stream, plan,
             static_cast<const char *>(args->packed_q), args->packed_tokens, stride_bytes, args->qo_indptr,
             static_cast<char *>(args->gathered), (int32_t)(row_bytes / (int64_t)sizeof(Vec)));
}

}  // namespace

extern "C" kvc_status_t kvc_gather_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  (void)ws; /* no workspace */
  const kvc_plan_view_t &plan = args->plan;
  const int64_t elem = kvc_dtype_size(plan.query_dtype);
  const int64_t row_bytes = (int64_t)plan.num_q_heads * plan.head_dim * elem, stride_bytes = args->packed_stride * elem;
  const int vec = vector_bytes((uint64_t)row_bytes, (uint64_t)stride_bytes, args->packed_q, args->gathered);
  if (vec < elem)
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INVALID_VALUE,
                           "kvc_gather_queries: packed_q %p or queries %p is not aligned to its %d-byte elements",
                           args->packed_q, args->gathered, (int)elem);
  switch (vec) {
    case 16: launch<uint4>(args, row_bytes, stride_bytes); break;
    case 8: launch<uint2>(args, row_bytes, stride_bytes); break;
    case 4: launch<uint32_t>(args, row_bytes, stride_bytes); break;
    case 2: launch<uint16_t>(args, row_bytes, stride_bytes); break;
    default: launch<uint8_t>(args, row_bytes, stride_bytes); break;
  }
  return kvc_launch_status(args, "kvc_gather_queries");
}
