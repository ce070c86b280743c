/*
 * test_paper_options.c - the two plan options that reproduce the paper code's fair eviction
 * (README "Fair eviction and the paper's code"): quota_rounding = KVC_QUOTA_LATER_FIRST and
 * window_protection = KVC_WINDOW_RANKED, against hand-worked quotas and kept positions. Where the
 * test library has a CUDA backend (the SIMT emulator), its selection is checked against the CPU's
 * on the same scores.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kvcompress.h"
#include "test_util.h"

enum { MAX_N = 64, MAX_SPANS = 4, HEADS = 2, Q_HEADS = 4, DIM = 8 };

typedef struct {
  int32_t n, budget, span_indptr[2];
  kvc_span_t spans[MAX_SPANS];
  kvc_plan_desc_t desc;
} setup_t;

static void setup(setup_t *s, kvc_score_method_t method, int32_t n, int32_t budget, const int32_t *span_ends,
                  int32_t nspans) {
  static const kvc_plan_desc_t init = KVC_PLAN_DESC_INIT;
  memset(s, 0, sizeof *s);
  s->n = n, s->budget = budget;
  for (int32_t i = 0; i < nspans; ++i)
    s->spans[i] = (kvc_span_t){i ? span_ends[i - 1] : 0, span_ends[i], KVC_SPAN_FAIR, 1.0f};
  s->span_indptr[1] = nspans;
  s->desc = init;
  s->desc.num_q_heads = Q_HEADS, s->desc.num_kv_heads = HEADS, s->desc.head_dim = DIM;
  s->desc.dtype = KVC_DTYPE_F32, s->desc.batch = 1;
  s->desc.seq_lens = &s->n, s->desc.budgets = &s->budget;
  s->desc.span_indptr = nspans ? s->span_indptr : NULL, s->desc.spans = s->spans;
  s->desc.method = method, s->desc.fairness = 1.0f;
}

static kvc_plan_t make_plan(kvc_context_t ctx, const setup_t *s) {
  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, &s->desc, &plan);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_plan_create: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  return plan;
}

/* kvc_plan_create must fail with `want` and a detail containing `needle`. */
static void assert_plan_fails(const setup_t *s, kvc_status_t want, const char *needle) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  kvc_plan_t plan = NULL;
  kvc_status_t status = kvc_plan_create(ctx, &s->desc, &plan);
  cr_assert_eq(status, want, "kvc_plan_create: %s, expected %s", kvc_status_name(status), kvc_status_name(want));
  cr_assert_null(plan);
  cr_assert(strstr(kvc_last_error(ctx), needle), "detail '%s' lacks '%s'", kvc_last_error(ctx), needle);
  kvc_context_destroy(ctx);
}

static void assert_quotas(kvc_context_t ctx, const setup_t *s, const int32_t *expected) {
  kvc_plan_t plan = make_plan(ctx, s);
  int32_t quotas[MAX_SPANS], implicit;
  cr_assert_eq(kvc_plan_span_quotas(plan, quotas, &implicit), KVC_SUCCESS);
  for (int32_t i = 0; i < s->span_indptr[1]; ++i)
    cr_assert_eq(quotas[i], expected[i], "rounding %d: span %d quota %d, expected %d", (int)s->desc.quota_rounding, i,
                 quotas[i], expected[i]);
  kvc_plan_destroy(plan);
}

