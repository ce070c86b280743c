/*
 * cost_model.h - analytic floors of the library's stages on the H200 the benchmarks target: the
 * least time the bytes a stage must move (or the products it must compute) take at the device's
 * measured ceilings. The benchmarks print each floor beside the measured time, so a result reads as
 * a fraction of what the hardware allows. Header-only C++, no CUDA needed.
 *
 * Ceilings (DESIGN.md section 7, measured on an H200): ~4.3 TB/s device-to-device copy (bytes read
 * plus bytes written), ~790 TFLOP/s bf16 tensor-core GEMM.
 */
#ifndef KVC_BENCH_COST_MODEL_H
#define KVC_BENCH_COST_MODEL_H

#include <cstdint>

namespace cost {

constexpr double kH200CopyBytesPerSecond = 4.3e12;
constexpr double kH200Bf16FlopsPerSecond = 790e12;

/* Seconds to move `bytes` (read + written, counted once each) at the copy ceiling. */
inline double memory_floor_s(double bytes) { return bytes / kH200CopyBytesPerSecond; }

/* Selection of `kept` of `n` tokens in each of `rows` rows (all layers' rows together): every fp32
 * score read once, every int32 kept index written once. Nothing else is necessary (the quotas and
 * protected bits are a few bytes per row). */
inline double select_floor_s(double rows, double n, double kept) { return memory_floor_s(rows * (4.0 * n + 4.0 * kept)); }

/* In-place compaction: every K and V row that moves (keep[j] != j) is read once and written once;
 * row_bytes = head_dim * element size; the keep indices are read once. */
inline double compact_floor_s(double moved_rows, double row_bytes, double keep_elems) {
  return memory_floor_s(2.0 * 2.0 * moved_rows * row_bytes + 4.0 * keep_elems);
}

/* kvc_compress, memory part: K read once to score it, the scores written and read once, the keep
 * indices written once, the moved K and V rows read and written once. (The attention methods'
 * QK^T products add a compute floor: flops / kH200Bf16FlopsPerSecond; the larger of the two bounds
 * the call.) */
inline double compress_memory_floor_s(double k_bytes, double score_elems, double keep_elems, double moved_rows,
                                      double row_bytes) {
  return memory_floor_s(k_bytes + 8.0 * score_elems + 4.0 * keep_elems + 2.0 * 2.0 * moved_rows * row_bytes);
}

inline double compute_floor_s(double flops) { return flops / kH200Bf16FlopsPerSecond; }

}  // namespace cost

#endif /* KVC_BENCH_COST_MODEL_H */
