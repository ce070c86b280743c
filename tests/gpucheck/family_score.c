/*
 * family_score.c - kvc_score on both backends on the same cache and queries: every method, dtype,
 * head_dim, GQA group, layout, table kind and page size, spans and span_local domains, pooling,
 * group reduce, custom scale, the engine's log-sum-exp, accumulate. The CUDA
 * scores must be within the tolerance of gpucheck.h, the pools unchanged (scoring only reads),
 * and then selection of either backend's scores must be bit-identical on both backends.
 * nonfinite: the same with NaN / +-inf planted in K rows and queries (and huge finite f32 keys for
 * KNORM): DESIGN.md's non-finite rule, one row of NaN per non-finite logit, on both backends.
 * decode: the same with per-head spans (spans_per_head) and often a fixed score_row_capacity.
 */
#include <stdlib.h>
#include <string.h>

#include "gpucheck.h"

/* decode: per-head spans and a fixed score_row_capacity (gc_draw_head_spans). */
static void score_case(gc_run_t *r, int nonfinite, int decode) {
  const gc_problem_opts_t opts = {NULL, 0, 1, 1, nonfinite, 0};
  gc_problem_t p;
  gc_draw_problem(r, &opts, &p);
  if (decode) gc_draw_head_spans(r, &p);
  const int accumulate = gc_chance(r, 0.15);
  if (accumulate) gc_describe(r, " accumulate");
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  GC_TRY(gc_make_plans(r, &p, &cpu_plan, &cuda_plan));
  kvc_plan_info_t info;
  GC_KVC(r, r->cpu, kvc_plan_get_info(cpu_plan, &info));
  kvc_test_cache_t *cache = gc_problem_cache(r, &p, 3);
  void *queries = gc_problem_queries(r, &p, &info);
  const size_t query_bytes = (size_t)info.obs_total * p.desc.num_q_heads * p.desc.head_dim * gc_dtype_bytes(kvc_test_query_dtype(&p.desc));
  float *lse = NULL;
  if (p.with_lse && queries) {
    lse = kvc_test_lse(&p.desc, cpu_plan, cache, queries);
    GC_CHECK(r, lse, "kvc_test_lse failed");
    void *tracked = gc_alloc(r, sizeof(float) * (size_t)info.obs_total * p.desc.num_q_heads);
    GC_CHECK(r, tracked, "out of memory");
    memcpy(tracked, lse, sizeof(float) * (size_t)info.obs_total * p.desc.num_q_heads);
    free(lse);
    lse = tracked;
  }

  /* CPU */
  const size_t score_bytes = sizeof(float) * (size_t)info.score_elems;
  float *initial = gc_alloc(r, score_bytes), *cpu_scores = gc_alloc(r, score_bytes), *cuda_scores = gc_alloc(r, score_bytes);
  GC_CHECK(r, initial && cpu_scores && cuda_scores, "out of memory");
  for (int64_t i = 0; i < info.score_elems; ++i) initial[i] = (float)kvc_rng_uniform(&r->rng);
  if (accumulate) memcpy(cpu_scores, initial, score_bytes);
  size_t ws_bytes = 0;
  void *ws = gc_workspace(r, cpu_plan, KVC_OP_SCORE, 0, &ws_bytes);
  if (r->failed) return;
  GC_KVC(r, r->cpu, kvc_score(r->cpu, cpu_plan, &cache->desc, queries, NULL, cpu_scores, accumulate, ws, ws_bytes, NULL));

  /* CUDA */
  gc_dev_cache_t dev;
  GC_TRY(gc_dev_cache(r, cache, NULL, 0, NULL, &dev));
  void *dev_queries = queries ? gc_dev(r, queries, query_bytes, "queries") : NULL;
  float *dev_lse = lse ? gc_dev(r, lse, sizeof(float) * (size_t)info.obs_total * p.desc.num_q_heads, "lse") : NULL;
  float *dev_scores = gc_dev(r, accumulate ? initial : NULL, score_bytes, "scores");
  size_t dev_ws_bytes = 0;
  void *dev_ws = gc_workspace(r, cuda_plan, KVC_OP_SCORE, 1, &dev_ws_bytes);
  if (r->failed) return;
  GC_KVC(r, r->cuda, kvc_score(r->cuda, cuda_plan, &dev.desc, dev_queries, dev_lse, dev_scores, accumulate, dev_ws,
                               dev_ws_bytes, r->stream));
  GC_TRY(gc_sync(r, "kvc_score"));
  GC_TRY(gc_fetch(r, cuda_scores, dev_scores, score_bytes, "scores"));
  double worst = 0.0;
  GC_TRY(gc_expect_scores(r, "kvc_score CUDA vs CPU", &p.desc, cuda_scores, cpu_scores, &worst));
  GC_TRY(gc_check_guards(r, "kvc_score"));
  kvc_test_cache_t *after = gc_track_cache(r, kvc_test_cache_clone(cache));
  GC_TRY(gc_dev_cache_fetch(r, &dev, after));
  GC_TRY(gc_expect_pool(r, "K pool after kvc_score (only read)", cache, after->k, cache->k, NULL));
  GC_TRY(gc_expect_pool(r, "V pool after kvc_score (never read)", cache, after->v, cache->v, NULL));

  GC_TRY(gc_check_selection(r, &p.desc, cpu_plan, cuda_plan, cpu_scores, "the CPU's scores", 1));
  GC_TRY(gc_check_selection(r, &p.desc, cpu_plan, cuda_plan, cuda_scores, "the CUDA scores", 0));
}

static void run_score(gc_run_t *r) { score_case(r, 0, 0); }
static void run_nonfinite(gc_run_t *r) { score_case(r, 1, 0); }
static void run_decode(gc_run_t *r) { score_case(r, 0, 1); }

const gc_family_t gc_family_score = {"score", "kvc_score CUDA vs CPU within tolerance, then selection of both", run_score};
const gc_family_t gc_family_nonfinite = {
    "nonfinite", "the score family with NaN / +-inf planted in K and queries (DESIGN.md's non-finite rule)",
    run_nonfinite};
const gc_family_t gc_family_decode = {
    "decode", "the score family with per-head spans and a fixed score_row_capacity (re-compression during decode)",
    run_decode};
