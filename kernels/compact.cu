/*
 * compact.cu - CUDA compaction: for every (sequence b, KV head h) with k_b < n_b and j < k_b,
 * slot j <- slot keep[j] for K, V and the extra per-token fp32 arrays, in place (kvc_compact in
 * kvcompress.h; byte for byte what kernels/compact_cpu.c does).
 *
 * Work split. The keep layout of the whole batch (num_kv_heads * total_kept writers, writer j of
 * row (b, h) moving one token) is cut into chunks of C consecutive writers; a chunk may end one
 * row and start the next. One block per chunk moves every byte of its writers: the K and V rows in
 * vectors of up to 16 bytes (the widest the pools' alignment allows) and the extras. The block
 * reads all its sources into registers, then writes all its destinations. Thousands of chunks
 * keep the device busy even for one sequence with few heads.
 *
 * Why in place is race-free. In a row keep is strictly ascending, so keep[j] >= j: slot s is read
 * only by the writer j with keep[j] = s (so j <= s) and written only by writer s. Chunk t writes
 * slots [j0, j1) of a row (j1 - j0 <= C), and each of those slots must be read before it is
 * overwritten:
 *   - by writers of chunk t: every read of the block comes before a __syncthreads, every write
 *     after it;
 *   - by writers of later chunks: none, they are > s;
 *   - by writers before j0: their sources are distinct slots in [j0, j1), so they are at most
 *     j1 - j0 <= C consecutive writers ending at j0 - 1 (keep is ascending): all in chunk t - 1,
 *     and only when chunk t starts mid-row. So such a chunk writes only after chunk t - 1 has
 *     published, through a flag in the workspace, that all its reads are done.
 * Rows never share memory (pages are owned by one sequence; heads and pools are disjoint).
 *
 * Why the wait cannot deadlock. Blocks take chunk numbers from an atomic ticket in the order they
 * start, not from blockIdx, so the block holding chunk t - 1 is already running (resident) when
 * chunk t waits for it, and its reads wait on nothing. The wait is a __syncthreads_or loop: in the
 * SIMT emulator blocks in flight interleave at barriers, and a block runs alone only after all
 * lower tickets have finished.
 *
 * Page ids are checked on the device before anything moves: a sequence whose first
 * ceil(n / page_size) page ids are not all in [0, num_pages) (or whose CSR list is shorter) is
 * left untouched, all its heads and extras. A keep index outside [j, n) moves nothing, so no byte
 * outside the sequence's own pages is ever read or written.
 */
#include "cuda_compat.cuh"

#include "common.h"
#include "ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int kVectorsPerThread = 4;                        /* staged in registers per chunk  */
constexpr int kCapacity = kThreads * kVectorsPerThread;     /* vectors a block holds at once  */
constexpr int kMaxExtras = 8;                               /* extras moved per pass          */

/* One pass over the keep layout: K and V (kv_lanes > 0, first pass only) plus up to kMaxExtras
 * extras. Everything by value: the kernels read no host memory. */
struct Pass {
  kvc_plan_view_t plan;
  kvc_paged_kv_t cache;
  const int32_t *keep;
  float *extras[kMaxExtras];
  int32_t num_extras;
  int32_t kv_lanes;  /* vectors per K row (and per V row); 0: extras only                      */
  int32_t chunk;     /* writers per chunk, C                                                    */
  int64_t chunks;
  int32_t *reads_done;          /* [chunks] 1 once the chunk's sources are all read             */
  unsigned long long *ticket;   /* next chunk number to hand out                                 */
  int32_t *seq_ok;              /* [batch] 1 when the sequence's page list is usable             */
};

/* Byte offsets in the pools and element offsets in the extras of one writer; from < 0: no move. */
struct Move {
  int64_t from, to;
  int64_t extra_from, extra_to;
};

/* A staged K/V vector or extra value. */
template <typename Vec>
union Staged {
  Vec vec;
  float extra;
};

/* Zeroes the ticket and the flags of a pass, and marks each sequence whose page list the moves
 * may follow: every id it would use in [0, num_pages), and for CSR enough entries of its own. */
__global__ void __launch_bounds__(kThreads) prepare_kernel(Pass pass) {
  for (int64_t f = blockIdx.x * (int64_t)kThreads + threadIdx.x; f < pass.chunks; f += (int64_t)gridDim.x * kThreads)
    pass.reads_done[f] = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *pass.ticket = 0;
  const kvc_paged_kv_t &cache = pass.cache;
  for (int32_t b = blockIdx.x; b < pass.plan.batch; b += gridDim.x) {
    const int32_t need = (pass.plan.seq_lens[b] + cache.page_size - 1) / cache.page_size;
    bool ok = true;
    if (!cache.page_table) {
      ok = b < cache.num_pages;
    } else {
      if (cache.page_indptr)
        ok = cache.page_indptr[b] >= 0 && cache.page_indptr[b + 1] - cache.page_indptr[b] >= need;
      const int32_t *pages = kvc_seq_pages(&cache, b);
      for (int32_t i = threadIdx.x; ok && i < need; i += kThreads) ok = pages[i] >= 0 && pages[i] < cache.num_pages;
    }
    ok = __syncthreads_and(ok);
    if (threadIdx.x == 0) pass.seq_ok[b] = ok;
  }
}

