/* test_util.c - see test_util.h. */
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t kvc_rng_next(kvc_rng_t *rng) {
  uint64_t z = (rng->state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double kvc_rng_uniform(kvc_rng_t *rng) { return (double)(kvc_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0); }

double kvc_rng_normal(kvc_rng_t *rng) {
  double u = kvc_rng_uniform(rng), v = kvc_rng_uniform(rng);
  return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

int32_t kvc_rng_range(kvc_rng_t *rng, int32_t lo, int32_t hi) {
  return lo + (int32_t)(kvc_rng_next(rng) % (uint64_t)(hi - lo + 1));
}

uint16_t kvc_test_f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
  uint32_t man = u & 0x7fffffu;
  if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
  if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    man |= 0x800000u;
    uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1);
    uint32_t r = man >> shift, rem = man & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
  return (uint16_t)(sign | r);
}

uint16_t kvc_test_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

uint8_t kvc_test_f32_to_e4m3(float f) {
  const uint8_t sign = signbit(f) ? 0x80u : 0u;
  if (isnan(f)) return (uint8_t)(sign | 0x7fu);
  const double a = fabs((double)f);
  if (a >= 448.0) return (uint8_t)(sign | 0x7eu); /* saturate (vLLM's conversion does) */
  if (a < 0.015625) return (uint8_t)(sign | (uint8_t)nearbyint(a * 512.0)); /* m * 2^-9; m = 8 is 2^-6, code 8 */
  int e;
  const double fraction = frexp(a, &e); /* a = fraction * 2^e, fraction in [0.5, 1) */
  int m = (int)nearbyint((fraction * 2.0 - 1.0) * 8.0), biased = e - 1 + 7;
  if (m == 8) m = 0, ++biased;
  if (biased > 15 || (biased == 15 && m == 7)) return (uint8_t)(sign | 0x7eu);
  return (uint8_t)(sign | biased << 3 | m);
}

double kvc_test_e4m3(uint8_t x) {
  const int e = (x >> 3) & 0xf, m = x & 7;
  const double magnitude = e == 15 && m == 7 ? NAN : e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
  return (x & 0x80u) ? -magnitude : magnitude;
}

kvc_dtype_t kvc_test_query_dtype(const kvc_plan_desc_t *d) {
  switch (d->query_dtype) {
    case KVC_QUERY_DTYPE_F32: return KVC_DTYPE_F32;
    case KVC_QUERY_DTYPE_F16: return KVC_DTYPE_F16;
    case KVC_QUERY_DTYPE_BF16: return KVC_DTYPE_BF16;
    default: return d->dtype;
  }
}

double kvc_test_key_scale(const kvc_plan_desc_t *d, int32_t h) {
  if (d->dtype != KVC_DTYPE_FP8_E4M3) return 1.0;
  return d->k_scales ? (double)d->k_scales[h] : (double)d->k_scale;
}

static int elem_size(kvc_dtype_t dtype) { return dtype == KVC_DTYPE_F32 ? 4 : dtype == KVC_DTYPE_FP8_E4M3 ? 1 : 2; }

double kvc_test_load(const void *base, kvc_dtype_t dtype, int64_t i) {
  uint32_t u;
  float f;
  switch (dtype) {
    case KVC_DTYPE_F32: return ((const float *)base)[i];
    case KVC_DTYPE_F16: {
      uint16_t h = ((const uint16_t *)base)[i];
      int32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
      double mag = exp == 0 ? ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY) : ldexp(man + 1024, exp - 25);
      return (h & 0x8000u) ? -mag : mag;
    }
    case KVC_DTYPE_BF16:
      u = (uint32_t)((const uint16_t *)base)[i] << 16;
      memcpy(&f, &u, sizeof f);
      return f;
    default: return kvc_test_e4m3(((const uint8_t *)base)[i]);
  }
}

