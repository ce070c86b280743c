/*
 * select_oracle.c - see select_oracle.h. Deliberately the slow, obvious way: per candidate set, a
 * qsort by (score desc, NaN last, -0 == +0, position desc) and the first m taken.
 */
#include "select_oracle.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *kvc_test_pattern_name(kvc_score_pattern_t pattern) {
  static const char *names[] = {"random", "few_values", "special", "equal", "nan"};
  return names[pattern];
}

void kvc_test_fill_scores(float *scores, int64_t count, kvc_score_pattern_t pattern, uint64_t seed) {
  kvc_rng_t rng = {seed};
  const float few[] = {-1.0f, 0.0f, -0.0f, 0.5f, 2.0f};
  const float special[] = {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e-45f, -1e-45f, 1.0f, -1.0f, 3.0e38f};
  for (int64_t i = 0; i < count; ++i) {
    switch (pattern) {
      case KVC_SCORES_RANDOM:
        scores[i] = (float)kvc_rng_normal(&rng);
        break;
      case KVC_SCORES_FEW_VALUES:
        scores[i] = few[kvc_rng_range(&rng, 0, 4)];
        break;
      case KVC_SCORES_SPECIAL:
        scores[i] = special[kvc_rng_range(&rng, 0, 10)];
        break;
      case KVC_SCORES_EQUAL:
        scores[i] = 0.25f;
        break;
      case KVC_SCORES_NAN: {
        uint32_t bits =
            0x7fc00000u | (uint32_t)kvc_rng_range(&rng, 0, 0x3fffff) | (kvc_rng_range(&rng, 0, 1) ? 0x80000000u : 0);
        memcpy(&scores[i], &bits, sizeof bits);
        break;
      }
    }
  }
}

int32_t kvc_test_random_spans(kvc_rng_t *rng, int32_t n, int32_t fair, int32_t protect, int equal_weights,
                              kvc_span_t *spans, int32_t count, int32_t cap) {
  kvc_span_t *out = spans + count;
  int32_t made = 0;
  /* FAIR spans: cut [0, n) into 2 * fair + 1 random pieces, every other piece a span */
  if (fair > 0 && n >= 2 * fair + 1) {
    int32_t at = kvc_rng_range(rng, 0, n / (2 * fair + 1));
    for (int32_t i = 0; i < fair && made < cap - count; ++i) {
      int32_t room = (n - at) / (fair - i), len = kvc_rng_range(rng, 1, room > 1 ? room - room / 4 : 1);
      out[made].start = at;
      out[made].end = at + len;
      out[made].kind = KVC_SPAN_FAIR;
      out[made].weight = equal_weights ? 1.0f : (float)(0.25 + 3.75 * kvc_rng_uniform(rng));
      made++;
      at += len + kvc_rng_range(rng, 0, (room - len) / 2);
    }
  }
  /* PROTECT spans: short, non-overlapping, anywhere (inside or across FAIR spans) */
  int32_t last_end = 0;
  for (int32_t i = 0; i < protect && made < cap - count && last_end < n; ++i) {
    int32_t start = kvc_rng_range(rng, last_end, last_end + (n - last_end) / (protect - i));
    if (start >= n) break;
    int32_t end = start + kvc_rng_range(rng, 1, 3);
    end = end > n ? n : end;
    out[made].start = start;
    out[made].end = end;
    out[made].kind = KVC_SPAN_PROTECT;
    out[made].weight = 1.0f;
    made++;
    last_end = end + 1;
  }
  /* sort by start (insertion sort; FAIR before PROTECT on equal starts) */
  for (int32_t i = 1; i < made; ++i) {
    kvc_span_t s = out[i];
    int32_t j = i;
    while (j > 0 && (out[j - 1].start > s.start || (out[j - 1].start == s.start && out[j - 1].kind > s.kind))) {
      out[j] = out[j - 1];
      --j;
    }
    out[j] = s;
  }
  return made;
}

typedef struct {
  float score;
  int32_t position;
} ranked_t;

/* Descending by the selection order: higher score first, NaN last, -0 == +0, ties later first. */
static int rank_order(const void *pa, const void *pb) {
  const ranked_t *a = (const ranked_t *)pa, *b = (const ranked_t *)pb;
  int a_nan = isnan(a->score), b_nan = isnan(b->score);
  if (a_nan != b_nan) return a_nan - b_nan;
  if (!a_nan && a->score != b->score) return a->score > b->score ? -1 : 1;
  return a->position > b->position ? -1 : 1;
}

