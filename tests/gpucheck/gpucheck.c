/*
 * gpucheck.c - the driver of kvc-gpucheck (see gpucheck.h): options, the family table, the case
 * loop, the shared helpers (guarded device memory, comparisons, drawing problems) and the summary.
 *
 *   kvc-gpucheck [--seed S] [--cases N] [--max-n M] [--time-budget SECONDS] [--family a,b]
 *                [--exclude a,b] [--shard K/N] [--max-work W] [--verbose] [--list]
 *
 * Case i (i = 0, 1, ...) has seed S + i and runs family active[seed % count], where `active` is the
 * --family list (default: every family, in the table's order) less --exclude; every parameter comes from the seed
 * alone, so `--family F --seed <seed> --cases 1 --max-n M` reruns exactly one case, whatever
 * families are added later. --shard K/N runs the K-th of N interleaved slices (blocks of one seed
 * per active family), so N processes can share a GPU.
 * --time-budget stops starting cases after that many seconds (the cases not started are reported,
 * not counted). Exit status: 0 when at least one case passed and none failed, 1 on a failure, 77 when
 * there is no device.
 */
#define _GNU_SOURCE
#include "gpucheck.h"

#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "compact_oracle.h"
#include "device.h"
#include "select_oracle.h"

/* Every family; --family picks some of them. */
static const gc_family_t *const kFamilies[] = {&gc_family_score,   &gc_family_select,    &gc_family_compact,
                                               &gc_family_compress, &gc_family_graph,   &gc_family_corrupt,
                                               &gc_family_gather,   &gc_family_nonfinite, &gc_family_decode};
#define NUM_FAMILIES ((int)(sizeof kFamilies / sizeof kFamilies[0]))

/* ============================================================================================== */
/* Failure, description, coverage                                                                 */
/* ============================================================================================== */

void gc_fail(gc_run_t *r, const char *file, int line, const char *fmt, ...) {
  if (r->failed) return;
  r->failed = 1;
  const char *base = strrchr(file, '/');
  int at = snprintf(r->failure, sizeof r->failure, "[%s:%d] ", base ? base + 1 : file, line);
  va_list args;
  va_start(args, fmt);
  vsnprintf(r->failure + at, sizeof r->failure - (size_t)at, fmt, args);
  va_end(args);
}

void gc_skip(gc_run_t *r, const char *reason) {
  r->skipped = 1;
  snprintf(r->skip_reason, sizeof r->skip_reason, "%s", reason);
}

void gc_describe(gc_run_t *r, const char *fmt, ...) {
  size_t used = strlen(r->desc);
  if (used + 1 >= sizeof r->desc) return;
  va_list args;
  va_start(args, fmt);
  vsnprintf(r->desc + used, sizeof r->desc - used, fmt, args);
  va_end(args);
}

void gc_cover(gc_run_t *r, const char *dimension, const char *value) {
  if (r->ncover < (int)(sizeof r->cover / sizeof r->cover[0])) {
    r->cover[r->ncover][0] = dimension;
    r->cover[r->ncover][1] = value;
    r->ncover++;
  }
}

/* The process-wide tally of (dimension, value), printed at the end. */
static struct {
  const char *dimension, *value;
  long count;
} g_coverage[512];
static int g_ncoverage;

static void tally_coverage(const gc_run_t *r) {
  for (int i = 0; i < r->ncover; ++i) {
    int j = 0;
    while (j < g_ncoverage &&
           !(strcmp(g_coverage[j].dimension, r->cover[i][0]) == 0 && strcmp(g_coverage[j].value, r->cover[i][1]) == 0))
      ++j;
    if (j == g_ncoverage) {
      if (g_ncoverage == (int)(sizeof g_coverage / sizeof g_coverage[0])) continue;
      g_coverage[g_ncoverage].dimension = r->cover[i][0];
      g_coverage[g_ncoverage].value = r->cover[i][1];
      g_coverage[g_ncoverage++].count = 0;
    }
    g_coverage[j].count++;
  }
}

static void print_coverage(void) {
  printf("coverage (cases per value):\n");
  for (int i = 0; i < g_ncoverage; ++i) {
    int first = 1;
    for (int j = 0; j < i; ++j) first &= strcmp(g_coverage[j].dimension, g_coverage[i].dimension) != 0;
    if (!first) continue;
    printf("  %-12s", g_coverage[i].dimension);
    for (int j = i; j < g_ncoverage; ++j)
      if (strcmp(g_coverage[j].dimension, g_coverage[i].dimension) == 0)
        printf(" %s %ld,", g_coverage[j].value, g_coverage[j].count);
    printf("\n");
  }
}

/* ============================================================================================== */
/* Memory                                                                                         */
/* ============================================================================================== */

static int g_verbose; /* --verbose: also the first few differing scores */

static unsigned char guard_byte(size_t i) { return (unsigned char)(0x5Au ^ (unsigned)(i * 29u)); }
static unsigned char g_guard[GC_GUARD_BYTES];

void *gc_alloc(gc_run_t *r, size_t bytes) {
  void *p = NULL;
  if (r->nhost == GC_MAX_TRACKED || posix_memalign(&p, 256, bytes ? bytes : 1) != 0) {
    gc_fail(r, __FILE__, __LINE__, "host allocation of %zu bytes failed", bytes);
    return NULL;
  }
  memset(p, 0, bytes ? bytes : 1);
  r->host[r->nhost++] = p;
  return p;
}

static void track_host(gc_run_t *r, void *p) {
  if (r->nhost < GC_MAX_TRACKED) r->host[r->nhost++] = p;
  else free(p); /* never: the families stay far below the cap */
}

void *gc_dev(gc_run_t *r, const void *host, size_t bytes, const char *name) {
  if (r->failed) return NULL;
  unsigned char *base = NULL;
  if (r->ndev == GC_MAX_TRACKED || gc_device_alloc((void **)&base, bytes + 2 * GC_GUARD_BYTES) != 0) {
    gc_fail(r, __FILE__, __LINE__, "device allocation of %zu bytes (%s) failed: %s", bytes, name, gc_device_error());
    return NULL;
  }
  r->dev[r->ndev].base = base;
  r->dev[r->ndev].bytes = bytes;
  r->dev[r->ndev].name = name;
  r->ndev++;
  int bad = gc_device_upload(base, g_guard, GC_GUARD_BYTES) ||
            gc_device_upload(base + GC_GUARD_BYTES + bytes, g_guard, GC_GUARD_BYTES);
  if (!bad && host) {
    bad = gc_device_upload(base + GC_GUARD_BYTES, host, bytes);
  } else if (!bad && bytes) {
    unsigned char *garbage = malloc(bytes);
    if (!garbage) {
      gc_fail(r, __FILE__, __LINE__, "host allocation of %zu bytes failed", bytes);
      return NULL;
    }
    memset(garbage, 0xA5, bytes);
    bad = gc_device_upload(base + GC_GUARD_BYTES, garbage, bytes);
    free(garbage);
  }
  if (bad) {
    gc_fail(r, __FILE__, __LINE__, "upload of %s (%zu bytes): %s", name, bytes, gc_device_error());
    return NULL;
  }
  return base + GC_GUARD_BYTES;
}

