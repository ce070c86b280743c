/*
 * select.cu - CUDA selection: per (sequence, KV head) the kept token indices, ascending, by the
 * selection semantics in kvcompress.h; bit for bit what kernels/select_cpu.c keeps.
 *
 * Every token's 64-bit key (kvc_select_key: score bits high, position low) is distinct, so "the top
 * m of a candidate set" is exactly the candidates whose key is >= some threshold: a row is selected
 * by finding thresholds, never by sorting.
 *   1. Protected tokens are kept.
 *   2. Per partition, the threshold of its top (quota - protected_count) unprotected tokens.
 *   3. The threshold of the top `fill` tokens that 1 and 2 left out.
 *   4. One ascending sweep writes every token that is protected or passes its partition's or the
 *      fill threshold; a stable scan gives each its output slot, so indices come out in order.
 * A threshold comes from an MSB-first radix select over 8-bit digits of the key: one pass over the
 * candidates per digit builds a shared-memory histogram (runs of equal digits cost one atomic),
 * until the digit's bin is taken whole (random scores: ~3 passes; ties go on into the position
 * digits). Nothing proportional to n is kept on chip: every pass re-reads the row's scores.
 *
 * Rows of at most kWarpRowMax tokens are selected by one warp each, kWarpsPerBlock rows per block;
 * longer rows (up to 2^31 - 1 tokens) by a block of kBlockThreads. TOVA selects each sequence once,
 * from head 0's row, and writes the result to every KV head, as the CPU backend does.
 */
#include "cuda_compat.cuh"

#include "common.h"
#include "launch.cuh"
#include "ops.h"

