/*
 * family_gather.c - kvc_gather_queries: the plan's observation rows out of the engine's packed q
 * (qo_indptr, the newest-rows convention), on both backends against the gather oracle of
 * tests/support, byte for byte. Packed lengths: a whole prefill, a last chunk that still reaches
 * the first observation position, and (one case in five) a chunk that does not: the CPU refuses
 * and writes nothing; CUDA writes the rows it cannot find as zeros. Token strides with room for a
 * fused qkv row, padding rows past qo_indptr[batch].
 */
#include <stdlib.h>
#include <string.h>

#include "gather_oracle.h"
#include "gpucheck.h"

static void run_gather(gc_run_t *r) {
  static const kvc_score_method_t with_queries[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA};
  const gc_problem_opts_t opts = {with_queries, 3, 0, 1, 0, 0};
  gc_problem_t p;
  gc_draw_problem(r, &opts, &p);
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  GC_TRY(gc_make_plans(r, &p, &cpu_plan, &cuda_plan));
  kvc_plan_info_t info;
  GC_KVC(r, r->cpu, kvc_plan_get_info(cpu_plan, &info));
  const kvc_plan_desc_t *d = &p.desc;
  int32_t *obs_indptr = gc_alloc(r, sizeof(int32_t) * (size_t)(d->batch + 1));
  int32_t *positions = gc_alloc(r, sizeof(int32_t) * (size_t)(info.obs_total + 1));
  int32_t *qo_indptr = gc_alloc(r, sizeof(int32_t) * (size_t)(d->batch + 1));
  if (r->failed) return;
  GC_KVC(r, r->cpu, kvc_plan_obs_positions(cpu_plan, obs_indptr, positions));

  /* packed rows per sequence: its newest len_b tokens */
  const int short_chunk = gc_chance(r, 0.2);
  int32_t cut = 0;
  qo_indptr[0] = 0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = p.seq_lens[b];
    const int32_t first = obs_indptr[b + 1] > obs_indptr[b] ? positions[obs_indptr[b]] : n; /* must reach back here */
    int32_t len = gc_chance(r, 0.6) ? n : kvc_rng_range(&r->rng, n - first, n);
    if (short_chunk && n - first > 0 && (cut == 0 || gc_chance(r, 0.3))) len = kvc_rng_range(&r->rng, 0, n - first - 1), cut++;
    qo_indptr[b + 1] = qo_indptr[b] + len;
  }
  static const int32_t extras[] = {0, 0, 8, 3};
  const int64_t token_stride = (int64_t)d->num_q_heads * d->head_dim + gc_pick(r, extras, 4);
  const int64_t num_tokens = qo_indptr[d->batch] + kvc_rng_range(&r->rng, 0, 3);
  const size_t elem = (size_t)gc_dtype_bytes(kvc_test_query_dtype(d));
  const size_t packed_bytes = (size_t)num_tokens * (size_t)token_stride * elem;
  const size_t out_bytes = (size_t)info.obs_total * d->num_q_heads * d->head_dim * elem;
  gc_describe(r, " packed_rows=%lld token_stride=%lld%s", (long long)num_tokens, (long long)token_stride,
              cut ? " chunks-too-short" : "");
  gc_cover(r, "gather", cut ? "rows missing" : token_stride > (int64_t)d->num_q_heads * d->head_dim ? "qkv stride" : "packed");
  unsigned char *packed = gc_alloc(r, packed_bytes), *want = gc_alloc(r, out_bytes), *got = gc_alloc(r, out_bytes);
  if (r->failed) return;
  for (size_t i = 0; i < packed_bytes; ++i) packed[i] = (unsigned char)kvc_rng_next(&r->rng);
  kvc_test_gather_oracle(cpu_plan, d, packed, num_tokens, token_stride, qo_indptr, want);

  /* CPU: the oracle's rows, or a refusal that leaves the output as it was */
  memset(got, 0xA5, out_bytes);
  const kvc_status_t status = kvc_gather_queries(r->cpu, cpu_plan, packed, num_tokens, token_stride, qo_indptr, got, NULL);
  if (cut) {
    GC_CHECK(r, status == KVC_ERROR_INVALID_VALUE, "CPU kvc_gather_queries with packed rows short of the first "
             "observation position: %s, expected KVC_ERROR_INVALID_VALUE", kvc_status_name(status));
    for (size_t i = 0; i < out_bytes; ++i) GC_CHECK(r, got[i] == 0xA5, "a refused CPU gather wrote byte %zu", i);
  } else {
    GC_CHECK(r, status == KVC_SUCCESS, "CPU kvc_gather_queries: %s (%s)", kvc_status_name(status), kvc_last_error(r->cpu));
    GC_TRY(gc_expect_bytes(r, "CPU kvc_gather_queries vs oracle", got, want, out_bytes));
  }

  /* CUDA: the oracle's rows, zeros where a row cannot be found */
  void *dev_packed = gc_dev(r, packed, packed_bytes, "packed q");
  int32_t *dev_indptr = gc_dev(r, qo_indptr, sizeof(int32_t) * (size_t)(d->batch + 1), "qo_indptr");
  void *dev_out = gc_dev(r, NULL, out_bytes, "queries");
  if (r->failed) return;
  GC_KVC(r, r->cuda, kvc_gather_queries(r->cuda, cuda_plan, dev_packed, num_tokens, token_stride, dev_indptr, dev_out,
                                        r->stream));
  GC_TRY(gc_sync(r, "kvc_gather_queries"));
  GC_TRY(gc_fetch(r, got, dev_out, out_bytes, "queries"));
  GC_TRY(gc_expect_bytes(r, "CUDA kvc_gather_queries vs oracle", got, want, out_bytes));
  GC_TRY(gc_check_guards(r, "kvc_gather_queries"));
}

const gc_family_t gc_family_gather = {
    "gather", "kvc_gather_queries from packed q: CUDA = CPU = oracle, short chunks refused (CPU) or zeros (CUDA)",
    run_gather};