static void store(void *base, kvc_dtype_t dtype, int64_t i, float value) {
  switch (dtype) {
    case KVC_DTYPE_F32: ((float *)base)[i] = value; break;
    case KVC_DTYPE_F16: ((uint16_t *)base)[i] = kvc_test_f32_to_f16(value); break;
    case KVC_DTYPE_BF16: ((uint16_t *)base)[i] = kvc_test_f32_to_bf16(value); break;
    default: ((uint8_t *)base)[i] = kvc_test_f32_to_e4m3(value); break; /* fp8: never the sentinel (below) */
  }
  if (dtype == KVC_DTYPE_FP8_E4M3 && ((uint8_t *)base)[i] == 0xCD) ((uint8_t *)base)[i] = 0x3C;
}

static int64_t slot_offset(const kvc_test_cache_t *c, int32_t page, int32_t slot, int32_t h) {
  const kvc_paged_kv_t *d = &c->desc;
  int64_t H = d->num_kv_heads, D = d->head_dim, P = d->page_size;
  int64_t page_elems = P * H * D;
  return c->layout == KVC_TEST_NHD ? page * page_elems + slot * H * D + h * D
                                   : page * page_elems + h * P * D + slot * D;
}

static int32_t page_of(const kvc_test_cache_t *c, int32_t b, int32_t t) {
  int32_t i = t / c->desc.page_size;
  switch (c->table_kind) {
    case KVC_TEST_DENSE: return c->table[(int64_t)b * c->desc.max_pages + i];
    case KVC_TEST_CSR: return c->table[c->indptr[b] + i];
    default: return b;
  }
}

void *kvc_test_k_ptr(const kvc_test_cache_t *c, int32_t b, int32_t t, int32_t h) {
  return c->k + slot_offset(c, page_of(c, b, t), t % c->desc.page_size, h) * elem_size(c->desc.dtype);
}

void *kvc_test_v_ptr(const kvc_test_cache_t *c, int32_t b, int32_t t, int32_t h) {
  return c->v + slot_offset(c, page_of(c, b, t), t % c->desc.page_size, h) * elem_size(c->desc.dtype);
}

double kvc_test_k(const kvc_test_cache_t *c, int32_t b, int32_t t, int32_t h, int32_t d) {
  return kvc_test_load(kvc_test_k_ptr(c, b, t, h), c->desc.dtype, d);
}

size_t kvc_test_row_bytes(const kvc_test_cache_t *c) {
  return (size_t)c->desc.head_dim * (size_t)elem_size(c->desc.dtype);
}