/* Keeps the top `m` of the tokens with member[t] && !kept[t]. */
static void keep_top(const float *row, int32_t n, const int32_t *member, int32_t who, unsigned char *kept, int32_t m,
                     ranked_t *scratch) {
  int32_t count = 0;
  for (int32_t t = 0; t < n; ++t)
    if ((!member || member[t] == who) && !kept[t]) scratch[count++] = (ranked_t){row[t], t};
  qsort(scratch, (size_t)count, sizeof *scratch, rank_order);
  for (int32_t i = 0; i < m && i < count; ++i) kept[scratch[i].position] = 1;
}

typedef struct {
  int32_t *obs_indptr, *obs_pos;
} obs_t;

static int load_obs(kvc_plan_t plan, const kvc_plan_desc_t *desc, obs_t *o) {
  kvc_plan_info_t info;
  if (kvc_plan_get_info(plan, &info) != KVC_SUCCESS) return -1;
  o->obs_indptr = malloc(sizeof(int32_t) * (size_t)(desc->batch + 1));
  o->obs_pos = malloc(sizeof(int32_t) * (size_t)(info.obs_total + 1));
  return kvc_plan_obs_positions(plan, o->obs_indptr, o->obs_pos) == KVC_SUCCESS ? 0 : -1;
}

/* Span row of (b, h) in desc's spans: b, or b * num_kv_heads + h with spans_per_head. */
static int32_t span_row(const kvc_plan_desc_t *d, int32_t b, int32_t h) {
  return d->spans_per_head ? b * d->num_kv_heads + h : b;
}

/* Protected tokens of (sequence b, KV head h). */
static void mark_protected(const kvc_plan_desc_t *d, const obs_t *o, int32_t b, int32_t h, unsigned char *prot) {
  const int32_t n = d->seq_lens[b], r = span_row(d, b, h);
  memset(prot, 0, (size_t)n);
  for (int32_t t = 0; t < n; ++t) prot[t] = t < d->sink_tokens || t >= n - d->recent_tokens;
  if (d->span_indptr)
    for (int32_t i = d->span_indptr[r]; i < d->span_indptr[r + 1]; ++i)
      if (d->spans[i].kind == KVC_SPAN_PROTECT)
        for (int32_t t = d->spans[i].start; t < d->spans[i].end; ++t) prot[t] = 1;
  if ((d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_TOVA) && d->window_protection == KVC_WINDOW_PROTECTED)
    for (int32_t i = o->obs_indptr[b]; i < o->obs_indptr[b + 1]; ++i) prot[o->obs_pos[i]] = 1;
}

int32_t kvc_test_protected_count(kvc_plan_t plan, const kvc_plan_desc_t *desc, int32_t b) {
  obs_t o;
  int32_t count = -1;
  if (load_obs(plan, desc, &o) == 0) {
    unsigned char *prot = malloc((size_t)desc->seq_lens[b]);
    for (int32_t h = 0; h < (desc->spans_per_head ? desc->num_kv_heads : 1); ++h) {
      mark_protected(desc, &o, b, h, prot);
      int32_t head_count = 0;
      for (int32_t t = 0; t < desc->seq_lens[b]; ++t) head_count += prot[t];
      count = head_count > count ? head_count : count;
    }
    free(prot);
  }
  free(o.obs_indptr), free(o.obs_pos);
  return count;
}

