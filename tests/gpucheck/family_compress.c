/*
 * family_compress.c - the fused pipeline, kvc_compress, and the same call captured in a CUDA graph.
 *
 * compress: kvc_compress on both backends. The CUDA kernels score in fp32, so near-ties may keep a
 * different token than the CPU's double; the exact statement is: the CUDA keep layout equals the
 * CPU's kvc_select of the CUDA kvc_score of the same inputs, and the CUDA pools equal the gather
 * oracle applied with that keep layout, byte for byte (sentinels and guard pages included).
 * STREAMING scores are exact, so there the CUDA keep layout must also equal the CPU's.
 *
 * graph: kvc_compress run once uncaptured (modules load lazily on first use), then
 * captured on a non-blocking stream, instantiated and replayed twice on fresh copies of the cache
 * with a garbage workspace; every replay must reproduce the uncaptured run's pools and keep layout.
 */
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "device.h"
#include "gpucheck.h"

/* The drawn problem's inputs, on both sides. */
typedef struct {
  gc_problem_t p;
  kvc_plan_t cpu_plan, cuda_plan;
  kvc_plan_info_t cpu_info, cuda_info;
  kvc_test_cache_t *before;
  void *queries, *dev_queries;
  float *dev_lse;
  gc_dev_cache_t dev;
} inputs_t;

static int make_inputs(gc_run_t *r, const gc_problem_opts_t *opts, inputs_t *in) {
  memset(in, 0, sizeof *in);
  gc_draw_problem(r, opts, &in->p);
  if (gc_make_plans(r, &in->p, &in->cpu_plan, &in->cuda_plan) ||
      kvc_plan_get_info(in->cpu_plan, &in->cpu_info) != KVC_SUCCESS ||
      kvc_plan_get_info(in->cuda_plan, &in->cuda_info) != KVC_SUCCESS) {
    if (!r->failed) gc_fail(r, __FILE__, __LINE__, "kvc_plan_get_info failed");
    return 1;
  }
  const kvc_plan_desc_t *d = &in->p.desc;
  in->before = gc_problem_cache(r, &in->p, 3);
  in->queries = gc_problem_queries(r, &in->p, &in->cpu_info);
  if (gc_dev_cache(r, in->before, NULL, 0, NULL, &in->dev)) return 1;
  if (in->queries)
    in->dev_queries = gc_dev(r, in->queries,
                             (size_t)in->cpu_info.obs_total * d->num_q_heads * d->head_dim * gc_dtype_bytes(kvc_test_query_dtype(d)),
                             "queries");
  if (in->p.with_lse && in->queries) {
    float *lse = kvc_test_lse(d, in->cpu_plan, in->before, in->queries);
    if (!lse) {
      gc_fail(r, __FILE__, __LINE__, "kvc_test_lse failed");
      return 1;
    }
    in->dev_lse = gc_dev(r, lse, sizeof(float) * (size_t)in->cpu_info.obs_total * d->num_q_heads, "lse");
    free(lse);
  }
  return r->failed;
}

