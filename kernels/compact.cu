/*
 * compact.cu - CUDA compaction: for every (layer, sequence b, KV head h) with k_b < n_b and
 * j < k_b, slot j <- slot keep[j] for K, V and the extra per-token fp32 arrays, in place (kvc_compact
 * and kvc_compact_layers in kvcompress.h; byte for byte what kernels/compact_cpu.c does).
 *
 * Work split. Each layer's keep layout (num_kv_heads * total_kept writers; writer j of row (b, h)
 * moves one token into slot j) is cut into chunks of C consecutive writers; a chunk may end one row
 * and start the next. One block per chunk moves every byte of its writers: the K and V rows in
 * vectors of up to 16 bytes (the widest the pools' alignment allows) and the extras. The block reads
 * all its sources into registers, then writes all its destinations. C shrinks until there are
 * about four chunks per resident block (and grows to what a block stages when there are more), so
 * even one short sequence with few heads fills the device.
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
 *     chunk u writes only after chunks r and r + 1 (those before u) have published that all their
 *     reads are done.
 * The publication is a device-scope release store of the chunk's flag by thread 0 after a
 * __syncthreads that follows every thread's loads; the waiting block's thread 0 reads the flag with
 * a device-scope acquire load and a __syncthreads passes that on to the threads that then store.
 * So each read of chunk r happens before every write of chunk u that could overwrite its source
 * (no system-scope fence is needed: the data never leaves the device). Layers never share memory
 * (each has its own pools, keep and extras), nor do rows (a page belongs to one sequence, checked
 * below; heads and pools are disjoint), so chunks of different layers or rows never wait for each
 * other's data.
 *
 * Why the wait cannot deadlock. Blocks take chunk numbers from an atomic ticket in the order they
 * start, not from blockIdx (chunk u of layer l is ticket l * chunks + u), so the blocks holding
 * chunks r, r + 1 < u of the same layer hold smaller tickets and are already running (resident)
 * when chunk u waits for them, and their reads wait on nothing. The wait is a __syncthreads_or
 * loop: in the SIMT emulator blocks in flight interleave at barriers, and a block runs alone only
 * after all lower tickets have finished.
 *
 * Tables checked on the device, before anything moves (the host cannot read them). A first launch
 * resets the flags and an open-addressing hash table of page ids in the workspace; a second checks
 * each sequence's first ceil(n / page_size) entries, 256 per block (a grid of sequences x page
 * chunks, so a long sequence's pages are claimed in parallel): an id outside [0, num_pages) flags
 * KVC_COMPACT_BAD_PAGE_ID, a CSR list that starts below 0 or is too short KVC_COMPACT_SHORT_PAGE_LIST,
 * and every id in range is claimed in the table with one 64-bit compare-and-swap of (page, sequence):
 * a claim that finds the page already there flags KVC_COMPACT_SHARED_PAGE on both sequences (the
 * same sequence twice included), so whichever claim wins, every sequence using a shared page is
 * flagged. A flagged sequence is left untouched, all its heads and extras, in every layer; on CUDA
 * a layer-batched call also flags a layer whose pools are NULL, equal, misaligned, run past the
 * address space or have overlapping K and V rows (KVC_COMPACT_BAD_POOL: the checks the host makes
 * of a single-layer descriptor's pools, kernels/common.h). The flags are the status array the engine reads afterwards. A keep index
 * outside [j, n) moves nothing, so no byte outside the sequence's own pages is read or written
 * whatever the keep array holds (an array that is not ascending may then scramble the sequence's
 * own kept tokens).
 *
 * Out of place (kvc_compact_into): writer j of row (b, h) copies source slot keep[j] (slot j when the
 * sequence keeps all) into slot j of its destination pages. The claim pass claims the destination
 * pages instead (a page claimed twice flags both sequences KVC_COMPACT_DST_OVERLAP), and a third
 * launch looks every source page up among those claims and flags the sequence whose destination it
 * is; source pages are not claimed, so they may be shared. With every remaining destination page
 * disjoint from every source page no K/V write can meet a read, so chunks wait for each other only
 * for the extras, which still move in place.
 */
#include "cuda_compat.cuh"

