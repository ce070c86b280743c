/*
 * test_select_emu.c - kvc_select on the CUDA backend (kernels/select.cu run by the SIMT emulator)
 * against the CPU backend, bit for bit, and both against the sorting oracle of
 * tests/support/select_oracle.c, through the public API.
 *
 * Rows of 1..512 tokens take the warp-per-row kernel, longer ones (here up to ~5k) the
 * block-per-row kernel, whose multi-pass loop is the same at 1M tokens. Score patterns: random,
 * few values (ties everywhere, across partition borders), NaN / +-inf / +-0, all equal, all NaN.
 * Quotas of 0 and of the whole partition, k = n, k = |P|, n = 1, many partitions with unequal
 * weights, fairness 0 / 0.5 / 1, TOVA's one selection shared by every KV head, SNAPKV's
 * protected window. The keep array has a guard tail the kernels must not touch.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "select_oracle.h"
#include "test_util.h"

static const int32_t kGuard = 64, kGuardValue = -12345;

static void *alloc_ws(kvc_plan_t plan, size_t *bytes) {
  cr_assert_eq(kvc_plan_workspace_size(plan, KVC_OP_SELECT, bytes), KVC_SUCCESS);
  return kvc_test_workspace_new(*bytes);
}

static void run_select(kvc_context_t ctx, kvc_plan_t plan, const float *scores, int32_t *keep) {
  size_t bytes = 0;
  void *ws = alloc_ws(plan, &bytes);
  kvc_status_t status = kvc_select(ctx, plan, scores, keep, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_select: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  free(ws);
}

/* First differing element of two keep layouts, as (sequence, head, index) for the message. */
static void assert_same_keep(const kvc_test_select_case_t *c, const int32_t *got, const int32_t *want,
                             const char *what) {
  int64_t at = 0;
  for (int32_t b = 0; b < c->batch; ++b) {
    const int32_t n = c->seq_lens[b], k = c->budgets[b] < n ? c->budgets[b] : n;
    for (int32_t h = 0; h < c->num_kv_heads; ++h)
      for (int32_t j = 0; j < k; ++j, ++at)
        cr_assert_eq(got[at], want[at],
                     "%s: %s scores, seq %d (n %d, k %d) head %d: keep[%d] is %d, expected %d (fairness %.2f)", what,
                     kvc_test_pattern_name(c->pattern), b, n, k, h, j, got[at], want[at], (double)c->fairness);
  }
}

static void check_case(const kvc_test_select_case_t *c) {
  kvc_plan_desc_t desc = kvc_test_select_case_desc(c);
  kvc_context_t cpu = NULL, cuda = NULL;
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  kvc_status_t status = kvc_plan_create(cpu, &desc, &cpu_plan);
  cr_assert_eq(status, KVC_SUCCESS, "CPU plan: %s (%s)", kvc_status_name(status), kvc_last_error(cpu));
  status = kvc_plan_create(cuda, &desc, &cuda_plan);
  cr_assert_eq(status, KVC_SUCCESS, "CUDA plan: %s (%s)", kvc_status_name(status), kvc_last_error(cuda));
  kvc_plan_info_t info;
  cr_assert_eq(kvc_plan_get_info(cpu_plan, &info), KVC_SUCCESS);

  float *scores = malloc(sizeof(float) * (size_t)info.score_elems);
  kvc_test_fill_scores(scores, info.score_elems, c->pattern, c->seed);
  const size_t keep_count = (size_t)info.keep_elems + (size_t)kGuard;
  int32_t *want = malloc(sizeof(int32_t) * keep_count), *cpu_keep = malloc(sizeof(int32_t) * keep_count);
  int32_t *cuda_keep = malloc(sizeof(int32_t) * keep_count);
  for (size_t i = 0; i < keep_count; ++i) cpu_keep[i] = cuda_keep[i] = kGuardValue;

  cr_assert_eq(kvc_test_select_oracle(cpu_plan, &desc, scores, want), 0, "oracle failed");
  run_select(cpu, cpu_plan, scores, cpu_keep);
  run_select(cuda, cuda_plan, scores, cuda_keep);
  assert_same_keep(c, cpu_keep, want, "CPU vs oracle");
  assert_same_keep(c, cuda_keep, cpu_keep, "CUDA vs CPU");
  for (int32_t i = 0; i < kGuard; ++i)
    cr_assert_eq(cuda_keep[info.keep_elems + i], kGuardValue, "CUDA wrote past the keep layout (element %d)", i);

  free(scores), free(want), free(cpu_keep), free(cuda_keep);
  kvc_plan_destroy(cpu_plan), kvc_plan_destroy(cuda_plan);
  kvc_context_destroy(cpu), kvc_context_destroy(cuda);
}