int gc_fetch(gc_run_t *r, void *host, const void *dev, size_t bytes, const char *what) {
  if (gc_device_download(host, dev, bytes) == 0) return 0;
  gc_fail(r, __FILE__, __LINE__, "download of %s: %s", what, gc_device_error());
  return 1;
}

int gc_put(gc_run_t *r, void *dev, const void *host, size_t bytes, const char *what) {
  if (gc_device_upload(dev, host, bytes) == 0) return 0;
  gc_fail(r, __FILE__, __LINE__, "upload of %s: %s", what, gc_device_error());
  return 1;
}

int gc_sync(gc_run_t *r, const char *after) {
  if (gc_device_sync() == 0) return 0;
  gc_fail(r, __FILE__, __LINE__, "device error after %s: %s", after, gc_device_error());
  return 1;
}

int gc_check_guards(gc_run_t *r, const char *after) {
  unsigned char got[GC_GUARD_BYTES];
  for (int i = 0; i < r->ndev; ++i)
    for (int side = 0; side < 2; ++side) {
      const unsigned char *zone = r->dev[i].base + (side ? GC_GUARD_BYTES + r->dev[i].bytes : 0);
      if (gc_fetch(r, got, zone, GC_GUARD_BYTES, "a guard zone")) return 1;
      for (size_t b = 0; b < GC_GUARD_BYTES; ++b)
        if (got[b] != g_guard[b]) {
          gc_fail(r, __FILE__, __LINE__, "after %s: the guard %s device buffer '%s' (%zu bytes) changed at byte %zu %s it",
                  after, side ? "after" : "before", r->dev[i].name, r->dev[i].bytes,
                  side ? b : GC_GUARD_BYTES - b, side ? "past" : "before");
          return 1;
        }
    }
  return 0;
}

kvc_plan_t gc_plan(gc_run_t *r, kvc_context_t ctx, const kvc_plan_desc_t *desc, kvc_status_t *status) {
  kvc_plan_t plan = NULL;
  *status = kvc_plan_create(ctx, desc, &plan);
  if (*status == KVC_SUCCESS && r->nplans < (int)(sizeof r->plans / sizeof r->plans[0])) r->plans[r->nplans++] = plan;
  return *status == KVC_SUCCESS ? plan : NULL;
}

kvc_test_cache_t *gc_track_cache(gc_run_t *r, kvc_test_cache_t *cache) {
  if (r->ncaches < (int)(sizeof r->caches / sizeof r->caches[0])) r->caches[r->ncaches++] = cache;
  return cache;
}

void *gc_workspace(gc_run_t *r, kvc_plan_t plan, kvc_op_t op, int on_device, size_t *bytes) {
  *bytes = 0;
  if (kvc_plan_workspace_size(plan, op, bytes) != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "kvc_plan_workspace_size(op %d) failed", (int)op);
    return NULL;
  }
  if (on_device) return gc_dev(r, NULL, *bytes, "workspace");
  unsigned char *ws = gc_alloc(r, *bytes);
  if (ws) memset(ws, 0xA5, *bytes);
  return ws;
}

static void release(gc_run_t *r) {
  gc_graph_free(r->graph);
  r->graph = NULL;
  if (r->ndev) (void)gc_device_sync(); /* nothing may still use the memory freed below */
  for (int i = 0; i < r->nplans; ++i) kvc_plan_destroy(r->plans[i]);
  for (int i = 0; i < r->ncaches; ++i) kvc_test_cache_free(r->caches[i]);
  for (int i = 0; i < r->ndev; ++i) gc_device_free(r->dev[i].base);
  for (int i = 0; i < r->nhost; ++i) free(r->host[i]);
  r->nplans = r->ncaches = r->ndev = r->nhost = 0;
}

/* ============================================================================================== */
/* Caches on the device                                                                           */
/* ============================================================================================== */

size_t gc_table_len(const kvc_test_cache_t *c) {
  if (c->table_kind == KVC_TEST_DENSE) return (size_t)c->batch * (size_t)c->desc.max_pages;
  if (c->table_kind == KVC_TEST_CSR) return (size_t)c->indptr[c->batch];
  return 0;
}

int gc_dev_cache(gc_run_t *r, const kvc_test_cache_t *host, const int32_t *table, size_t table_len,
                 const int32_t *indptr, gc_dev_cache_t *out) {
  out->desc = host->desc;
  out->pool_bytes = host->pool_bytes;
  out->desc.k = gc_dev(r, host->k, host->pool_bytes, "K pool");
  out->desc.v = gc_dev(r, host->v, host->pool_bytes, "V pool");
  if (host->table_kind != KVC_TEST_CONTIG) {
    if (!table) table = host->table, table_len = gc_table_len(host);
    out->desc.page_table = gc_dev(r, table, sizeof(int32_t) * table_len, "page table");
  }
  if (host->table_kind == KVC_TEST_CSR)
    out->desc.page_indptr =
        gc_dev(r, indptr ? indptr : host->indptr, sizeof(int32_t) * (size_t)(host->batch + 1), "page indptr");
  return r->failed;
}

int gc_dev_cache_refill(gc_run_t *r, gc_dev_cache_t *d, const kvc_test_cache_t *host) {
  return gc_put(r, d->desc.k, host->k, d->pool_bytes, "K pool") || gc_put(r, d->desc.v, host->v, d->pool_bytes, "V pool");
}

int gc_dev_cache_fetch(gc_run_t *r, const gc_dev_cache_t *d, kvc_test_cache_t *into) {
  return gc_fetch(r, into->k, d->desc.k, d->pool_bytes, "K pool") ||
         gc_fetch(r, into->v, d->desc.v, d->pool_bytes, "V pool");
}

/* ============================================================================================== */
/* Comparisons                                                                                    */
/* ============================================================================================== */

int gc_close(double cuda, double cpu) {
  if (isnan(cpu) || isnan(cuda)) return isnan(cpu) && isnan(cuda);
  if (isinf(cpu) || isinf(cuda)) return cpu == cuda;
  return fabs(cuda - cpu) <= GC_SCORE_REL_TOL * fabs(cpu) + GC_SCORE_ABS_TOL;
}