/* Scores (score layout) of one random cache with the plan's observation queries, on the CPU. */
static float *cpu_scores(kvc_context_t ctx, kvc_plan_t plan, uint64_t seed) {
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  const int32_t len = (int32_t)info.total_tokens;
  kvc_test_cache_t *cache =
      kvc_test_cache_new(1, &len, HEADS, DIM, KVC_DTYPE_F32, len, KVC_TEST_NHD, KVC_TEST_CONTIG, 0, seed);
  void *queries = kvc_test_queries_new(info.obs_total, Q_HEADS, DIM, KVC_DTYPE_F32, seed + 1);
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_SCORE, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  float *scores = malloc(sizeof(float) * (size_t)info.score_elems);
  kvc_status_t status = kvc_score(ctx, plan, &cache->desc, queries, NULL, scores, 0, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_score: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  free(ws), free(queries), kvc_test_cache_free(cache);
  return scores;
}

static void select_keep(kvc_context_t ctx, kvc_plan_t plan, const float *scores, int32_t *keep) {
  size_t bytes;
  kvc_plan_workspace_size(plan, KVC_OP_SELECT, &bytes);
  void *ws = kvc_test_workspace_new(bytes);
  kvc_status_t status = kvc_select(ctx, plan, scores, keep, ws, bytes, NULL);
  cr_assert_eq(status, KVC_SUCCESS, "kvc_select: %s (%s)", kvc_status_name(status), kvc_last_error(ctx));
  free(ws);
}

/* Runs score + select on the CPU; where a CUDA backend exists (the emulator), its selection of the
 * same scores must be identical. Returns the keep layout (HEADS rows of budget). */
static int32_t *run(const setup_t *s, uint64_t seed) {
  kvc_context_t cpu = NULL, cuda = NULL;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &cpu), KVC_SUCCESS);
  kvc_plan_t plan = make_plan(cpu, s);
  float *scores = cpu_scores(cpu, plan, seed);
  int32_t *keep = malloc(sizeof(int32_t) * HEADS * (size_t)s->budget);
  select_keep(cpu, plan, scores, keep);
  if (kvc_context_create(KVC_BACKEND_CUDA, 0, &cuda) == KVC_SUCCESS) {
    kvc_plan_t cuda_plan = make_plan(cuda, s);
    int32_t *cuda_keep = malloc(sizeof(int32_t) * HEADS * (size_t)s->budget);
    select_keep(cuda, cuda_plan, scores, cuda_keep);
    for (int32_t i = 0; i < HEADS * s->budget; ++i)
      cr_assert_eq(cuda_keep[i], keep[i], "CUDA keep[%d] = %d, CPU %d", i, cuda_keep[i], keep[i]);
    free(cuda_keep), kvc_plan_destroy(cuda_plan), kvc_context_destroy(cuda);
  }
  free(scores), kvc_plan_destroy(plan), kvc_context_destroy(cpu);
  return keep;
}

/* Kept positions of head h inside [from, to), as a bitmask relative to `from` (<= 64 wide). */
static uint64_t kept_in(const setup_t *s, const int32_t *keep, int32_t h, int32_t from, int32_t to) {
  uint64_t mask = 0;
  for (int32_t j = 0; j < s->budget; ++j) {
    int32_t t = keep[h * s->budget + j];
    if (t >= from && t < to) mask |= 1ull << (t - from);
  }
  return mask;
}

static int popcount64(uint64_t x) { return __builtin_popcountll(x); }

/* ---- quota rounding ----------------------------------------------------------------------- */

Test(paper_options, later_first_is_floor_then_rest_for_two_spans) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  setup_t s;
  const int32_t ends[] = {8, 10};
  setup(&s, KVC_SCORE_KNORM, 10, 7, ends, 2); /* shares 5.6 and 1.4 */
  assert_quotas(ctx, &s, (const int32_t[]){6, 1}); /* largest remainder: .6 beats .4 */
  s.desc.quota_rounding = KVC_QUOTA_LATER_FIRST;
  assert_quotas(ctx, &s, (const int32_t[]){5, 2}); /* floor(7 * 8 / 10) = 5, the rest 2 */
  /* every split of n = 10 into two spans and every k: floor(k * L0 / n) and the rest */
  for (int32_t cut = 1; cut < 10; ++cut)
    for (int32_t k = 1; k <= 10; ++k) {
      const int32_t e[] = {cut, 10};
      setup(&s, KVC_SCORE_KNORM, 10, k, e, 2);
      s.desc.quota_rounding = KVC_QUOTA_LATER_FIRST;
      const int32_t first = k * cut / 10;
      assert_quotas(ctx, &s, (const int32_t[]){first, k - first});
    }
  kvc_context_destroy(ctx);
}

Test(paper_options, later_first_hands_leftovers_to_the_latest_spans) {
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  setup_t s;
  const int32_t ends[] = {9, 12, 15};
  setup(&s, KVC_SCORE_KNORM, 15, 8, ends, 3); /* shares 4.8, 1.6, 1.6: floors 4 1 1, 2 left over */
  assert_quotas(ctx, &s, (const int32_t[]){5, 1, 2}); /* .8, then the later of the two .6 */
  s.desc.quota_rounding = KVC_QUOTA_LATER_FIRST;
  assert_quotas(ctx, &s, (const int32_t[]){4, 2, 2});
  /* an integral share gets no leftover: shares 2, 2.5, 2.5 of k = 7 over lengths 4, 5, 5 */
  const int32_t ends2[] = {4, 9, 14};
  setup(&s, KVC_SCORE_KNORM, 14, 7, ends2, 3);
  s.desc.quota_rounding = KVC_QUOTA_LATER_FIRST;
  assert_quotas(ctx, &s, (const int32_t[]){2, 2, 3});
  kvc_context_destroy(ctx);
}