#include "device_memory.cuh"
#include "common.h"
#include "launch.cuh"
#include "search.cuh"
#include "ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int kVectorsPerThread = 4;                    /* staged in registers per chunk     */
constexpr int kCapacity = kThreads * kVectorsPerThread; /* vectors a block holds at once     */
constexpr int kMaxExtras = 8;                           /* extras moved per pass             */
constexpr int kChunksPerResidentBlock = 4;              /* chunk count the size C aims at    */
constexpr unsigned long long kNoClaim = ~0ull;          /* an empty slot of the page table   */

/* One pass over every layer's keep layout: K and V (kv_lanes > 0, first pass only) plus up to
 * kMaxExtras extras. Everything by value: the kernels read no host memory. */
struct Pass {
  kvc_plan_view_t plan;
  kvc_paged_kv_t cache;     /* layout and page table (k, v: the single layer's pools)             */
  kvc_paged_kv_t dst;       /* out of place: `cache` with the destination table; else == cache    */
  bool out_of_place;
  void *const *k_layers;    /* [num_layers] device arrays of the layers' pools, or NULL            */
  void *const *v_layers;
  const int32_t *keep;
  float *extras[kMaxExtras];
  int32_t num_extras;
  int32_t num_layers;
  int32_t kv_lanes;         /* vectors per K row (and per V row); 0: extras only                  */
  int32_t vec_bytes;        /* bytes per K/V vector                                               */
  kvc_pool_lattice_t lattice; /* the layout's rows, for each layer's K/V overlap check (layered)    */
  int64_t extent_bytes;     /* one pool's extent                                                  */
  int32_t chunk;            /* writers per chunk, C                                               */
  int64_t chunks;           /* per layer                                                          */
  int64_t *first_reader;    /* [layers][chunks] earliest chunk that reads a slot this one writes, or -1 */
  int32_t *reads_done;      /* [layers][chunks] 1 once all the chunk's sources are read           */
  unsigned long long *ticket; /* next chunk number to hand out                                    */
  int32_t *table_status;    /* [batch] page-table flags of each sequence                          */
  int32_t *status;          /* [layers][batch] the status array: table flags | pool flags          */
  unsigned long long *claims; /* [1 << claim_bits] (page << 32 | sequence), or kNoClaim             */
  int32_t claim_bits;
};

/* A writer: keep-layout element i (of one layer) is writer j of row (b, h), which starts at
 * element row_base. */
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

__device__ int64_t writers_per_layer(const kvc_plan_view_t &plan) { return plan.num_kv_heads * plan.total_kept; }

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

__device__ char *pool_of(const Pass &pass, int32_t layer, bool v) {
  if (pass.k_layers) return static_cast<char *>(v ? pass.v_layers[layer] : pass.k_layers[layer]);
  return static_cast<char *>(v ? pass.cache.v : pass.cache.k);
}

/* Resets the ticket, the flags and the readers of a pass; with check_table also the table's flags
 * and claims (the first pass checks the table for the later ones). */
__global__ void __launch_bounds__(kThreads) prepare_kernel(Pass pass, bool check_table) {
  const int64_t start = blockIdx.x * (int64_t)kThreads + threadIdx.x, stride = (int64_t)gridDim.x * kThreads;
  for (int64_t u = start; u < pass.num_layers * pass.chunks; u += stride) {
    pass.reads_done[u] = 0;
    pass.first_reader[u] = -1;
  }
  if (start == 0) *pass.ticket = 0;
  if (!check_table) return;
  for (int64_t b = start; b < pass.plan.batch; b += stride) pass.table_status[b] = 0;
  for (int64_t i = start; pass.claims && i < (int64_t)1 << pass.claim_bits; i += stride) pass.claims[i] = kNoClaim;
}

__device__ uint32_t claim_slot(const Pass &pass, int32_t page) {
  /* multiplicative hash: the high bits of page * 2^32 / phi; the table is at least twice the
   * number of claims, so a probe always ends at an empty slot or the page */
  return (uint32_t)((uint32_t)page * 2654435769u) >> (32 - pass.claim_bits);
}

/* Claims `page` for sequence b (in place, or a destination page out of place); a page claimed
 * before flags both claimants with `flag` (SHARED_PAGE in place, DST_OVERLAP out of place). */