/* Start of score row (b, h) of a plan made from d: packed, or at (b * heads + h) * capacity. */
static int64_t score_row_at(const kvc_plan_desc_t *d, int32_t b, int32_t h) {
  if (d->score_row_capacity) return ((int64_t)b * d->num_kv_heads + h) * d->score_row_capacity;
  int64_t at = 0;
  for (int32_t i = 0; i < b; ++i) at += (int64_t)d->num_kv_heads * d->seq_lens[i];
  return at + (int64_t)h * d->seq_lens[b];
}

int gc_expect_scores(gc_run_t *r, const char *what, const kvc_plan_desc_t *d, const float *cuda, const float *cpu,
                     double *max_rel) {
  int64_t at = 0, bad = 0, total = 0;
  int32_t fb = -1, fh = 0, ft = 0;
  double worst = 0.0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = d->seq_lens[b];
    for (int32_t h = 0; h < d->num_kv_heads; ++h) {
      at = score_row_at(d, b, h);
      for (int32_t t = 0; t < n; ++t, ++at, ++total) {
        if (!gc_close(cuda[at], cpu[at])) {
          if (!bad++) fb = b, fh = h, ft = t;
          if (g_verbose && bad <= 8)
            printf("     %s: sequence %d head %d token %d: CUDA %.9g CPU %.9g\n", what, b, h, t, (double)cuda[at],
                   (double)cpu[at]);
        } else if (isfinite(cpu[at]) && cpu[at] != 0.0f) {
          worst = fmax(worst, fabs((double)cuda[at] - cpu[at]) / fabs((double)cpu[at]));
        }
      }
    }
  }
  if (max_rel) *max_rel = worst;
  if (!bad) return 0;
  const int64_t i = score_row_at(d, fb, fh) + ft;
  gc_fail(r, __FILE__, __LINE__,
          "%s: %lld of %lld scores outside |cuda - cpu| <= %g |cpu| + %g; first: sequence %d (n %d) head %d token %d: "
          "CUDA %.9g vs CPU %.9g",
          what, (long long)bad, (long long)total, GC_SCORE_REL_TOL, GC_SCORE_ABS_TOL, fb, d->seq_lens[fb], fh, ft,
          (double)cuda[i], (double)cpu[i]);
  return 1;
}

int gc_expect_keep(gc_run_t *r, const char *what, const kvc_plan_desc_t *d, const int32_t *got, const int32_t *want) {
  int64_t at = 0, bad_rows = 0;
  int32_t fb = -1, fh = 0, fj = 0;
  int64_t first = 0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = d->seq_lens[b], k = d->budgets[b] < n ? d->budgets[b] : n;
    for (int32_t h = 0; h < d->num_kv_heads; ++h, at += k)
      for (int32_t j = 0; j < k; ++j)
        if (got[at + j] != want[at + j]) {
          if (!bad_rows++) fb = b, fh = h, fj = j, first = at + j;
          break;
        }
  }
  if (!bad_rows) return 0;
  const int32_t n = d->seq_lens[fb], k = d->budgets[fb] < n ? d->budgets[fb] : n;
  gc_fail(r, __FILE__, __LINE__, "%s: %lld keep rows differ; first: sequence %d (n %d, k %d) head %d: keep[%d] = %d, expected %d",
          what, (long long)bad_rows, fb, n, k, fh, fj, got[first], want[first]);
  return 1;
}

int gc_expect_counts(gc_run_t *r, const char *what, const kvc_plan_desc_t *d, const int32_t *got, const int32_t *want) {
  if (!d->span_indptr) return 0;
  int64_t at = 0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t spans = d->span_indptr[b + 1] - d->span_indptr[b];
    for (int32_t h = 0; h < d->num_kv_heads; ++h)
      for (int32_t s = 0; s < spans; ++s, ++at)
        if (got[at] != want[at]) {
          gc_fail(r, __FILE__, __LINE__, "%s: sequence %d head %d span %d: count %d, expected %d", what, b, h, s, got[at],
                  want[at]);
          return 1;
        }
  }
  return 0;
}

int gc_expect_bytes(gc_run_t *r, const char *what, const void *got, const void *want, size_t bytes) {
  const int64_t at = kvc_test_first_difference(got, want, bytes);
  if (at < 0) return 0;
  gc_fail(r, __FILE__, __LINE__, "%s: byte %lld of %zu is %02x, expected %02x", what, (long long)at, bytes,
          ((const unsigned char *)got)[at], ((const unsigned char *)want)[at]);
  return 1;
}

int gc_expect_pool(gc_run_t *r, const char *what, const kvc_test_cache_t *c, const void *got, const void *want,
                   const unsigned char *except_seq) {
  const kvc_paged_kv_t *d = &c->desc;
  const size_t elem = (size_t)gc_dtype_bytes(d->dtype), page_bytes = (size_t)d->stride_page * elem;
  const unsigned char *g = got, *w = want;
  int64_t bad = 0, first = -1;
  for (int32_t page = 0; page < d->num_pages; ++page) {
    const int32_t owner = c->owner[page];
    if (except_seq && owner >= 0 && except_seq[owner]) continue;
    const size_t base = (size_t)page * page_bytes;
    if (memcmp(g + base, w + base, page_bytes) == 0) continue;
    for (size_t i = 0; i < page_bytes; ++i)
      if (g[base + i] != w[base + i]) {
        if (first < 0) first = (int64_t)(base + i);
        bad++;
      }
  }
  if (first < 0) return 0;
  const int32_t page = (int32_t)((size_t)first / page_bytes);
  const size_t e = ((size_t)first % page_bytes) / elem;
  const int64_t H = d->num_kv_heads, D = d->head_dim, P = d->page_size;
  const int64_t slot = c->layout == KVC_TEST_NHD ? (int64_t)e / (H * D) : ((int64_t)e / D) % P;
  const int64_t head = c->layout == KVC_TEST_NHD ? ((int64_t)e / D) % H : (int64_t)e / (P * D);
  char owner[48];
  if (c->owner[page] >= 0) snprintf(owner, sizeof owner, "sequence %d", c->owner[page]);
  else snprintf(owner, sizeof owner, "owned by no sequence");
  gc_fail(r, __FILE__, __LINE__, "%s: %lld bytes differ; first: page %d (%s) slot %lld head %lld element %lld: %02x, expected %02x",
          what, (long long)bad, page, owner, (long long)slot, (long long)head, (long long)(e % (size_t)D), g[first],
          w[first]);
  return 1;
}

/* ============================================================================================== */
/* Drawing                                                                                        */
/* ============================================================================================== */

int gc_chance(gc_run_t *r, double p) { return kvc_rng_uniform(&r->rng) < p; }

int32_t gc_pick(gc_run_t *r, const int32_t *values, int count) { return values[kvc_rng_range(&r->rng, 0, count - 1)]; }

