/*
 * cost_model_table.c - prints the analytic floors of bench/cost_model.h as the markdown table of
 * bench/RESULTS.md: kvc_score for Llama-3.1-8B heads (32 q / 8 KV, head_dim 128, bf16, one
 * sequence) at n = 4k, 32k and 128k: SnapKV (window 64), H2O over every query (window n), TOVA and
 * KNORM, with and without the engine's log-sum-exp. A model, not a measurement.
 *
 *   cost_model_table [COMMIT]   (built with the benchmarks: build/<dir>/bench/cost_model_table);
 *                               COMMIT names the commit of cost_model.h in the preamble
 * bench/results/cost_model.md is its output; bench/report.py puts it into bench/RESULTS.md.
 */
#include <stdio.h>

#include "cost_model.h"

/* "12.3 µs" below a millisecond, else "4.56 ms" */
static const char *duration(char *text, double seconds) {
  if (seconds < 1e-3) snprintf(text, 32, "%.1f µs", seconds * 1e6);
  else snprintf(text, 32, "%.2f ms", seconds * 1e3);
  return text;
}

int main(int argc, char **argv) {
  static const int64_t lengths[] = {4096, 32768, 131072};
  static const struct {
    const char *name;
    kvc_score_method_t method;
    int window_is_n, window, engine_lse;
  } stages[] = {
      {"SnapKV, window 64", KVC_SCORE_SNAPKV, 0, 64, 0}, {"SnapKV, window 64, engine lse", KVC_SCORE_SNAPKV, 0, 64, 1},
      {"H2O, every query", KVC_SCORE_H2O, 1, 0, 0},     {"H2O, every query, engine lse", KVC_SCORE_H2O, 1, 0, 1},
      {"TOVA", KVC_SCORE_TOVA, 0, 1, 0},                 {"KNORM", KVC_SCORE_KNORM, 0, 1, 0},
  };
  printf("Computed by `cost_model_table%s%s > bench/results/cost_model.md` (`cmake --build <dir> --target "
         "cost_model_table`; no device needed) from `bench/cost_model.h`%s%s%s: **analytic floors, not measurements** "
         "(no GPU has run these kernels yet). kvc_score of one layer, Llama-3.1-8B attention (32 q heads, 8 KV heads, "
         "head_dim 128), bf16, one sequence; floor = max(bytes moved / copy bandwidth, tensor flops / tensor peak, "
         "exp2 / MUFU rate). The flops and exponentials are those of the two-pass kernels (the normaliser pass over "
         "every pair a query sees, then the accumulation pass over the scored pairs); with the engine's lse only the "
         "second.\n\n",
         argc > 1 ? " " : "", argc > 1 ? argv[1] : "", argc > 1 ? " at commit `" : "", argc > 1 ? argv[1] : "",
         argc > 1 ? "`" : "");
  printf("| stage (kvc_score, one layer) | n | bytes moved | tensor TFLOP | exp2 (1e9) | memory | tensor | MUFU | "
         "**floor** | bound |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (size_t s = 0; s < sizeof stages / sizeof stages[0]; ++s)
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; ++i) {
      const int64_t n = lengths[i];
      const int32_t window = stages[s].window_is_n ? (int32_t)n : stages[s].window;
      const kvc_floor_t f = kvc_floor_score(stages[s].method, n, window, 1, 8, 32, 128, 2, 2, stages[s].engine_lse);
      char memory[32], tensor[32], mufu[32], floor[32];
      printf("| %s | %lldk | %.1f MB | %.3f | %.3f | %s | %s | %s | **%s** | %s |\n", stages[s].name,
             (long long)(n / 1024), f.bytes / 1e6, f.tensor_flops / 1e12, f.exps / 1e9, duration(memory, f.memory_s),
             duration(tensor, f.tensor_s), duration(mufu, f.mufu_s), duration(floor, f.floor_s), kvc_bound_name(f.bound));
    }
  printf("\nCeilings (bench/cost_model.h): copy %.2f TB/s and bf16 tensor %.0f TFLOP/s as measured on H200 machines "
         "here (KINDS.md); exp2 %.2fe12/s on the MUFU units, derived (132 SMs x 16/clock x 1.98 GHz), not measured.\n",
         KVC_H200_COPY_BYTES_PER_S / 1e12, KVC_H200_TENSOR_FLOPS_PER_S / 1e12, KVC_H200_MUFU_EXP2_PER_S / 1e12);
  return 0;
}
