/*
 * compact.cu - CUDA compaction: for every (sequence b, KV head h) with k_b < n_b and j < k_b,
 * slot j <- slot keep[j] for K, V and the extra per-token fp32 arrays, in place (kvc_compact in
 * kvcompress.h; byte for byte what kernels/compact_cpu.c does).
 *
 * Work split. The keep layout of the whole batch (num_kv_heads * total_kept writers; writer j of
 * row (b, h) moves one token into slot j) is cut into chunks of C consecutive writers; a chunk may
 * end one row and start the next. One block per chunk moves every byte of its writers: the K and V
 * rows in vectors of up to 16 bytes (the widest the pools' alignment allows) and the extras. The
 * block reads all its sources into registers, then writes all its destinations. Thousands of
 * chunks keep the device busy even for one sequence with few heads.
 *
 * Why in place is race-free. In a row keep is strictly ascending, so keep[j] >= j: slot s is read
 * only by the writer j with keep[j] = s (so j <= s) and written only by writer s, i.e. by the
 * chunk holding writer s. Each slot a chunk u writes must be read before it is overwritten:
 *   - by writers of chunk u: every read of the block comes before a __syncthreads, every write
 *     after it;
 *   - by writers of later chunks: none, they are > s;
 *   - by writers of earlier chunks: the readers of u's slots of one row have distinct sources in
 *     a range of at most C slots, so (keep ascending) they are at most C consecutive writers and
 *     lie in at most two consecutive chunks, r and r + 1. Only the row the chunk starts in can
 *     have such readers (a row that starts inside u has all its writers in u or later). A pass
 *     before the move finds r for every chunk (the first writer whose source lies in it), and
 *     chunk u writes only after chunks r and r + 1 (those before u) have published, through a
 *     flag each in the workspace, that all their reads are done.
 * Rows never share memory (a page belongs to one sequence; heads and pools are disjoint).
 *
 * Why the wait cannot deadlock. Blocks take chunk numbers from an atomic ticket in the order they
 * start, not from blockIdx, so the blocks holding chunks r, r + 1 < u are already running
 * (resident) when chunk u waits for them, and their reads wait on nothing. The wait is a
 * __syncthreads_or loop: in the SIMT emulator blocks in flight interleave at barriers, and a
 * block runs alone only after all lower tickets have finished.
 *
 * Page ids are checked on the device before anything moves: a sequence whose first
 * ceil(n / page_size) page ids are not all in [0, num_pages) (or whose CSR list is shorter) is
 * left untouched, all its heads and extras. A keep index outside [j, n) moves nothing, so no byte
 * outside the sequence's own pages is read or written whatever the keep array holds (an array
 * that is not ascending may then scramble the sequence's own kept tokens).
 */
#include "cuda_compat.cuh"

#include "common.h"
#include "launch.cuh"
#include "search.cuh"
#include "ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int kVectorsPerThread = 4;                    /* staged in registers per chunk     */
constexpr int kCapacity = kThreads * kVectorsPerThread; /* vectors a block holds at once     */
constexpr int kMaxExtras = 8;                           /* extras moved per pass             */

/* One pass over the keep layout: K and V (kv_lanes > 0, first pass only) plus up to kMaxExtras
 * extras. Everything by value: the kernels read no host memory. */
struct Pass {
  kvc_plan_view_t plan;
  kvc_paged_kv_t cache;
  const int32_t *keep;
  float *extras[kMaxExtras];
  int32_t num_extras;
  int32_t kv_lanes; /* vectors per K row (and per V row); 0: extras only                         */
  int32_t chunk;    /* writers per chunk, C                                                       */
  int64_t chunks;
  int64_t *first_reader;      /* [chunks] earliest chunk that reads a slot this chunk writes, or -1 */
  int32_t *reads_done;        /* [chunks] 1 once all the chunk's sources are read                 */
  unsigned long long *ticket; /* next chunk number to hand out                                    */
  int32_t *seq_ok;            /* [batch] 1 when the sequence's page list may be followed           */
};