__device__ void claim_page(const Pass &pass, int32_t page, int32_t b, int32_t flag) {
  const unsigned long long mine = (unsigned long long)(uint32_t)page << 32 | (uint32_t)b;
  const uint32_t mask = (1u << pass.claim_bits) - 1u;
  for (uint32_t slot = claim_slot(pass, page);; slot = (slot + 1) & mask) {
    const unsigned long long seen = atomicCAS(&pass.claims[slot], kNoClaim, mine);
    if (seen == kNoClaim) return;
    if ((uint32_t)(seen >> 32) == (uint32_t)page) {
      atomicOr(&pass.table_status[b], flag);
      atomicOr(&pass.table_status[(int32_t)(uint32_t)seen], flag);
      return;
    }
  }
}

/* Out of place, after every destination page is claimed: a source page that is some sequence's
 * destination flags that sequence (its writes would land on rows still to be read). */
__device__ void probe_source_page(const Pass &pass, int32_t page) {
  const uint32_t mask = (1u << pass.claim_bits) - 1u;
  for (uint32_t slot = claim_slot(pass, page);; slot = (slot + 1) & mask) {
    const unsigned long long seen = pass.claims[slot];
    if (seen == kNoClaim) return;
    if ((uint32_t)(seen >> 32) == (uint32_t)page) {
      atomicOr(&pass.table_status[(int32_t)(uint32_t)seen], KVC_COMPACT_DST_OVERLAP);
      return;
    }
  }
}

/* Entry i of sequence b's list in `table` (of the first `need`): its page, or -1 with `bad` or
 * `short_list` ORed into *flags (NULL table: page b, entry 0 only). */
__device__ int32_t list_entry(const kvc_paged_kv_t &table, int32_t b, int32_t need, int64_t i, int32_t bad,
                              int32_t short_list, int32_t *flags) {
  int32_t have = need;
  if (!table.page_table) {
    if (i > 0) return -1;
    if (b < table.num_pages) return b;
    *flags |= bad;
    return -1;
  }
  if (table.page_indptr) {
    const int32_t first = table.page_indptr[b], last = table.page_indptr[b + 1];
    have = first < 0 || last < first ? 0 : last - first < need ? last - first : need;
    if (have < need) *flags |= short_list;
  }
  if (i >= have) return -1;
  const int32_t page = kvc_seq_pages(&table, b)[i];
  if (page >= 0 && page < table.num_pages) return page;
  *flags |= bad;
  return -1;
}

/* Sequence blockIdx.y's page lists, kThreads entries per block (blockIdx.x): each entry checked; in
 * place each source page claimed, out of place each destination page (the sources are probed by
 * probe_sources_kernel once every claim is in). */
__global__ void __launch_bounds__(kThreads) claim_pages_kernel(Pass pass) {
  const int32_t b = blockIdx.y, page_size = pass.cache.page_size;
  const int32_t need = (int32_t)kvc_pages_needed(pass.plan.seq_lens[b], page_size);
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (blockIdx.x * (int64_t)kThreads >= need) return;
  int32_t flags = 0;
  const int32_t page =
      list_entry(pass.cache, b, need, i, KVC_COMPACT_BAD_PAGE_ID, KVC_COMPACT_SHORT_PAGE_LIST, &flags);
  if (!pass.out_of_place) {
    if (page >= 0 && pass.claims) claim_page(pass, page, b, KVC_COMPACT_SHARED_PAGE); /* no table: page b, unique */
  } else {
    const int32_t dst_need = (int32_t)kvc_pages_needed(pass.plan.keep_lens[b], page_size);
    const int32_t dst_page = list_entry(pass.dst, b, dst_need, i, KVC_COMPACT_DST_BAD_PAGE_ID,
                                        KVC_COMPACT_DST_SHORT_PAGE_LIST, &flags);
    if (dst_page >= 0) claim_page(pass, dst_page, b, KVC_COMPACT_DST_OVERLAP);
  }
  if (flags) atomicOr(&pass.table_status[b], flags);
}

/* Out of place, the grid of claim_pages_kernel: every source page in range looked up among the
 * destination claims (a bad source id is flagged there already). */
