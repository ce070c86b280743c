/*
 * family_corrupt.c - corrupt page tables: ids outside [0, num_pages) (-1, INT32_MIN, num_pages,
 * INT32_MAX, ...) in dense or CSR tables, and CSR lists shorter than a sequence needs. The header's
 * contract: the CPU backend refuses (KVC_ERROR_INVALID_VALUE) before touching memory; the CUDA
 * backend scores such tokens as zero keys and leaves the sequence's pages untouched in compaction,
 * never reaching another sequence's page.
 *
 * The reference is the same cache with every corrupt entry pointing at one page of zeros (a page no
 * sequence owns, zeroed in both copies): CUDA scores on the corrupt table must match CPU scores on
 * the reference within tolerance; CUDA compaction on the corrupt table must equal the gather oracle
 * with every corrupted sequence skipped, byte for byte over the whole pools.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"
#include "gpucheck.h"

static void run_corrupt(gc_run_t *r) {
  const gc_problem_opts_t opts = {NULL, 0, 1, 0, 0, 0};
  gc_problem_t p;
  gc_draw_problem(r, &opts, &p);
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  GC_TRY(gc_make_plans(r, &p, &cpu_plan, &cuda_plan));
  kvc_plan_info_t info;
  GC_KVC(r, r->cpu, kvc_plan_get_info(cpu_plan, &info));
  const kvc_plan_desc_t *d = &p.desc;
  kvc_test_cache_t *ref = gc_problem_cache(r, &p, 3); /* becomes the reference: corrupt entries -> zero page */
  const int32_t num_pages = ref->desc.num_pages, page_size = ref->desc.page_size;
  const size_t elem = (size_t)gc_dtype_bytes(d->dtype), page_bytes = (size_t)ref->desc.stride_page * elem;
  int32_t zero_page = -1;
  for (int32_t pg = 0; pg < num_pages && zero_page < 0; ++pg)
    if (ref->owner[pg] < 0) zero_page = pg;
  GC_CHECK(r, zero_page >= 0, "no unowned page in the test cache");
  memset(ref->k + (size_t)zero_page * page_bytes, 0, page_bytes);
  memset(ref->v + (size_t)zero_page * page_bytes, 0, page_bytes);

  /* which sequences, and how */
  const int csr = ref->table_kind == KVC_TEST_CSR;
  unsigned char *corrupted = gc_alloc(r, (size_t)d->batch);
  int32_t *drop = gc_alloc(r, sizeof(int32_t) * (size_t)d->batch); /* CSR entries cut off the end */
  const size_t table_len = gc_table_len(ref);
  int32_t *bad_table = gc_alloc(r, sizeof(int32_t) * (table_len + 1)), *bad_indptr = gc_alloc(r, sizeof(int32_t) * (size_t)(d->batch + 1));
  if (r->failed) return;
  memcpy(bad_table, ref->table, sizeof(int32_t) * table_len);
  const int32_t bad_ids[] = {-1, -7, INT_MIN, 0, 0, INT_MAX}; /* 0s replaced below by num_pages (+ a bit) */
  int32_t chosen = 0, shortened = 0;
  for (int32_t want = kvc_rng_range(&r->rng, 1, d->batch < 3 ? d->batch : 3), tries = 0; chosen < want && tries < 64; ++tries) {
    const int32_t b = kvc_rng_range(&r->rng, 0, d->batch - 1);
    if (corrupted[b]) continue;
    corrupted[b] = 1, chosen++;
    const int32_t need = (p.seq_lens[b] + page_size - 1) / page_size;
    int32_t *ref_row = csr ? ref->table + ref->indptr[b] : ref->table + (int64_t)b * ref->desc.max_pages;
    int32_t *bad_row = bad_table + (ref_row - ref->table);
    if (csr && gc_chance(r, 0.4)) { /* a list too short: its last entries missing */
      drop[b] = kvc_rng_range(&r->rng, 1, need);
      for (int32_t i = need - drop[b]; i < need; ++i) ref_row[i] = zero_page;
      shortened++;
    } else {
      const int32_t i = kvc_rng_range(&r->rng, 0, need - 1);
      int32_t bad = bad_ids[kvc_rng_range(&r->rng, 0, 5)];
      if (bad == 0) bad = num_pages + kvc_rng_range(&r->rng, 0, 3);
      bad_row[i] = bad;
      ref_row[i] = zero_page;
    }
  }
  if (csr) { /* the corrupt CSR arrays: each list as is, minus the dropped tail */
    int32_t at = 0;
    bad_indptr[0] = 0;
    for (int32_t b = 0; b < d->batch; ++b) {
      const int32_t need = ref->indptr[b + 1] - ref->indptr[b];
      for (int32_t i = 0; i < need - drop[b]; ++i) bad_table[at++] = bad_table[ref->indptr[b] + i];
      bad_indptr[b + 1] = at;
    }
  }
  gc_describe(r, " corrupted=%d (%d CSR lists cut short)", chosen, shortened);
  gc_cover(r, "corrupt", shortened ? "short CSR list" : "page id out of range");

  /* scoring: the CPU refuses the corrupt table; CUDA = CPU on the reference */
  kvc_paged_kv_t bad_host = ref->desc;
  bad_host.page_table = bad_table;
  bad_host.page_indptr = csr ? bad_indptr : NULL;
  void *queries = gc_problem_queries(r, &p, &info);
  const size_t score_bytes = sizeof(float) * (size_t)info.score_elems;
  float *cpu_scores = gc_alloc(r, score_bytes), *cuda_scores = gc_alloc(r, score_bytes);
  size_t ws_bytes = 0;
  void *ws = gc_workspace(r, cpu_plan, KVC_OP_SCORE, 0, &ws_bytes);
  if (r->failed) return;
  kvc_status_t status = kvc_score(r->cpu, cpu_plan, &bad_host, queries, NULL, cpu_scores, 0, ws, ws_bytes, NULL);
  GC_CHECK(r, status == KVC_ERROR_INVALID_VALUE, "CPU kvc_score on a corrupt table: %s, expected KVC_ERROR_INVALID_VALUE",
           kvc_status_name(status));
  GC_KVC(r, r->cpu, kvc_score(r->cpu, cpu_plan, &ref->desc, queries, NULL, cpu_scores, 0, ws, ws_bytes, NULL));

  gc_dev_cache_t dev;
  GC_TRY(gc_dev_cache(r, ref, bad_table, csr ? (size_t)bad_indptr[d->batch] : table_len, csr ? bad_indptr : NULL, &dev));
  {
    const size_t query_bytes = (size_t)info.obs_total * d->num_q_heads * d->head_dim * gc_dtype_bytes(kvc_test_query_dtype(d));
    void *dev_queries = queries ? gc_dev(r, queries, query_bytes, "queries") : NULL;
    float *dev_scores = gc_dev(r, NULL, score_bytes, "scores");
    size_t dev_ws_bytes = 0;
    void *dev_ws = gc_workspace(r, cuda_plan, KVC_OP_SCORE, 1, &dev_ws_bytes);
    if (r->failed) return;
    GC_KVC(r, r->cuda, kvc_score(r->cuda, cuda_plan, &dev.desc, dev_queries, NULL, dev_scores, 0, dev_ws, dev_ws_bytes,
                                 r->stream));
    GC_TRY(gc_sync(r, "kvc_score on a corrupt table"));
    GC_TRY(gc_fetch(r, cuda_scores, dev_scores, score_bytes, "scores"));
    GC_TRY(gc_expect_scores(r, "CUDA kvc_score on the corrupt table vs CPU on zero pages", d, cuda_scores, cpu_scores, NULL));
  }

  /* compaction: the CPU refuses and moves nothing; CUDA skips exactly the corrupted sequences */
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_new(d->batch, p.seq_lens, p.budgets, d->num_kv_heads, kvc_rng_range(&r->rng, 0, 3),
                                    kvc_rng_next(&r->rng), &keep_elems);
  int32_t *tracked = gc_alloc(r, sizeof(int32_t) * (size_t)(keep_elems + 1));
  GC_CHECK(r, keep && tracked, "out of memory");
  memcpy(tracked, keep, sizeof(int32_t) * (size_t)keep_elems);
  free(keep);
  keep = tracked;
  kvc_test_cache_t *expected = gc_track_cache(r, kvc_test_cache_clone(ref));
  kvc_test_compact_oracle(ref, expected, p.budgets, keep, NULL, NULL, 0, corrupted);
  kvc_test_cache_t *host = gc_track_cache(r, kvc_test_cache_clone(ref));
  bad_host.k = host->k, bad_host.v = host->v;
  size_t compact_bytes = 0;
  void *compact_ws = gc_workspace(r, cpu_plan, KVC_OP_COMPACT, 0, &compact_bytes);
  if (r->failed) return;
  status = kvc_compact(r->cpu, cpu_plan, &bad_host, keep, NULL, 0, compact_ws, compact_bytes, NULL);
  GC_CHECK(r, status == KVC_ERROR_INVALID_VALUE, "CPU kvc_compact on a corrupt table: %s, expected KVC_ERROR_INVALID_VALUE",
           kvc_status_name(status));
  GC_TRY(gc_expect_pool(r, "K pool after a refused CPU kvc_compact", ref, host->k, ref->k, NULL));

  int32_t *dev_keep = gc_dev(r, keep, sizeof(int32_t) * (size_t)info.keep_elems, "keep");
  size_t dev_bytes = 0;
  void *dev_ws = gc_workspace(r, cuda_plan, KVC_OP_COMPACT, 1, &dev_bytes);
  if (r->failed) return;
  GC_KVC(r, r->cuda, kvc_compact(r->cuda, cuda_plan, &dev.desc, dev_keep, NULL, 0, dev_ws, dev_bytes, r->stream));
  GC_TRY(gc_sync(r, "kvc_compact on a corrupt table"));
  kvc_test_cache_t *got = gc_track_cache(r, kvc_test_cache_clone(ref));
  GC_TRY(gc_dev_cache_fetch(r, &dev, got));
  GC_TRY(gc_expect_pool(r, "CUDA kvc_compact K pool on a corrupt table vs oracle (corrupted sequences untouched)", ref,
                        got->k, expected->k, NULL));
  GC_TRY(gc_expect_pool(r, "CUDA kvc_compact V pool on a corrupt table vs oracle (corrupted sequences untouched)", ref,
                        got->v, expected->v, NULL));
  GC_TRY(gc_check_guards(r, "kvc_compact on a corrupt table"));
}

const gc_family_t gc_family_corrupt = {
    "corrupt", "corrupt page tables: CPU refuses; CUDA scores zero keys, skips those sequences, touches nothing else",
    run_corrupt};
