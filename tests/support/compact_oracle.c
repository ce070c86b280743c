/* compact_oracle.c - see compact_oracle.h. */
#include "compact_oracle.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int32_t kvc_test_kept(int32_t budget, int32_t n) { return budget < n ? budget : n; }

/* k ascending indices of [lo, n) chosen uniformly (selection sampling). */
static void random_subset(int32_t *row, int32_t k, int32_t lo, int32_t n, kvc_rng_t *rng) {
  int32_t chosen = 0;
  for (int32_t t = lo; t < n && chosen < k; ++t)
    if ((int64_t)(kvc_rng_next(rng) % (uint64_t)(n - t)) < k - chosen) row[chosen++] = t;
}

static void fill_row(int32_t *row, int32_t n, int32_t k, kvc_keep_pattern_t pattern, kvc_rng_t *rng) {
  if (k == n) pattern = KVC_KEEP_LAST; /* untouched: 0 .. n-1 */
  switch (pattern) {
    case KVC_KEEP_RANDOM: random_subset(row, k, 0, n, rng); break;
    case KVC_KEEP_LAST:
      for (int32_t j = 0; j < k; ++j) row[j] = n - k + j;
      break;
    case KVC_KEEP_STRIDED:
      for (int32_t j = 0; j < k; ++j) row[j] = (int32_t)((int64_t)j * n / k);
      break;
    default:
      for (int32_t j = 0; j < k / 2; ++j) row[j] = j;
      random_subset(row + k / 2, k - k / 2, k / 2, n, rng);
      break;
  }
}

int32_t *kvc_test_keep_new(int32_t batch, const int32_t *seq_lens, const int32_t *budgets, int32_t heads,
                           int32_t pattern_shift, uint64_t seed, int64_t *elems) {
  kvc_rng_t rng = {seed};
  int64_t total = 0;
  for (int32_t b = 0; b < batch; ++b) total += (int64_t)heads * kvc_test_kept(budgets[b], seq_lens[b]);
  int32_t *keep = (int32_t *)malloc(sizeof(int32_t) * (size_t)(total > 0 ? total : 1));
  int32_t *row = keep;
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t n = seq_lens[b], k = kvc_test_kept(budgets[b], n);
    for (int32_t h = 0; h < heads; ++h, row += k)
      fill_row(row, n, k, (kvc_keep_pattern_t)((b + h + pattern_shift) % KVC_KEEP_PATTERNS), &rng);
  }
  *elems = total;
  return keep;
}

float **kvc_test_extras_new(int32_t count, int64_t elems, uint64_t seed) {
  kvc_rng_t rng = {seed};
  float **extras = (float **)calloc((size_t)(count > 0 ? count : 1), sizeof(float *));
  for (int32_t e = 0; e < count; ++e) {
    extras[e] = (float *)malloc(sizeof(float) * (size_t)(elems > 0 ? elems : 1));
    for (int64_t i = 0; i < elems; ++i) extras[e][i] = (float)kvc_rng_normal(&rng);
  }
  return extras;
}

float **kvc_test_extras_clone(float *const *extras, int32_t count, int64_t elems) {
  float **copy = (float **)calloc((size_t)(count > 0 ? count : 1), sizeof(float *));
  for (int32_t e = 0; e < count; ++e) {
    copy[e] = (float *)malloc(sizeof(float) * (size_t)(elems > 0 ? elems : 1));
    memcpy(copy[e], extras[e], sizeof(float) * (size_t)elems);
  }
  return copy;
}

void kvc_test_extras_free(float **extras, int32_t count) {
  if (!extras) return;
  for (int32_t e = 0; e < count; ++e) free(extras[e]);
  free(extras);
}

void kvc_test_compact_oracle(const kvc_test_cache_t *before, kvc_test_cache_t *expected, const int32_t *budgets,
                             const int32_t *keep, float *const *extras_before, float *const *extras_expected,
                             int32_t num_extras, const unsigned char *skip) {
  const int32_t heads = before->desc.num_kv_heads;
  const size_t row_bytes = kvc_test_row_bytes(before);
  const int32_t *row = keep;
  int64_t token_offset = 0;
  for (int32_t b = 0; b < before->batch; ++b) {
    const int32_t n = before->seq_lens[b], k = kvc_test_kept(budgets[b], n);
    for (int32_t h = 0; h < heads; ++h, row += k) {
      if (k == n || (skip && skip[b])) continue;
      const int64_t extra_row = heads * token_offset + (int64_t)h * n;
      for (int32_t j = 0; j < k; ++j) {
        memcpy(kvc_test_k_ptr(expected, b, j, h), kvc_test_k_ptr(before, b, row[j], h), row_bytes);
        memcpy(kvc_test_v_ptr(expected, b, j, h), kvc_test_v_ptr(before, b, row[j], h), row_bytes);
        for (int32_t e = 0; e < num_extras; ++e) extras_expected[e][extra_row + j] = extras_before[e][extra_row + row[j]];
      }
    }
    token_offset += n;
  }
}

int64_t kvc_test_first_difference(const void *a, const void *b, size_t bytes) {
  const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
  for (size_t i = 0; i < bytes; ++i)
    if (x[i] != y[i]) return (int64_t)i;
  return -1;
}

int kvc_test_describe_difference(const void *got, const void *want, size_t bytes, const kvc_test_cache_t *layout,
                                 char *why, size_t cap) {
  const int64_t at = kvc_test_first_difference(got, want, bytes);
  if (at < 0) return 0;
  const int64_t page_bytes =
      layout ? layout->desc.stride_page * (int64_t)kvc_test_row_bytes(layout) / layout->desc.head_dim : 1;
  snprintf(why, cap, "differs from the oracle at byte %lld (page %lld, owner %d, byte %lld of it): %02x, expected %02x",
           (long long)at, (long long)(at / page_bytes), layout ? layout->owner[at / page_bytes] : -1,
           (long long)(at % page_bytes), ((const unsigned char *)got)[at], ((const unsigned char *)want)[at]);
  return 1;
}

const int32_t kvc_test_mixed_lens[KVC_TEST_MIXED_BATCH] = {37, 300, 1110, 700, 1500, 64, 129, 1};
const int32_t kvc_test_mixed_budgets[KVC_TEST_MIXED_BATCH] = {1, 299, 1080, 350, 150, 100, 129, 1};

int32_t kvc_test_compact_head_dim(kvc_dtype_t dtype) {
  static const int32_t dims[] = {64, 40, 128, 24};
  return dims[dtype];
}

void kvc_test_retention_oracle(int32_t batch, const int32_t *seq_lens, const int32_t *budgets, int32_t heads,
                               const int32_t *span_indptr, const kvc_span_t *spans, const int32_t *keep,
                               int32_t *counts) {
  const int32_t *row = keep;
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t k = kvc_test_kept(budgets[b], seq_lens[b]), first = span_indptr[b];
    const int32_t nspans = span_indptr[b + 1] - first;
    for (int32_t h = 0; h < heads; ++h, row += k)
      for (int32_t i = 0; i < nspans; ++i) {
        int32_t count = 0;
        for (int32_t j = 0; j < k; ++j) count += row[j] >= spans[first + i].start && row[j] < spans[first + i].end;
        counts[(int64_t)heads * first + (int64_t)h * nspans + i] = count;
      }
  }
}
