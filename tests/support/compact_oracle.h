/*
 * compact_oracle.h - compaction and retention computed from first principles, for the tests that
 * compare the CUDA backend (emulated or real) with the CPU backend: keep layouts built to stress
 * the in-place hazard, the gather read from an untouched copy of the cache through test_util's own
 * address arithmetic, and brute-force retention counts.
 */
#ifndef KVC_COMPACT_ORACLE_H
#define KVC_COMPACT_ORACLE_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"
#include "test_util.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  KVC_KEEP_RANDOM = 0,        /* a uniformly random k-subset                                      */
  KVC_KEEP_LAST = 1,          /* the last k tokens: every source shifted by n - k (by one at n-1) */
  KVC_KEEP_STRIDED = 2,       /* floor(j * n / k): every other at k = n/2, one drop in m near n    */
  KVC_KEEP_PREFIX_RANDOM = 3, /* tokens [0, k/2) in place, then a random subset of the rest       */
  KVC_KEEP_PATTERNS = 4
} kvc_keep_pattern_t;

/* k = min(budget, n). */
int32_t kvc_test_kept(int32_t budget, int32_t n);

/* The keep layout (malloc'd, *elems int32) of a batch: row (b, h) follows pattern
 * (b + h + pattern_shift) % KVC_KEEP_PATTERNS; rows of sequences with k == n hold 0 .. n-1. */
int32_t *kvc_test_keep_new(int32_t batch, const int32_t *seq_lens, const int32_t *budgets, int32_t heads,
                           int32_t pattern_shift, uint64_t seed, int64_t *elems);

/* Extra per-token arrays in the score layout, random floats: `count` arrays of `elems` (malloc'd,
 * free with kvc_test_extras_free). */
float **kvc_test_extras_new(int32_t count, int64_t elems, uint64_t seed);
float **kvc_test_extras_clone(float *const *extras, int32_t count, int64_t elems);
void kvc_test_extras_free(float **extras, int32_t count);

/* What compaction must leave: `expected` (a clone of `before`) gets, for every sequence b with
 * k < n and skip[b] == 0 (skip may be NULL), head h and j < k, slot j <- before's slot keep[j] in
 * K and V, and the same in the extras (score layout). Everything else stays as in `before`. */
void kvc_test_compact_oracle(const kvc_test_cache_t *before, kvc_test_cache_t *expected, const int32_t *budgets,
                             const int32_t *keep, float *const *extras_before, float *const *extras_expected,
                             int32_t num_extras, const unsigned char *skip);

/* Byte offset of the first difference of two buffers, or -1. */
int64_t kvc_test_first_difference(const void *a, const void *b, size_t bytes);
/* Whether `got` differs from `want` (bytes each); if so a sentence in `why` (cap bytes): the first
 * differing byte, with its page, that page's owner and its offset in the page when `layout` (the
 * cache the buffers are pools of) is given. */
int kvc_test_describe_difference(const void *got, const void *want, size_t bytes, const kvc_test_cache_t *layout,
                                 char *why, size_t cap);

/* The mixed batch of the compaction tests: k = 1, k = n - 1, one drop in 37, half, a tenth, budget
 * > n and budget = n (kept whole), and a one-token sequence. */
enum { KVC_TEST_MIXED_BATCH = 8 };
extern const int32_t kvc_test_mixed_lens[KVC_TEST_MIXED_BATCH], kvc_test_mixed_budgets[KVC_TEST_MIXED_BATCH];
/* Row sizes that give 16-byte vectors (f32 64, f16 40 -> 80 B, bf16 128) and 8-byte ones (fp8 24). */
int32_t kvc_test_compact_head_dim(kvc_dtype_t dtype);

/* Brute-force count layout of a keep layout (plain loops over each row, no search). */
void kvc_test_retention_oracle(int32_t batch, const int32_t *seq_lens, const int32_t *budgets, int32_t heads,
                               const int32_t *span_indptr, const kvc_span_t *spans, const int32_t *keep,
                               int32_t *counts);

#ifdef __cplusplus
}
#endif

#endif /* KVC_COMPACT_ORACLE_H */
