/*
 * gpucheck.h - kvc-gpucheck: the CUDA backend against the CPU backend in one process, over seeded
 * random cases, as a plain program (no Criterion: a GPU machine has none).
 *
 * Every case is drawn from one 64-bit seed by one "family" (a case generator: score, select,
 * compact, compress, graph, corrupt, gather, nonfinite; gpucheck.c lists them). The seed gives every
 * parameter, so `kvc-gpucheck --family F --seed S --cases 1 --max-n M` reruns exactly the case that
 * failed, on the GPU or on the emulator (kvc-gpucheck-emu), which is how a GPU failure becomes a
 * regression case CI runs.
 *
 * The same sources build twice: against libkvcompress with device_cuda.c (a real GPU), and against
 * kvcompress_emu with device_emu.c (its "CUDA backend" is the SIMT emulator and its device memory
 * is host memory). device.h is the seam between them.
 *
 * A family function draws its case from r->rng, builds inputs through the helpers below and checks
 * with GC_CHECK / the gc_expect_* helpers; on the first failure it returns (every allocation made
 * through gc_alloc / gc_dev / gc_plan / gc_track_cache is released by the driver after the case).
 * To add a feature: one family_<name>.c with a gc_family_t, one line in gpucheck.c's table.
 */
#ifndef KVC_GPUCHECK_H
#define KVC_GPUCHECK_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"
#include "test_util.h"

/* ---------------------------------------------------------------------------------------------- */
/* Tolerances: the one place. CUDA scores are compared with the CPU's as                           */
/*   |cuda - cpu| <= GC_SCORE_REL_TOL * |cpu| + GC_SCORE_ABS_TOL, infinities and NaN positions equal. */
/* The derivation is tests/emu/test_score_emu.c's header: the kernels accumulate in fp32 what the */
/* CPU does in double; the logit's fp32 rounding (~1e-5 relative at head_dim 256 on this data)    */
/* becomes a relative error of each probability, sums of positive terms add ~terms * 2^-24; 1e-4  */
/* is ~10x the typical error, 1e-9 covers probabilities that underflow. KNORM (~2e-5) fits too;   */
/* STREAMING is exact. Selection, compaction and retention have no tolerance: bit for bit.        */
/* ---------------------------------------------------------------------------------------------- */
#define GC_SCORE_REL_TOL 1e-4
#define GC_SCORE_ABS_TOL 1e-9

/* ---------------------------------------------------------------------------------------------- */
/* One case                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

#define GC_MAX_TRACKED 96

typedef struct gc_run {
  uint64_t seed;           /* this case's seed                                                   */
  kvc_rng_t rng;           /* the family draws everything from it                               */
  int32_t max_n;           /* --max-n: no sequence longer                                        */
  double max_work;         /* cap on one case's attention multiply-adds (CPU reference time)    */
  int emulated;            /* the CUDA backend is the SIMT emulator                             */
  kvc_context_t cpu, cuda; /* shared by every case of the process                                */
  kvc_stream_t stream;     /* a non-blocking stream (NULL on the emulator)                      */
  char desc[768];          /* what the case is (printed with a failure)                         */
  char failure[1024];      /* first failure; empty while passing                                */
  char skip_reason[160];   /* set by gc_skip: the case cannot run here                           */
  int failed, skipped;
  /* releases at the end of the case */
  void *host[GC_MAX_TRACKED];
  int nhost;
  struct gc_devbuf {
    unsigned char *base; /* raw device allocation: guard | bytes | guard                        */
    size_t bytes;
    const char *name;
  } dev[GC_MAX_TRACKED];
  int ndev;
  kvc_plan_t plans[16];
  int nplans;
  kvc_test_cache_t *caches[16];
  int ncaches;
  void *graph; /* an instantiated CUDA graph (gc_graph_end)                                     */
  /* coverage: (dimension, value) pairs this case exercised */
  const char *cover[48][2];
  int ncover;
} gc_run_t;

typedef struct {
  const char *name; /* used by --family and in every failure line                           */
  const char *what; /* one line for --list                                                  */
  void (*run)(gc_run_t *r);
} gc_family_t;