/* A writer: keep-layout element i is writer j of row (b, h), which starts at element row_base. */
struct Writer {
  int32_t b, h, j, n, k;
  int64_t row_base;
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

__device__ Writer writer_at(const kvc_plan_view_t &plan, int64_t i) {
  const int32_t lo = last_offset_at_or_below(plan.keep_offsets, plan.batch, plan.num_kv_heads, i);
  Writer w;
  w.b = lo;
  w.n = plan.seq_lens[lo];
  w.k = plan.keep_lens[lo];
  const int64_t r = i - plan.num_kv_heads * plan.keep_offsets[lo];
  w.h = (int32_t)(r / w.k);
  w.j = (int32_t)(r - (int64_t)w.h * w.k);
  w.row_base = i - w.j;
  return w;
}

/* Resets the ticket, the flags and the readers of a pass, and marks each sequence whose page list
 * the moves may follow: every id it would use in [0, num_pages), and for CSR enough entries. */
__global__ void __launch_bounds__(kThreads) prepare_kernel(Pass pass) {
  for (int64_t u = blockIdx.x * (int64_t)kThreads + threadIdx.x; u < pass.chunks; u += (int64_t)gridDim.x * kThreads) {
    pass.reads_done[u] = 0;
    pass.first_reader[u] = -1;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *pass.ticket = 0;
  const kvc_paged_kv_t &cache = pass.cache;
  for (int32_t b = blockIdx.x; b < pass.plan.batch; b += gridDim.x) {
    const int32_t need = (pass.plan.seq_lens[b] + cache.page_size - 1) / cache.page_size;
    bool ok = true;
    if (!cache.page_table) {
      ok = b < cache.num_pages;
    } else {
      if (cache.page_indptr) ok = cache.page_indptr[b] >= 0 && cache.page_indptr[b + 1] - cache.page_indptr[b] >= need;
      const int32_t *pages = kvc_seq_pages(&cache, b);
      for (int32_t i = threadIdx.x; ok && i < need; i += kThreads) ok = pages[i] >= 0 && pages[i] < cache.num_pages;
    }
    ok = __syncthreads_and(ok);
    if (threadIdx.x == 0) pass.seq_ok[b] = ok;
  }
}

/* One thread per writer. The first writer of a row whose source lies in chunk u's slots is the
 * earliest reader of u (keep ascending); it records its chunk when that comes before u. One
 * writer per chunk can qualify (see the top comment), so plain stores suffice. */
__global__ void __launch_bounds__(kThreads) find_readers_kernel(Pass pass) {
  const int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x;
  if (i >= pass.plan.num_kv_heads * pass.plan.total_kept) return;
  const Writer w = writer_at(pass.plan, i);
  if (w.k == w.n) return;
  const int32_t source = pass.keep[i];
  if (source <= w.j || source >= w.k) return; /* no move, or a slot nobody writes */
  const int64_t read_chunk = i / pass.chunk, written_chunk = (w.row_base + source) / pass.chunk;
  const bool first_into_chunk = w.j == 0 || (w.row_base + pass.keep[i - 1]) / pass.chunk < written_chunk;
  if (first_into_chunk && read_chunk < written_chunk) pass.first_reader[written_chunk] = read_chunk;
}

/* The move of writer w of `chunk` (none for threads past the chunk or rows that stay). */
__device__ Move describe_move(const Pass &pass, int64_t chunk, int w) {
  Move move = {-1, -1, -1, -1};
  const kvc_plan_view_t &plan = pass.plan;
  const int64_t i = chunk * pass.chunk + w;
  if (w >= pass.chunk || i >= plan.num_kv_heads * plan.total_kept) return move;
  const Writer writer = writer_at(plan, i);
  if (writer.k == writer.n || !pass.seq_ok[writer.b]) return move;
  const int32_t source = pass.keep[i], j = writer.j, b = writer.b, h = writer.h;
  if (source <= j || source >= writer.n) return move;
  const kvc_paged_kv_t &cache = pass.cache;
  const int32_t *pages = kvc_seq_pages(&cache, b);
  const int64_t elem_bytes = kvc_dtype_size(cache.dtype);
  move.from = kvc_slot_offset(&cache, kvc_page_of(&cache, pages, b, source), source, h) * elem_bytes;
  move.to = kvc_slot_offset(&cache, kvc_page_of(&cache, pages, b, j), j, h) * elem_bytes;
  const int64_t extra_row = plan.num_kv_heads * plan.token_offsets[b] + (int64_t)h * writer.n;
  move.extra_from = extra_row + source;
  move.extra_to = extra_row + j;
  return move;
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

/* True once chunk u's reads are published (chunks >= limit need no wait); the fence orders this
 * block's later writes after them. */
__device__ bool reads_published(const Pass &pass, int64_t u, int64_t limit) {
  const bool done = u >= limit || *reinterpret_cast<const volatile int32_t *>(&pass.reads_done[u]) != 0;
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
  const int64_t chunk = (int64_t)ticket, reader = pass.first_reader[chunk];
  moves[threadIdx.x] = describe_move(pass, chunk, threadIdx.x);
  __syncthreads();

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
  if (reader >= 0) /* the readers of this chunk's slots are in chunks reader and reader + 1 */
    while (!__syncthreads_or(threadIdx.x == 0 && reads_published(pass, reader, chunk) &&
                             reads_published(pass, reader + 1, chunk))) {
    }
#pragma unroll
  for (int v = 0; v < kVectorsPerThread; ++v) {
    const int unit = threadIdx.x + v * kThreads, w = unit / columns;
    if (w < pass.chunk && moves[w].from >= 0) store_column<Vec>(pass, moves[w], unit - w * columns, staged[v]);
  }
}

/* Widest vector (16, 8, 4, 2 or 1 bytes) that divides the row and every pool address and stride. */
int vector_bytes(const kvc_paged_kv_t &cache) {
  const uint64_t elem = (uint64_t)kvc_dtype_size(cache.dtype);
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
void launch_pass(const Pass &pass, cudaStream_t stream) {
  const int64_t writers = pass.plan.num_kv_heads * pass.plan.total_kept;
  const int64_t chunk_blocks = (pass.chunks + kThreads - 1) / kThreads;
  const int64_t prepare_blocks = chunk_blocks > pass.plan.batch ? chunk_blocks : pass.plan.batch;
  KVC_LAUNCH(prepare_kernel, dim3((unsigned)prepare_blocks), dim3(kThreads), 0, stream, pass);
  KVC_LAUNCH(find_readers_kernel, dim3((unsigned)((writers + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
             pass);
  KVC_LAUNCH(compact_kernel<Vec>, dim3((unsigned)pass.chunks), dim3(kThreads), 0, stream, pass);
}

}  // namespace

extern "C" kvc_status_t kvc_compact_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan;
  /* The most chunks any pass has: vectors no narrower than an element, a full set of extras. */
  const int64_t writers = (int64_t)plan.num_kv_heads * plan.total_kept;
  const int32_t fewest_writers = chunk_writers(2 * plan.head_dim + kMaxExtras);
  const size_t max_chunks = (size_t)((writers + fewest_writers - 1) / fewest_writers);
  int64_t *first_reader = static_cast<int64_t *>(kvc_carve(ws, sizeof(int64_t) * max_chunks));
  int32_t *reads_done = static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * max_chunks));
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
  pass.first_reader = first_reader;
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
  return kvc_launch_status(args, "kvc_compact");
}