int32_t gc_length(gc_run_t *r, int32_t max_n) {
  if (max_n <= 1) return 1;
  const double u = kvc_rng_uniform(&r->rng);
  if (u < 0.04) return 1;
  if (u < 0.08) return max_n;
  int32_t n = (int32_t)floor(exp(kvc_rng_uniform(&r->rng) * log((double)max_n + 1.0)));
  return n < 1 ? 1 : n > max_n ? max_n : n;
}

const char *gc_method_name(kvc_score_method_t m) {
  static const char *names[] = {"snapkv", "h2o", "tova", "knorm", "streaming"};
  return (int)m >= 0 && (int)m < 5 ? names[m] : "?";
}

const char *gc_dtype_name(kvc_dtype_t d) {
  static const char *names[] = {"f32", "f16", "bf16", "fp8"};
  return (int)d >= 0 && (int)d < 4 ? names[d] : "?";
}

int gc_dtype_bytes(kvc_dtype_t d) { return d == KVC_DTYPE_F32 ? 4 : d == KVC_DTYPE_FP8_E4M3 ? 1 : 2; }

static const char *size_class(int64_t n) {
  return n <= 1 ? "1" : n <= 64 ? "2-64" : n <= 512 ? "65-512" : n <= 4096 ? "513-4k" : n <= 32768 ? "4k-32k" : ">32k";
}

void gc_draw_spans(gc_run_t *r, gc_problem_t *p, int span_local) {
  kvc_plan_desc_t *d = &p->desc;
  int32_t count = 0;
  p->span_indptr[0] = 0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = p->seq_lens[b];
    if (!span_local) {
      count += kvc_test_random_spans(&r->rng, n, kvc_rng_range(&r->rng, 0, 4), kvc_rng_range(&r->rng, 0, 3),
                                     gc_chance(r, 0.5), p->spans, count, GC_MAX_SPANS);
    } else {
      /* FAIR spans tiling [0, n) (span_local needs every unprotected token in one), PROTECT inside */
      const int32_t pieces = kvc_rng_range(&r->rng, 1, n < 4 ? n : 4);
      int32_t cuts[5] = {0};
      for (int32_t i = 1; i < pieces; ++i) cuts[i] = kvc_rng_range(&r->rng, 1, n - 1);
      cuts[pieces] = n;
      for (int32_t i = 1; i < pieces; ++i) /* sort the inner cuts */
        for (int32_t j = i; j > 1 && cuts[j - 1] > cuts[j]; --j) {
          int32_t t = cuts[j];
          cuts[j] = cuts[j - 1];
          cuts[j - 1] = t;
        }
      kvc_span_t fair[4];
      int32_t nfair = 0;
      for (int32_t i = 0; i < pieces; ++i)
        if (cuts[i + 1] > cuts[i])
          fair[nfair++] = (kvc_span_t){cuts[i], cuts[i + 1], KVC_SPAN_FAIR, (float)(0.25 + 3.75 * kvc_rng_uniform(&r->rng))};
      /* merge with 0..2 PROTECT spans, sorted by start, FAIR first on equal starts */
      kvc_span_t protect[2];
      int32_t nprot = 0, last_end = 0;
      for (int32_t i = 0, want = kvc_rng_range(&r->rng, 0, 2); i < want && last_end < n; ++i) {
        int32_t start = kvc_rng_range(&r->rng, last_end, n - 1), end = start + kvc_rng_range(&r->rng, 1, 3);
        protect[nprot++] = (kvc_span_t){start, end > n ? n : end, KVC_SPAN_PROTECT, 1.0f};
        last_end = (end > n ? n : end) + 1;
      }
      for (int32_t f = 0, q = 0; f < nfair || q < nprot;)
        p->spans[count++] = (q == nprot || (f < nfair && fair[f].start <= protect[q].start)) ? fair[f++] : protect[q++];
    }
    p->span_indptr[b + 1] = count;
    int32_t fair = 0;
    for (int32_t i = p->span_indptr[b]; i < count; ++i) fair += p->spans[i].kind == KVC_SPAN_FAIR;
    if (span_local && d->window < fair) d->window = fair; /* one observation query per domain at least */
  }
  d->span_indptr = p->span_indptr;
  d->spans = p->spans;
  d->span_local = span_local;
}

void gc_draw_head_spans(gc_run_t *r, gc_problem_t *p) {
  kvc_plan_desc_t *d = &p->desc;
  const int32_t heads = d->num_kv_heads;
  int32_t count = 0, longest = 0;
  p->head_span_indptr[0] = 0;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = p->seq_lens[b], first = count;
    const int room = count + 5 * heads <= GC_MAX_SPANS; /* a row draws at most 3 FAIR + 2 PROTECT */
    longest = n > longest ? n : longest;
    for (int32_t h = 0; h < heads; ++h) {
      if (h > 0 && (d->method == KVC_SCORE_TOVA || gc_chance(r, 0.25))) { /* head 0's spans again */
        const int32_t row0_count = p->head_span_indptr[b * heads + 1] - first;
        memcpy(p->head_spans + count, p->head_spans + first, sizeof(kvc_span_t) * (size_t)row0_count);
        count += row0_count;
      } else if (room) {
        count += kvc_test_random_spans(&r->rng, n, kvc_rng_range(&r->rng, 0, 3), kvc_rng_range(&r->rng, 0, 2),
                                       gc_chance(r, 0.5), p->head_spans, count, GC_MAX_SPANS);
      }
      p->head_span_indptr[b * heads + h + 1] = count;
    }
  }
  d->span_indptr = p->head_span_indptr;
  d->spans = p->head_spans;
  d->spans_per_head = 1;
  d->score_row_capacity = gc_chance(r, 0.7) ? longest + kvc_rng_range(&r->rng, 0, 40) : 0;
  gc_describe(r, " per-head spans (%d)%s, score_row_capacity %d", count, d->span_local ? " without span_local" : "",
              d->score_row_capacity);
  d->span_local = 0;
}

/* Observation queries of one sequence, roughly (the plan has the exact count): the cost model of
 * the case caps. */
static double obs_of(const kvc_plan_desc_t *d, int32_t n) {
  if (d->method == KVC_SCORE_TOVA) return 1.0;
  if (d->method != KVC_SCORE_SNAPKV && d->method != KVC_SCORE_H2O) return 0.0;
  return d->window < n ? d->window : n;
}

