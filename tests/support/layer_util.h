/*
 * layer_util.h - test data for the layer-batched calls: one cache per layer sharing a layout and a
 * page table but holding different data, their pools as kvc_layers_t arrays, and stacked keep
 * layouts.
 */
#ifndef KVC_LAYER_UTIL_H
#define KVC_LAYER_UTIL_H

#include <stdint.h>

#include "kvcompress.h"
#include "test_util.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_TEST_MAX_LAYERS 8

/* num_layers deep copies of `base` (same layout, page table and guard sentinels); in layer l the
 * K and V rows of every (sequence, head) are rotated by l * n / num_layers + l tokens, so each layer
 * holds different data in the same slots (free with kvc_test_layer_caches_free). */
typedef struct {
  int32_t num_layers;
  kvc_test_cache_t *cache[KVC_TEST_MAX_LAYERS];
  void *k[KVC_TEST_MAX_LAYERS], *v[KVC_TEST_MAX_LAYERS]; /* the pools, for kvc_layers_t */
  kvc_paged_kv_t desc;                                   /* the shared layout, k = v = NULL */
} kvc_test_layers_t;

kvc_test_layers_t *kvc_test_layers_new(const kvc_test_cache_t *base, int32_t num_layers);
/* Deep copy (pools included). */
kvc_test_layers_t *kvc_test_layers_clone(const kvc_test_layers_t *layers);
void kvc_test_layers_free(kvc_test_layers_t *layers);
/* Its pools as the layer arrays of a call (queries and lse NULL). */
kvc_layers_t kvc_test_layers_view(kvc_test_layers_t *layers);

/* num_layers keep layouts of kvc_test_keep_new stacked, layer l with pattern shift
 * pattern_shift + l and seed seed + l (malloc'd; *elems is one layer's). */
int32_t *kvc_test_keep_layers_new(int32_t num_layers, int32_t batch, const int32_t *seq_lens, const int32_t *budgets,
                                  int32_t heads, int32_t pattern_shift, uint64_t seed, int64_t *elems);

/* kvc_score_layers on `backend` (SNAPKV over 3 layers, per-layer queries, one layer's lse left to
 * the library) == one kvc_score per layer, bit for bit; NULL queries are refused. */
void kvc_test_score_layers_match_single_calls(kvc_backend_t backend);

#ifdef __cplusplus
}
#endif

#endif /* KVC_LAYER_UTIL_H */