static const int32_t kMixedLens[] = {1, 5, 31, 64, 512, 513, 1000, 2048, 4099};
#define MIXED_BATCH ((int32_t)(sizeof kMixedLens / sizeof kMixedLens[0]))

static const kvc_score_pattern_t kPatterns[] = {KVC_SCORES_RANDOM, KVC_SCORES_FEW_VALUES, KVC_SCORES_SPECIAL,
                                                KVC_SCORES_EQUAL, KVC_SCORES_NAN};

/* Plain top-k with sinks and recents, short and long rows in one batch, every pattern. */
Test(select_emu, plain_topk_all_patterns) {
  for (int i = 0; i < 5; ++i) {
    kvc_test_select_case_t c =
        kvc_test_select_case(KVC_SCORE_KNORM, 2, MIXED_BATCH, kMixedLens, 0.3, 4, kPatterns[i], 100 + i);
    c.sink = 2, c.recent = 2;
    check_case(&c);
  }
}

/* FAIR spans with gaps (implicit partition) and PROTECT spans inside / across them. */
Test(select_emu, fair_spans_every_fairness) {
  const float fairness[] = {0.0f, 0.5f, 1.0f};
  for (int f = 0; f < 3; ++f)
    for (int i = 0; i < 5; ++i) {
      kvc_test_select_case_t c =
          kvc_test_select_case(KVC_SCORE_KNORM, 2, MIXED_BATCH, kMixedLens, 0.4, 8, kPatterns[i], 200 + 10 * f + i);
      c.fairness = fairness[f];
      c.sink = 1, c.recent = 1;
      kvc_test_select_case_add_spans(&c, 3, 2, 0);
      check_case(&c);
    }
}

/* Dozens of partitions of unequal weight in long rows. */
Test(select_emu, many_partitions) {
  const int32_t lens[] = {3000, 5000, 700};
  const float fairness[] = {0.0f, 0.5f, 1.0f};
  for (int f = 0; f < 3; ++f)
    for (int p = 0; p < 2; ++p) {
      kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 1, 3, lens, 0.25, 64,
                                                      p ? KVC_SCORES_FEW_VALUES : KVC_SCORES_RANDOM, 300 + 10 * f + p);
      c.fairness = fairness[f];
      kvc_test_select_case_add_spans(&c, 40, 10, 0);
      check_case(&c);
    }
}

/* Fairness 1 with a budget close to n: quotas reach whole partitions (q_p = L_p); fairness 0:
 * quotas equal the protected counts (q_p - lo_p = 0, including 0 for partitions without any). */
Test(select_emu, quota_extremes) {
  const int32_t lens[] = {400, 2500};
  const double fractions[] = {0.97, 0.02};
  for (int e = 0; e < 2; ++e)
    for (int i = 0; i < 3; ++i) {
      kvc_test_select_case_t c =
          kvc_test_select_case(KVC_SCORE_KNORM, 2, 2, lens, fractions[e], 12, kPatterns[i], 400 + 10 * e + i);
      c.fairness = e == 0 ? 1.0f : 0.0f;
      kvc_test_select_case_add_spans(&c, 4, 1, 0);
      check_case(&c);
    }
  /* one heavy span: its quota saturates at its length while the light ones get little */
  const int32_t one[] = {3000};
  kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 1, 1, one, 0.5, 1, KVC_SCORES_RANDOM, 420);
  c.fairness = 1.0f;
  c.has_spans = 1;
  c.span_indptr[0] = 0, c.span_indptr[1] = 3;
  c.spans[0] = (kvc_span_t){0, 600, KVC_SPAN_FAIR, 100.0f};
  c.spans[1] = (kvc_span_t){600, 2900, KVC_SPAN_FAIR, 0.01f};
  c.spans[2] = (kvc_span_t){2900, 3000, KVC_SPAN_FAIR, 1.0f};
  check_case(&c);
  int32_t quotas[3];
  kvc_context_t cpu;
  kvc_plan_t plan;
  kvc_plan_desc_t desc = kvc_test_select_case_desc(&c);
  kvc_context_create(KVC_BACKEND_CPU, 0, &cpu);
  cr_assert_eq(kvc_plan_create(cpu, &desc, &plan), KVC_SUCCESS);
  kvc_plan_span_quotas(plan, quotas, NULL);
  cr_expect_eq(quotas[0], 600, "the heavy span's quota saturates (got %d)", quotas[0]);
  kvc_plan_destroy(plan);
  kvc_context_destroy(cpu);
}