void gc_draw_problem(gc_run_t *r, const gc_problem_opts_t *opts, gc_problem_t *p) {
  static const kvc_score_method_t all[] = {KVC_SCORE_SNAPKV, KVC_SCORE_H2O, KVC_SCORE_TOVA, KVC_SCORE_KNORM,
                                           KVC_SCORE_STREAMING};
  static const int32_t dims[] = {64, 128, 256}, heads[] = {1, 2, 4, 8}, groups[] = {1, 4, 8, 1, 4, 8, 2};
  static const int32_t windows[] = {1, 4, 16, 32, 64, 64, 100, 200};
  static const int32_t pages[] = {1, 16, 16, 16, 64};
  memset(p, 0, sizeof *p);
  kvc_plan_desc_t *d = &p->desc;
  kvc_plan_desc_init(d);
  const kvc_score_method_t *methods = opts->methods ? opts->methods : all;
  d->method = methods[kvc_rng_range(&r->rng, 0, (opts->methods ? opts->num_methods : 5) - 1)];
  const int attention = d->method == KVC_SCORE_SNAPKV || d->method == KVC_SCORE_H2O || d->method == KVC_SCORE_TOVA;

  static const kvc_dtype_t dtypes[] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};
  d->dtype = dtypes[kvc_rng_range(&r->rng, 0, 2)];
  if (opts->allow_fp8 && gc_chance(r, d->method == KVC_SCORE_STREAMING ? 0.3 : 0.2)) {
    static const kvc_query_dtype_t queries[] = {KVC_QUERY_DTYPE_F16, KVC_QUERY_DTYPE_BF16, KVC_QUERY_DTYPE_F16,
                                                KVC_QUERY_DTYPE_BF16, KVC_QUERY_DTYPE_F32};
    d->dtype = KVC_DTYPE_FP8_E4M3;
    d->query_dtype = queries[kvc_rng_range(&r->rng, 0, 4)];
    d->k_scale = (float)(0.05 + 2.0 * kvc_rng_uniform(&r->rng));
    for (int h = 0; h < 8; ++h) p->k_scales[h] = (float)(0.05 + 2.0 * kvc_rng_uniform(&r->rng));
    if (gc_chance(r, 0.5)) d->k_scales = p->k_scales;
  }

  /* shapes within the case caps: total elements (memory, cache generation) and attention work */
  const double elem_cap = r->emulated ? 1 << 20 : 1 << 25;
  for (int attempt = 0;; ++attempt) {
    d->head_dim = opts->selection_only ? 64 : gc_chance(r, 0.75) ? gc_pick(r, dims, 3) : 8 * kvc_rng_range(&r->rng, 1, 32);
    d->num_kv_heads = gc_pick(r, heads, 4);
    d->num_q_heads = d->num_kv_heads * gc_pick(r, groups, 7);
    const double u = kvc_rng_uniform(&r->rng);
    d->batch = u < 0.7 ? kvc_rng_range(&r->rng, 1, 4) : u < 0.9 ? kvc_rng_range(&r->rng, 5, 16) : kvc_rng_range(&r->rng, 17, GC_MAX_BATCH);
    int32_t max_len = 0;
    for (int32_t b = 0; b < d->batch; ++b) {
      p->seq_lens[b] = gc_length(r, r->max_n);
      max_len = p->seq_lens[b] > max_len ? p->seq_lens[b] : max_len;
    }
    d->window = 64;
    if (d->method == KVC_SCORE_SNAPKV) d->window = gc_pick(r, windows, 8);
    if (d->method == KVC_SCORE_H2O) d->window = gc_chance(r, 0.4) ? max_len : gc_pick(r, windows, 8);
    double elems = 0, work = 0;
    for (int32_t b = 0; b < d->batch; ++b) {
      elems += (double)p->seq_lens[b] * d->num_kv_heads * (opts->selection_only ? 4 : d->head_dim);
      work += opts->selection_only ? 0 : obs_of(d, p->seq_lens[b]) * p->seq_lens[b] * d->num_q_heads * d->head_dim;
    }
    if (d->dtype == KVC_DTYPE_FP8_E4M3 && d->head_dim % 16) d->head_dim += 8; /* CUDA copies fp8 rows by 16 bytes */
    if ((elems <= elem_cap && work <= r->max_work) || attempt == 40) {
      if (attempt == 40) { /* the smallest shape of this method */
        d->batch = 1, d->num_kv_heads = 1, d->num_q_heads = 1, d->head_dim = 64, p->seq_lens[0] = 1 + (int32_t)(r->seed % 64);
        if (p->seq_lens[0] > r->max_n) p->seq_lens[0] = r->max_n;
      }
      break;
    }
  }
  d->seq_lens = p->seq_lens;
  d->budgets = p->budgets;
  for (int32_t b = 0; b < d->batch; ++b) {
    const int32_t n = p->seq_lens[b];
    p->budgets[b] = gc_chance(r, 0.1) ? n + kvc_rng_range(&r->rng, 0, 3)
                                      : 1 + (int32_t)floor((n - 1) * kvc_rng_uniform(&r->rng) * kvc_rng_uniform(&r->rng) * 1.3);
    if (p->budgets[b] < 1) p->budgets[b] = 1;
  }
  static const int32_t kernels[] = {1, 3, 5, 5, 7, 9};
  d->pool_kernel = d->method == KVC_SCORE_SNAPKV ? gc_pick(r, kernels, 6) : 1;
  d->pool = gc_chance(r, 0.3) ? KVC_POOL_MAX : KVC_POOL_AVG;
  d->group_reduce = gc_chance(r, 0.3) ? KVC_REDUCE_MAX : KVC_REDUCE_MEAN;
  d->scale = gc_chance(r, 0.2) ? (float)(0.02 + 0.3 * kvc_rng_uniform(&r->rng)) : 0.0f;
  d->sink_tokens = d->method == KVC_SCORE_STREAMING && gc_chance(r, 0.7) ? 4 : gc_chance(r, 0.3) ? kvc_rng_range(&r->rng, 1, 8) : 0;
  d->recent_tokens = gc_chance(r, 0.3) ? kvc_rng_range(&r->rng, 1, 32) : 0;
  const double policy = kvc_rng_uniform(&r->rng);
  d->budget_policy = policy < 0.7 ? KVC_BUDGET_FAIL : policy < 0.85 ? KVC_BUDGET_CLAMP : KVC_BUDGET_SKIP;
  static const float fairness[] = {0.0f, 0.5f, 1.0f};
  d->fairness = gc_chance(r, 0.8) ? fairness[kvc_rng_range(&r->rng, 0, 2)] : (float)kvc_rng_uniform(&r->rng);
  const double s = kvc_rng_uniform(&r->rng);
  if (s < 0.45) gc_draw_spans(r, p, 0);
  else if (s < 0.65) gc_draw_spans(r, p, 1);

  p->layout = gc_chance(r, 0.5) ? KVC_TEST_HND : KVC_TEST_NHD;
  const double t = kvc_rng_uniform(&r->rng);
  p->table = t < 0.45 ? KVC_TEST_DENSE : (t < 0.85 || !opts->allow_contiguous) ? KVC_TEST_CSR : KVC_TEST_CONTIG;
  p->page_size = gc_chance(r, 0.8) ? gc_pick(r, pages, 5) : kvc_rng_range(&r->rng, 2, 40);
  p->nonfinite = opts->nonfinite && d->dtype != KVC_DTYPE_FP8_E4M3;
  p->with_lse = attention && !p->nonfinite && gc_chance(r, 0.25);

  int64_t total = 0;
  int32_t max_len = 0;
  for (int32_t b = 0; b < d->batch; ++b) {
    total += p->seq_lens[b];
    max_len = p->seq_lens[b] > max_len ? p->seq_lens[b] : max_len;
  }
  gc_describe(r, "method=%s dtype=%s head_dim=%d heads=%d/%d batch=%d n_max=%d tokens=%lld window=%d pool=%d%s "
                 "reduce=%s scale=%g sinks=%d recent=%d fairness=%g spans=%d%s layout=%s table=%s page_size=%d%s%s",
              gc_method_name(d->method), gc_dtype_name(d->dtype), d->head_dim, d->num_q_heads, d->num_kv_heads, d->batch,
              max_len, (long long)total, d->window, d->pool_kernel, d->pool == KVC_POOL_MAX ? "max" : "avg",
              d->group_reduce == KVC_REDUCE_MAX ? "max" : "mean", (double)d->scale, d->sink_tokens, d->recent_tokens,
              (double)d->fairness, d->span_indptr ? d->span_indptr[d->batch] : 0, d->span_local ? " span_local" : "",
              p->layout == KVC_TEST_NHD ? "NHD" : "HND",
              p->table == KVC_TEST_DENSE ? "dense" : p->table == KVC_TEST_CSR ? "csr" : "contiguous", p->page_size,
              p->nonfinite ? " nonfinite" : "", p->with_lse ? " lse" : "");
  static const char *policies[] = {"fail", "clamp", "skip"};
  gc_describe(r, " budget_policy=%s", policies[d->budget_policy]);
  if (d->dtype == KVC_DTYPE_FP8_E4M3) {
    gc_describe(r, " queries=%s k_scale=%s", gc_dtype_name(kvc_test_query_dtype(d)), d->k_scales ? "per-head" : "per-tensor");
    if (d->method != KVC_SCORE_STREAMING) gc_cover(r, "fp8 scored", d->k_scales ? "per-head scale" : "per-tensor scale");
  }
  gc_cover(r, "method", gc_method_name(d->method));
  gc_cover(r, "dtype", gc_dtype_name(d->dtype));
  static const char *dim_names[] = {"64", "128", "256", "other"};
  gc_cover(r, "head_dim", dim_names[d->head_dim == 64 ? 0 : d->head_dim == 128 ? 1 : d->head_dim == 256 ? 2 : 3]);
  static const char *group_names[] = {"1", "2", "4", "8"};
  const int32_t group = d->num_q_heads / d->num_kv_heads;
  gc_cover(r, "gqa", group_names[group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : 3]);
  gc_cover(r, "layout", p->layout == KVC_TEST_NHD ? "NHD" : "HND");
  gc_cover(r, "table", p->table == KVC_TEST_DENSE ? "dense" : p->table == KVC_TEST_CSR ? "csr" : "contiguous");
  gc_cover(r, "page_size", p->table == KVC_TEST_CONTIG ? "one-per-seq" : p->page_size == 1 ? "1" : p->page_size == 16 ? "16" : "other");
  gc_cover(r, "n_max", size_class(max_len));
  gc_cover(r, "batch", d->batch == 1 ? "1" : d->batch <= 16 ? "2-16" : "17-64");
  gc_cover(r, "spans", !d->span_indptr ? "none" : d->span_local ? "span_local" : "fair+protect");
  gc_cover(r, "fairness", d->fairness == 0.0f ? "0" : d->fairness == 0.5f ? "0.5" : d->fairness == 1.0f ? "1" : "other");
  if (d->sink_tokens || d->recent_tokens) gc_cover(r, "protect", "sinks/recent");
  if (p->nonfinite) gc_cover(r, "data", "nan/inf");
  if (p->with_lse) gc_cover(r, "lse", "given");
  if (attention && obs_of(d, max_len) > 128) gc_cover(r, "score_path", "gemm (>128 queries)");
}