__global__ void __launch_bounds__(kThreads) probe_sources_kernel(Pass pass) {
  const int32_t b = blockIdx.y, need = (int32_t)kvc_pages_needed(pass.plan.seq_lens[b], pass.cache.page_size);
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (blockIdx.x * (int64_t)kThreads >= need) return;
  int32_t ignored = 0;
  const int32_t page = list_entry(pass.cache, b, need, i, 0, 0, &ignored);
  if (page >= 0) probe_source_page(pass, page);
}

/* One thread per writer of every layer. The first writer of a row whose source lies in chunk u's
 * slots is the earliest reader of u (keep ascending); it records its chunk when that comes before
 * u. One writer per chunk can qualify (see the top comment), so plain stores suffice. The same
 * threads publish the status array: the table's flags, and a layer's bad pools. */
__global__ void __launch_bounds__(kThreads) find_readers_kernel(Pass pass) {
  const int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x, writers = writers_per_layer(pass.plan);
  if (i < (int64_t)pass.num_layers * pass.plan.batch) {
    const int32_t layer = (int32_t)(i / pass.plan.batch), b = (int32_t)(i % pass.plan.batch);
    int32_t flags = pass.table_status[b];
    if (pass.k_layers) { /* what the host checks for a single-layer descriptor's pools */
      const char *k = pool_of(pass, layer, false), *v = pool_of(pass, layer, true);
      const uintptr_t pk = reinterpret_cast<uintptr_t>(k), pv = reinterpret_cast<uintptr_t>(v);
      const uintptr_t last = UINTPTR_MAX - (uintptr_t)pass.extent_bytes;
      if (!k || !v || k == v || (pk | pv) % pass.vec_bytes || pk > last || pv > last ||
          kvc_kv_rows_overlap(&pass.lattice, k, v, pass.extent_bytes, kvc_dtype_size(pass.cache.dtype),
                              pass.cache.head_dim))
        flags |= KVC_COMPACT_BAD_POOL;
    }
    pass.status[i] = flags;
  }
  /* out of place only the extras move in place: without them no chunk waits for another */
  if (i >= pass.num_layers * writers || (pass.out_of_place && pass.num_extras == 0)) return;
  const int64_t layer = i / writers, local = i - layer * writers;
  const Writer w = writer_at(pass.plan, local);
  if (w.k == w.n) return;
  const int32_t source = pass.keep[i];
  if (source <= w.j || source >= w.k) return; /* no move, or a slot nobody writes */
  const int64_t read_chunk = local / pass.chunk, written_chunk = (w.row_base + source) / pass.chunk;
  const bool first_into_chunk = w.j == 0 || (w.row_base + pass.keep[i - 1]) / pass.chunk < written_chunk;
  if (first_into_chunk && read_chunk < written_chunk) pass.first_reader[layer * pass.chunks + written_chunk] = read_chunk;
}

/* The move of writer w of `chunk` of `layer` (none for threads past the chunk, rows that stay and
 * sequences or layers the status array flags). In place a K/V row and the extras move when the
 * source lies past the slot; out of place the K/V row always goes to the destination pages (a
 * sequence that keeps all is copied, slot j <- j) and the extras move in place. */
__device__ Move describe_move(const Pass &pass, int32_t layer, int64_t chunk, int w) {
  Move move = {-1, -1, -1, -1};
  const kvc_plan_view_t &plan = pass.plan;
  const int64_t i = chunk * pass.chunk + w, writers = writers_per_layer(plan);
  if (w >= pass.chunk || i >= writers) return move;
  const Writer writer = writer_at(plan, i);
  const bool keeps_all = writer.k == writer.n;
  if ((keeps_all && !pass.out_of_place) || pass.status[(int64_t)layer * plan.batch + writer.b] != KVC_COMPACT_OK)
    return move;
  const int32_t j = writer.j, b = writer.b, h = writer.h;
  const int32_t source = keeps_all ? j : pass.keep[layer * writers + i];
  if (source < 0 || source >= writer.n) return move;
  const bool moves_in_place = source > j;
  const int64_t elem_bytes = kvc_dtype_size(pass.cache.dtype);
  if (pass.out_of_place || moves_in_place) {
    move.from = kvc_slot_offset(&pass.cache, kvc_page_of(&pass.cache, kvc_seq_pages(&pass.cache, b), b, source), source, h) *
                elem_bytes;
    move.to = kvc_slot_offset(&pass.dst, kvc_page_of(&pass.dst, kvc_seq_pages(&pass.dst, b), b, j), j, h) * elem_bytes;
  }
  if (!keeps_all && moves_in_place) {
    const int64_t extra_row = layer * plan.score_elems + kvc_score_row(&plan, b, h);
    move.extra_from = extra_row + source;
    move.extra_to = extra_row + j;
  }
  return move;
}