static void run_compress(gc_run_t *r) {
  const gc_problem_opts_t opts = {NULL, 0, 1, 1, 0, 0};
  inputs_t in;
  GC_TRY(make_inputs(r, &opts, &in));
  const kvc_plan_desc_t *d = &in.p.desc;
  const size_t keep_bytes = sizeof(int32_t) * (size_t)in.cpu_info.keep_elems;
  const size_t score_bytes = sizeof(float) * (size_t)in.cpu_info.score_elems;

  /* CPU kvc_compress */
  kvc_test_cache_t *cpu_after = gc_track_cache(r, kvc_test_cache_clone(in.before));
  size_t ws_bytes = 0;
  unsigned char *ws = gc_workspace(r, in.cpu_plan, KVC_OP_COMPRESS, 0, &ws_bytes);
  if (r->failed) return;
  GC_KVC(r, r->cpu, kvc_compress(r->cpu, in.cpu_plan, &cpu_after->desc, in.queries, NULL, ws, ws_bytes, NULL));
  const int32_t *cpu_keep = (const int32_t *)(ws + in.cpu_info.keep_offset_bytes);
  kvc_test_cache_t *cpu_expected = gc_track_cache(r, kvc_test_cache_clone(in.before));
  kvc_test_compact_oracle(in.before, cpu_expected, in.p.budgets, cpu_keep, NULL, NULL, 0, NULL);
  GC_TRY(gc_expect_pool(r, "CPU kvc_compress K pool vs the oracle of its keep layout", in.before, cpu_after->k,
                        cpu_expected->k, NULL));
  GC_TRY(gc_expect_pool(r, "CPU kvc_compress V pool vs the oracle of its keep layout", in.before, cpu_after->v,
                        cpu_expected->v, NULL));

  /* CUDA kvc_score alone (the cache is only read), then kvc_compress */
  float *dev_scores = gc_dev(r, NULL, score_bytes, "scores");
  size_t score_ws_bytes = 0, dev_ws_bytes = 0;
  void *score_ws = gc_workspace(r, in.cuda_plan, KVC_OP_SCORE, 1, &score_ws_bytes);
  unsigned char *dev_ws = gc_workspace(r, in.cuda_plan, KVC_OP_COMPRESS, 1, &dev_ws_bytes);
  float *cuda_scores = gc_alloc(r, score_bytes);
  int32_t *cuda_keep = gc_alloc(r, keep_bytes), *want_keep = gc_alloc(r, keep_bytes);
  if (r->failed) return;
  GC_KVC(r, r->cuda, kvc_score(r->cuda, in.cuda_plan, &in.dev.desc, in.dev_queries, in.dev_lse, dev_scores, 0,
                               score_ws, score_ws_bytes, r->stream));
  GC_KVC(r, r->cuda, kvc_compress(r->cuda, in.cuda_plan, &in.dev.desc, in.dev_queries, in.dev_lse, dev_ws, dev_ws_bytes,
                                  r->stream));
  GC_TRY(gc_sync(r, "kvc_score + kvc_compress"));
  GC_TRY(gc_fetch(r, cuda_scores, dev_scores, score_bytes, "scores"));
  GC_TRY(gc_fetch(r, cuda_keep, dev_ws + in.cuda_info.keep_offset_bytes, keep_bytes, "the keep layout in the workspace"));
  kvc_test_cache_t *got = gc_track_cache(r, kvc_test_cache_clone(in.before));
  GC_TRY(gc_dev_cache_fetch(r, &in.dev, got));

  size_t select_bytes = 0;
  void *select_ws = gc_workspace(r, in.cpu_plan, KVC_OP_SELECT, 0, &select_bytes);
  if (r->failed) return;
  GC_KVC(r, r->cpu, kvc_select(r->cpu, in.cpu_plan, cuda_scores, want_keep, select_ws, select_bytes, NULL));
  GC_TRY(gc_expect_keep(r, "CUDA kvc_compress keep vs CPU kvc_select of the CUDA kvc_score", d, cuda_keep, want_keep));
  kvc_test_cache_t *expected = gc_track_cache(r, kvc_test_cache_clone(in.before));
  kvc_test_compact_oracle(in.before, expected, in.p.budgets, cuda_keep, NULL, NULL, 0, NULL);
  GC_TRY(gc_expect_pool(r, "CUDA kvc_compress K pool vs the oracle of its keep layout", in.before, got->k, expected->k, NULL));
  GC_TRY(gc_expect_pool(r, "CUDA kvc_compress V pool vs the oracle of its keep layout", in.before, got->v, expected->v, NULL));
  GC_TRY(gc_check_guards(r, "kvc_compress"));
  const int same = memcmp(cuda_keep, cpu_keep, keep_bytes) == 0;
  if (d->method == KVC_SCORE_STREAMING && !in.p.nonfinite)
    GC_TRY(gc_expect_keep(r, "CUDA vs CPU kvc_compress keep (STREAMING scores are exact)", d, cuda_keep, cpu_keep));
  gc_cover(r, "compress_keep", same ? "= CPU keep" : "differs from CPU keep (fp32 near-ties)");
}