/* Sequence of keep-layout element i: the last b with num_kv_heads * keep_offsets[b] <= i. */
__device__ int32_t sequence_of(const kvc_plan_view_t &plan, int64_t i) {
  int32_t lo = 0, hi = plan.batch - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (plan.num_kv_heads * plan.keep_offsets[mid] <= i) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/* The move of writer w of `chunk`. Returns true when w is the chunk's first writer and sits
 * mid-row in a sequence that moves: the chunk must then wait for chunk - 1's reads. */
__device__ bool describe_writer(const Pass &pass, int64_t chunk, int w, Move &move) {
  move = Move{-1, -1, -1, -1};
  const kvc_plan_view_t &plan = pass.plan;
  const int64_t i = chunk * pass.chunk + w;
  if (w >= pass.chunk || i >= plan.num_kv_heads * plan.total_kept) return false;
  const int32_t b = sequence_of(plan, i), n = plan.seq_lens[b], k = plan.keep_lens[b];
  if (k == n || !pass.seq_ok[b]) return false;
  const int64_t r = i - plan.num_kv_heads * plan.keep_offsets[b];
  const int32_t h = (int32_t)(r / k), j = (int32_t)(r - (int64_t)h * k);
  const int32_t src = pass.keep[i];
  if (src > j && src < n) {
    const kvc_paged_kv_t &cache = pass.cache;
    const int32_t *pages = kvc_seq_pages(&cache, b);
    const int64_t elem_bytes = kvc_dtype_size(cache.dtype);
    move.from = kvc_slot_offset(&cache, kvc_page_of(&cache, pages, b, src), src, h) * elem_bytes;
    move.to = kvc_slot_offset(&cache, kvc_page_of(&cache, pages, b, j), j, h) * elem_bytes;
    const int64_t extra_row = plan.num_kv_heads * plan.token_offsets[b] + (int64_t)h * n;
    move.extra_from = extra_row + src;
    move.extra_to = extra_row + j;
  }
  return w == 0 && j > 0;
}

/* Column c of a writer: K vectors [0, L), V vectors [L, 2L), then one float per extra. */
template <typename Vec>
__device__ Staged<Vec> load_column(const Pass &pass, const Move &move, int c) {
  Staged<Vec> value;
  const int32_t lanes = pass.kv_lanes;
  if (c < 2 * lanes) {
    const char *pool = static_cast<const char *>(c < lanes ? pass.cache.k : pass.cache.v);
    value.vec = *reinterpret_cast<const Vec *>(pool + move.from + (int64_t)(c % lanes) * sizeof(Vec));
  } else {
    value.extra = pass.extras[c - 2 * lanes][move.extra_from];
  }
  return value;
}

template <typename Vec>
__device__ void store_column(const Pass &pass, const Move &move, int c, const Staged<Vec> &value) {
  const int32_t lanes = pass.kv_lanes;
  if (c < 2 * lanes) {
    char *pool = static_cast<char *>(c < lanes ? pass.cache.k : pass.cache.v);
    *reinterpret_cast<Vec *>(pool + move.to + (int64_t)(c % lanes) * sizeof(Vec)) = value.vec;
  } else {
    pass.extras[c - 2 * lanes][move.extra_to] = value.extra;
  }
}

/* True once chunk's reads are published; the fence orders this block's later writes after them. */
__device__ bool reads_published(const int32_t *flag) {
  const bool done = *reinterpret_cast<const volatile int32_t *>(flag) != 0;
  if (done) __threadfence();
  else __nanosleep(128);
  return done;
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads) compact_kernel(Pass pass) {
  __shared__ Move moves[kThreads];
  __shared__ unsigned long long ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(pass.ticket, 1ull);
  __syncthreads();
  const int64_t chunk = (int64_t)ticket;
  const bool wait = __syncthreads_or(describe_writer(pass, chunk, threadIdx.x, moves[threadIdx.x]));

  const int columns = 2 * pass.kv_lanes + pass.num_extras;
  Staged<Vec> staged[kVectorsPerThread];
#pragma unroll
  for (int v = 0; v < kVectorsPerThread; ++v) {
    const int unit = threadIdx.x + v * kThreads, w = unit / columns;
    if (w < pass.chunk && moves[w].from >= 0) staged[v] = load_column<Vec>(pass, moves[w], unit - w * columns);
  }
  __syncthreads(); /* every source of this chunk is read */
  if (threadIdx.x == 0) {
    __threadfence();
    atomicExch(&pass.reads_done[chunk], 1);
  }
  if (wait)
    while (!__syncthreads_or(threadIdx.x == 0 && reads_published(&pass.reads_done[chunk - 1]))) {
    }
#pragma unroll
  for (int v = 0; v < kVectorsPerThread; ++v) {
    const int unit = threadIdx.x + v * kThreads, w = unit / columns;
    if (w < pass.chunk && moves[w].from >= 0) store_column<Vec>(pass, moves[w], unit - w * columns, staged[v]);
  }
}

/* Widest vector (16, 8, 4, 2 or 1 bytes) that divides the row and every pool address and stride. */
int vector_bytes(const kvc_paged_kv_t &cache) {
  const int64_t elem = kvc_dtype_size(cache.dtype);
  const uint64_t bits = (uint64_t)cache.head_dim * elem | (uint64_t)cache.stride_page * elem |
                        (uint64_t)cache.stride_token * elem | (uint64_t)cache.stride_head * elem |
                        (uint64_t)reinterpret_cast<uintptr_t>(cache.k) | (uint64_t)reinterpret_cast<uintptr_t>(cache.v);
  int bytes = 16;
  while (bits % bytes) bytes /= 2;
  return bytes;
}

/* Writers per chunk: as many as the block stages, at most one per thread (its Move). */
int32_t chunk_writers(int32_t columns) {
  const int32_t fit = kCapacity / columns;
  return fit < kThreads ? fit : kThreads;
}

template <typename Vec>
void launch_pass(Pass &pass, cudaStream_t stream) {
  const int64_t flag_blocks = (pass.chunks + kThreads - 1) / kThreads;
  const int64_t prepare_blocks = flag_blocks > pass.plan.batch ? flag_blocks : pass.plan.batch;
  KVC_LAUNCH(prepare_kernel, dim3((unsigned)prepare_blocks), dim3(kThreads), 0, stream, pass);
  KVC_LAUNCH(compact_kernel<Vec>, dim3((unsigned)pass.chunks), dim3(kThreads), 0, stream, pass);
}

}  // namespace