int gc_make_plans(gc_run_t *r, gc_problem_t *p, kvc_plan_t *cpu, kvc_plan_t *cuda) {
  kvc_status_t status = KVC_SUCCESS;
  for (int attempt = 0; attempt < 8; ++attempt) {
    *cpu = gc_plan(r, r->cpu, &p->desc, &status);
    if (status != KVC_ERROR_BUDGET) break;
    for (int32_t b = 0; b < p->desc.batch; ++b) { /* protected tokens exceed a budget: raise them */
      const int32_t n = p->seq_lens[b];
      p->budgets[b] = attempt == 6 ? n : (p->budgets[b] * 2 + 8 < n ? p->budgets[b] * 2 + 8 : n);
    }
  }
  if (status != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "the drawn case is not a valid plan on the CPU: %s (%s)", kvc_status_name(status),
            kvc_last_error(r->cpu));
    return 1;
  }
  *cuda = gc_plan(r, r->cuda, &p->desc, &status);
  if (status != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "the CUDA plan fails where the CPU's succeeds: %s (%s)", kvc_status_name(status),
            kvc_last_error(r->cuda));
    return 1;
  }
  /* budget_policy may have clamped or skipped sequences: from here on budgets[b] is the k_b the plan
   * keeps (every check computes k = min(budget, n)); both backends must agree on it */
  int32_t cpu_lens[GC_MAX_BATCH], cuda_lens[GC_MAX_BATCH], outcomes[GC_MAX_BATCH];
  if (kvc_plan_new_lengths(*cpu, cpu_lens) != KVC_SUCCESS || kvc_plan_new_lengths(*cuda, cuda_lens) != KVC_SUCCESS ||
      kvc_plan_outcomes(*cpu, outcomes) != KVC_SUCCESS) {
    gc_fail(r, __FILE__, __LINE__, "kvc_plan_new_lengths / kvc_plan_outcomes failed");
    return 1;
  }
  int clamped = 0, skipped = 0;
  for (int32_t b = 0; b < p->desc.batch; ++b) {
    if (cpu_lens[b] != cuda_lens[b]) {
      gc_fail(r, __FILE__, __LINE__, "sequence %d keeps %d tokens in the CPU plan, %d in the CUDA plan", b, cpu_lens[b],
              cuda_lens[b]);
      return 1;
    }
    p->budgets[b] = cpu_lens[b];
    clamped += outcomes[b] == KVC_OUTCOME_CLAMPED;
    skipped += outcomes[b] == KVC_OUTCOME_SKIPPED;
  }
  if (clamped) gc_cover(r, "outcome", "clamped");
  if (skipped) gc_cover(r, "outcome", "skipped");
  if (clamped || skipped) gc_describe(r, " outcomes: %d clamped, %d skipped", clamped, skipped);
  return 0;
}