/* ---- window protection -------------------------------------------------------------------- */

Test(paper_options, ranked_window_is_kept_first_but_not_forced) {
  setup_t s;
  setup(&s, KVC_SCORE_SNAPKV, 20, 6, NULL, 0);
  s.desc.window = 8, s.desc.fairness = 0.0f;
  assert_plan_fails(&s, KVC_ERROR_BUDGET, "protects 8 tokens"); /* the protected window > budget 6 */
  s.desc.window_protection = KVC_WINDOW_RANKED;
  int32_t *keep = run(&s, 11);
  for (int32_t h = 0; h < HEADS; ++h)
    for (int32_t j = 0; j < 6; ++j) cr_assert_eq(keep[h * 6 + j], 14 + j, "the window's latest 6 positions");
  free(keep);
  /* a budget that holds the window: both modes keep the same tokens */
  setup(&s, KVC_SCORE_SNAPKV, 20, 11, NULL, 0);
  s.desc.window = 8, s.desc.fairness = 0.0f;
  int32_t *protected_keep = run(&s, 12);
  s.desc.window_protection = KVC_WINDOW_RANKED;
  keep = run(&s, 12);
  cr_assert_eq(memcmp(keep, protected_keep, sizeof(int32_t) * HEADS * 11), 0);
  for (int32_t h = 0; h < HEADS; ++h) cr_assert_eq(kept_in(&s, keep, h, 12, 20), 0xffu);
  free(keep), free(protected_keep);
}

/* The paper code's SnapKV-fair: spans [0, 30) and [30, 40), window 8 split 4 + 4, k = 9. */
Test(paper_options, snapkv_fair_as_the_paper_code) {
  setup_t s;
  const int32_t ends[] = {30, 40};
  setup(&s, KVC_SCORE_SNAPKV, 40, 9, ends, 2);
  s.desc.window = 8, s.desc.span_local = 1;
  kvc_context_t ctx;
  cr_assert_eq(kvc_context_create(KVC_BACKEND_CPU, 0, &ctx), KVC_SUCCESS);
  assert_quotas(ctx, &s, (const int32_t[]){5, 4}); /* protected windows: the later span keeps >= 4 */
  s.desc.window_protection = KVC_WINDOW_RANKED;
  assert_quotas(ctx, &s, (const int32_t[]){7, 2}); /* shares 6.75 and 2.25 */
  s.desc.quota_rounding = KVC_QUOTA_LATER_FIRST;
  assert_quotas(ctx, &s, (const int32_t[]){6, 3}); /* floor(9 * 30 / 40) = 6, the rest 3 */
  kvc_context_destroy(ctx);
  int32_t *keep = run(&s, 21);
  for (int32_t h = 0; h < HEADS; ++h) {
    cr_assert_eq(kept_in(&s, keep, h, 30, 40), 0x380u, "head %d: the later span keeps its window's last 3 (37..39)", h);
    uint64_t early = kept_in(&s, keep, h, 0, 30);
    cr_assert_eq(early >> 26, 0xfu, "head %d: the earlier span keeps its whole window 26..29", h);
    cr_assert_eq(popcount64(early), 6);
  }
  free(keep);
}

/* TOVA-fair: each span's last token scores +inf; ranked, one token of budget is enough. */
Test(paper_options, tova_fair_ranked_anchor) {
  setup_t s;
  const int32_t ends[] = {10, 20};
  setup(&s, KVC_SCORE_TOVA, 20, 1, ends, 2);
  s.desc.span_local = 1;
  assert_plan_fails(&s, KVC_ERROR_BUDGET, "protects 2 tokens"); /* two protected anchors > budget 1 */
  s.desc.window_protection = KVC_WINDOW_RANKED;
  int32_t *keep = run(&s, 31); /* quotas 0 and 1 (ties to the later span) */
  for (int32_t h = 0; h < HEADS; ++h) cr_assert_eq(keep[h], 19);
  free(keep);
}

Test(paper_options, bad_values_are_named) {
  setup_t s;
  setup(&s, KVC_SCORE_KNORM, 10, 5, NULL, 0);
  s.desc.quota_rounding = (kvc_quota_rounding_t)2;
  assert_plan_fails(&s, KVC_ERROR_INVALID_VALUE, "quota_rounding is 2");
  s.desc.quota_rounding = KVC_QUOTA_LARGEST_REMAINDER;
  s.desc.window_protection = (kvc_window_protection_t)-1;
  assert_plan_fails(&s, KVC_ERROR_INVALID_VALUE, "window_protection is -1");
}