extern "C" kvc_status_t kvc_compact_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan;
  /* The most chunks any pass has: vectors no narrower than an element, a full set of extras. */
  const int64_t writers = (int64_t)plan.num_kv_heads * plan.total_kept;
  const int64_t max_chunks = (writers + chunk_writers(2 * plan.head_dim + kMaxExtras) - 1) /
                             chunk_writers(2 * plan.head_dim + kMaxExtras);
  int32_t *reads_done = static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * (size_t)max_chunks));
  unsigned long long *ticket = static_cast<unsigned long long *>(kvc_carve(ws, sizeof(unsigned long long)));
  int32_t *seq_ok = static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * (size_t)plan.batch));
  if (!ws->base || plan.total_kept == plan.total_tokens) return KVC_SUCCESS; /* sizing, or nothing moves */

  const kvc_paged_kv_t &cache = *args->cache;
  const int vec = vector_bytes(cache);
  if (vec < kvc_dtype_size(cache.dtype))
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INVALID_VALUE,
                           "kvc_compact: cache->k %p or cache->v %p is not aligned to its %d-byte elements", cache.k,
                           cache.v, kvc_dtype_size(cache.dtype));
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  Pass pass = {};
  pass.plan = plan;
  pass.cache = cache;
  pass.keep = args->keep;
  pass.reads_done = reads_done;
  pass.ticket = ticket;
  pass.seq_ok = seq_ok;
  /* K and V with the first kMaxExtras extras, then the rest of the extras kMaxExtras at a time */
  const int32_t passes = args->num_extras > kMaxExtras ? (args->num_extras + kMaxExtras - 1) / kMaxExtras : 1;
  for (int32_t p = 0; p < passes; ++p) {
    const int32_t first = p * kMaxExtras;
    pass.kv_lanes = p == 0 ? plan.head_dim * kvc_dtype_size(cache.dtype) / vec : 0;
    pass.num_extras = args->num_extras - first < kMaxExtras ? args->num_extras - first : kMaxExtras;
    for (int32_t e = 0; e < pass.num_extras; ++e) pass.extras[e] = args->extras[first + e];
    pass.chunk = chunk_writers(2 * pass.kv_lanes + pass.num_extras);
    pass.chunks = (writers + pass.chunk - 1) / pass.chunk;
    switch (pass.kv_lanes ? vec : 4) {
      case 16: launch_pass<uint4>(pass, stream); break;
      case 8: launch_pass<uint2>(pass, stream); break;
      case 4: launch_pass<uint32_t>(pass, stream); break;
      case 2: launch_pass<uint16_t>(pass, stream); break;
      default: launch_pass<uint8_t>(pass, stream); break;
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_CUDA, "kvc_compact: kernel launch failed: %s",
                           cudaGetErrorString(err));
  return KVC_SUCCESS;
}