/* Failure and skip. gc_fail formats r->failure (first failure wins). */
void gc_fail(gc_run_t *r, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void gc_skip(gc_run_t *r, const char *reason);
/* Appends to r->desc ("key=value " pieces). */
void gc_describe(gc_run_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Counts (dimension, value) in the coverage table printed at the end. Strings must be static. */
void gc_cover(gc_run_t *r, const char *dimension, const char *value);

#define GC_CHECK(r, cond, ...)                        \
  do {                                                \
    if (!(cond)) {                                    \
      gc_fail((r), __FILE__, __LINE__, __VA_ARGS__); \
      return;                                         \
    }                                                 \
  } while (0)
/* A kvc_* call that must succeed; names the call, status and kvc_last_error. */
#define GC_KVC(r, ctx, call)                                                                          \
  do {                                                                                                \
    kvc_status_t gc_status_ = (call);                                                                 \
    if (gc_status_ != KVC_SUCCESS) {                                                                  \
      gc_fail((r), __FILE__, __LINE__, "%s: %s (%s)", #call, kvc_status_name(gc_status_), kvc_last_error(ctx)); \
      return;                                                                                         \
    }                                                                                                 \
  } while (0)
/* Returns from the family when a helper (returning nonzero on failure) failed. */
#define GC_TRY(expr)   \
  do {                 \
    if ((expr) != 0) { \
      return;          \
    }                  \
  } while (0)

/* ---------------------------------------------------------------------------------------------- */
/* Memory (released after the case)                                                               */
/* ---------------------------------------------------------------------------------------------- */

/* Zeroed host memory, 256-byte aligned. NULL (and r failed) when out of memory. */
void *gc_alloc(gc_run_t *r, size_t bytes);
/* A device buffer of `bytes` between two guard zones of GC_GUARD_BYTES with a known pattern,
 * filled from `host`, or with the garbage byte 0xA5 when host is NULL. The pointer is 256-byte
 * aligned. gc_check_guards checks every buffer's guards. NULL (and r failed) on error. */
#define GC_GUARD_BYTES 4096
void *gc_dev(gc_run_t *r, const void *host, size_t bytes, const char *name);
int gc_fetch(gc_run_t *r, void *host, const void *dev, size_t bytes, const char *what);
int gc_put(gc_run_t *r, void *dev, const void *host, size_t bytes, const char *what);
/* Waits for the device; fails the case with the device's error string. */
int gc_sync(gc_run_t *r, const char *after);
/* Every device buffer's guard zones intact; names the buffer and the byte. */
int gc_check_guards(gc_run_t *r, const char *after);
kvc_plan_t gc_plan(gc_run_t *r, kvc_context_t ctx, const kvc_plan_desc_t *desc, kvc_status_t *status);
kvc_test_cache_t *gc_track_cache(gc_run_t *r, kvc_test_cache_t *cache);
/* Workspace of `op` for `plan`: host (CPU) or guarded device memory (CUDA), garbage-filled. */
void *gc_workspace(gc_run_t *r, kvc_plan_t plan, kvc_op_t op, int on_device, size_t *bytes);

/* ---------------------------------------------------------------------------------------------- */
/* Caches on the device                                                                            */
/* ---------------------------------------------------------------------------------------------- */

/* A device copy of a host test cache: pools, table and indptr in guarded device buffers. The table
 * and indptr may be replaced (corrupt tables) by passing them; NULL takes the host cache's. */
typedef struct {
  kvc_paged_kv_t desc;
  size_t pool_bytes;
} gc_dev_cache_t;

int gc_dev_cache(gc_run_t *r, const kvc_test_cache_t *host, const int32_t *table, size_t table_len,
                 const int32_t *indptr, gc_dev_cache_t *out);
int gc_dev_cache_refill(gc_run_t *r, gc_dev_cache_t *d, const kvc_test_cache_t *host);
/* Downloads the device pools into `into` (a clone of the host cache). */
int gc_dev_cache_fetch(gc_run_t *r, const gc_dev_cache_t *d, kvc_test_cache_t *into);
/* Entries of the host cache's table (dense batch*max_pages, CSR indptr[batch], 0 for contiguous). */
size_t gc_table_len(const kvc_test_cache_t *c);

/* ---------------------------------------------------------------------------------------------- */
/* Comparisons (each fails the case with the first difference, located)                           */
/* ---------------------------------------------------------------------------------------------- */

int gc_close(double cuda, double cpu); /* the tolerance above; NaN == NaN, infinities exact */
/* Score layouts of a plan made from `d`; `max_rel` (may be NULL) gets the worst relative error. */
int gc_expect_scores(gc_run_t *r, const char *what, const kvc_plan_desc_t *d, const float *cuda, const float *cpu,
                     double *max_rel);
int gc_expect_keep(gc_run_t *r, const char *what, const kvc_plan_desc_t *d, const int32_t *got, const int32_t *want);
int gc_expect_counts(gc_run_t *r, const char *what, const kvc_plan_desc_t *d, const int32_t *got, const int32_t *want);
/* Two pools of `cache`'s geometry byte for byte, except the pages of sequences with
 * except_seq[b] != 0 (may be NULL); a difference is located as (page, owner, slot, head). */
int gc_expect_pool(gc_run_t *r, const char *what, const kvc_test_cache_t *cache, const void *got, const void *want,
                   const unsigned char *except_seq);
int gc_expect_bytes(gc_run_t *r, const char *what, const void *got, const void *want, size_t bytes);

/* ---------------------------------------------------------------------------------------------- */
/* Drawing cases                                                                                   */
/* ---------------------------------------------------------------------------------------------- */

int gc_chance(gc_run_t *r, double p);              /* 1 with probability p */
int32_t gc_pick(gc_run_t *r, const int32_t *values, int count);
int32_t gc_length(gc_run_t *r, int32_t max_n);     /* log-uniform in [1, max_n], extremes often */
const char *gc_method_name(kvc_score_method_t m);
const char *gc_dtype_name(kvc_dtype_t d);
int gc_dtype_bytes(kvc_dtype_t d);

/* A drawn scoring problem (the score, compress, graph and corrupt families share it). */
#define GC_MAX_BATCH 64
#define GC_MAX_SPANS 1024
typedef struct {
  kvc_plan_desc_t desc; /* points into the arrays below                                    */
  int32_t seq_lens[GC_MAX_BATCH], budgets[GC_MAX_BATCH], span_indptr[GC_MAX_BATCH + 1];
  kvc_span_t spans[GC_MAX_SPANS];
  float k_scales[8]; /* fp8 keys' per-KV-head scales (heads <= 8)                          */
  int32_t page_size;
  kvc_test_layout_t layout;
  kvc_test_table_t table;
  int nonfinite; /* NaN / inf planted in K (and queries)                                    */
  int with_lse;  /* the CUDA run gets the test's own normalisers                            */
  /* per-head spans (gc_draw_head_spans): desc.span_indptr / spans then point here           */
  int32_t head_span_indptr[GC_MAX_BATCH * 8 + 1];
  kvc_span_t head_spans[GC_MAX_SPANS];
} gc_problem_t;

typedef struct {
  const kvc_score_method_t *methods; /* NULL: every method                                   */
  int num_methods;
  int allow_fp8;        /* fp8 caches: STREAMING (compaction), and scoring with f16 / bf16 /
                           f32 queries and a per-tensor or per-KV-head k_scale                 */
  int allow_contiguous; /* the one-page-per-sequence layout                                   */
  int nonfinite;       /* plant NaN / inf (f32/f16/bf16)                                       */
  int selection_only; /* no cache: head_dim 64, only the score layout's size is capped         */
} gc_problem_opts_t;

/* Draws a problem within r->max_n and r->max_work and describes it in r->desc. */
void gc_draw_problem(gc_run_t *r, const gc_problem_opts_t *opts, gc_problem_t *p);
/* Plans on both backends. A KVC_ERROR_BUDGET (protected tokens over a budget) raises the budgets
 * and retries; both backends must agree on the status. Returns 0 with both plans made. */
int gc_make_plans(gc_run_t *r, gc_problem_t *p, kvc_plan_t *cpu, kvc_plan_t *cuda);
/* The host cache of a problem (tracked), with NaN / inf planted when p->nonfinite. */
kvc_test_cache_t *gc_problem_cache(gc_run_t *r, const gc_problem_t *p, int32_t guard_pages);
/* Host queries of the plan (tracked; NULL when obs_total is 0). */
void *gc_problem_queries(gc_run_t *r, const gc_problem_t *p, const kvc_plan_info_t *info);

/* Adds FAIR / PROTECT spans to every sequence of desc (span_local: FAIR spans tile [0, n)). */
void gc_draw_spans(gc_run_t *r, gc_problem_t *p, int span_local);
/* Re-compression during decode: replaces the spans by per-(sequence, KV head) ones (spans_per_head;
 * TOVA and some heads copy head 0's, the rest are drawn), drops span_local, and often gives the
 * plan a fixed score_row_capacity above its longest sequence. */
void gc_draw_head_spans(gc_run_t *r, gc_problem_t *p);

/* kvc_select of `scores` (score layout, host) on both backends: bit-identical keep layouts, the
 * CPU's equal to the sorting oracle of tests/support (with_oracle), no write past the keep layout;
 * and, when the plan has spans, kvc_retention on both against the brute-force counts. */
int gc_check_selection(gc_run_t *r, const kvc_plan_desc_t *d, kvc_plan_t cpu_plan, kvc_plan_t cuda_plan,
                       const float *scores, const char *what, int with_oracle);

/* The families (family_*.c). */
extern const gc_family_t gc_family_score, gc_family_select, gc_family_compact, gc_family_compress,
    gc_family_graph, gc_family_corrupt, gc_family_gather, gc_family_nonfinite, gc_family_decode;

#endif /* KVC_GPUCHECK_H */