/* Whether column c (see load_column) of a writer moves. */
__device__ bool column_moves(const Pass &pass, const Move &move, int c) {
  return c < 2 * pass.kv_lanes ? move.from >= 0 : move.extra_from >= 0;
}

/* Column c of a writer: K vectors [0, L), V vectors [L, 2L), then one float per extra. */
template <typename Vec>
__device__ Staged<Vec> load_column(const Pass &pass, const char *k, const char *v, const Move &move, int c) {
  Staged<Vec> value;
  const int32_t lanes = pass.kv_lanes;
  if (c < 2 * lanes) {
    const char *pool = c < lanes ? k : v;
    value.vec = kvc_load_streaming(reinterpret_cast<const Vec *>(pool + move.from + (int64_t)(c % lanes) * sizeof(Vec)));
  } else {
    value.extra = pass.extras[c - 2 * lanes][move.extra_from];
  }
  return value;
}

template <typename Vec>
__device__ void store_column(const Pass &pass, char *k, char *v, const Move &move, int c, const Staged<Vec> &value) {
  const int32_t lanes = pass.kv_lanes;
  if (c < 2 * lanes) {
    char *pool = c < lanes ? k : v;
    kvc_store_streaming(reinterpret_cast<Vec *>(pool + move.to + (int64_t)(c % lanes) * sizeof(Vec)), value.vec);
  } else {
    pass.extras[c - 2 * lanes][move.extra_to] = value.extra;
  }
}

/* True once chunk u of the layer (flags from `done`) has published its reads; chunks >= limit
 * need no wait. The acquire orders this block's later writes after those reads. */
__device__ bool reads_published(const int32_t *done, int64_t u, int64_t limit) {
  if (u >= limit || kvc_load_acquire(&done[u]) != 0) return true;
  __nanosleep(128);
  return false;
}

template <typename Vec>
__global__ void __launch_bounds__(kThreads) compact_kernel(Pass pass) {
  __shared__ Move moves[kThreads];
  __shared__ unsigned long long ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(pass.ticket, 1ull);
  __syncthreads();
  const int32_t layer = (int32_t)(ticket / pass.chunks);
  const int64_t chunk = (int64_t)(ticket % pass.chunks);
  const int64_t reader = pass.first_reader[layer * pass.chunks + chunk];
  int32_t *done = pass.reads_done + layer * pass.chunks;
  char *k = pool_of(pass, layer, false), *v = pool_of(pass, layer, true);
  moves[threadIdx.x] = describe_move(pass, layer, chunk, threadIdx.x);
  __syncthreads();

  const int columns = 2 * pass.kv_lanes + pass.num_extras;
  Staged<Vec> staged[kVectorsPerThread];
#pragma unroll
  for (int u = 0; u < kVectorsPerThread; ++u) {
    const int unit = threadIdx.x + u * kThreads, w = unit / columns;
    if (w < pass.chunk && column_moves(pass, moves[w], unit - w * columns))
      staged[u] = load_column<Vec>(pass, k, v, moves[w], unit - w * columns);
  }
  __syncthreads(); /* every source of this chunk is read */
  if (threadIdx.x == 0) kvc_store_release(&done[chunk], 1);
  if (reader >= 0) /* the readers of this chunk's slots are in chunks reader and reader + 1 */
    while (!__syncthreads_or(threadIdx.x == 0 && reads_published(done, reader, chunk) &&
                             reads_published(done, reader + 1, chunk))) {
    }
#pragma unroll
  for (int u = 0; u < kVectorsPerThread; ++u) {
    const int unit = threadIdx.x + u * kThreads, w = unit / columns;
    if (w < pass.chunk && column_moves(pass, moves[w], unit - w * columns))
      store_column<Vec>(pass, k, v, moves[w], unit - w * columns, staged[u]);
  }
}