kvc_test_cache_t *kvc_test_cache_new(int32_t batch, const int32_t *seq_lens, int32_t num_kv_heads, int32_t head_dim,
                                     kvc_dtype_t dtype, int32_t page_size, kvc_test_layout_t layout,
                                     kvc_test_table_t table_kind, int32_t guard_pages, uint64_t seed) {
  kvc_rng_t rng = {seed};
  kvc_test_cache_t *c = (kvc_test_cache_t *)calloc(1, sizeof *c);
  c->batch = batch;
  c->layout = layout;
  c->table_kind = table_kind;
  c->seq_lens = (int32_t *)malloc(sizeof(int32_t) * (size_t)batch);
  memcpy(c->seq_lens, seq_lens, sizeof(int32_t) * (size_t)batch);
  int32_t max_len = 0, max_pages = 0, used_pages = 0;
  for (int32_t b = 0; b < batch; ++b) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
  if (table_kind == KVC_TEST_CONTIG) {
    page_size = max_len;
    guard_pages = 0; /* page b is sequence b: the tails past each length are the guards */
  }
  for (int32_t b = 0; b < batch; ++b) {
    int32_t need = (seq_lens[b] + page_size - 1) / page_size;
    max_pages = need > max_pages ? need : max_pages;
    used_pages += need;
  }
  int32_t num_pages = used_pages + guard_pages;
  kvc_paged_kv_t *d = &c->desc;
  d->dtype = dtype;
  d->num_kv_heads = num_kv_heads;
  d->head_dim = head_dim;
  d->page_size = page_size;
  d->num_pages = num_pages;
  d->stride_page = (int64_t)page_size * num_kv_heads * head_dim;
  d->stride_token = layout == KVC_TEST_NHD ? (int64_t)num_kv_heads * head_dim : head_dim;
  d->stride_head = layout == KVC_TEST_NHD ? head_dim : (int64_t)page_size * head_dim;
  c->pool_bytes = (size_t)num_pages * (size_t)d->stride_page * (size_t)elem_size(dtype);
  c->k = (unsigned char *)malloc(c->pool_bytes);
  c->v = (unsigned char *)malloc(c->pool_bytes);
  memset(c->k, 0xCD, c->pool_bytes);
  memset(c->v, 0xCD, c->pool_bytes);
  c->owner = (int32_t *)malloc(sizeof(int32_t) * (size_t)num_pages);
  for (int32_t p = 0; p < num_pages; ++p) c->owner[p] = -1;

  /* shuffled page ids so sequences' pages interleave with each other and with the guards */
  int32_t *ids = (int32_t *)malloc(sizeof(int32_t) * (size_t)num_pages);
  for (int32_t p = 0; p < num_pages; ++p) ids[p] = p;
  if (table_kind != KVC_TEST_CONTIG)
    for (int32_t p = num_pages - 1; p > 0; --p) {
      int32_t j = kvc_rng_range(&rng, 0, p), t = ids[p];
      ids[p] = ids[j];
      ids[j] = t;
    }
  if (table_kind == KVC_TEST_DENSE) {
    d->max_pages = max_pages + 1; /* a spare column past every sequence's need: must never be used */
    c->table = (int32_t *)malloc(sizeof(int32_t) * (size_t)batch * (size_t)d->max_pages);
    for (int64_t i = 0; i < (int64_t)batch * d->max_pages; ++i) c->table[i] = -7; /* invalid on purpose */
  } else if (table_kind == KVC_TEST_CSR) {
    c->indptr = (int32_t *)malloc(sizeof(int32_t) * (size_t)(batch + 1));
    c->table = (int32_t *)malloc(sizeof(int32_t) * (size_t)(used_pages > 0 ? used_pages : 1));
  }
  int32_t next = 0;
  if (c->indptr) c->indptr[0] = 0;
  for (int32_t b = 0; b < batch; ++b) {
    int32_t need = (seq_lens[b] + page_size - 1) / page_size;
    for (int32_t i = 0; i < need; ++i) {
      int32_t page = ids[next++];
      c->owner[page] = b;
      if (table_kind == KVC_TEST_DENSE) c->table[(int64_t)b * d->max_pages + i] = page;
      if (table_kind == KVC_TEST_CSR) c->table[c->indptr[b] + i] = page;
    }
    if (c->indptr) c->indptr[b + 1] = c->indptr[b] + need;
  }
  free(ids);
  d->page_table = c->table;
  d->page_indptr = c->indptr;
  d->k = c->k;
  d->v = c->v;

  for (int32_t b = 0; b < batch; ++b)
    for (int32_t t = 0; t < seq_lens[b]; ++t) {
      double offset = 0.5 * sin(0.37 * t + b); /* per-token offset: norms differ between tokens */
      for (int32_t h = 0; h < num_kv_heads; ++h) {
        void *kp = kvc_test_k_ptr(c, b, t, h), *vp = kvc_test_v_ptr(c, b, t, h);
        for (int32_t e = 0; e < head_dim; ++e) {
          store(kp, dtype, e, (float)(kvc_rng_normal(&rng) + offset));
          store(vp, dtype, e, (float)kvc_rng_normal(&rng));
        }
      }
    }
  return c;
}

void kvc_test_cache_free(kvc_test_cache_t *c) {
  if (!c) return;
  free(c->seq_lens);
  free(c->k);
  free(c->v);
  free(c->table);
  free(c->indptr);
  free(c->owner);
  free(c);
}