namespace {

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kWarpRowMax = 512;   /* a warp re-reads at most 16 tokens per lane per pass */
constexpr int kWarpsPerBlock = 8;  /* short rows per block */
constexpr int kBlockThreads = 1024;
constexpr int kItems = 4;          /* consecutive tokens per thread in the output sweep */
constexpr uint64_t kSelectNone = ~0ull; /* above every key (+inf's is 0xff800000'xxxxxxxx) */
constexpr uint64_t kSelectAll = 0;
static_assert(64 % kDigitBits == 0 && kBins % 32 == 0, "digits tile the key; bins tile a warp");

/* Per-row state a group shares through shared memory. */
struct GroupShared {
  int32_t histogram[kBins];
  int32_t digit, need, bin;     /* find_digit's answer */
  int32_t warp_totals[32];      /* output sweep: kept tokens per warp of the chunk */
  int32_t warp_offsets[32];     /* ... and their exclusive prefix sums */
  int32_t chunk_total;
};

/* The threads that select one row together: one warp, or the whole block. */
template <int kThreads>
struct RowGroup {
  static constexpr int kWarps = kThreads / 32;
  int rank; /* thread index in the group */
  __device__ int warp() const { return rank / 32; }
  __device__ int lane() const { return rank % 32; }
  __device__ static void sync() {
    if constexpr (kThreads == 32)
      __syncwarp();
    else
      __syncthreads();
  }
};

/* One (sequence, head) row as the selection reads it. */
struct Row {
  const float *scores;
  const uint32_t *protect;         /* the sequence's protected bitmask */
  const kvc_partition_t *parts;    /* the sequence's partitions, FAIR ones first */
  uint64_t *thresholds;            /* per partition: its quota threshold (workspace) */
  int32_t n, num_parts, num_fair;
};

__device__ inline bool is_protected(const Row &row, int32_t t) { return (row.protect[t >> 5] >> (t & 31)) & 1u; }

/* Index of t's partition. `fair` is the calling thread's cursor: the first FAIR partition ending
 * after the thread's previous token (a thread visits its tokens in ascending order). */
__device__ inline int32_t partition_of(const Row &row, int32_t t, int32_t &fair) {
  while (fair < row.num_fair && row.parts[fair].end <= t) ++fair;
  return fair < row.num_fair && row.parts[fair].start <= t ? fair : row.num_fair; /* else implicit */
}

/* Histogram of the digit at `shift` of the candidates in [lo, hi) whose higher digits equal
 * prefix's. candidate(t, key, fair_cursor) says whether token t competes. */
template <int kThreads, class Candidate>
__device__ void count_digits(RowGroup<kThreads> g, const Row &row, int32_t lo, int32_t hi, int32_t first_fair,
                             int shift, uint64_t prefix, const Candidate &candidate, int32_t *histogram) {
  const uint64_t high_mask = shift + kDigitBits >= 64 ? 0 : ~0ull << (shift + kDigitBits);
  int32_t fair = first_fair, run_digit = 0, run_count = 0; /* equal digits in a row: one atomic */
#pragma unroll 4
  for (int64_t t = lo + g.rank; t < hi; t += kThreads) {
    const uint64_t key = kvc_select_key(row.scores[t], (int32_t)t);
    if ((key & high_mask) != prefix || !candidate((int32_t)t, key, fair)) continue;
    const int32_t digit = (int32_t)(key >> shift) & (kBins - 1);
    if (digit != run_digit && run_count) {
      atomicAdd(&histogram[run_digit], run_count);
      run_count = 0;
    }
    run_digit = digit;
    ++run_count;
  }
  if (run_count) atomicAdd(&histogram[run_digit], run_count);
}

/* Run by one warp: the digit whose bin holds the need-th largest counted key (bins read from the
 * top), the rank left inside that bin and the bin's size, into sh. Lane l owns kBins/32 bins. */
__device__ void find_digit(GroupShared &sh, int32_t need, int lane) {
  constexpr int kPerLane = kBins / 32;
  const int top = kBins - 1 - lane * kPerLane;
  int32_t mine = 0;
  for (int i = 0; i < kPerLane; ++i) mine += sh.histogram[top - i];
  int32_t above = mine; /* inclusive scan over lanes: lower lanes own higher digits */
  for (int d = 1; d < 32; d *= 2) {
    const int32_t v = __shfl_up_sync(0xffffffffu, above, d);
    if (lane >= d) above += v;
  }
  above -= mine;
  if (above >= need || above + mine < need) return; /* exactly one lane holds the need-th key */
  for (int i = 0; i < kPerLane; ++i) {
    const int32_t count = sh.histogram[top - i];
    if (above + count >= need) {
      sh.digit = top - i;
      sh.need = need - above;
      sh.bin = count;
      return;
    }
    above += count;
  }
}

/* Threshold of the top `need` candidates of [lo, hi), 1 <= need < their count: the keys >= it are
 * exactly those. Every thread of the group calls it and gets the same value. */
template <int kThreads, class Candidate>
__device__ uint64_t top_threshold(RowGroup<kThreads> g, const Row &row, int32_t lo, int32_t hi, int32_t first_fair,
                                  int32_t need, const Candidate &candidate, GroupShared &sh) {
  uint64_t prefix = 0;
  for (int shift = 64 - kDigitBits; shift >= 0; shift -= kDigitBits) {
    for (int i = g.rank; i < kBins; i += kThreads) sh.histogram[i] = 0;
    g.sync();
    count_digits(g, row, lo, hi, first_fair, shift, prefix, candidate, sh.histogram);
    g.sync();
    if (g.warp() == 0) find_digit(sh, need, g.lane());
    g.sync();
    /* sh is rewritten two barriers later, after every thread has read it */
    prefix |= (uint64_t)sh.digit << shift;
    if (sh.need == sh.bin) break; /* the bin is taken whole: every candidate >= prefix is in */
    need = sh.need;
  }
  return prefix;
}

/* Threshold of a selection of `need` out of `count` candidates, skipping the passes when trivial. */
template <int kThreads, class Candidate>
__device__ uint64_t select_threshold(RowGroup<kThreads> g, const Row &row, int32_t lo, int32_t hi,
                                     int32_t first_fair, int32_t need, int32_t count, const Candidate &candidate,
                                     GroupShared &sh) {
  if (need <= 0) return kSelectNone;
  if (need >= count) return kSelectAll;
  return top_threshold(g, row, lo, hi, first_fair, need, candidate, sh);
}

/* Exclusive prefix sum of `count` over the group, in rank order; *total gets the sum. */
template <int kThreads>
__device__ int32_t group_exclusive_scan(RowGroup<kThreads> g, int32_t count, GroupShared &sh, int32_t *total) {
  int32_t inclusive = count;
  for (int d = 1; d < 32; d *= 2) {
    const int32_t v = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (g.lane() >= d) inclusive += v;
  }
  if constexpr (RowGroup<kThreads>::kWarps == 1) {
    *total = __shfl_sync(0xffffffffu, inclusive, 31);
    return inclusive - count;
  } else {
    if (g.lane() == 31) sh.warp_totals[g.warp()] = inclusive;
    g.sync();
    if (g.warp() == 0) {
      const int32_t warp_total = g.lane() < RowGroup<kThreads>::kWarps ? sh.warp_totals[g.lane()] : 0;
      int32_t before = warp_total;
      for (int d = 1; d < 32; d *= 2) {
        const int32_t v = __shfl_up_sync(0xffffffffu, before, d);
        if (g.lane() >= d) before += v;
      }
      sh.warp_offsets[g.lane()] = before - warp_total;
      if (g.lane() == 31) sh.chunk_total = before;
    }
    g.sync();
    /* warp_totals is rewritten after the next barrier's readers are done; warp_offsets after the
     * next chunk's first barrier, which every reader below must pass first */
    *total = sh.chunk_total;
    return sh.warp_offsets[g.warp()] + inclusive - count;
  }
}

/* Selects row (b, h) of the row_heads rows per sequence and writes it to the keep rows of heads
 * h .. h + num_kv_heads / row_heads - 1 (TOVA: row_heads 1, every head). */
template <int kThreads>
__device__ void select_row(RowGroup<kThreads> g, const kvc_plan_view_t &plan, const float *scores, int32_t *keep,
                           uint64_t *thresholds, int32_t b, int32_t h, int32_t row_heads, GroupShared &sh) {
  const int32_t n = plan.seq_lens[b], k = plan.keep_lens[b], copies = plan.num_kv_heads / row_heads;
  int32_t *out = keep + plan.num_kv_heads * plan.keep_offsets[b] + (int64_t)h * k;
  if (k == n) { /* budget >= length: the row keeps everything */
    for (int32_t t = g.rank; t < n; t += kThreads)
      for (int32_t c = 0; c < copies; ++c) out[(int64_t)c * k + t] = t;
    return;
  }
  const int32_t part0 = plan.part_indptr[b], num_parts = plan.part_indptr[b + 1] - part0;
  Row row;
  row.scores = scores + plan.num_kv_heads * plan.token_offsets[b] + (int64_t)h * n;
  row.protect = plan.protect_bits + plan.protect_word_offsets[b];
  row.parts = plan.parts + part0;
  row.thresholds = thresholds + (int64_t)part0 * row_heads + (int64_t)h * num_parts;
  row.n = n;
  row.num_parts = num_parts;
  row.num_fair = num_parts - (row.parts[num_parts - 1].implicit ? 1 : 0);

  /* 2: partitions are disjoint, so a partition's candidates are its unprotected tokens */
  for (int32_t p = 0; p < num_parts; ++p) {
    const kvc_partition_t part = row.parts[p];
    const int32_t need = part.quota - part.protected_count, count = part.length - part.protected_count;
    uint64_t threshold;
    if (part.implicit) {
      const int32_t implicit = row.num_fair;
      threshold = select_threshold(g, row, 0, n, 0, need, count,
                                   [&](int32_t t, uint64_t, int32_t &fair) {
                                     return !is_protected(row, t) && partition_of(row, t, fair) == implicit;
                                   },
                                   sh);
    } else {
      threshold = select_threshold(g, row, part.start, part.end, p, need, count,
                                   [&](int32_t t, uint64_t, int32_t &) { return !is_protected(row, t); }, sh);
    }
    if (g.rank == 0) row.thresholds[p] = threshold;
  }
  g.sync(); /* the thresholds are visible to the whole group */

  /* 3: the fill chooses among the tokens not kept yet; F of the n are (sum of quotas) */
  const int32_t fill = plan.fill[b];
  const uint64_t fill_threshold = select_threshold(
      g, row, 0, n, 0, fill, n - (k - fill),
      [&](int32_t t, uint64_t key, int32_t &fair) {
        return !is_protected(row, t) && key < row.thresholds[partition_of(row, t, fair)];
      },
      sh);

  /* 4: stable compaction, kItems consecutive tokens per thread per chunk */
  int32_t written = 0, fair = 0;
  for (int64_t c0 = 0; c0 < n; c0 += (int64_t)kThreads * kItems) {
    const int64_t first = c0 + (int64_t)g.rank * kItems;
    unsigned kept = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int32_t t = (int32_t)(first + i);
      if (first + i >= n) break;
      const uint64_t key = kvc_select_key(row.scores[t], t);
      if (is_protected(row, t) || key >= row.thresholds[partition_of(row, t, fair)] || key >= fill_threshold)
        kept |= 1u << i;
    }
    int32_t chunk_total;
    int32_t slot = written + group_exclusive_scan(g, __popc(kept), sh, &chunk_total);
    for (int i = 0; i < kItems; ++i)
      if (kept >> i & 1u) {
        for (int32_t c = 0; c < copies; ++c) out[(int64_t)c * k + slot] = (int32_t)(first + i);
        ++slot;
      }
    written += chunk_total;
  }
}