/* Widest vector (16, 8, 4, 2 or 1 bytes) that divides the row, every stride and, for a
 * single-layer call, the pool addresses (a layer-batched call checks its pools on the device). */
int vector_bytes(const kvc_paged_kv_t &cache, bool layered) {
  const uint64_t elem = (uint64_t)kvc_dtype_size(cache.dtype);
  uint64_t bits = (uint64_t)cache.head_dim * elem | (uint64_t)cache.stride_page * elem |
                  (uint64_t)cache.stride_token * elem | (uint64_t)cache.stride_head * elem;
  if (!layered)
    bits |= (uint64_t)reinterpret_cast<uintptr_t>(cache.k) | (uint64_t)reinterpret_cast<uintptr_t>(cache.v);
  int bytes = 16;
  while (bits % bytes) bytes /= 2;
  return bytes;
}

/* Writers per chunk: about kChunksPerResidentBlock chunks per resident block over all layers, at
 * least one writer, at most what the block stages (and one Move per thread). */
int32_t chunk_writers(int32_t columns, int64_t all_writers, int32_t resident_blocks) {
  const int32_t fit = kCapacity / columns < kThreads ? kCapacity / columns : kThreads;
  const int64_t target = (int64_t)kChunksPerResidentBlock * (resident_blocks > 0 ? resident_blocks : 1);
  const int64_t spread = (all_writers + target - 1) / target;
  return spread < 1 ? 1 : spread < fit ? (int32_t)spread : fit;
}

/* log2 of the claim table's slots: a power of two at least twice the claims (and 2). */
int32_t claim_bits_for(int64_t claims) {
  int32_t bits = 1;
  while (((int64_t)1 << bits) < 2 * claims) ++bits;
  return bits;
}

