/*
 * compact_into.c - see compact_into.h.
 */
#include "compact_into.h"

#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"

int32_t kvc_test_dst_pages(int32_t batch, const int32_t *seq_lens, const int32_t *budgets, int32_t page_size) {
  int32_t pages = 0;
  for (int32_t b = 0; b < batch; ++b) pages += (kvc_test_kept(budgets[b], seq_lens[b]) + page_size - 1) / page_size;
  return pages;
}

/* A page of a sequence other than b (its own when the batch has one sequence). */
static int32_t other_page(const kvc_test_cache_t *cache, int32_t b) {
  for (int32_t p = 0; p < cache->desc.num_pages; ++p)
    if (cache->owner[p] >= 0 && cache->owner[p] != b) return p;
  for (int32_t p = 0; p < cache->desc.num_pages; ++p)
    if (cache->owner[p] >= 0) return p;
  return 0;
}

kvc_test_dst_t *kvc_test_dst_new(const kvc_test_cache_t *cache, const int32_t *budgets, kvc_test_table_t kind,
                                 uint64_t seed) {
  kvc_rng_t rng = {seed};
  const int32_t batch = cache->batch, page_size = cache->desc.page_size, num_pages = cache->desc.num_pages;
  kvc_test_dst_t *dst = (kvc_test_dst_t *)calloc(1, sizeof *dst);
  dst->kind = kind;
  dst->batch = batch;
  dst->need = (int32_t *)malloc(sizeof(int32_t) * (size_t)batch);
  int32_t most = 0, total = 0, free_pages = 0;
  for (int32_t b = 0; b < batch; ++b) {
    dst->need[b] = (kvc_test_kept(budgets[b], cache->seq_lens[b]) + page_size - 1) / page_size;
    most = dst->need[b] > most ? dst->need[b] : most;
    total += dst->need[b];
  }
  int32_t *unowned = (int32_t *)malloc(sizeof(int32_t) * (size_t)num_pages);
  for (int32_t p = 0; p < num_pages; ++p)
    if (cache->owner[p] < 0) unowned[free_pages++] = p;
  for (int32_t i = free_pages - 1; i > 0; --i) {
    const int32_t j = kvc_rng_range(&rng, 0, i), t = unowned[i];
    unowned[i] = unowned[j];
    unowned[j] = t;
  }
  if (free_pages < total) abort(); /* the cache was built with too few guard pages */
  if (kind == KVC_TEST_DENSE) {
    dst->desc.max_pages = most + 1;
    dst->table = (int32_t *)malloc(sizeof(int32_t) * (size_t)batch * (size_t)(most + 1));
    for (int32_t b = 0; b < batch; ++b)
      for (int32_t i = 0; i <= most; ++i) dst->table[(int64_t)b * (most + 1) + i] = other_page(cache, b);
  } else {
    dst->indptr = (int32_t *)malloc(sizeof(int32_t) * (size_t)(batch + 1));
    dst->table = (int32_t *)malloc(sizeof(int32_t) * (size_t)(total + batch));
    dst->indptr[0] = 0;
    for (int32_t b = 0; b < batch; ++b) {
      dst->indptr[b + 1] = dst->indptr[b] + dst->need[b] + 1;
      dst->table[dst->indptr[b + 1] - 1] = other_page(cache, b); /* the padding entry */
    }
  }
  int32_t next = 0;
  for (int32_t b = 0; b < batch; ++b)
    for (int32_t i = 0; i < dst->need[b]; ++i) *kvc_test_dst_entry(dst, b, i) = unowned[next++];
  free(unowned);
  dst->desc.page_table = dst->table;
  dst->desc.page_indptr = dst->indptr;
  return dst;
}

void kvc_test_dst_free(kvc_test_dst_t *dst) {
  if (!dst) return;
  free(dst->table);
  free(dst->indptr);
  free(dst->need);
  free(dst);
}

int32_t *kvc_test_dst_entry(kvc_test_dst_t *dst, int32_t b, int32_t i) {
  return dst->kind == KVC_TEST_CSR ? &dst->table[dst->indptr[b] + i] : &dst->table[(int64_t)b * dst->desc.max_pages + i];
}

kvc_test_cache_t kvc_test_dst_view(const kvc_test_cache_t *cache, const kvc_test_dst_t *dst) {
  kvc_test_cache_t view = *cache;
  view.table = dst->table;
  view.indptr = dst->indptr;
  view.table_kind = dst->kind;
  view.desc.page_table = dst->table;
  view.desc.page_indptr = dst->indptr;
  view.desc.max_pages = dst->desc.max_pages;
  return view;
}

void kvc_test_compact_into_oracle(const kvc_test_cache_t *before, kvc_test_cache_t *expected,
                                  const kvc_test_dst_t *dst, const int32_t *budgets, const int32_t *keep,
                                  const unsigned char *skip) {
  const int32_t heads = before->desc.num_kv_heads;
  const size_t row_bytes = kvc_test_row_bytes(before);
  const kvc_test_cache_t to = kvc_test_dst_view(expected, dst);
  const int32_t *row = keep;
  for (int32_t b = 0; b < before->batch; ++b) {
    const int32_t n = before->seq_lens[b], k = kvc_test_kept(budgets[b], n);
    for (int32_t h = 0; h < heads; ++h, row += k) {
      if (skip && skip[b]) continue;
      for (int32_t j = 0; j < k; ++j) {
        const int32_t source = k == n ? j : row[j];
        memcpy(kvc_test_k_ptr(&to, b, j, h), kvc_test_k_ptr(before, b, source, h), row_bytes);
        memcpy(kvc_test_v_ptr(&to, b, j, h), kvc_test_v_ptr(before, b, source, h), row_bytes);
      }
    }
  }
}
