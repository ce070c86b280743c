/*
 * family_select.c - selection on its own: score patterns that stress the ordering rules (random,
 * few values with ties across partitions, NaN / +-inf / +-0 / denormals, all equal, all NaN) over
 * rows of 1 token to --max-n, batches up to 64, spans, PROTECT, sinks / recent, fairness, every
 * method's protected positions; CUDA and CPU bit for bit, the CPU against the sorting oracle, and
 * retention counts. Also gc_check_selection, which the score family uses on real scores.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "gpucheck.h"
#include "select_oracle.h"

int gc_check_selection(gc_run_t *r, const kvc_plan_desc_t *d, kvc_plan_t cpu_plan, kvc_plan_t cuda_plan,
                       const float *scores, const char *what, int with_oracle) {
  kvc_plan_info_t info;
  if (kvc_plan_get_info(cpu_plan, &info) != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "kvc_plan_get_info failed");
    return 1;
  }
  char label[96];
  const size_t keep_bytes = sizeof(int32_t) * (size_t)info.keep_elems;
  int32_t *cpu_keep = gc_alloc(r, keep_bytes), *cuda_keep = gc_alloc(r, keep_bytes);
  size_t ws_bytes = 0;
  void *ws = gc_workspace(r, cpu_plan, KVC_OP_SELECT, 0, &ws_bytes);
  if (r->failed) return 1;
  kvc_status_t status = kvc_select(r->cpu, cpu_plan, scores, cpu_keep, ws, ws_bytes, NULL);
  if (status != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "CPU kvc_select (%s): %s (%s)", what, kvc_status_name(status), kvc_last_error(r->cpu));
    return 1;
  }
  if (with_oracle) {
    int32_t *want = gc_alloc(r, keep_bytes);
    if (!want || kvc_test_select_oracle(cpu_plan, d, scores, want) != 0) {
      gc_fail(r, __FILE__, __LINE__, "the selection oracle failed");
      return 1;
    }
    snprintf(label, sizeof label, "CPU kvc_select vs the sorting oracle (%s)", what);
    if (gc_expect_keep(r, label, d, cpu_keep, want)) return 1;
  }

  float *dev_scores = gc_dev(r, scores, sizeof(float) * (size_t)info.score_elems, "scores");
  int32_t *dev_keep = gc_dev(r, NULL, keep_bytes, "keep");
  size_t dev_ws_bytes = 0;
  void *dev_ws = gc_workspace(r, cuda_plan, KVC_OP_SELECT, 1, &dev_ws_bytes);
  if (r->failed) return 1;
  status = kvc_select(r->cuda, cuda_plan, dev_scores, dev_keep, dev_ws, dev_ws_bytes, r->stream);
  if (status != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "CUDA kvc_select (%s): %s (%s)", what, kvc_status_name(status), kvc_last_error(r->cuda));
    return 1;
  }
  if (gc_sync(r, "kvc_select") || gc_fetch(r, cuda_keep, dev_keep, keep_bytes, "keep")) return 1;
  snprintf(label, sizeof label, "CUDA kvc_select vs CPU (%s)", what);
  if (gc_expect_keep(r, label, d, cuda_keep, cpu_keep) || gc_check_guards(r, "kvc_select")) return 1;

  if (!d->span_indptr || info.count_elems == 0) return 0;
  /* per-head spans: the keep and count layouts are those of per-sequence spans over batch * heads
   * one-head sequences (row (b, h) the (b * heads + h)-th) */
  kvc_plan_desc_t rows = *d;
  if (d->spans_per_head) {
    const int32_t heads = d->num_kv_heads, count = d->batch * heads;
    int32_t *lens = gc_alloc(r, sizeof(int32_t) * (size_t)count), *budgets = gc_alloc(r, sizeof(int32_t) * (size_t)count);
    if (r->failed) return 1;
    for (int32_t i = 0; i < count; ++i) lens[i] = d->seq_lens[i / heads], budgets[i] = d->budgets[i / heads];
    rows.batch = count, rows.num_kv_heads = 1, rows.seq_lens = lens, rows.budgets = budgets, rows.spans_per_head = 0;
  }
  d = &rows;
  const size_t count_bytes = sizeof(int32_t) * (size_t)info.count_elems;
  int32_t *want = gc_alloc(r, count_bytes), *cpu_counts = gc_alloc(r, count_bytes), *got = gc_alloc(r, count_bytes);
  int32_t *dev_counts = gc_dev(r, NULL, count_bytes, "retention counts");
  size_t rb = 0, drb = 0;
  void *rws = gc_workspace(r, cpu_plan, KVC_OP_RETENTION, 0, &rb), *drws = gc_workspace(r, cuda_plan, KVC_OP_RETENTION, 1, &drb);
  if (r->failed) return 1;
  kvc_test_retention_oracle(d->batch, d->seq_lens, d->budgets, d->num_kv_heads, d->span_indptr, d->spans, cpu_keep,
                            want);
  status = kvc_retention(r->cpu, cpu_plan, cpu_keep, cpu_counts, rws, rb, NULL);
  if (status != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "CPU kvc_retention: %s (%s)", kvc_status_name(status), kvc_last_error(r->cpu));
    return 1;
  }
  status = kvc_retention(r->cuda, cuda_plan, dev_keep, dev_counts, drws, drb, r->stream);
  if (status != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "CUDA kvc_retention: %s (%s)", kvc_status_name(status), kvc_last_error(r->cuda));
    return 1;
  }
  if (gc_sync(r, "kvc_retention") || gc_fetch(r, got, dev_counts, count_bytes, "retention counts")) return 1;
  return gc_expect_counts(r, "CPU kvc_retention vs brute force", d, cpu_counts, want) ||
         gc_expect_counts(r, "CUDA kvc_retention vs brute force", d, got, want) ||
         gc_check_guards(r, "kvc_retention");
}

static void run_select(gc_run_t *r) {
  const gc_problem_opts_t opts = {NULL, 0, 0, 1, 0, 1};
  gc_problem_t p;
  gc_draw_problem(r, &opts, &p);
  static const kvc_score_pattern_t patterns[] = {KVC_SCORES_RANDOM, KVC_SCORES_RANDOM,     KVC_SCORES_RANDOM,
                                                 KVC_SCORES_FEW_VALUES, KVC_SCORES_FEW_VALUES, KVC_SCORES_SPECIAL,
                                                 KVC_SCORES_SPECIAL,    KVC_SCORES_EQUAL,      KVC_SCORES_NAN};
  static const char *pattern_names[] = {"random", "few_values", "special", "equal", "nan"};
  const kvc_score_pattern_t pattern = patterns[kvc_rng_range(&r->rng, 0, 8)];
  gc_describe(r, " scores=%s", pattern_names[pattern]);
  gc_cover(r, "scores", pattern_names[pattern]);
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  GC_TRY(gc_make_plans(r, &p, &cpu_plan, &cuda_plan));
  kvc_plan_info_t info;
  GC_KVC(r, r->cpu, kvc_plan_get_info(cpu_plan, &info));
  float *scores = gc_alloc(r, sizeof(float) * (size_t)info.score_elems);
  GC_CHECK(r, scores, "out of memory");
  kvc_test_fill_scores(scores, info.score_elems, pattern, kvc_rng_next(&r->rng));
  GC_TRY(gc_check_selection(r, &p.desc, cpu_plan, cuda_plan, scores, "synthetic scores", 1));
}

const gc_family_t gc_family_select = {"select", "kvc_select (and kvc_retention) on synthetic score patterns: CUDA = CPU = sorting oracle",
                                      run_select};
