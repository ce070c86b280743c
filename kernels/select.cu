/*
 * select.cu - CUDA selection: per (sequence, KV head) the kept token indices, ascending, by the
 * selection semantics in kvcompress.h; bit for bit what kernels/select_cpu.c keeps, for one layer
 * or many (the layer is one more grid axis: layer l's rows read and write its stacked layouts).
 *
 * Thresholds, not sorting. Every token's 64-bit key (kvc_select_key: score bits high, position
 * low) is distinct, so "the top m of a candidate set" is exactly the candidates whose key is >= some
 * threshold:
 *   1. Protected tokens are kept.
 *   2. Per partition, the threshold of its top (quota - protected_count) unprotected tokens.
 *   3. The threshold of the top `fill` tokens that 1 and 2 left out.
 *   4. One ascending sweep writes every token that is protected or passes its partition's or the
 *      fill threshold; a stable scan gives each its output slot, so indices come out in order.
 * A threshold comes from an MSB-first radix select over 8-bit digits of the key: one pass over the
 * candidates per digit builds a 256-bin histogram (runs of equal digits cost one atomic), until the
 * digit's bin is taken whole (random scores: ~3 passes). Only when the bin at the last score digit
 * still holds more candidates than are needed (tied scores straddle the threshold) do the position
 * digits break the tie, and only the digits that positions below n use.
 *
 * Three shapes of row, chosen per sequence from the plan's segment length S (host/plan.c: enough
 * segments for every resident block, each 4k..16k tokens, KVC_SELECT_SEGMENT for tests):
 *   - n <= 512 (and <= S): one warp per row, eight rows per block;
 *   - 512 < n <= S: one block per row;
 *   - n > S: split into ceil(n / S) segments, one block each at a time (below).
 * Warp and block rows are staged first: their scores become 32-bit order-preserving keys
 * (kvc_score_bits) in shared memory, with the row's protected bits, through 16-byte loads; every
 * radix pass then reads shared memory, and the position of a token is its index there.
 *
 * Split rows: the multi-pass protocol, and why it is correct on the GPU and in the emulator.
 * A split row's passes must see the histograms of all its segments, which different blocks count.
 * An intra-kernel grid barrier (or a flag a block spins on) would need every block of the grid to
 * be resident, and the SIMT emulator runs blocks one after another (interleaving them only at
 * __syncthreads), so a spinning block would never let the block it waits for run. So the passes are
 * separate launches, a fixed number independent of n, batch and layers:
 *     init; 4 digit passes for the partitions (stage 2); 4 for the fill (stage 3); count; write
 * (all of them whenever a row is split: which selections are open depends on the quotas, which a
 * plan compatible with the one a graph was captured for may change, kvc_plan_compatible; a pass
 * in which a row has no open selection costs its segments one read of the row's states).
 * A digit pass: every segment block adds its candidates' digit counts into the row's global
 * histogram of each selection still open (device-scope atomicAdd), then bumps the row's arrival
 * counter with an acquire-release atomic after a __syncthreads. The block that arrives last
 * (count = segments - 1) has, through that acquire, every other segment's counts: it alone picks
 * the digit, updates the selection's state (prefix, rank still needed, or the final threshold),
 * zeroes the histogram and the counter for the next pass, and on the last score digit resolves a tie
 * by the position digits over the whole row (tied thresholds only). No block ever waits for another,
 * so no residency is assumed and nothing can deadlock; the next launch sees every state (kernel
 * boundaries order all memory). `count` writes each segment's number of kept tokens and `write`
 * starts each segment's output at the sum of the earlier segments' counts.
 * A grid sized to the resident blocks loops over the segments of all split rows of all layers.
 *
 * TOVA selects each sequence once, from head 0's row, and writes the result to every KV head, as
 * the CPU backend does.
 */
#include "cuda_compat.cuh"

#include "device_memory.cuh"
#include "common.h"
#include "launch.cuh"
#include "ops.h"
#include "search.cuh"

namespace {

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kScoreShift = 32;    /* the lowest score digit of a 64-bit key */
constexpr int kWarpRowMax = 512;   /* a warp row: at most 16 tokens per lane */
constexpr int kWarpsPerBlock = 8;  /* warp rows per block */
constexpr int kBlockThreads = 512; /* block rows and split segments */
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
  int32_t flag;                 /* a block-wide answer (the last arrival) */
};

/* One selection's state in the workspace: the partition thresholds of every row (all a block row
 * needs), and for split rows the open radix select of each partition and of the fill. */
