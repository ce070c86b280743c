/*
 * cost_model.h - the analytic floor of each stage on one H200, the number every GPU benchmark
 * prints beside its measured time (METHOD.md's "two numbers first"):
 *
 *     floor = max(bytes moved / copy bandwidth, tensor flops / tensor peak, exponentials / MUFU rate)
 *
 * with bytes the fewest any implementation must move through device memory (each input read once,
 * each output written once), and the flops and exponentials those of the algorithm as the library
 * runs it (stated per stage below). A measured time over its floor is the gap left; the term that
 * sets the floor says whether the stage is bound by memory, tensor cores or the MUFU units. This is
 * a model: numbers computed from it are floors, never measurements.
 *
 * Header-only C99 (static inline), usable from the bench .cu programs and from plain C
 * (bench/cost_model_table.c prints the table of bench/RESULTS.md). Stages name their floor
 * kvc_floor_<stage>(...); a new stage adds its own function beside these and uses kvc_floor_of.
 */
#ifndef KVC_COST_MODEL_H
#define KVC_COST_MODEL_H

#include <stdint.h>

#include "kvcompress.h"

/* Ceilings of one NVIDIA H200 (SXM, 132 SMs), as measured on this workplace's device machines
 * (/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04):
 *   copy: a device-to-device copy moved ~4.3 TB/s counting bytes read plus bytes written (8.6 GB in
 *         2.0 ms; the same on gVisor and Firecracker machines);
 *   tensor: an 8192^3 bf16 matrix product ran at 788 TFLOP/s on random data (769-798 on Firecracker);
 *   MUFU: NOT measured here: ex2.approx issues at 16 per SM per clock on Hopper (4 per SM sub-
 *         partition), 132 SMs x 16 x 1.98 GHz (the SM clock read under load, KINDS.md) = 4.18e12/s,
 *         the higher end of the 3.7-4.2e12/s estimate of research/performance-review.md, so the
 *         floor stays a lower bound. Replace it by a measurement when a device run makes one. */
#define KVC_H200_COPY_BYTES_PER_S 4.3e12
#define KVC_H200_TENSOR_FLOPS_PER_S 7.88e14 /* dense bf16 (f16 alike), fp32 accumulation */
#define KVC_H200_MUFU_EXP2_PER_S 4.18e12

typedef enum { KVC_BOUND_MEMORY = 0, KVC_BOUND_TENSOR = 1, KVC_BOUND_MUFU = 2 } kvc_bound_t;

typedef struct {
  double bytes;        /* device-memory bytes moved (read + written)      */
  double tensor_flops; /* tensor-core flops (2 per multiply-add)          */
  double exps;         /* exponentials (exp2 on the MUFU units)           */
  double memory_s, tensor_s, mufu_s;
  double floor_s;      /* the largest of the three                        */
  kvc_bound_t bound;   /* which one                                       */
} kvc_floor_t;

static inline const char *kvc_bound_name(kvc_bound_t bound) {
  return bound == KVC_BOUND_MEMORY ? "memory" : bound == KVC_BOUND_TENSOR ? "tensor" : "mufu";
}

/* The floor of a stage that moves `bytes`, does `tensor_flops` on tensor cores and `exps`
 * exponentials, against the H200 ceilings above. */
static inline kvc_floor_t kvc_floor_of(double bytes, double tensor_flops, double exps) {
  kvc_floor_t f;
  f.bytes = bytes;
  f.tensor_flops = tensor_flops;
  f.exps = exps;
  f.memory_s = bytes / KVC_H200_COPY_BYTES_PER_S;
  f.tensor_s = tensor_flops / KVC_H200_TENSOR_FLOPS_PER_S;
  f.mufu_s = exps / KVC_H200_MUFU_EXP2_PER_S;
  f.floor_s = f.memory_s, f.bound = KVC_BOUND_MEMORY;
  if (f.tensor_s > f.floor_s) f.floor_s = f.tensor_s, f.bound = KVC_BOUND_TENSOR;
  if (f.mufu_s > f.floor_s) f.floor_s = f.mufu_s, f.bound = KVC_BOUND_MUFU;
  return f;
}

/* Causal (query, key) pairs of one sequence of n tokens with `window` observation queries (its
 * last w = min(window, n) positions; TOVA: one): query i sees n - w + i + 1 keys. `scored`: only
 * the keys the method scores (SNAPKV: those before the window; TOVA: all but the last). */