/* One warp per row of at most kWarpRowMax tokens. Rows: (b, h) = (row / row_heads, row % row_heads). */
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    select_short_rows_kernel(kvc_plan_view_t plan, const float *scores, int32_t *keep, uint64_t *thresholds,
                             int32_t row_heads) {
  __shared__ GroupShared shared[kWarpsPerBlock];
  const int warp = threadIdx.x / 32;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  if (row >= (int64_t)plan.batch * row_heads) return;
  const int32_t b = (int32_t)(row / row_heads), h = (int32_t)(row % row_heads);
  if (plan.seq_lens[b] > kWarpRowMax) return;
  select_row(RowGroup<32>{(int)threadIdx.x % 32}, plan, scores, keep, thresholds, b, h, row_heads,
             shared[warp]);
}

/* One block per row longer than kWarpRowMax. */
__global__ void __launch_bounds__(kBlockThreads)
    select_long_rows_kernel(kvc_plan_view_t plan, const float *scores, int32_t *keep, uint64_t *thresholds,
                            int32_t row_heads) {
  __shared__ GroupShared shared;
  const int32_t b = (int32_t)(blockIdx.x / row_heads), h = (int32_t)(blockIdx.x % row_heads);
  if (plan.seq_lens[b] <= kWarpRowMax) return;
  select_row(RowGroup<kBlockThreads>{(int)threadIdx.x}, plan, scores, keep, thresholds, b, h, row_heads,
             shared);
}

}  // namespace