/* Plants NaN / +inf / -inf (or, for KNORM on f32, huge finite values) at a few random elements of
 * `data` (`count` elements, each `row` long) and names them in the description. */
static void plant_nonfinite(gc_run_t *r, void *data, int64_t count, int64_t row, kvc_dtype_t dtype, int huge,
                            const char *where) {
  static const uint16_t f16[] = {0x7e00, 0x7c00, 0xfc00}, bf16[] = {0x7fc0, 0x7f80, 0xff80};
  static const char *names[] = {"nan", "+inf", "-inf"};
  const float f32[] = {NAN, INFINITY, -INFINITY};
  for (int i = 0, m = kvc_rng_range(&r->rng, 1, 3); i < m && count > 0; ++i) {
    const int64_t at = (int64_t)(kvc_rng_uniform(&r->rng) * (double)count);
    const int kind = kvc_rng_range(&r->rng, 0, 2);
    if (dtype == KVC_DTYPE_F32) ((float *)data)[at] = huge ? (kind ? 3.0e38f : -2.5e38f) : f32[kind];
    else if (dtype == KVC_DTYPE_F16) ((uint16_t *)data)[at] = f16[kind];
    else if (dtype == KVC_DTYPE_BF16) ((uint16_t *)data)[at] = bf16[kind];
    gc_describe(r, " %s[%lld][%lld]=%s", where, (long long)(at / row), (long long)(at % row),
                huge ? (kind ? "3e38" : "-2.5e38") : names[kind]);
  }
}

kvc_test_cache_t *gc_problem_cache(gc_run_t *r, const gc_problem_t *p, int32_t guard_pages) {
  const kvc_plan_desc_t *d = &p->desc;
  kvc_test_cache_t *c = gc_track_cache(
      r, kvc_test_cache_new(d->batch, p->seq_lens, d->num_kv_heads, d->head_dim, d->dtype, p->page_size, p->layout,
                            p->table, guard_pages, kvc_rng_next(&r->rng)));
  if (p->nonfinite) {
    /* in owned K rows only: slots nobody owns must keep the 0xCD sentinel */
    const int huge = d->method == KVC_SCORE_KNORM && d->dtype == KVC_DTYPE_F32 && gc_chance(r, 0.5);
    for (int i = 0, m = kvc_rng_range(&r->rng, 1, 2); i < m; ++i) {
      const int32_t b = kvc_rng_range(&r->rng, 0, d->batch - 1), t = kvc_rng_range(&r->rng, 0, p->seq_lens[b] - 1);
      const int32_t h = kvc_rng_range(&r->rng, 0, d->num_kv_heads - 1);
      char where[64];
      snprintf(where, sizeof where, "K(seq %d, token %d, head %d)", b, t, h);
      plant_nonfinite(r, kvc_test_k_ptr(c, b, t, h), d->head_dim, d->head_dim, d->dtype, huge, where);
    }
  }
  return c;
}

void *gc_problem_queries(gc_run_t *r, const gc_problem_t *p, const kvc_plan_info_t *info) {
  if (info->obs_total == 0) return NULL;
  const kvc_plan_desc_t *d = &p->desc;
  const kvc_dtype_t dtype = kvc_test_query_dtype(d);
  void *q = kvc_test_queries_new(info->obs_total, d->num_q_heads, d->head_dim, dtype, kvc_rng_next(&r->rng));
  track_host(r, q);
  if (p->nonfinite && gc_chance(r, 0.5))
    plant_nonfinite(r, q, info->obs_total * d->num_q_heads * d->head_dim, d->head_dim, dtype, 0,
                    "queries(row*heads + head)");
  return q;
}

/* ============================================================================================== */
/* The case loop                                                                                  */
/* ============================================================================================== */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* What a crash prints: the case being run (formatted before it starts; async-signal-safe write). */
static char g_current[256];

static void on_fatal_signal(int sig) {
  static const char head[] = "\nFATAL signal while running ";
  ssize_t ignored = write(2, head, sizeof head - 1);
  ignored = write(2, g_current, strlen(g_current));
  ignored = write(2, "\n", 1);
  (void)ignored;
  signal(sig, SIG_DFL);
  raise(sig);
}

typedef struct {
  uint64_t seed;
  int cases, max_n, verbose, list, shard, shards;
  double time_budget, max_work;
  const char *families, *exclude;
} options_t;

/* 1 if `name` is in the comma-separated `list`; -1 (with a message) if `list` names an unknown family. */
static int named_in(const char *list, const char *name) {
  int found = 0;
  for (const char *at = list; at && *at;) {
    const size_t len = strcspn(at, ",");
    int known = 0;
    for (int f = 0; f < NUM_FAMILIES; ++f) known |= strlen(kFamilies[f]->name) == len && !strncmp(at, kFamilies[f]->name, len);
    if (!known) {
      fprintf(stderr, "kvc-gpucheck: unknown family '%.*s' (--list shows them)\n", (int)len, at);
      return -1;
    }
    found |= strlen(name) == len && !strncmp(at, name, len);
    at += len + (at[len] == ',');
  }
  return found;
}

/* The families of --family (all when not given) less those of --exclude, in the table's order. */
static int active_families(const char *only, const char *exclude, const gc_family_t **active) {
  int count = 0;
  for (int f = 0; f < NUM_FAMILIES; ++f) {
    const int in = only ? named_in(only, kFamilies[f]->name) : 1, out = named_in(exclude, kFamilies[f]->name);
    if (in < 0 || out < 0) return 0;
    if (in && !out) active[count++] = kFamilies[f];
  }
  return count;
}

static void usage(void) {
  fprintf(stderr,
          "usage: kvc-gpucheck [--seed S] [--cases N] [--max-n M] [--time-budget SECONDS] [--family a,b]\n"
          "                    [--exclude a,b] [--shard K/N] [--max-work W] [--verbose] [--list]\n");
}

