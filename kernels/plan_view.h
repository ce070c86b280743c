/*
 * plan_view.h - the validated plan as the ops see it: plain data, no CUDA types, usable from C,
 * C++ and CUDA. The host layer (host/plan.c) builds it once on the host and, on CUDA, once more
 * with every array pointer pointing into one device allocation. Ops receive it by value.
 */
#ifndef KVC_PLAN_VIEW_H
#define KVC_PLAN_VIEW_H

#include <stdint.h>

#include "kvcompress.h"

/* A scoring domain: a token range whose keys are scored by the observation queries inside it.
 * Without span_local there is one per sequence, [0, n); with it, one per FAIR span. */
typedef struct {
  int32_t start, end;          /* token range [start, end)                                      */
  int32_t obs_begin, obs_end;  /* its observation queries: global rows [obs_begin, obs_end)     */
  int32_t scored_end;          /* keys [start, scored_end) get the method's score; SNAPKV: the
                                  first query's position; TOVA: end - 1; others: end            */
} kvc_domain_t;

/* A selection partition: a FAIR span, or the implicit partition of tokens in no FAIR span. */
typedef struct {
  int32_t start, end;    /* FAIR: its range; implicit: [0, n) minus the FAIR spans              */
  int32_t implicit;      /* 1 for the implicit partition (always the last of its sequence)      */
  int32_t length;        /* L_p, tokens in the partition                                        */
  int32_t protected_count; /* lo_p                                                              */
  int32_t quota;         /* q_p: tokens of the partition kept by quota (protected ones included) */
} kvc_partition_t;

typedef struct {
  int32_t batch, num_q_heads, num_kv_heads, head_dim, group_size; /* group = q heads per KV head */
  kvc_dtype_t dtype;
  kvc_score_method_t method;
  kvc_pool_t pool;
  kvc_reduce_t group_reduce;
  int32_t pool_kernel, span_local;
  float scale; /* resolved: never 0 */
  int32_t max_seq_len, max_keep_len, max_obs_per_domain;
  /* CUDA selection and compaction geometry (kernels/select.cu, compact.cu), fixed at plan time for
   * the plan's device: blocks of their multi-block kernels resident at once (the launchers' grid
   * targets), and the segment length of selection: a row longer than select_segment tokens is split
   * into segments of select_segment tokens, one block each, selected by the multi-pass kernels; a
   * shorter row is one block's (staged whole in shared memory). KVC_SELECT_SEGMENT overrides the
   * segment length for tests. The CPU backend reads none of these. */
  int32_t select_resident_blocks, compact_resident_blocks, select_segment;
  /* CPU backend: threads the workspace holds scratch for (the context's thread count when the
   * plan was made) and a cap on the instruction set of the scoring loops (0: none; tests set
   * KVC_CPU_ISA = 1 portable, 2 AVX2, 3 AVX-512, read by kvc_plan_create). */
  int32_t cpu_threads, cpu_isa;
  /* Span rows (desc.spans_per_head): span_heads is 1 (spans per sequence: span row b) or
   * num_kv_heads (per (sequence, KV head): span row b * num_kv_heads + h); kvc_span_row. The
   * per-span-row arrays below (protected bits, partitions, fill, user spans) have batch * span_heads
   * rows. */
  int32_t span_heads;
  /* Score layout (desc.score_row_capacity): 0 packed, row (b, h) at num_kv_heads * token_offsets[b]
   * + h * n_b; C > 0: row (b, h) at (b * num_kv_heads + h) * C. kvc_score_row; score_elems is the
   * per-layer element count of either. */
  int32_t score_row_capacity;
  int64_t score_elems;

  const int32_t *seq_lens;       /* [batch] n_b                                                */
  const int32_t *keep_lens;      /* [batch] k_b = min(budget, n)                               */
  const int64_t *token_offsets;  /* [batch+1] prefix sums of n_b (score row (b,h) starts at
                                    num_kv_heads * token_offsets[b] + h * n_b)                 */
  const int64_t *keep_offsets;   /* [batch+1] prefix sums of k_b (same rule for keep rows)     */
  int64_t total_tokens, total_kept, obs_total;

  const int32_t *obs_indptr;     /* [batch+1] rows of the queries array per sequence           */
  const int32_t *obs_pos;        /* [obs_total] position of each query in its sequence         */
  const int32_t *obs_lo;         /* [obs_total] first key the query sees (its domain's start)  */

  const int32_t *domain_indptr;  /* [batch+1]                                                  */
  const kvc_domain_t *domains;

  /* indexed by span row r (kvc_span_row), batch * span_heads of them: */
  const int32_t *part_indptr;    /* [rows+1]; FAIR partitions in span order, implicit last     */
  const kvc_partition_t *parts;
  const int32_t *fill;           /* [rows] k - F: tokens chosen by the global fill             */

  const int64_t *protect_word_offsets; /* [rows+1] prefix sums of ceil(n_b / 32)               */
  const uint32_t *protect_bits;  /* bit t of row r: word protect_word_offsets[r] + t / 32      */

  const int64_t *split_segments; /* [batch+1] prefix sums of the segments of rows split by selection
                                    (ceil(n_b / select_segment) when n_b > select_segment, else 0) */
  const int64_t *split_parts;    /* [rows+1] prefix sums of the partitions of the span rows of
                                    split sequences                                            */

  const int32_t *span_indptr;    /* [rows+1] user spans (all kinds), for retention             */
  const kvc_span_t *spans;
  int64_t total_spans;

  kvc_dtype_t query_dtype;       /* the queries' dtype, resolved (kvc_plan_desc_t.query_dtype)  */
  const float *k_scales;         /* FP8 keys' scales: [num_kv_heads] with desc.k_scales, else one
                                    (k_scale; 1 for other dtypes); kvc_key_scale reads them    */
  int32_t k_scales_per_head;     /* 1: k_scales has a scale per KV head; 0: one for all         */
} kvc_plan_view_t;

#endif /* KVC_PLAN_VIEW_H */