int kvc_test_select_oracle(kvc_plan_t plan, const kvc_plan_desc_t *d, const float *scores, int32_t *keep) {
  kvc_plan_info_t info;
  obs_t o = {NULL, NULL};
  if (kvc_plan_get_info(plan, &info) != KVC_SUCCESS || load_obs(plan, d, &o) != 0) return -1;
  int32_t *quotas = malloc(sizeof(int32_t) * (size_t)(info.total_spans + 1));
  const int32_t rows = d->spans_per_head ? d->batch * d->num_kv_heads : d->batch;
  int32_t *implicit = malloc(sizeof(int32_t) * (size_t)rows);
  int status = kvc_plan_span_quotas(plan, quotas, implicit) == KVC_SUCCESS ? 0 : -1;
  int32_t max_n = 1;
  for (int32_t b = 0; b < d->batch; ++b) max_n = d->seq_lens[b] > max_n ? d->seq_lens[b] : max_n;
  unsigned char *kept = malloc((size_t)max_n);
  int32_t *member = malloc(sizeof(int32_t) * (size_t)max_n);
  ranked_t *scratch = malloc(sizeof(ranked_t) * (size_t)max_n);
  const int32_t heads = d->num_kv_heads;
  int64_t score_at = 0, keep_at = 0;
  for (int32_t b = 0; b < d->batch && status == 0; ++b) {
    const int32_t n = d->seq_lens[b], k = d->budgets[b] < n ? d->budgets[b] : n;
    const int64_t stride = d->score_row_capacity ? d->score_row_capacity : n;
    if (d->score_row_capacity) score_at = (int64_t)b * heads * d->score_row_capacity;
    for (int32_t h = 0; h < heads; ++h) {
      /* TOVA: one selection for every head, head 0's (its scores and spans) */
      const int32_t h_sel = d->method == KVC_SCORE_TOVA ? 0 : h, r = span_row(d, b, h_sel);
      const int32_t first_span = d->span_indptr ? d->span_indptr[r] : 0;
      const int32_t end_span = d->span_indptr ? d->span_indptr[r + 1] : 0;
      /* partition of each token: index of its FAIR span among the row's, else `nfair` (implicit) */
      int32_t nfair = 0;
      for (int32_t t = 0; t < n; ++t) member[t] = -1;
      for (int32_t i = first_span; i < end_span; ++i)
        if (d->spans[i].kind == KVC_SPAN_FAIR) {
          for (int32_t t = d->spans[i].start; t < d->spans[i].end; ++t) member[t] = nfair;
          nfair++;
        }
      for (int32_t t = 0; t < n; ++t)
        if (member[t] < 0) member[t] = nfair;
      const float *row = scores + score_at + (int64_t)h_sel * stride;
      int32_t *out = keep + keep_at + (int64_t)h * k;
      mark_protected(d, &o, b, h_sel, kept);
      if (k < n) {
        int32_t fair_index = 0, F = 0;
        for (int32_t i = first_span; i < end_span; ++i) {
          if (d->spans[i].kind != KVC_SPAN_FAIR) continue;
          int32_t lo = 0;
          for (int32_t t = d->spans[i].start; t < d->spans[i].end; ++t) lo += kept[t];
          keep_top(row, n, member, fair_index++, kept, quotas[i] - lo, scratch);
          F += quotas[i];
        }
        if (implicit[r] >= 0) {
          int32_t lo = 0;
          for (int32_t t = 0; t < n; ++t) lo += member[t] == nfair && kept[t];
          keep_top(row, n, member, nfair, kept, implicit[r] - lo, scratch);
          F += implicit[r];
        }
        keep_top(row, n, NULL, 0, kept, k - F, scratch);
      }
      int32_t written = 0;
      for (int32_t t = 0; t < n; ++t)
        if (k == n || kept[t]) out[written++] = t;
      if (written != k) status = -1;
    }
    score_at += (int64_t)heads * n;
    keep_at += (int64_t)heads * k;
  }
  free(quotas), free(implicit), free(kept), free(member), free(scratch), free(o.obs_indptr), free(o.obs_pos);
  return status;
}

kvc_test_select_case_t kvc_test_select_case(kvc_score_method_t method, int32_t heads, int32_t batch,
                                            const int32_t *lens, double keep_fraction, int32_t min_budget,
                                            kvc_score_pattern_t pattern, uint64_t seed) {
  kvc_test_select_case_t c;
  memset(&c, 0, sizeof c);
  c.method = method;
  c.num_kv_heads = heads;
  c.batch = batch;
  c.pattern = pattern;
  c.seed = seed;
  for (int32_t b = 0; b < batch; ++b) {
    int32_t budget = (int32_t)(keep_fraction * lens[b]);
    c.seq_lens[b] = lens[b];
    c.budgets[b] = budget < min_budget ? min_budget : budget;
  }
  return c;
}

void kvc_test_select_case_add_spans(kvc_test_select_case_t *c, int32_t fair, int32_t protect, int equal_weights) {
  kvc_rng_t rng = {c->seed ^ 0x5eedu};
  c->has_spans = 1;
  c->span_indptr[0] = 0;
  for (int32_t b = 0; b < c->batch; ++b)
    c->span_indptr[b + 1] =
        c->span_indptr[b] + kvc_test_random_spans(&rng, c->seq_lens[b], fair, protect, equal_weights, c->spans,
                                                  c->span_indptr[b], KVC_TEST_SELECT_MAX_SPANS);
}

kvc_plan_desc_t kvc_test_select_case_desc(const kvc_test_select_case_t *c) {
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_kv_heads = c->num_kv_heads;
  desc.num_q_heads = c->num_kv_heads;
  desc.head_dim = 64;
  desc.batch = c->batch;
  desc.seq_lens = c->seq_lens;
  desc.budgets = c->budgets;
  desc.span_indptr = c->has_spans ? c->span_indptr : NULL;
  desc.spans = c->has_spans ? c->spans : NULL;
  desc.method = c->method;
  desc.window = c->window > 0 ? c->window : 16;
  desc.sink_tokens = c->sink;
  desc.recent_tokens = c->recent;
  desc.fairness = c->fairness;
  return desc;
}
