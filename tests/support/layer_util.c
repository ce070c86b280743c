/* layer_util.c - see layer_util.h. */
#include "layer_util.h"

#include <stdlib.h>
#include <string.h>

#include "compact_oracle.h"

/* Rotates the rows of every (sequence, head) of one pool by `shift` tokens, through the test's own
 * address arithmetic. */
static void rotate_rows(kvc_test_cache_t *c, int is_v, int32_t layer, int32_t num_layers) {
  const size_t row = kvc_test_row_bytes(c);
  for (int32_t b = 0; b < c->batch; ++b) {
    const int32_t n = c->seq_lens[b], shift = (int32_t)(((int64_t)layer * n / num_layers + layer) % n);
    if (shift == 0) continue;
    unsigned char *copy = (unsigned char *)malloc(row * (size_t)n);
    for (int32_t h = 0; h < c->desc.num_kv_heads; ++h) {
      for (int32_t t = 0; t < n; ++t)
        memcpy(copy + row * (size_t)t, is_v ? kvc_test_v_ptr(c, b, t, h) : kvc_test_k_ptr(c, b, t, h), row);
      for (int32_t t = 0; t < n; ++t)
        memcpy(is_v ? kvc_test_v_ptr(c, b, t, h) : kvc_test_k_ptr(c, b, t, h), copy + row * (size_t)((t + shift) % n),
               row);
    }
    free(copy);
  }
}

static void point(kvc_test_layers_t *l) {
  for (int32_t i = 0; i < l->num_layers; ++i) {
    l->k[i] = l->cache[i]->k;
    l->v[i] = l->cache[i]->v;
  }
  l->desc = l->cache[0]->desc;
  l->desc.k = l->desc.v = NULL;
}

kvc_test_layers_t *kvc_test_layers_new(const kvc_test_cache_t *base, int32_t num_layers) {
  kvc_test_layers_t *l = (kvc_test_layers_t *)calloc(1, sizeof *l);
  l->num_layers = num_layers;
  for (int32_t i = 0; i < num_layers; ++i) {
    l->cache[i] = kvc_test_cache_clone(base);
    rotate_rows(l->cache[i], 0, i, num_layers);
    rotate_rows(l->cache[i], 1, i, num_layers);
  }
  point(l);
  return l;
}

kvc_test_layers_t *kvc_test_layers_clone(const kvc_test_layers_t *src) {
  kvc_test_layers_t *l = (kvc_test_layers_t *)calloc(1, sizeof *l);
  l->num_layers = src->num_layers;
  for (int32_t i = 0; i < src->num_layers; ++i) l->cache[i] = kvc_test_cache_clone(src->cache[i]);
  point(l);
  return l;
}

void kvc_test_layers_free(kvc_test_layers_t *l) {
  if (!l) return;
  for (int32_t i = 0; i < l->num_layers; ++i) kvc_test_cache_free(l->cache[i]);
  free(l);
}

kvc_layers_t kvc_test_layers_view(kvc_test_layers_t *l) {
  kvc_layers_t view = {l->num_layers, l->k, l->v, NULL, NULL};
  return view;
}

int32_t *kvc_test_keep_layers_new(int32_t num_layers, int32_t batch, const int32_t *seq_lens, const int32_t *budgets,
                                  int32_t heads, int32_t pattern_shift, uint64_t seed, int64_t *elems) {
  int32_t *stacked = NULL;
  for (int32_t i = 0; i < num_layers; ++i) {
    int32_t *keep = kvc_test_keep_new(batch, seq_lens, budgets, heads, pattern_shift + i, seed + (uint64_t)i, elems);
    if (!stacked) stacked = (int32_t *)malloc(sizeof(int32_t) * (size_t)(*elems) * (size_t)num_layers);
    memcpy(stacked + (size_t)i * (size_t)*elems, keep, sizeof(int32_t) * (size_t)*elems);
    free(keep);
  }
  return stacked;
}