extern "C" kvc_status_t kvc_select_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan, &host = *args->host_plan;
  /* TOVA: one selection per sequence, copied to every KV head */
  const int32_t row_heads = plan.method == KVC_SCORE_TOVA ? 1 : plan.num_kv_heads;
  const int64_t rows = (int64_t)plan.batch * row_heads;
  const size_t parts = (size_t)host.part_indptr[host.batch];
  uint64_t *thresholds = static_cast<uint64_t *>(kvc_carve(ws, sizeof(uint64_t) * parts * (size_t)row_heads));
  if (!ws->base) return KVC_SUCCESS;

  bool short_rows = false, long_rows = false;
  for (int32_t b = 0; b < host.batch; ++b) (host.seq_lens[b] <= kWarpRowMax ? short_rows : long_rows) = true;
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  if (short_rows)
    KVC_LAUNCH(select_short_rows_kernel, dim3((unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock)),
               dim3(kWarpsPerBlock * 32), 0, stream, plan, args->scores, args->keep, thresholds, row_heads);
  if (long_rows)
    KVC_LAUNCH(select_long_rows_kernel, dim3((unsigned)rows), dim3(kBlockThreads), 0, stream, plan, args->scores,
               args->keep, thresholds, row_heads);
  return kvc_launch_status(args, "kvc_select");
}
