/*
 * compact_into.h - destination tables and the oracle for out-of-place compaction (kvc_compact_into):
 * destination pages drawn from the pages no sequence owns, lists padded with other sequences' pages
 * (so reading past a list's first ceil(k / page_size) entries would show), and the expected pools
 * computed through test_util's own address arithmetic from an untouched copy.
 */
#ifndef KVC_COMPACT_INTO_H
#define KVC_COMPACT_INTO_H

#include <stdint.h>

#include "kvcompress.h"
#include "test_util.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  kvc_page_table_t desc; /* points into table / indptr                                           */
  kvc_test_table_t kind; /* KVC_TEST_DENSE or KVC_TEST_CSR                                       */
  int32_t batch;
  int32_t *table, *indptr;
  int32_t *need;         /* [batch] ceil(k_b / page_size): the entries the library may read      */
} kvc_test_dst_t;

/* Pages an out-of-place compaction of the batch writes: sum of ceil(k_b / page_size). Give the
 * source cache at least that many guard pages. */
int32_t kvc_test_dst_pages(int32_t batch, const int32_t *seq_lens, const int32_t *budgets, int32_t page_size);

/* A destination table for `cache` with k_b = min(budgets[b], n_b): ceil(k_b / page_size) pages per
 * sequence drawn in a shuffled order from the pages no sequence owns (cache->owner == -1; the ones
 * left over stay unused, holding the sentinel). Dense rows are one entry wider than the longest
 * need; that entry and every entry past a row's need hold a page of another sequence; CSR lists
 * get one such entry after each sequence's list (outside its [indptr[b], indptr[b] + need)). */
kvc_test_dst_t *kvc_test_dst_new(const kvc_test_cache_t *cache, const int32_t *budgets, kvc_test_table_t kind,
                                 uint64_t seed);
void kvc_test_dst_free(kvc_test_dst_t *dst);
/* Entry i of sequence b's destination list. */
int32_t *kvc_test_dst_entry(kvc_test_dst_t *dst, int32_t b, int32_t i);

/* `cache` (a clone of the source) as seen through the destination table: kvc_test_k_ptr(view, b, j,
 * h) is kept token j's destination row. Shares cache's pools. */
kvc_test_cache_t kvc_test_dst_view(const kvc_test_cache_t *cache, const kvc_test_dst_t *dst);

/* What kvc_compact_into must leave in the pools: `expected` (a clone of `before`) gets, for every
 * sequence b with skip[b] == 0 (skip may be NULL), head h and j < k_b, destination row j <- before's
 * row keep[j] (row j when k_b = n_b) in K and V. Nothing else changes (extras: kvc_test_compact_oracle). */
void kvc_test_compact_into_oracle(const kvc_test_cache_t *before, kvc_test_cache_t *expected,
                                  const kvc_test_dst_t *dst, const int32_t *budgets, const int32_t *keep,
                                  const unsigned char *skip);

#ifdef __cplusplus
}
#endif

#endif /* KVC_COMPACT_INTO_H */