struct SelState {
  uint64_t threshold; /* final threshold, or while open the key prefix fixed so far */
  int32_t need;       /* open: rank still to find among the candidates under the prefix */
  int32_t open;       /* 1 while digit passes remain */
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

/* score[t] for t in [lo, hi) of `scores`, each thread its tokens in ascending order: a scalar head
 * up to a 16-byte boundary, 16-byte loads, a scalar tail. */
template <int kThreads, class F>
__device__ void for_each_score(RowGroup<kThreads> g, const float *scores, int32_t lo, int32_t hi, const F &f) {
  int32_t body = lo + (int32_t)((4 - (reinterpret_cast<uintptr_t>(scores + lo) / sizeof(float)) % 4) % 4);
  if (body > hi) body = hi;
  /* int64 cursors: a row may be 2^31 - 1 tokens long */
  for (int64_t t = lo + g.rank; t < body; t += kThreads) f((int32_t)t, scores[t]);
  const int32_t vectors = (hi - body) / 4;
  const float4 *vec = reinterpret_cast<const float4 *>(scores + body);
  for (int32_t i = g.rank; i < vectors; i += kThreads) {
    const float4 x = vec[i];
    const int32_t t = body + 4 * i;
    f(t, x.x);
    f(t + 1, x.y);
    f(t + 2, x.z);
    f(t + 3, x.w);
  }
  for (int64_t t = body + 4 * vectors + g.rank; t < hi; t += kThreads) f((int32_t)t, scores[t]);
}

/* One (sequence, head) row of one layer as the selection reads it. */
struct RowBase {
  const uint32_t *protect;       /* the span row's protected bitmask                        */
  const kvc_partition_t *parts;  /* the span row's partitions, FAIR ones first              */
  SelState *states;              /* per partition: its threshold (and open select)          */
  int32_t n, num_parts, num_fair, fill;
  __device__ bool is_protected(int32_t t) const { return (protect[t >> 5] >> (t & 31)) & 1u; }
  /* Index of t's partition. `fair` is the calling thread's cursor: the first FAIR partition ending
   * after the thread's previous token (a thread visits its tokens in ascending order). */
  __device__ int32_t partition_of(int32_t t, int32_t &fair) const {
    while (fair < num_fair && parts[fair].end <= t) ++fair;
    return fair < num_fair && parts[fair].start <= t ? fair : num_fair; /* else implicit */
  }
};

/* A row staged in shared memory: 32-bit score keys, index = position. */
struct StagedRow : RowBase {
  const uint32_t *keys;
  template <int kThreads, class F>
  __device__ void for_each_key(RowGroup<kThreads> g, int32_t lo, int32_t hi, const F &f) const {
    for (int64_t t = lo + g.rank; t < hi; t += kThreads) f((int32_t)t, (uint64_t)keys[t] << 32 | (uint32_t)t);
  }
};

/* A row read from the scores in global memory (split rows). */
struct GlobalRow : RowBase {
  const float *scores;
  template <int kThreads, class F>
  __device__ void for_each_key(RowGroup<kThreads> g, int32_t lo, int32_t hi, const F &f) const {
    for_each_score(g, scores, lo, hi, [&](int32_t t, float s) { f(t, kvc_select_key(s, t)); });
  }
};

/* Histogram of the digit at `shift` of the candidates in [lo, hi) whose higher digits equal
 * prefix's. candidate(t, key, fair_cursor) says whether token t competes. */
template <int kThreads, class Row, class Candidate>
__device__ void count_digits(RowGroup<kThreads> g, const Row &row, int32_t lo, int32_t hi, int32_t first_fair,
                             int shift, uint64_t prefix, const Candidate &candidate, int32_t *histogram) {
  const uint64_t high_mask = shift + kDigitBits >= 64 ? 0 : ~0ull << (shift + kDigitBits);
  int32_t fair = first_fair, run_digit = 0, run_count = 0; /* equal digits in a row: one atomic */
  row.for_each_key(g, lo, hi, [&](int32_t t, uint64_t key) {
    if ((key & high_mask) != prefix || !candidate(t, key, fair)) return;
    const int32_t digit = (int32_t)(key >> shift) & (kBins - 1);
    if (digit != run_digit && run_count) {
      atomicAdd(&histogram[run_digit], run_count);
      run_count = 0;
    }
    run_digit = digit;
    ++run_count;
  });
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

/* Digits at and below `shift` that a position below n can have nonzero: the position digits above
 * the highest bit of n - 1 are zero for every token, so their passes are skipped. */
__device__ inline bool digit_is_used(int shift, int32_t n) {
  return shift >= kScoreShift || ((uint32_t)(n - 1) >> shift) != 0;
}

/* Threshold of the top `need` candidates of [lo, hi) among those whose key starts with `prefix`
 * (the digits above `shift`), 1 <= need < their count: the keys >= it are exactly those. Every
 * thread of the group calls it and gets the same value. */
template <int kThreads, class Row, class Candidate>
__device__ uint64_t top_threshold(RowGroup<kThreads> g, const Row &row, int32_t lo, int32_t hi, int32_t first_fair,
                                  int32_t need, const Candidate &candidate, GroupShared &sh, int shift = 64 - kDigitBits,
                                  uint64_t prefix = 0) {
  for (; shift >= 0; shift -= kDigitBits) {
    if (!digit_is_used(shift, row.n)) continue;
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
template <int kThreads, class Row, class Candidate>
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

/* Candidates of each stage. A partition's: its unprotected tokens (the implicit one's also lie
 * outside every FAIR span). The fill's: unprotected tokens below their partition's threshold. */
template <class Row>
__device__ auto partition_candidate(const Row &row, int32_t p) {
  const bool implicit = row.parts[p].implicit;
  return [&row, p, implicit](int32_t t, uint64_t, int32_t &fair) {
    return !row.is_protected(t) && (!implicit || row.partition_of(t, fair) == p);
  };
}

template <class Row>
__device__ auto fill_candidate(const Row &row) {
  return [&row](int32_t t, uint64_t key, int32_t &fair) {
    return !row.is_protected(t) && key < row.states[row.partition_of(t, fair)].threshold;
  };
}

/* The token range a partition's candidates lie in (the implicit partition: the whole row). */
__device__ inline void partition_range(const kvc_partition_t &part, int32_t n, int32_t *lo, int32_t *hi) {
  *lo = part.implicit ? 0 : part.start;
  *hi = part.implicit ? n : part.end;
}

/* Stage 4 over tokens [lo, hi) of a row, written from out[written0] on: every token that is
 * protected or passes its partition's or the fill threshold, in order, to `copies` keep rows k
 * apart. Returns the number written. `base` <= lo aligns each thread's kItems tokens (global rows:
 * to 16 bytes, so they are one load). */
template <int kThreads, class KeyAt>
__device__ int32_t write_kept(RowGroup<kThreads> g, const RowBase &row, int32_t base, int32_t lo, int32_t hi,
                              const KeyAt &keys_at, uint64_t fill_threshold, int32_t *out, int32_t written0,
                              int32_t copies, int32_t k, GroupShared &sh) {
  int32_t written = written0, fair = 0;
  for (int64_t c0 = base; c0 < hi; c0 += kThreads * kItems) {
    const int64_t first = c0 + g.rank * kItems;
    uint64_t keys[kItems];
    keys_at(first, keys);
    unsigned kept = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (first + i < lo || first + i >= hi) continue;
      const int32_t t = (int32_t)(first + i);
      if (row.is_protected(t) || keys[i] >= row.states[row.partition_of(t, fair)].threshold ||
          keys[i] >= fill_threshold)
        kept |= 1u << i;
    }
    int32_t chunk_total;
    int32_t slot = written + group_exclusive_scan(g, __popc(kept), sh, &chunk_total);
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (kept >> i & 1u) {
        for (int32_t c = 0; c < copies; ++c) out[(int64_t)c * k + slot] = (int32_t)(first + i);
        ++slot;
      }
    written += chunk_total;
  }
  return written - written0;
}

/* Everything a kernel needs, by value: the kernels read no host memory. Per-layer arrays are the
 * single-layer ones stacked (layer l at l times their per-layer size). */
struct Select {
  kvc_plan_view_t plan;
  const float *scores;
  int32_t *keep;
  SelState *part_states;    /* [layers][state_heads * parts]                          */
  SelState *fill_states;    /* [layers][batch * row_heads] (split rows)               */
  int32_t *histograms;      /* [layers][state_heads * split parts][kBins] (split rows) */
  int32_t *arrivals;        /* [layers][batch * row_heads] (split rows)               */
  int32_t *segment_counts;  /* [layers][row_heads * split segments] (split rows)      */
  int32_t num_layers, row_heads;
  int32_t state_heads;      /* copies of a span row's partitions: row_heads with per-sequence
                               spans, 1 with per-head spans (each (b, h) is its own span row) */
  int64_t parts;            /* partitions of the batch                                */
  int64_t split_parts, split_segments;
};

/* Slot of (layer, b, h)'s first partition (span row r, num_parts of them) in an array of
 * per-partition items whose span rows start at `starts` (part_indptr, split_parts) and total
 * `total` per copy. */
template <typename Offset>
__device__ int64_t partition_slot(const Select &s, int32_t layer, int32_t r, int32_t h, int32_t num_parts,
                                  const Offset *starts, int64_t total) {
  return ((int64_t)layer * total + starts[r]) * s.state_heads + (int64_t)(h % s.state_heads) * num_parts;
}

/* Row (layer, b, h) of the row_heads rows per sequence. */
template <class Row>
__device__ Row row_of(const Select &s, int32_t layer, int32_t b, int32_t h) {
  const kvc_plan_view_t &plan = s.plan;
  const int32_t r = kvc_span_row(&plan, b, h), part0 = plan.part_indptr[r], num_parts = plan.part_indptr[r + 1] - part0;
  Row row;
  row.protect = plan.protect_bits + plan.protect_word_offsets[r];
  row.parts = plan.parts + part0;
  row.fill = plan.fill[r];
  row.states = s.part_states + partition_slot(s, layer, r, h, num_parts, plan.part_indptr, s.parts);
  row.n = plan.seq_lens[b];
  row.num_parts = num_parts;
  row.num_fair = num_parts - (row.parts[num_parts - 1].implicit ? 1 : 0);
  return row;
}

__device__ const float *row_scores(const Select &s, int32_t layer, int32_t b, int32_t h) {
  const kvc_plan_view_t &plan = s.plan;
  return s.scores + (int64_t)layer * plan.score_elems + kvc_score_row(&plan, b, h);
}

__device__ int32_t *row_keep(const Select &s, int32_t layer, int32_t b, int32_t h) {
  const kvc_plan_view_t &plan = s.plan;
  return s.keep + plan.num_kv_heads * ((int64_t)layer * plan.total_kept + plan.keep_offsets[b]) +
         (int64_t)h * plan.keep_lens[b];
}

/* The row keeps everything (budget >= length): 0 .. n-1 to every copy. */
template <int kThreads>
__device__ void keep_all(RowGroup<kThreads> g, int32_t *out, int32_t n, int32_t copies) {
  for (int64_t t = g.rank; t < n; t += kThreads)
    for (int32_t c = 0; c < copies; ++c) out[(int64_t)c * n + t] = (int32_t)t;
}

/* Stages row (layer, b, h) into keys / protect (shared memory) and selects it. */
template <int kThreads>
__device__ void select_staged_row(RowGroup<kThreads> g, const Select &s, int32_t layer, int32_t b, int32_t h,
                                  uint32_t *keys, uint32_t *protect, GroupShared &sh) {
  const kvc_plan_view_t &plan = s.plan;
  const int32_t n = plan.seq_lens[b], k = plan.keep_lens[b], copies = plan.num_kv_heads / s.row_heads;
  int32_t *out = row_keep(s, layer, b, h);
  if (k == n) return keep_all(g, out, n, copies);
  StagedRow row = row_of<StagedRow>(s, layer, b, h);
  const uint32_t *protect_global = row.protect;
  for_each_score(g, row_scores(s, layer, b, h), 0, n, [&](int32_t t, float score) { keys[t] = kvc_score_bits(score); });
  for (int32_t w = g.rank; w < (n + 31) / 32; w += kThreads) protect[w] = protect_global[w];
  row.keys = keys;
  row.protect = protect;
  g.sync(); /* the row is staged */

  /* 2: partitions are disjoint, so a partition's candidates are its unprotected tokens */
  for (int32_t p = 0; p < row.num_parts; ++p) {
    const kvc_partition_t part = row.parts[p];
    int32_t lo, hi;
    partition_range(part, n, &lo, &hi);
    const uint64_t threshold = select_threshold(g, row, lo, hi, part.implicit ? 0 : p, part.quota - part.protected_count,
                                                part.length - part.protected_count, partition_candidate(row, p), sh);
    if (g.rank == 0) row.states[p].threshold = threshold;
  }
  g.sync(); /* the thresholds are visible to the whole group */

  /* 3: the fill chooses among the tokens not kept yet; F of the n are (sum of quotas) */
  const int32_t fill = row.fill;
  const uint64_t fill_threshold = select_threshold(g, row, 0, n, 0, fill, n - (k - fill), fill_candidate(row), sh);

  /* 4 */
  write_kept(g, row, 0, 0, n,
             [&](int64_t first, uint64_t *out_keys) {
#pragma unroll
               for (int i = 0; i < kItems; ++i)
                 out_keys[i] = first + i < n ? (uint64_t)keys[first + i] << 32 | (uint32_t)(first + i) : 0;
             },
             fill_threshold, out, 0, copies, k, sh);
}

/* Rows are (layer, b, h) = (row / (batch * row_heads), ...). */
__device__ void decode_row(const Select &s, int64_t row, int32_t *layer, int32_t *b, int32_t *h) {
  const int64_t per_layer = (int64_t)s.plan.batch * s.row_heads, r = row % per_layer;
  *layer = (int32_t)(row / per_layer);
  *b = (int32_t)(r / s.row_heads);
  *h = (int32_t)(r % s.row_heads);
}

__device__ bool is_split(const kvc_plan_view_t &plan, int32_t b) { return plan.seq_lens[b] > plan.select_segment; }

/* Warp rows: n <= kWarpRowMax and not split; one warp each, kWarpsPerBlock per block. */
/* four blocks an SM: 64 registers, no spills */
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4) select_warp_rows_kernel(Select s) {
  __shared__ GroupShared shared[kWarpsPerBlock];
  __shared__ uint32_t keys[kWarpsPerBlock][kWarpRowMax];
  __shared__ uint32_t protect[kWarpsPerBlock][kWarpRowMax / 32];
  const int warp = threadIdx.x / 32;
  const int64_t rows = (int64_t)s.num_layers * s.plan.batch * s.row_heads;
  for (int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + warp; row < rows; row += (int64_t)gridDim.x * kWarpsPerBlock) {
    int32_t layer, b, h;
    decode_row(s, row, &layer, &b, &h);
    if (s.plan.seq_lens[b] > kWarpRowMax || is_split(s.plan, b)) continue;
    select_staged_row(RowGroup<32>{(int)threadIdx.x % 32}, s, layer, b, h, keys[warp], protect[warp], shared[warp]);
    __syncwarp(); /* the next row may restage keys only after this one's last reads */
  }
}

/* Block rows: kWarpRowMax < n <= select_segment; the row and its bits in dynamic shared memory. */
__global__ void __launch_bounds__(kBlockThreads) select_block_rows_kernel(Select s, int32_t staged_tokens) {
  __shared__ GroupShared shared;
  KVC_DYNAMIC_SMEM(uint32_t, stage);
  const int64_t rows = (int64_t)s.num_layers * s.plan.batch * s.row_heads;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int32_t layer, b, h;
    decode_row(s, row, &layer, &b, &h);
    if (s.plan.seq_lens[b] <= kWarpRowMax || is_split(s.plan, b)) continue;
    select_staged_row(RowGroup<kBlockThreads>{(int)threadIdx.x}, s, layer, b, h, stage, stage + staged_tokens, shared);
    __syncthreads(); /* the next row may restage only after this one's last reads */
  }
}

/* ---- split rows ------------------------------------------------------------------------------ */

/* Segment `item` of the split rows of all layers: the row, its index among the rows, and its
 * token range. */
struct Segment {
  int32_t layer, b, h, index, count, lo, hi;
  int64_t row;          /* layer * batch * row_heads + b * row_heads + h                 */
  int64_t first_index;  /* of the row's segment 0 in the per-layer segment numbering      */
};

__device__ Segment segment_at(const Select &s, int64_t item) {
  const kvc_plan_view_t &plan = s.plan;
  const int64_t per_layer = s.row_heads * s.split_segments, r = item % per_layer;
  Segment seg;
  seg.layer = (int32_t)(item / per_layer);
  seg.b = last_offset_at_or_below(plan.split_segments, plan.batch, s.row_heads, r);
  seg.count = (int32_t)(plan.split_segments[seg.b + 1] - plan.split_segments[seg.b]);
  const int64_t within = r - s.row_heads * plan.split_segments[seg.b];
  seg.h = (int32_t)(within / seg.count);
  seg.index = (int32_t)(within % seg.count);
  seg.first_index = (int64_t)seg.layer * per_layer + s.row_heads * plan.split_segments[seg.b] + (int64_t)seg.h * seg.count;
  seg.lo = seg.index * plan.select_segment;
  const int32_t n = plan.seq_lens[seg.b];
  seg.hi = n - seg.lo > plan.select_segment ? seg.lo + plan.select_segment : n;
  seg.row = ((int64_t)seg.layer * plan.batch + seg.b) * s.row_heads + seg.h;
  return seg;
}

__device__ GlobalRow global_row(const Select &s, const Segment &seg) {
  GlobalRow row = row_of<GlobalRow>(s, seg.layer, seg.b, seg.h);
  row.scores = row_scores(s, seg.layer, seg.b, seg.h);
  return row;
}

/* Histogram slot of partition p of the segment's row (the fill uses slot 0). */
__device__ int32_t *histogram_of(const Select &s, const Segment &seg, int32_t p, int32_t num_parts) {
  const int32_t r = kvc_span_row(&s.plan, seg.b, seg.h);
  return s.histograms + (partition_slot(s, seg.layer, r, seg.h, num_parts, s.plan.split_parts, s.split_parts) + p) * kBins;
}

/* The state of a selection that needs `need` of `count` candidates, before any pass. */
__device__ SelState initial_state(int32_t need, int32_t count) {
  SelState st;
  st.need = need;
  st.open = need > 0 && need < count;
  st.threshold = need <= 0 ? kSelectNone : need >= count ? kSelectAll : 0;
  return st;
}

/* Every split row's selections opened, its histograms and arrival counter zeroed. */
__global__ void __launch_bounds__(kBlockThreads) select_split_init_kernel(Select s) {
  const kvc_plan_view_t &plan = s.plan;
  const int64_t rows = (int64_t)s.num_layers * plan.batch * s.row_heads;
  const int64_t stride = (int64_t)gridDim.x * kBlockThreads;
  for (int64_t row = blockIdx.x * (int64_t)kBlockThreads + threadIdx.x; row < rows; row += stride) {
    int32_t layer, b, h;
    decode_row(s, row, &layer, &b, &h);
    if (!is_split(plan, b)) continue;
    RowBase rb = row_of<RowBase>(s, layer, b, h);
    const int32_t n = plan.seq_lens[b], k = plan.keep_lens[b], fill = rb.fill;
    for (int32_t p = 0; p < rb.num_parts; ++p) {
      const kvc_partition_t &part = rb.parts[p];
      rb.states[p] = k == n ? initial_state(0, 1)
                            : initial_state(part.quota - part.protected_count, part.length - part.protected_count);
    }
    s.fill_states[row] = k == n ? initial_state(1, 1) : initial_state(fill, n - (k - fill));
    s.arrivals[row] = 0;
  }
  const int64_t bins = (int64_t)s.num_layers * s.state_heads * s.split_parts * kBins;
  for (int64_t i = blockIdx.x * (int64_t)kBlockThreads + threadIdx.x; i < bins; i += stride) s.histograms[i] = 0;
}

/* Adds the block's shared histogram to a global one (nonzero bins only) and clears it. */
__device__ void flush_histogram(GroupShared &sh, int32_t *global) {
  for (int i = threadIdx.x; i < kBins; i += kBlockThreads) {
    if (sh.histogram[i]) atomicAdd(&global[i], sh.histogram[i]);
  }
}

/* The last arrival's step for one open selection: the digit at `shift` from the merged histogram;
 * the selection closes when its bin is taken whole, or on the last score digit, where ties are
 * broken by positions over [lo, hi) of the whole row. */
template <class Candidate>
__device__ void close_digit(RowGroup<kBlockThreads> g, const GlobalRow &row, int32_t lo, int32_t hi, int32_t first_fair,
                            SelState *state, int32_t *global, int shift, const Candidate &candidate, GroupShared &sh) {
  /* read at the device's point of coherence, and zeroed for the next pass */
  for (int i = g.rank; i < kBins; i += kBlockThreads) sh.histogram[i] = atomicExch(&global[i], 0);
  const SelState st = *state;
  g.sync();
  if (g.warp() == 0) find_digit(sh, st.need, g.lane());
  g.sync();
  SelState next = st;
  next.threshold = st.threshold | (uint64_t)sh.digit << shift;
  next.need = sh.need;
  const bool whole = sh.need == sh.bin;
  g.sync(); /* sh is reused by the tie break */
  if (whole) {
    next.open = 0;
  } else if (shift == kScoreShift) {
    next.threshold = top_threshold(g, row, lo, hi, first_fair, next.need, candidate, sh, kScoreShift - kDigitBits,
                                   next.threshold);
    next.open = 0;
  }
  if (g.rank == 0) *state = next;
}

/* One digit pass of stage 2 (partitions, fill == 0) or 3 (the fill) over every split segment. */
__global__ void __launch_bounds__(kBlockThreads) select_split_pass_kernel(Select s, int32_t fill, int32_t shift) {
  __shared__ GroupShared sh;
  const RowGroup<kBlockThreads> g{(int)threadIdx.x};
  const int64_t items = (int64_t)s.num_layers * s.row_heads * s.split_segments;
  const uint64_t high_mask = shift + kDigitBits >= 64 ? 0 : ~0ull << (shift + kDigitBits);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const Segment seg = segment_at(s, item);
    const GlobalRow row = global_row(s, seg);
    SelState *fill_state = s.fill_states + seg.row;
    bool any_open = false;
    if (!fill) {
      for (int32_t p = 0; p < row.num_parts; ++p) {
        const SelState st = row.states[p];
        if (!st.open) continue;
        any_open = true;
        int32_t lo, hi;
        partition_range(row.parts[p], row.n, &lo, &hi);
        lo = lo > seg.lo ? lo : seg.lo;
        hi = hi < seg.hi ? hi : seg.hi;
        if (lo >= hi) continue;
        for (int i = g.rank; i < kBins; i += kBlockThreads) sh.histogram[i] = 0;
        g.sync();
        /* a FAIR partition's cursor starts at itself; the implicit one's at the first FAIR
         * partition that does not end before the segment */
        int32_t first_fair = p;
        if (row.parts[p].implicit) {
          first_fair = 0;
          while (first_fair < row.num_fair && row.parts[first_fair].end <= lo) ++first_fair;
        }
        count_digits(g, row, lo, hi, first_fair, shift, st.threshold & high_mask, partition_candidate(row, p),
                     sh.histogram);
        g.sync();
        flush_histogram(sh, histogram_of(s, seg, p, row.num_parts));
        g.sync();
      }
    } else {
      const SelState st = *fill_state;
      if (st.open) {
        any_open = true;
        for (int i = g.rank; i < kBins; i += kBlockThreads) sh.histogram[i] = 0;
        g.sync();
        int32_t first_fair = 0;
        while (first_fair < row.num_fair && row.parts[first_fair].end <= seg.lo) ++first_fair;
        count_digits(g, row, seg.lo, seg.hi, first_fair, shift, st.threshold & high_mask, fill_candidate(row),
                     sh.histogram);
        g.sync();
        flush_histogram(sh, histogram_of(s, seg, 0, row.num_parts));
      }
    }
    if (!any_open) continue; /* every segment of the row sees the same states: none arrives */

    /* Arrival: the __syncthreads orders every thread's histogram atomics before thread 0's
     * acquire-release increment; the last arrival's acquire makes all segments' counts visible. */
    g.sync();
    if (g.rank == 0) sh.flag = kvc_fetch_add_acq_rel(&s.arrivals[seg.row], 1) == seg.count - 1;
    g.sync();
    if (!sh.flag) continue;
    if (!fill) {
      for (int32_t p = 0; p < row.num_parts; ++p) {
        if (!row.states[p].open) continue;
        int32_t lo, hi;
        partition_range(row.parts[p], row.n, &lo, &hi);
        close_digit(g, row, lo, hi, row.parts[p].implicit ? 0 : p, &row.states[p],
                    histogram_of(s, seg, p, row.num_parts), shift, partition_candidate(row, p), sh);
      }
    } else {
      close_digit(g, row, 0, row.n, 0, fill_state, histogram_of(s, seg, 0, row.num_parts), shift,
                  fill_candidate(row), sh);
    }
    if (g.rank == 0) s.arrivals[seg.row] = 0;
    g.sync(); /* sh and the states are reused by the next item */
  }
}