/* k = n (untouched rows next to compressed ones), k = |P|, n = 1. */
Test(select_emu, budget_edges) {
  const int32_t lens[] = {1, 1, 600, 600, 2000, 7};
  kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 3, 6, lens, 1.0, 1, KVC_SCORES_FEW_VALUES, 500);
  c.budgets[1] = 5;   /* budget > n = 1 */
  c.budgets[3] = 601; /* k = n on a long row */
  c.sink = 3, c.recent = 3;
  c.budgets[2] = 6; /* k = |P| = sinks + recents */
  c.budgets[4] = 6;
  c.budgets[5] = 6; /* short row, k = |P| = 6 of 7 */
  for (int i = 0; i < 5; ++i) {
    c.pattern = kPatterns[i];
    c.seed = 500 + i;
    check_case(&c);
  }
  /* k = |P| with PROTECT spans and SNAPKV's window */
  kvc_test_select_case_t s =
      kvc_test_select_case(KVC_SCORE_SNAPKV, 2, 2, (const int32_t[]){900, 300}, 0.0, 1, KVC_SCORES_RANDOM, 510);
  s.window = 8;
  kvc_test_select_case_add_spans(&s, 2, 3, 1);
  kvc_context_t cpu;
  kvc_plan_t probe;
  kvc_context_create(KVC_BACKEND_CPU, 0, &cpu);
  s.budgets[0] = s.seq_lens[0], s.budgets[1] = s.seq_lens[1];
  kvc_plan_desc_t desc = kvc_test_select_case_desc(&s);
  cr_assert_eq(kvc_plan_create(cpu, &desc, &probe), KVC_SUCCESS, "%s", kvc_last_error(cpu));
  for (int32_t b = 0; b < 2; ++b) s.budgets[b] = kvc_test_protected_count(probe, &desc, b);
  kvc_plan_destroy(probe);
  kvc_context_destroy(cpu);
  check_case(&s);
}

/* TOVA: head 0's scores choose for every KV head (the other heads' scores differ and are ignored). */
Test(select_emu, tova_shared_heads) {
  const int32_t lens[] = {200, 1500, 3};
  for (int i = 0; i < 3; ++i) {
    kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_TOVA, 4, 3, lens, 0.3, 6, kPatterns[i], 600 + i);
    c.fairness = 0.5f;
    kvc_test_select_case_add_spans(&c, 2, 1, 1);
    check_case(&c);
  }
}

/* SNAPKV protects its observation window; fairness across spans on top. */
Test(select_emu, snapkv_window_protected) {
  const int32_t lens[] = {100, 1200};
  for (int i = 0; i < 2; ++i) {
    kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_SNAPKV, 2, 2, lens, 0.2, 40, kPatterns[i], 700 + i);
    c.window = 32;
    c.fairness = 1.0f;
    kvc_test_select_case_add_spans(&c, 2, 0, 1);
    check_case(&c);
  }
}

/* Many random configurations, small enough to run quickly through the emulator. */
Test(select_emu, randomized) {
  kvc_rng_t rng = {800};
  for (int trial = 0; trial < 40; ++trial) {
    int32_t lens[4], batch = kvc_rng_range(&rng, 1, 4);
    for (int32_t b = 0; b < batch; ++b) lens[b] = kvc_rng_range(&rng, 1, kvc_rng_range(&rng, 0, 3) ? 600 : 3000);
    kvc_test_select_case_t c =
        kvc_test_select_case(KVC_SCORE_KNORM, kvc_rng_range(&rng, 1, 3), batch, lens, kvc_rng_uniform(&rng), 1,
                             kPatterns[kvc_rng_range(&rng, 0, 4)], 900 + trial);
    c.fairness = (float)kvc_rng_range(&rng, 0, 4) / 4.0f;
    kvc_test_select_case_add_spans(&c, kvc_rng_range(&rng, 0, 6), 0, kvc_rng_range(&rng, 0, 1));
    check_case(&c);
  }
}

/* ---- rows split across blocks ---------------------------------------------------------------- */

/* KVC_SELECT_SEGMENT lowers the segment length the CUDA plan splits rows by (read once at plan
 * creation), so rows of a few hundred tokens take the multi-block passes here: dozens of segments
 * per row, partitions and ties across segment borders, the arrival counters of many rows at once.
 * The plan must then carry the split rows' histograms (a larger workspace than without). */