template <typename Vec>
void launch_pass(const Pass &pass, bool check_table, int32_t most_pages, cudaStream_t stream) {
  const int64_t writers = (int64_t)pass.num_layers * pass.plan.num_kv_heads * pass.plan.total_kept;
  const int64_t layer_chunks = (int64_t)pass.num_layers * pass.chunks;
  const int64_t slots = check_table && pass.claims ? (int64_t)1 << pass.claim_bits : 0;
  int64_t resets = layer_chunks > slots ? layer_chunks : slots;
  resets = resets > pass.plan.batch ? resets : pass.plan.batch;
  KVC_LAUNCH(prepare_kernel, dim3((unsigned)((resets + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream, pass,
             check_table);
  const dim3 lists((unsigned)((most_pages + kThreads - 1) / kThreads), (unsigned)pass.plan.batch);
  if (check_table) KVC_LAUNCH(claim_pages_kernel, lists, dim3(kThreads), 0, stream, pass);
  if (check_table && pass.out_of_place) KVC_LAUNCH(probe_sources_kernel, lists, dim3(kThreads), 0, stream, pass);
  const int64_t statuses = (int64_t)pass.num_layers * pass.plan.batch, threads = writers > statuses ? writers : statuses;
  KVC_LAUNCH(find_readers_kernel, dim3((unsigned)((threads + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream, pass);
  KVC_LAUNCH(compact_kernel<Vec>, dim3((unsigned)layer_chunks), dim3(kThreads), 0, stream, pass);
}

}  // namespace

extern "C" kvc_status_t kvc_compact_cuda_geometry(int32_t *resident_blocks, char *detail, size_t cap) {
  return kvc_resident_blocks(compact_kernel<uint4>, kThreads, 0, resident_blocks, "compaction", detail, cap);
}

extern "C" kvc_status_t kvc_compact_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan;
  const int32_t layers = args->num_layers;
  /* The most chunks a layer can have: C is smallest with the narrowest vectors (one element) and
   * a full set of extras, and for one layer (more layers spread over more chunks of the same C). */
  const int64_t writers = (int64_t)plan.num_kv_heads * plan.total_kept;
  const int32_t fewest = chunk_writers(2 * plan.head_dim + kMaxExtras, writers, plan.compact_resident_blocks);
  const size_t max_chunks = (size_t)((writers + fewest - 1) / fewest) * (size_t)layers;
  int64_t *first_reader = static_cast<int64_t *>(kvc_carve(ws, sizeof(int64_t) * max_chunks));
  int32_t *reads_done = static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * max_chunks));
  unsigned long long *ticket = static_cast<unsigned long long *>(kvc_carve(ws, sizeof(unsigned long long)));
  int32_t *table_status = static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * (size_t)plan.batch));
  /* at most one claim per token (page_size 1) */
  unsigned long long *claims = static_cast<unsigned long long *>(
      kvc_carve(ws, sizeof(unsigned long long) * ((size_t)1 << claim_bits_for(plan.total_tokens))));
  if (!ws->base || !args->keep) return KVC_SUCCESS; /* sizing */

  const kvc_plan_view_t &host = *args->host_plan;
  const kvc_paged_kv_t &cache = *args->cache;
  const bool layered = args->layers != nullptr;
  const int vec = vector_bytes(cache, layered);
  if (vec < kvc_dtype_size(cache.dtype))
    return kvc_fail_detail(args->detail, args->detail_cap, KVC_ERROR_INVALID_VALUE,
                           "kvc_compact: cache->k %p or cache->v %p is not aligned to its %d-byte elements", cache.k,
                           cache.v, kvc_dtype_size(cache.dtype));
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  Pass pass = {};
  pass.plan = plan;
  pass.cache = cache;
  pass.out_of_place = args->dst_table != nullptr;
  pass.dst = pass.out_of_place ? kvc_with_table(&cache, args->dst_table) : cache;
  pass.k_layers = layered ? args->layers->k : nullptr;
  pass.v_layers = layered ? args->layers->v : nullptr;
  pass.keep = args->keep;
  pass.num_layers = layers;
  pass.vec_bytes = vec;
  pass.lattice = kvc_pool_lattice(&cache, plan.num_kv_heads);
  pass.extent_bytes = (plan.head_dim + pass.lattice.reach[3]) * (int64_t)kvc_dtype_size(cache.dtype);
  pass.first_reader = first_reader;
  pass.reads_done = reads_done;
  pass.ticket = ticket;
  pass.table_status = table_status;
  pass.status = args->compact_status;
  /* the claims the tables can make: at most one per page a sequence uses (in place) or writes (out of
   * place: at most one per kept token, as many as the table has slots for) */
  int64_t used = 0;
  const int32_t most_pages = (int32_t)kvc_pages_needed(host.max_seq_len, cache.page_size);
  for (int32_t b = 0; b < host.batch; ++b)
    used += kvc_pages_needed(pass.out_of_place ? host.keep_lens[b] : host.seq_lens[b], cache.page_size);
  pass.claims = cache.page_table || pass.out_of_place ? claims : nullptr;
  pass.claim_bits = claim_bits_for(used);
  /* K and V with the first kMaxExtras extras, then the rest of the extras kMaxExtras at a time. The
   * table is checked and the status published even when nothing moves. */
  const int32_t passes = args->num_extras > kMaxExtras ? (args->num_extras + kMaxExtras - 1) / kMaxExtras : 1;
  for (int32_t p = 0; p < passes; ++p) {
    const int32_t first = p * kMaxExtras;
    pass.kv_lanes = p == 0 ? plan.head_dim * kvc_dtype_size(cache.dtype) / vec : 0;
    pass.num_extras = args->num_extras - first < kMaxExtras ? args->num_extras - first : kMaxExtras;
    for (int32_t e = 0; e < pass.num_extras; ++e) pass.extras[e] = args->extras[first + e];
    pass.chunk = chunk_writers(2 * pass.kv_lanes + pass.num_extras, writers * layers, plan.compact_resident_blocks);
    pass.chunks = (writers + pass.chunk - 1) / pass.chunk;
    switch (pass.kv_lanes ? vec : 4) {
      case 16: launch_pass<uint4>(pass, p == 0, most_pages, stream); break;
      case 8: launch_pass<uint2>(pass, p == 0, most_pages, stream); break;
      case 4: launch_pass<uint32_t>(pass, p == 0, most_pages, stream); break;
      case 2: launch_pass<uint16_t>(pass, p == 0, most_pages, stream); break;
      default: launch_pass<uint8_t>(pass, p == 0, most_pages, stream); break;
    }
  }
  return kvc_launch_status(args, "kvc_compact");
}