static int parse(int argc, char **argv, options_t *o) {
  *o = (options_t){1, 200, 4096, 0, 0, 0, 1, 0.0, 0.0, NULL, NULL};
  for (int i = 1; i < argc; ++i) {
    const char *key = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(key, "--verbose")) o->verbose = 1;
    else if (!strcmp(key, "--list")) o->list = 1;
    else if (!value) return usage(), 0;
    else if (!strcmp(key, "--seed")) o->seed = strtoull(value, NULL, 10), ++i;
    else if (!strcmp(key, "--cases")) o->cases = atoi(value), ++i;
    else if (!strcmp(key, "--max-n")) o->max_n = atoi(value), ++i;
    else if (!strcmp(key, "--time-budget")) o->time_budget = atof(value), ++i;
    else if (!strcmp(key, "--max-work")) o->max_work = atof(value), ++i;
    else if (!strcmp(key, "--family")) o->families = value, ++i;
    else if (!strcmp(key, "--exclude")) o->exclude = value, ++i;
    else if (!strcmp(key, "--shard")) {
      if (sscanf(value, "%d/%d", &o->shard, &o->shards) != 2 || o->shards < 1 || o->shard < 0 || o->shard >= o->shards)
        return usage(), 0;
      ++i;
    } else {
      return usage(), 0;
    }
  }
  if (o->max_n < 1 || o->cases < 0) return usage(), 0;
  return 1;
}

int main(int argc, char **argv) {
  options_t o;
  if (!parse(argc, argv, &o)) return 2;
  if (o.list) {
    for (int f = 0; f < NUM_FAMILIES; ++f) printf("%-9s %s\n", kFamilies[f]->name, kFamilies[f]->what);
    return 0;
  }
  const gc_family_t *active[NUM_FAMILIES];
  const int num_active = active_families(o.families, o.exclude, active);
  if (!num_active) return 2;
  for (size_t i = 0; i < GC_GUARD_BYTES; ++i) g_guard[i] = guard_byte(i);
  setvbuf(stdout, NULL, _IOLBF, 0);
  g_verbose = o.verbose;
  const char *device = gc_device_open();
  if (!device) {
    printf("kvc-gpucheck: no CUDA device: nothing checked\n");
    return 77;
  }
  gc_run_t *r = calloc(1, sizeof *r);
  r->emulated = gc_device_is_emulated();
  r->max_n = o.max_n;
  /* attention multiply-adds of one case: keeps the CPU reference (double) under ~1 s */
  r->max_work = o.max_work > 0 ? o.max_work : fmin(2e9, (double)o.max_n * (r->emulated ? 4096.0 : 65536.0));
  if (kvc_context_create(KVC_BACKEND_CPU, 0, &r->cpu) != KVC_SUCCESS ||
      kvc_context_create(KVC_BACKEND_CUDA, 0, &r->cuda) != KVC_SUCCESS || gc_stream_create(&r->stream) != 0) {
    printf("kvc-gpucheck: could not create the contexts on %s: %s\n", device, kvc_last_error(r->cuda));
    return 1;
  }
  signal(SIGSEGV, on_fatal_signal);
  signal(SIGBUS, on_fatal_signal);
  signal(SIGFPE, on_fatal_signal);
  signal(SIGABRT, on_fatal_signal);
  printf("kvc-gpucheck: %s; seeds from %llu, %d cases, max-n %d, max-work %.3g, families", device,
         (unsigned long long)o.seed, o.cases, o.max_n, r->max_work);
  for (int f = 0; f < num_active; ++f) printf("%s%s", f ? "," : " ", active[f]->name);
  if (o.shards > 1) printf(", shard %d/%d", o.shard, o.shards);
  if (o.time_budget > 0) printf(", time budget %.0f s", o.time_budget);
  printf("\n");

  const double t0 = now_s();
  int passed = 0, failed = 0, skipped = 0, ran = 0, not_started = 0;
  struct {
    double seconds;
    uint64_t seed;
    const char *family;
  } slowest[5] = {{0}};
  for (uint64_t i = 0; ran < o.cases; ++i) {
    if ((int)((i / (uint64_t)num_active) % (uint64_t)o.shards) != o.shard) continue;
    const uint64_t seed = o.seed + i;
    const gc_family_t *family = active[seed % (uint64_t)num_active];
    if (o.time_budget > 0 && now_s() - t0 > o.time_budget) {
      not_started = o.cases - ran;
      break;
    }
    ran++;
    memset(r->desc, 0, sizeof r->desc);
    r->failure[0] = r->skip_reason[0] = '\0';
    r->failed = r->skipped = r->ncover = 0;
    r->seed = seed;
    r->rng.state = seed * 0x9e3779b97f4a7c15ull ^ 0x243f6a8885a308d3ull;
    snprintf(g_current, sizeof g_current, "seed=%llu family=%s (rerun: --family %s --seed %llu --cases 1 --max-n %d)",
             (unsigned long long)seed, family->name, family->name, (unsigned long long)seed, o.max_n);
    const double start = now_s();
    family->run(r);
    release(r);
    const double seconds = now_s() - start;
    if (r->failed) {
      failed++;
      tally_coverage(r);
      printf("FAIL seed=%llu family=%s: %s\n     case: %s\n     rerun: kvc-gpucheck%s --family %s --seed %llu --cases 1 --max-n %d\n",
             (unsigned long long)seed, family->name, r->failure, r->desc, r->emulated ? "-emu" : "", family->name,
             (unsigned long long)seed, o.max_n);
      if (!r->emulated && gc_device_sync() != 0) {
        printf("kvc-gpucheck: the device is in an error state (%s): the remaining cases cannot run\n", gc_device_error());
        not_started = o.cases - ran;
        break;
      }
    } else if (r->skipped) {
      skipped++;
      if (o.verbose) printf("skip seed=%llu family=%s: %s\n", (unsigned long long)seed, family->name, r->skip_reason);
    } else {
      passed++;
      tally_coverage(r);
      if (o.verbose)
        printf("ok   seed=%llu family=%s %.3f s: %s\n", (unsigned long long)seed, family->name, seconds, r->desc);
    }
    for (int s = 0; s < 5; ++s)
      if (seconds > slowest[s].seconds) {
        memmove(&slowest[s + 1], &slowest[s], sizeof slowest[0] * (size_t)(4 - s));
        slowest[s].seconds = seconds, slowest[s].seed = seed, slowest[s].family = family->name;
        break;
      }
  }
  print_coverage();
  printf("slowest cases:");
  for (int s = 0; s < 5 && slowest[s].family; ++s)
    printf(" seed %llu (%s) %.2f s;", (unsigned long long)slowest[s].seed, slowest[s].family, slowest[s].seconds);
  printf("\n");
  if (not_started) printf("kvc-gpucheck: the %d cases not started (time budget or device error) are not counted\n", not_started);
  printf("kvc-gpucheck: %.1f s on %s\n", now_s() - t0, r->emulated ? "the emulator" : "the GPU");
  printf("gpucheck: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
  gc_stream_destroy(r->stream);
  kvc_context_destroy(r->cpu);
  kvc_context_destroy(r->cuda);
  free(r);
  return failed || !passed ? 1 : 0;
}