/* The keys of a thread's kItems tokens from `first` (16-byte aligned; 0 for tokens outside [lo, hi)). */
__device__ void global_keys(const float *scores, int64_t first, int32_t lo, int32_t hi, uint64_t *keys) {
  const int32_t t = (int32_t)first;
  if (first >= lo && first + kItems <= hi) {
    const float4 x = *reinterpret_cast<const float4 *>(scores + first);
    keys[0] = kvc_select_key(x.x, t);
    keys[1] = kvc_select_key(x.y, t + 1);
    keys[2] = kvc_select_key(x.z, t + 2);
    keys[3] = kvc_select_key(x.w, t + 3);
    return;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    keys[i] = first + i >= lo && first + i < hi ? kvc_select_key(scores[first + i], (int32_t)(first + i)) : 0;
}
static_assert(kItems == 4, "global_keys loads one float4 per thread");

/* The first token at or below lo whose score is 16-byte aligned. */
__device__ int32_t aligned_base(const float *scores, int32_t lo) {
  return lo - (int32_t)((reinterpret_cast<uintptr_t>(scores + lo) / sizeof(float)) % 4);
}

/* Kept tokens of every split segment (count == 1), or their indices (count == 0): a segment's
 * output starts after the kept tokens of the row's earlier segments. */
__global__ void __launch_bounds__(kBlockThreads) select_split_output_kernel(Select s, int32_t count) {
  __shared__ GroupShared sh;
  const RowGroup<kBlockThreads> g{(int)threadIdx.x};
  const int64_t items = (int64_t)s.num_layers * s.row_heads * s.split_segments;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const Segment seg = segment_at(s, item);
    const GlobalRow row = global_row(s, seg);
    const uint64_t fill_threshold = s.fill_states[seg.row].threshold;
    const int32_t k = s.plan.keep_lens[seg.b], copies = s.plan.num_kv_heads / s.row_heads;
    const int32_t base = aligned_base(row.scores, seg.lo);
    const auto keys_at = [&](int64_t first, uint64_t *keys) { global_keys(row.scores, first, seg.lo, seg.hi, keys); };
    if (count) {
      int32_t kept = 0, fair = 0;
      for (int64_t first = base + g.rank * kItems; first < seg.hi; first += kBlockThreads * kItems) {
        uint64_t keys[kItems];
        keys_at(first, keys);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          if (first + i < seg.lo || first + i >= seg.hi) continue;
          const int32_t t = (int32_t)(first + i);
          if (row.is_protected(t) || keys[i] >= row.states[row.partition_of(t, fair)].threshold ||
              keys[i] >= fill_threshold)
            ++kept;
        }
      }
      int32_t total;
      group_exclusive_scan(g, kept, sh, &total);
      if (g.rank == 0) s.segment_counts[seg.first_index + seg.index] = total;
    } else {
      int32_t before = 0;
      for (int32_t i = g.rank; i < seg.index; i += kBlockThreads) before += s.segment_counts[seg.first_index + i];
      int32_t written0;
      group_exclusive_scan(g, before, sh, &written0);
      write_kept(g, row, base, seg.lo, seg.hi, keys_at, fill_threshold, row_keep(s, seg.layer, seg.b, seg.h),
                 written0, copies, k, sh);
    }
    g.sync(); /* sh is reused by the next item */
  }
}