kvc_test_cache_t *kvc_test_cache_clone(const kvc_test_cache_t *src) {
  kvc_test_cache_t *c = (kvc_test_cache_t *)malloc(sizeof *c);
  *c = *src;
  size_t table_len = src->table_kind == KVC_TEST_DENSE ? (size_t)src->batch * (size_t)src->desc.max_pages
                     : src->table_kind == KVC_TEST_CSR ? (size_t)(src->indptr[src->batch] > 0 ? src->indptr[src->batch] : 1)
                                                       : 0;
  c->seq_lens = (int32_t *)malloc(sizeof(int32_t) * (size_t)src->batch);
  memcpy(c->seq_lens, src->seq_lens, sizeof(int32_t) * (size_t)src->batch);
  c->k = (unsigned char *)malloc(src->pool_bytes);
  c->v = (unsigned char *)malloc(src->pool_bytes);
  memcpy(c->k, src->k, src->pool_bytes);
  memcpy(c->v, src->v, src->pool_bytes);
  c->owner = (int32_t *)malloc(sizeof(int32_t) * (size_t)src->desc.num_pages);
  memcpy(c->owner, src->owner, sizeof(int32_t) * (size_t)src->desc.num_pages);
  c->table = NULL;
  c->indptr = NULL;
  if (table_len) {
    c->table = (int32_t *)malloc(sizeof(int32_t) * table_len);
    memcpy(c->table, src->table, sizeof(int32_t) * table_len);
  }
  if (src->indptr) {
    c->indptr = (int32_t *)malloc(sizeof(int32_t) * (size_t)(src->batch + 1));
    memcpy(c->indptr, src->indptr, sizeof(int32_t) * (size_t)(src->batch + 1));
  }
  c->desc.k = c->k;
  c->desc.v = c->v;
  c->desc.page_table = c->table;
  c->desc.page_indptr = c->indptr;
  return c;
}

void *kvc_test_workspace_new(size_t bytes) {
  void *p = NULL;
  if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return NULL;
  memset(p, 0, bytes ? bytes : 1);
  return p;
}

void *kvc_test_queries_new(int64_t rows, int32_t num_q_heads, int32_t head_dim, kvc_dtype_t dtype, uint64_t seed) {
  kvc_rng_t rng = {seed};
  int64_t count = rows * num_q_heads * head_dim;
  void *q = malloc((size_t)(count > 0 ? count : 1) * (size_t)elem_size(dtype));
  for (int64_t i = 0; i < count; ++i) store(q, dtype, i, (float)kvc_rng_normal(&rng));
  return q;
}

float *kvc_test_lse(const kvc_plan_desc_t *d, kvc_plan_t plan, const kvc_test_cache_t *cache, const void *queries) {
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  const int32_t H = d->num_kv_heads, Hq = d->num_q_heads, D = d->head_dim, G = Hq / H;
  const double scale = d->scale > 0.0f ? (double)d->scale : 1.0 / sqrt((double)D);
  const kvc_dtype_t query_dtype = kvc_test_query_dtype(d);
  int32_t *indptr = (int32_t *)malloc(sizeof(int32_t) * (size_t)(d->batch + 1));
  int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * (size_t)(info.obs_total + 1));
  float *lse = (float *)malloc(sizeof(float) * (size_t)(info.obs_total * Hq + 1));
  kvc_plan_obs_positions(plan, indptr, pos);
  for (int32_t b = 0; b < d->batch; ++b)
    for (int32_t r = indptr[b]; r < indptr[b + 1]; ++r) {
      int32_t lo = 0;
      for (int32_t i = d->span_indptr ? d->span_indptr[b] : 0; d->span_local && i < d->span_indptr[b + 1]; ++i)
        if (d->spans[i].kind == KVC_SPAN_FAIR && pos[r] >= d->spans[i].start && pos[r] < d->spans[i].end)
          lo = d->spans[i].start;
      for (int32_t g = 0; g < Hq; ++g) {
        double total = 0.0;
        for (int32_t j = lo; j <= pos[r]; ++j) {
          double dot = 0.0;
          for (int32_t x = 0; x < D; ++x)
            dot += kvc_test_load(queries, query_dtype, ((int64_t)r * Hq + g) * D + x) * kvc_test_k(cache, b, j, g / G, x);
          dot *= kvc_test_key_scale(d, g / G);
          total += exp(scale * dot);
        }
        lse[(int64_t)r * Hq + g] = (float)log(total);
      }
    }
  free(indptr);
  free(pos);
  return lse;
}