static void run_graph(gc_run_t *r) {
  if (!gc_graph_supported()) {
    gc_skip(r, "CUDA graphs need a real GPU");
    return;
  }
  const gc_problem_opts_t opts = {NULL, 0, 1, 1, 0, 0};
  inputs_t in;
  GC_TRY(make_inputs(r, &opts, &in));
  const size_t keep_bytes = sizeof(int32_t) * (size_t)in.cuda_info.keep_elems;
  size_t ws_bytes = 0;
  unsigned char *ws = gc_workspace(r, in.cuda_plan, KVC_OP_COMPRESS, 1, &ws_bytes);
  unsigned char *garbage = gc_alloc(r, ws_bytes);
  int32_t *ref_keep = gc_alloc(r, keep_bytes), *keep = gc_alloc(r, keep_bytes);
  if (r->failed) return;
  memset(garbage, 0xA5, ws_bytes);

  /* uncaptured first: lazy loading happens here, not inside the capture */
  GC_KVC(r, r->cuda, kvc_compress(r->cuda, in.cuda_plan, &in.dev.desc, in.dev_queries, in.dev_lse, ws, ws_bytes, r->stream));
  GC_TRY(gc_sync(r, "uncaptured kvc_compress"));
  kvc_test_cache_t *ref = gc_track_cache(r, kvc_test_cache_clone(in.before));
  GC_TRY(gc_dev_cache_fetch(r, &in.dev, ref));
  GC_TRY(gc_fetch(r, ref_keep, ws + in.cuda_info.keep_offset_bytes, keep_bytes, "keep layout"));

  GC_TRY(gc_dev_cache_refill(r, &in.dev, in.before));
  GC_CHECK(r, gc_graph_begin(r->stream) == 0, "%s", gc_device_error());
  const kvc_status_t status =
      kvc_compress(r->cuda, in.cuda_plan, &in.dev.desc, in.dev_queries, in.dev_lse, ws, ws_bytes, r->stream);
  const int bad = gc_graph_end(r->stream, &r->graph);
  GC_CHECK(r, status == KVC_SUCCESS, "captured kvc_compress: %s (%s)", kvc_status_name(status), kvc_last_error(r->cuda));
  GC_CHECK(r, !bad, "capturing kvc_compress: %s", gc_device_error());
  kvc_test_cache_t *got = gc_track_cache(r, kvc_test_cache_clone(in.before));
  for (int replay = 0; replay < 2; ++replay) {
    GC_TRY(gc_dev_cache_refill(r, &in.dev, in.before));
    GC_TRY(gc_put(r, ws, garbage, ws_bytes, "workspace"));
    GC_CHECK(r, gc_graph_launch(r->graph, r->stream) == 0 && gc_stream_sync(r->stream) == 0, "replay %d: %s", replay,
             gc_device_error());
    GC_TRY(gc_dev_cache_fetch(r, &in.dev, got));
    GC_TRY(gc_fetch(r, keep, ws + in.cuda_info.keep_offset_bytes, keep_bytes, "keep layout"));
    GC_TRY(gc_expect_keep(r, replay ? "second graph replay vs uncaptured keep" : "graph replay vs uncaptured keep",
                          &in.p.desc, keep, ref_keep));
    GC_TRY(gc_expect_pool(r, "graph replay K pool vs uncaptured", in.before, got->k, ref->k, NULL));
    GC_TRY(gc_expect_pool(r, "graph replay V pool vs uncaptured", in.before, got->v, ref->v, NULL));
  }
  GC_TRY(gc_check_guards(r, "graph replays"));
  gc_cover(r, "graph", "captured + 2 replays");
}

const gc_family_t gc_family_compress = {
    "compress", "kvc_compress: CUDA keep = CPU select of CUDA scores, pools = oracle of that keep", run_compress};
const gc_family_t gc_family_graph = {"graph", "kvc_compress captured in a CUDA graph, replayed twice (GPU only)",
                                     run_graph};