static void split_rows_at(const char *segment) {
  setenv("KVC_SELECT_SEGMENT", segment, 1);
}

Test(select_emu, split_rows_carry_their_histograms) {
  kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 2, MIXED_BATCH, kMixedLens, 0.3, 4, KVC_SCORES_RANDOM, 1);
  kvc_plan_desc_t desc = kvc_test_select_case_desc(&c);
  kvc_context_t cuda;
  kvc_plan_t whole, split;
  size_t whole_bytes = 0, split_bytes = 0;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda), KVC_SUCCESS);
  split_rows_at("16384");
  cr_assert_eq(kvc_plan_create(cuda, &desc, &whole), KVC_SUCCESS);
  split_rows_at("100");
  cr_assert_eq(kvc_plan_create(cuda, &desc, &split), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(whole, KVC_OP_SELECT, &whole_bytes), KVC_SUCCESS);
  cr_assert_eq(kvc_plan_workspace_size(split, KVC_OP_SELECT, &split_bytes), KVC_SUCCESS);
  /* each of the 2 heads of the 5 rows over 100 tokens: at least its partition's 256-bin histogram */
  cr_assert_geq(split_bytes, whole_bytes + 2 * 5 * 256 * sizeof(int32_t), "%zu vs %zu", split_bytes, whole_bytes);
  kvc_plan_destroy(whole), kvc_plan_destroy(split);
  kvc_context_destroy(cuda);
}

Test(select_emu, split_rows_plain_topk_all_patterns) {
  split_rows_at("200");
  for (int i = 0; i < 5; ++i) {
    kvc_test_select_case_t c =
        kvc_test_select_case(KVC_SCORE_KNORM, 2, MIXED_BATCH, kMixedLens, 0.3, 4, kPatterns[i], 1100 + i);
    c.sink = 2, c.recent = 2;
    check_case(&c);
  }
}

Test(select_emu, split_rows_fair_spans_every_fairness) {
  split_rows_at("300");
  const float fairness[] = {0.0f, 0.5f, 1.0f};
  for (int f = 0; f < 3; ++f)
    for (int i = 0; i < 3; ++i) {
      kvc_test_select_case_t c =
          kvc_test_select_case(KVC_SCORE_KNORM, 2, MIXED_BATCH, kMixedLens, 0.4, 8, kPatterns[i], 1200 + 10 * f + i);
      c.fairness = fairness[f];
      c.sink = 1, c.recent = 1;
      kvc_test_select_case_add_spans(&c, 3, 2, 0);
      check_case(&c);
    }
}

/* Forty partitions over rows of 3000 and 5000 tokens in segments of 256: most segments hold
 * several partitions, most partitions several segments. */
Test(select_emu, split_rows_many_partitions) {
  split_rows_at("256");
  const int32_t lens[] = {3000, 5000, 700};
  const float fairness[] = {0.5f, 1.0f};
  for (int f = 0; f < 2; ++f)
    for (int p = 0; p < 2; ++p) {
      kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 1, 3, lens, 0.25, 64,
                                                      p ? KVC_SCORES_FEW_VALUES : KVC_SCORES_RANDOM, 1300 + 10 * f + p);
      c.fairness = fairness[f];
      kvc_test_select_case_add_spans(&c, 40, 10, 0);
      check_case(&c);
    }
}

/* Segments of one and of three tokens (every token its own block's work), k = n and k = |P|. */
Test(select_emu, split_rows_tiny_segments) {
  const char *segments[] = {"1", "3"};
  for (int s = 0; s < 2; ++s) {
    split_rows_at(segments[s]);
    const int32_t lens[] = {1, 1, 40, 40, s ? 200 : 60, 7};
    kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_KNORM, 2, 6, lens, 1.0, 1, KVC_SCORES_FEW_VALUES, 1400 + s);
    c.budgets[1] = 5;
    c.budgets[3] = 41;
    c.sink = 3, c.recent = 3;
    c.budgets[2] = 6;
    c.budgets[4] = 30;
    c.budgets[5] = 6;
    for (int i = 0; i < 2; ++i) {
      c.pattern = kPatterns[i];
      c.seed = 1400 + 10 * s + i;
      check_case(&c);
    }
  }
}