static inline double kvc_score_pairs(kvc_score_method_t method, double n, double window, int scored) {
  const double w = method == KVC_SCORE_TOVA ? 1.0 : (window < n ? window : n);
  if (!scored || method == KVC_SCORE_H2O) return w * (n - w) + w * (w + 1.0) / 2.0;
  return method == KVC_SCORE_SNAPKV ? w * (n - w) : n - 1.0;
}

/* kvc_score, one layer, `batch` sequences of n tokens; K elements of key_bytes (fp8 1, f16/bf16 2,
 * f32 4), queries of query_bytes (2 or 4; the same as K's but for fp8 keys, whose queries are
 * f16 / bf16 / f32 and whose logits run on the queries' tensor cores once K is widened):
 *   bytes  K once (batch * n * kv_heads * head_dim * key_bytes), the queries once, the scores
 *          written once (4 bytes per (KV head, token)): what any scorer must move;
 *   tensor the logits of the two passes of SNAPKV / H2O / TOVA (the normaliser over every pair a
 *          query sees, then the accumulation over the scored pairs), 2 * head_dim flops each per
 *          q head; with the engine's log-sum-exp (engine_lse) only the second pass;
 *   exps   one exp2 per logit of each pass.
 * KNORM and STREAMING have neither flops on tensor cores nor exponentials. For f32 the logits run
 * on CUDA cores (no tensor term is counted: compare with care). */
static inline kvc_floor_t kvc_floor_score(kvc_score_method_t method, int64_t n, int32_t window, int32_t batch,
                                          int32_t kv_heads, int32_t q_heads, int32_t head_dim, int key_bytes,
                                          int query_bytes, int engine_lse) {
  const int attention = method == KVC_SCORE_SNAPKV || method == KVC_SCORE_H2O || method == KVC_SCORE_TOVA;
  const double seqs = (double)batch, dn = (double)n, D = (double)head_dim, Hq = (double)q_heads;
  const double w = method == KVC_SCORE_TOVA ? 1.0 : ((double)window < dn ? (double)window : dn);
  double bytes = seqs * dn * kv_heads * 4.0; /* the scores */
  if (method != KVC_SCORE_STREAMING) bytes += seqs * dn * kv_heads * D * key_bytes;
  if (attention) bytes += seqs * w * Hq * D * query_bytes;
  double logits = 0.0;
  if (attention)
    logits = seqs * Hq *
             ((engine_lse ? 0.0 : kvc_score_pairs(method, dn, (double)window, 0)) +
              kvc_score_pairs(method, dn, (double)window, 1));
  return kvc_floor_of(bytes, query_bytes == 2 ? 2.0 * D * logits : 0.0, logits);
}

/* kvc_select, `rows` rows of n tokens (all layers' rows together) keeping `kept` each: every fp32
 * score read once, every int32 kept index written once (quotas and protected bits are a few bytes
 * per row). */
static inline kvc_floor_t kvc_floor_select(double rows, double n, double kept) {
  return kvc_floor_of(rows * (4.0 * n + 4.0 * kept), 0.0, 0.0);
}

/* In-place kvc_compact: every K and V row that moves (keep[j] != j) read once and written once
 * (row_bytes = head_dim * element size), the keep indices read once. */
static inline kvc_floor_t kvc_floor_compact(double moved_rows, double row_bytes, double keep_elems) {
  return kvc_floor_of(2.0 * 2.0 * moved_rows * row_bytes + 4.0 * keep_elems, 0.0, 0.0);
}

/* Out-of-place kvc_compact_into: every kept K and V row (all k of each row, whether or not it
 * changes slot) read once from the source pages and written once to the destination pages, the keep
 * indices read once. */
static inline kvc_floor_t kvc_floor_compact_into(double kept_rows, double row_bytes, double keep_elems) {
  return kvc_floor_compact(kept_rows, row_bytes, keep_elems);
}

/* kvc_compress: K read once to score it, the scores written and read once, the keep indices
 * written once, the moved K and V rows read and written once; plus the scoring's tensor flops and
 * exponentials (kvc_floor_score's, passed in). */
static inline kvc_floor_t kvc_floor_compress(double k_bytes, double score_elems, double keep_elems, double moved_rows,
                                             double row_bytes, double tensor_flops, double exps) {
  return kvc_floor_of(k_bytes + 8.0 * score_elems + 4.0 * keep_elems + 2.0 * 2.0 * moved_rows * row_bytes,
                      tensor_flops, exps);
}

#endif /* KVC_COST_MODEL_H */