unsigned grid_for(int64_t items, int32_t resident) {
  return (unsigned)(items < resident ? (items > 0 ? items : 1) : resident);
}

size_t staged_bytes(int32_t tokens) { return sizeof(uint32_t) * ((size_t)tokens + ((size_t)tokens + 31) / 32); }

}  // namespace

extern "C" kvc_status_t kvc_select_cuda_geometry(int32_t *resident_blocks, char *detail, size_t cap) {
#if !defined(KVC_SIMT)
  /* block rows stage up to the longest segment: above the default 48 KiB of shared memory */
  const cudaError_t err = cudaFuncSetAttribute(select_block_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)staged_bytes(KVC_SELECT_MAX_SEGMENT));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return kvc_fail_detail(detail, cap, KVC_ERROR_CUDA, "kvc_plan_create: selection shared memory limit: %s",
                           cudaGetErrorString(err));
  }
#endif
  return kvc_resident_blocks(select_split_pass_kernel, kBlockThreads, 0, resident_blocks, "selection", detail, cap);
}

extern "C" kvc_status_t kvc_select_cuda(const kvc_op_args_t *args, kvc_carver_t *ws) {
  const kvc_plan_view_t &plan = args->plan, &host = *args->host_plan;
  Select s = {};
  s.plan = plan;
  s.num_layers = args->num_layers;
  /* TOVA: one selection per sequence, copied to every KV head */
  s.row_heads = plan.method == KVC_SCORE_TOVA ? 1 : plan.num_kv_heads;
  const int32_t span_rows = host.batch * host.span_heads;
  s.state_heads = host.span_heads > 1 ? 1 : s.row_heads;
  s.parts = host.part_indptr[span_rows];
  s.split_parts = host.split_parts[span_rows];
  s.split_segments = host.split_segments[host.batch];
  const size_t layers = (size_t)s.num_layers, rows = (size_t)host.batch * (size_t)s.row_heads;
  s.part_states = static_cast<SelState *>(kvc_carve(ws, sizeof(SelState) * layers * (size_t)s.state_heads * (size_t)s.parts));
  s.fill_states = static_cast<SelState *>(kvc_carve(ws, sizeof(SelState) * layers * (s.split_segments ? rows : 0)));
  s.histograms = static_cast<int32_t *>(
      kvc_carve(ws, sizeof(int32_t) * kBins * layers * (size_t)s.state_heads * (size_t)s.split_parts));
  s.arrivals = static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * layers * (s.split_segments ? rows : 0)));
  s.segment_counts =
      static_cast<int32_t *>(kvc_carve(ws, sizeof(int32_t) * layers * (size_t)s.row_heads * (size_t)s.split_segments));
  if (!ws->base) return KVC_SUCCESS;
  s.scores = args->scores;
  s.keep = args->keep;

  bool warp_rows = false, block_rows = false;
  int32_t staged_tokens = 0;
  for (int32_t b = 0; b < host.batch; ++b) {
    const int32_t n = host.seq_lens[b];
    if (n > host.select_segment) continue;
    (n <= kWarpRowMax ? warp_rows : block_rows) = true;
    if (n > kWarpRowMax && n > staged_tokens) staged_tokens = n;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(args->stream);
  const int32_t resident = plan.select_resident_blocks;
  const int64_t all_rows = (int64_t)s.num_layers * (int64_t)rows;
  if (warp_rows)
    KVC_LAUNCH(select_warp_rows_kernel, dim3(grid_for((all_rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 2 * resident)),
               dim3(kWarpsPerBlock * 32), 0, stream, s);
  if (block_rows)
    KVC_LAUNCH(select_block_rows_kernel, dim3(grid_for(all_rows, resident)), dim3(kBlockThreads),
               staged_bytes(staged_tokens), stream, s, staged_tokens);
  if (s.split_segments) {
    const int64_t items = (int64_t)s.num_layers * s.row_heads * s.split_segments;
    const dim3 grid(grid_for(items, resident)), block(kBlockThreads);
    KVC_LAUNCH(select_split_init_kernel, grid, block, 0, stream, s);
    for (int32_t fill = 0; fill < 2; ++fill)
      for (int shift = 64 - kDigitBits; shift >= kScoreShift; shift -= kDigitBits)
        KVC_LAUNCH(select_split_pass_kernel, grid, block, 0, stream, s, fill, shift);
    KVC_LAUNCH(select_split_output_kernel, grid, block, 0, stream, s, 1);
    KVC_LAUNCH(select_split_output_kernel, grid, block, 0, stream, s, 0);
  }
  return kvc_launch_status(args, "kvc_select");
}