/* TOVA's shared selection and SNAPKV's protected window in split rows. */
Test(select_emu, split_rows_tova_and_snapkv) {
  split_rows_at("64");
  const int32_t lens[] = {200, 1500, 3};
  for (int i = 0; i < 3; ++i) {
    kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_TOVA, 4, 3, lens, 0.3, 6, kPatterns[i], 1500 + i);
    c.fairness = 0.5f;
    kvc_test_select_case_add_spans(&c, 2, 1, 1);
    check_case(&c);
  }
  const int32_t snap_lens[] = {100, 1200};
  kvc_test_select_case_t c = kvc_test_select_case(KVC_SCORE_SNAPKV, 2, 2, snap_lens, 0.2, 40, KVC_SCORES_FEW_VALUES, 1510);
  c.window = 32;
  c.fairness = 1.0f;
  kvc_test_select_case_add_spans(&c, 2, 0, 1);
  check_case(&c);
}

/* ---- every layer in one call ----------------------------------------------------------------- */

/* kvc_select_layers over 3 layers of different scores: CUDA == CPU == one kvc_select per layer on
 * the CPU, with rows staged whole and with rows split into segments of 300 (and TOVA's one
 * selection per sequence, split). */
Test(select_emu, layers_in_one_call_match_single_layer_calls) {
  enum { L = 3 };
  const char *segments[] = {"16384", "300", "300"};
  for (int s = 0; s < 3; ++s) {
    split_rows_at(segments[s]);
    kvc_test_select_case_t c = kvc_test_select_case(s == 2 ? KVC_SCORE_TOVA : KVC_SCORE_KNORM, 2, MIXED_BATCH,
                                                    kMixedLens, 0.3, 4, KVC_SCORES_FEW_VALUES, 1600 + s);
    c.fairness = 0.5f;
    c.sink = 2;
    kvc_test_select_case_add_spans(&c, 3, 1, 0);
    kvc_plan_desc_t desc = kvc_test_select_case_desc(&c);
    kvc_context_t ctx[2];
    kvc_plan_t plan[2];
    cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx[0]), KVC_SUCCESS);
    cr_assert_eq(kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx[1]), KVC_SUCCESS);
    for (int backend = 0; backend < 2; ++backend)
      cr_assert_eq(kvc_plan_create(ctx[backend], &desc, &plan[backend]), KVC_SUCCESS, "%s", kvc_last_error(ctx[backend]));
    kvc_plan_info_t info;
    cr_assert_eq(kvc_plan_get_info(plan[0], &info), KVC_SUCCESS);
    float *scores = malloc(sizeof(float) * (size_t)(L * info.score_elems));
    for (int32_t l = 0; l < L; ++l)
      kvc_test_fill_scores(scores + l * info.score_elems, info.score_elems, l == 1 ? KVC_SCORES_RANDOM : KVC_SCORES_FEW_VALUES,
                           c.seed + (uint64_t)l);
    int32_t *want = malloc(sizeof(int32_t) * (size_t)(L * info.keep_elems));
    for (int32_t l = 0; l < L; ++l) run_select(ctx[0], plan[0], scores + l * info.score_elems, want + l * info.keep_elems);
    for (int backend = 0; backend < 2; ++backend) {
      kvc_workspace_layout_t layout;
      cr_assert_eq(kvc_plan_workspace_layout(plan[backend], KVC_OP_SELECT, L, &layout), KVC_SUCCESS);
      void *ws = kvc_test_workspace_new(layout.workspace_bytes);
      const size_t count = (size_t)(L * info.keep_elems) + (size_t)kGuard;
      int32_t *got = malloc(sizeof(int32_t) * count);
      for (size_t i = 0; i < count; ++i) got[i] = kGuardValue;
      kvc_status_t status = kvc_select_layers(ctx[backend], plan[backend], L, scores, got, ws, layout.workspace_bytes, NULL);
      cr_assert_eq(status, KVC_SUCCESS, "%s: %s (%s)", backend ? "CUDA" : "CPU", kvc_status_name(status),
                   kvc_last_error(ctx[backend]));
      for (int64_t e = 0; e < L * info.keep_elems; ++e)
        cr_assert_eq(got[e], want[e], "%s, segment %s: layer %lld keep element %lld is %d, the single call's %d",
                     backend ? "CUDA" : "CPU", segments[s], (long long)(e / info.keep_elems),
                     (long long)(e % info.keep_elems), got[e], want[e]);
      for (int32_t i = 0; i < kGuard; ++i) cr_assert_eq(got[L * info.keep_elems + i], kGuardValue);
      free(got);
      free(ws);
    }
    free(scores), free(want);
    for (int backend = 0; backend < 2; ++backend) {
      kvc_plan_destroy(plan[backend]);
      kvc_context_destroy(ctx[backend]);
    }
  }
}
