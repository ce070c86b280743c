/*
 * family_compact.c - kvc_compact on both backends against the gather oracle of tests/support
 * (read from an untouched copy through the tests' own address arithmetic), byte for byte over
 * the whole pools: every dtype (fp8 too), layout, table kind and page size, keep rows that stress
 * the in-place hazard (the last k, strided, prefix + random), sequences left whole, 0-2 extra
 * per-token arrays. Unowned slots and pages hold a sentinel that must survive; device buffers are
 * fenced by guard zones. One case in five corrupts one sequence's keep rows (out of range,
 * unordered, repeated): the CPU must refuse before moving anything; the CUDA backend may scramble
 * that sequence's own pages only, every other byte must match the oracle. One case in three (with
 * a page table and sound keep rows) compacts out of place (kvc_compact_into) into destination pages
 * drawn from the unowned ones, dense or CSR, against tests/support/compact_into's oracle.
 */
#include <stdlib.h>
#include <string.h>

#include "compact_into.h"
#include "compact_oracle.h"
#include "gpucheck.h"

static void run_compact(gc_run_t *r) {
  static const kvc_score_method_t streaming[] = {KVC_SCORE_STREAMING}; /* the plan's method: any dtype */
  const gc_problem_opts_t opts = {streaming, 1, 1, 1, 0, 0};
  gc_problem_t p;
  gc_draw_problem(r, &opts, &p);
  const int corrupt_keep = gc_chance(r, 0.2);
  const int32_t num_extras = corrupt_keep ? 0 : kvc_rng_range(&r->rng, 0, 2);
  kvc_plan_t cpu_plan = NULL, cuda_plan = NULL;
  GC_TRY(gc_make_plans(r, &p, &cpu_plan, &cuda_plan));
  kvc_plan_info_t info;
  GC_KVC(r, r->cpu, kvc_plan_get_info(cpu_plan, &info));
  const kvc_plan_desc_t *d = &p.desc;
  const int into = !corrupt_keep && p.table != KVC_TEST_CONTIG && gc_chance(r, 1.0 / 3);
  kvc_test_cache_t *before =
      gc_problem_cache(r, &p, 3 + (into ? kvc_test_dst_pages(d->batch, p.seq_lens, p.budgets, p.page_size) : 0));
  int64_t keep_elems = 0;
  int32_t *keep = kvc_test_keep_new(d->batch, p.seq_lens, p.budgets, d->num_kv_heads, kvc_rng_range(&r->rng, 0, 3),
                                    kvc_rng_next(&r->rng), &keep_elems);
  int32_t *tracked_keep = gc_alloc(r, sizeof(int32_t) * (size_t)(keep_elems + 1));
  GC_CHECK(r, keep && tracked_keep && keep_elems == info.keep_elems, "keep layout of %lld entries, plan says %lld",
           (long long)keep_elems, (long long)info.keep_elems);
  memcpy(tracked_keep, keep, sizeof(int32_t) * (size_t)keep_elems);
  free(keep);
  keep = tracked_keep;

  /* one sequence's rows garbled: out of range, unordered, repeated */
  unsigned char *skip = gc_alloc(r, (size_t)d->batch);
  GC_CHECK(r, skip, "out of memory");
  int32_t garbled = -1;
  if (corrupt_keep) {
    int64_t at = 0;
    for (int32_t b = 0; b < d->batch; ++b) {
      const int32_t n = p.seq_lens[b], k = kvc_test_kept(p.budgets[b], n);
      if (k < n && garbled < 0 && gc_chance(r, 0.5 + 0.5 * (b == d->batch - 1))) {
        garbled = b;
        for (int64_t j = 0; j < (int64_t)d->num_kv_heads * k; ++j) keep[at + j] = kvc_rng_range(&r->rng, -3, n + 3);
        keep[at + kvc_rng_range(&r->rng, 0, k - 1)] = gc_chance(r, 0.5) ? -1 : n; /* surely invalid */
      }
      at += (int64_t)d->num_kv_heads * k;
    }
    if (garbled >= 0) skip[garbled] = 1;
  }
  gc_describe(r, " extras=%d%s%s", num_extras, garbled >= 0 ? " garbled-keep-rows" : "", into ? " out-of-place" : "");
  gc_cover(r, "compaction", into ? "out of place" : "in place");
  if (garbled >= 0) gc_cover(r, "corrupt", "keep rows");
  gc_cover(r, "extras", num_extras ? "1-2" : "0");

  const size_t extra_bytes = sizeof(float) * (size_t)info.score_elems;
  float *extras[2] = {NULL, NULL}, *expected_extras[2] = {NULL, NULL}, *cpu_extras[2] = {NULL, NULL};
  float *dev_extras[2] = {NULL, NULL};
  for (int32_t e = 0; e < num_extras; ++e) {
    extras[e] = gc_alloc(r, extra_bytes), expected_extras[e] = gc_alloc(r, extra_bytes), cpu_extras[e] = gc_alloc(r, extra_bytes);
    GC_CHECK(r, extras[e] && expected_extras[e] && cpu_extras[e], "out of memory");
    for (int64_t i = 0; i < info.score_elems; ++i) extras[e][i] = (float)kvc_rng_normal(&r->rng);
    memcpy(expected_extras[e], extras[e], extra_bytes);
    memcpy(cpu_extras[e], extras[e], extra_bytes);
  }
  kvc_test_cache_t *expected = gc_track_cache(r, kvc_test_cache_clone(before));
  kvc_test_compact_oracle(before, expected, p.budgets, keep, extras, expected_extras, num_extras, skip);
  /* out of place: the destination table in tracked memory (host and device) and its own oracle for
   * the pools (the extras move in place either way) */
  kvc_page_table_t dst_host = {NULL, NULL, 0}, dst_dev = {NULL, NULL, 0};
  if (into) {
    const kvc_test_table_t kind = gc_chance(r, 0.5) ? KVC_TEST_CSR : KVC_TEST_DENSE;
    kvc_test_dst_t *dst = kvc_test_dst_new(before, p.budgets, kind, kvc_rng_next(&r->rng));
    const size_t entries = kind == KVC_TEST_CSR ? (size_t)dst->indptr[d->batch] : (size_t)d->batch * dst->desc.max_pages;
    int32_t *table = gc_alloc(r, sizeof(int32_t) * entries), *indptr = gc_alloc(r, sizeof(int32_t) * (d->batch + 1));
    if (table) memcpy(table, dst->table, sizeof(int32_t) * entries);
    if (indptr && dst->indptr) memcpy(indptr, dst->indptr, sizeof(int32_t) * (size_t)(d->batch + 1));
    dst_host = (kvc_page_table_t){table, kind == KVC_TEST_CSR ? indptr : NULL, dst->desc.max_pages};
    memcpy(expected->k, before->k, before->pool_bytes);
    memcpy(expected->v, before->v, before->pool_bytes);
    kvc_test_compact_into_oracle(before, expected, dst, p.budgets, keep, NULL);
    kvc_test_dst_free(dst);
    GC_CHECK(r, table && indptr, "out of memory");
    dst_dev = (kvc_page_table_t){gc_dev(r, table, sizeof(int32_t) * entries, "dst table"),
                                 kind == KVC_TEST_CSR ? gc_dev(r, indptr, sizeof(int32_t) * (d->batch + 1), "dst indptr")
                                                      : NULL,
                                 dst_host.max_pages};
    gc_cover(r, "destination table", kind == KVC_TEST_CSR ? "csr" : "dense");
  }

  /* CPU */
  kvc_test_cache_t *host = gc_track_cache(r, kvc_test_cache_clone(before));
  size_t ws_bytes = 0;
  void *ws = gc_workspace(r, cpu_plan, KVC_OP_COMPACT, 0, &ws_bytes);
  if (r->failed) return;
  kvc_status_t status =
      into ? kvc_compact_into(r->cpu, cpu_plan, &host->desc, &dst_host, keep, cpu_extras, num_extras, ws, ws_bytes, NULL)
           : kvc_compact(r->cpu, cpu_plan, &host->desc, keep, cpu_extras, num_extras, ws, ws_bytes, NULL);
  if (garbled >= 0) {
    GC_CHECK(r, status == KVC_ERROR_INVALID_VALUE, "CPU kvc_compact with garbled keep rows of sequence %d: %s, expected "
             "KVC_ERROR_INVALID_VALUE", garbled, kvc_status_name(status));
    GC_TRY(gc_expect_pool(r, "K pool after a refused CPU kvc_compact", before, host->k, before->k, NULL));
    GC_TRY(gc_expect_pool(r, "V pool after a refused CPU kvc_compact", before, host->v, before->v, NULL));
  } else {
    GC_CHECK(r, status == KVC_SUCCESS, "CPU kvc_compact: %s (%s)", kvc_status_name(status), kvc_last_error(r->cpu));
    GC_TRY(gc_expect_pool(r, "CPU kvc_compact K pool vs oracle", before, host->k, expected->k, NULL));
    GC_TRY(gc_expect_pool(r, "CPU kvc_compact V pool vs oracle", before, host->v, expected->v, NULL));
    for (int32_t e = 0; e < num_extras; ++e)
      GC_TRY(gc_expect_bytes(r, "CPU kvc_compact extra vs oracle", cpu_extras[e], expected_extras[e], extra_bytes));
  }

  /* CUDA */
  gc_dev_cache_t dev;
  GC_TRY(gc_dev_cache(r, before, NULL, 0, NULL, &dev));
  int32_t *dev_keep = gc_dev(r, keep, sizeof(int32_t) * (size_t)info.keep_elems, "keep");
  for (int32_t e = 0; e < num_extras; ++e) dev_extras[e] = gc_dev(r, extras[e], extra_bytes, "extra");
  size_t dev_ws_bytes = 0;
  void *dev_ws = gc_workspace(r, cuda_plan, KVC_OP_COMPACT, 1, &dev_ws_bytes);
  if (r->failed) return;
  if (into)
    GC_KVC(r, r->cuda, kvc_compact_into(r->cuda, cuda_plan, &dev.desc, &dst_dev, dev_keep, num_extras ? dev_extras : NULL,
                                        num_extras, dev_ws, dev_ws_bytes, r->stream));
  else
    GC_KVC(r, r->cuda, kvc_compact(r->cuda, cuda_plan, &dev.desc, dev_keep, num_extras ? dev_extras : NULL, num_extras,
                                   dev_ws, dev_ws_bytes, r->stream));
  GC_TRY(gc_sync(r, "kvc_compact"));
  kvc_test_cache_t *got = gc_track_cache(r, kvc_test_cache_clone(before));
  GC_TRY(gc_dev_cache_fetch(r, &dev, got));
  GC_TRY(gc_expect_pool(r, garbled >= 0 ? "CUDA kvc_compact K pool vs oracle, outside the garbled sequence's pages"
                                        : "CUDA kvc_compact K pool vs oracle",
                        before, got->k, expected->k, skip));
  GC_TRY(gc_expect_pool(r, "CUDA kvc_compact V pool vs oracle", before, got->v, expected->v, skip));
  float *got_extra = num_extras ? gc_alloc(r, extra_bytes) : NULL;
  for (int32_t e = 0; e < num_extras; ++e) {
    GC_TRY(gc_fetch(r, got_extra, dev_extras[e], extra_bytes, "extra"));
    GC_TRY(gc_expect_bytes(r, "CUDA kvc_compact extra vs oracle", got_extra, expected_extras[e], extra_bytes));
  }
  GC_TRY(gc_check_guards(r, "kvc_compact"));
}

const gc_family_t gc_family_compact = {
    "compact", "kvc_compact byte for byte vs the gather oracle (every dtype, extras, garbled keep rows)", run_compact};
