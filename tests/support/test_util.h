/*
 * test_util.h - shared test helpers: a deterministic RNG, paged caches in every layout the
 * descriptor supports (with guard pages filled with a sentinel), and plain accessors the oracles
 * use to read a token's K/V without going through the library's page mapping code.
 */
#ifndef KVC_TEST_UTIL_H
#define KVC_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

/* splitmix64: deterministic, seedable, good enough for test data. */
typedef struct { uint64_t state; } kvc_rng_t;
uint64_t kvc_rng_next(kvc_rng_t *rng);
double kvc_rng_uniform(kvc_rng_t *rng);              /* [0, 1) */
double kvc_rng_normal(kvc_rng_t *rng);               /* N(0, 1) */
int32_t kvc_rng_range(kvc_rng_t *rng, int32_t lo, int32_t hi); /* [lo, hi] inclusive */

typedef enum { KVC_TEST_NHD = 0, KVC_TEST_HND = 1 } kvc_test_layout_t;
typedef enum {
  KVC_TEST_DENSE = 0, /* vLLM block table [batch][max_pages]          */
  KVC_TEST_CSR = 1,   /* FlashInfer indptr + indices                   */
  KVC_TEST_CONTIG = 2 /* page_table NULL, one page per sequence (page_size = max seq len) */
} kvc_test_table_t;

/* A paged cache in host memory. Pages are handed out in a shuffled order; `guard_pages` extra
 * pages owned by no sequence are interleaved, and every slot no sequence owns (guard pages, the
 * tails of last pages) holds the sentinel byte 0xCD. K and V values are N(0,1) * `scale_k` with a
 * per-token offset so that norms differ between tokens (fp8: rounded to e4m3, the code 0xCD, which
 * is -6.5, replaced by 0x3C). */
typedef struct {
  kvc_paged_kv_t desc;      /* host pointers into the fields below                   */
  int32_t batch;
  int32_t *seq_lens;        /* [batch], owned copy                                   */
  unsigned char *k, *v;     /* pools, pool_bytes each                                */
  size_t pool_bytes;
  int32_t *table;           /* dense table or CSR indices (NULL for CONTIG)          */
  int32_t *indptr;          /* CSR offsets (NULL otherwise)                          */
  int32_t *owner;           /* [num_pages] sequence owning each page, -1 for guards  */
  kvc_test_layout_t layout;
  kvc_test_table_t table_kind;
} kvc_test_cache_t;

kvc_test_cache_t *kvc_test_cache_new(int32_t batch, const int32_t *seq_lens, int32_t num_kv_heads,
                                     int32_t head_dim, kvc_dtype_t dtype, int32_t page_size,
                                     kvc_test_layout_t layout, kvc_test_table_t table_kind,
                                     int32_t guard_pages, uint64_t seed);
void kvc_test_cache_free(kvc_test_cache_t *cache);
/* Deep copy (pools and tables), for before/after comparisons. */
kvc_test_cache_t *kvc_test_cache_clone(const kvc_test_cache_t *cache);

/* Address of (sequence b, token t, head h) in the K or V pool, computed independently of the
 * library from the table kind and layout. */
void *kvc_test_k_ptr(const kvc_test_cache_t *c, int32_t b, int32_t t, int32_t h);
void *kvc_test_v_ptr(const kvc_test_cache_t *c, int32_t b, int32_t t, int32_t h);
/* Element d of (b, t, h) of K as double (f32/f16/bf16/fp8 e4m3 decoded, without any k_scale). */
double kvc_test_k(const kvc_test_cache_t *c, int32_t b, int32_t t, int32_t h, int32_t d);
/* Byte size of one token row of one head (head_dim * element size). */
size_t kvc_test_row_bytes(const kvc_test_cache_t *c);

/* Random queries [rows][num_q_heads][head_dim] in `dtype` (malloc'd; free with free()). */
void *kvc_test_queries_new(int64_t rows, int32_t num_q_heads, int32_t head_dim, kvc_dtype_t dtype,
                           uint64_t seed);
/* The natural-log softmax normaliser of every (observation row, q head) of a plan made from `desc`
 * (kvc_score's `lse` argument), in double from the test's own page mapping, as float
 * [obs_total][num_q_heads] (malloc'd). Row r sees keys [lo, p]: lo = 0, or with span_local the
 * start of the FAIR span holding p. */
float *kvc_test_lse(const kvc_plan_desc_t *desc, kvc_plan_t plan, const kvc_test_cache_t *cache, const void *queries);
/* Zeroed, 256-byte aligned (the workspace alignment the API requires); free with free(). */
void *kvc_test_workspace_new(size_t bytes);
/* Element i of an array of `dtype` as double (fp8: kvc_test_e4m3). */
double kvc_test_load(const void *base, kvc_dtype_t dtype, int64_t i);
/* Round-to-nearest-even conversions used to build f16/bf16 test data. */
uint16_t kvc_test_f32_to_f16(float f);
uint16_t kvc_test_f32_to_bf16(float f);
/* fp8 e4m3 from its definition (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; S.1111.111 NaN,
 * no inf): float to the nearest code, ties to even, saturating at +-448; and a code as double. */
uint8_t kvc_test_f32_to_e4m3(float f);
double kvc_test_e4m3(uint8_t x);
/* A desc's query dtype (query_dtype resolved) and the scale of KV head h's keys (FP8: k_scales[h]
 * or k_scale; other dtypes 1), read by the rules of kvcompress.h. */
kvc_dtype_t kvc_test_query_dtype(const kvc_plan_desc_t *d);
double kvc_test_key_scale(const kvc_plan_desc_t *d, int32_t h);

#ifdef __cplusplus
}
#endif

#endif /* KVC_TEST_UTIL_H */
