/*
 * engine_loop.c - libkvcompress driven the way a paged-attention serving engine drives it (README,
 * "Using it from an inference engine"):
 *
 *   - a vLLM-style block table over a pool of pages shared by the batch, one K and one V pool per
 *     layer, pages handed out from a free list and returned after every compression;
 *   - prefill of a batch of prompts of different lengths, each compressed LAYER BY LAYER right
 *     after that layer's prefill (SnapKV, fair eviction over two instructions, a whitelisted
 *     guardrail), with the observation queries gathered from the layer's packed q;
 *   - a decode loop that appends one token per sequence and step, accumulates H2O scores in a
 *     fixed-capacity score layout (the rows do not move as the sequences grow), and every
 *     kRecompressEvery steps re-compresses each layer back to its budget with per-head spans
 *     (kvc_spans_after_compaction), the accumulated scores compacted along as an extra.
 *
 * The "model" is a hash: token t of sequence b has K, V and q rows that are a pure function of
 * (layer, b, t, head, dim). So the program knows, without the library, what every page must hold,
 * and after every event it checks, for every layer, sequence and KV head:
 *   1. the first new_len slots of the sequence's pages hold exactly the K and V rows of the
 *      tokens it keeps (its own bookkeeping: "mirror" ids, updated from the keep indices);
 *   2. decode events: the accumulated H2O scores equal its own double-precision recomputation of
 *      every step's attention over the keys present at that step;
 *   3. a from-scratch compression of the same logical tokens equals the incremental one: a fresh
 *      plan whose per-head spans the program derives from the mirror itself, on a contiguous copy
 *      of the cache (HF layout) with the same scores, keeps the same tokens and leaves the same
 *      rows; and the library's kvc_spans_after_compaction equals those derived spans.
 *
 *     engine_loop [--cuda]      CPU backend by default; --cuda runs the same loop on the CUDA
 *                               backend: on a GPU with managed memory (built with
 *                               KVC_EXAMPLE_CUDART), or linked to the SIMT emulator's library
 *                               (tests/CMakeLists.txt), whose device memory is host memory
 * Exit status 0 when every check holds; the first failed check is printed.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <kvcompress.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef KVC_EXAMPLE_CUDART
#include <cuda_runtime.h>
#endif

enum {
  kLayers = 2,
  kBatch = 3,
  kKvHeads = 2,
  kQHeads = 4, /* GQA group of 2 */
  kHeadDim = 32,
  kPageSize = 16,
  kPoolPages = 96,
  kMaxBlocks = 24, /* block table row length: 384 tokens */
  kPrefillWindow = 16,
  kDecodeSteps = 48,
  kRecompressEvery = 16,
  kRecent = 4,
};
static const int32_t kPromptLen[kBatch] = {150, 233, 97};
/* each prompt: [0, 4) preamble, [4, 20) the guardrail (PROTECT), the system instruction up to n/2,
 * then the user instruction; both instructions are FAIR spans */
enum { kGuardStart = 4, kGuardEnd = 20 };

/* ----------------------------------------------------------------------------- the "model" */

static float hash_unit(uint64_t x) { /* splitmix64 -> [-1, 1) */
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return (float)(x >> 40) / (float)(1 << 23) - 1.0f;
}
/* what: 0 K, 1 V, 2 q. Token t's keys get a magnitude of their own, so attention has favourites. */
static float model(int what, int l, int b, int t, int head, int d) {
  const uint64_t key = ((uint64_t)what << 60) ^ ((uint64_t)l << 52) ^ ((uint64_t)b << 44) ^ ((uint64_t)t << 20) ^
                       ((uint64_t)head << 10) ^ (uint64_t)d;
  const float x = hash_unit(key);
  return what == 0 ? x * (1.5f + hash_unit(((uint64_t)l << 52) ^ ((uint64_t)b << 44) ^ (uint64_t)t)) : x;
}

/* ----------------------------------------------------------------------------- memory */

static int g_cuda;
static void *alloc_bytes(size_t bytes) {
  void *p = NULL;
#ifdef KVC_EXAMPLE_CUDART
  if (g_cuda) return cudaMallocManaged(&p, bytes, cudaMemAttachGlobal) == cudaSuccess ? memset(p, 0, bytes) : NULL;
#endif
  if (posix_memalign(&p, 256, bytes ? bytes : 1)) return NULL;
  return memset(p, 0, bytes);
}
static void free_bytes(void *p) {
#ifdef KVC_EXAMPLE_CUDART
  if (g_cuda) {
    cudaFree(p);
    return;
  }
#endif
  free(p);
}
/* The host reads results only after the device is done (managed memory on CUDA). */
static void wait_device(void) {
#ifdef KVC_EXAMPLE_CUDART
  if (g_cuda) cudaDeviceSynchronize();
#endif
}

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      fprintf(stderr, "engine_loop: check failed at line %d: ", __LINE__); \
      fprintf(stderr, __VA_ARGS__);                                       \
      fprintf(stderr, "\n");                                              \
      exit(1);                                                            \
    }                                                                     \
  } while (0)
#define KVC(ctx, call)                                                                                   \
  do {                                                                                                   \
    kvc_status_t st_ = (call);                                                                           \
    CHECK(st_ == KVC_SUCCESS, "%s: %s (%s)", #call, kvc_status_name(st_), ctx ? kvc_last_error(ctx) : ""); \
  } while (0)

/* ----------------------------------------------------------------------------- the engine */

typedef struct {
  kvc_context_t ctx;
  float *k[kLayers], *v[kLayers]; /* NHD pools [page][slot][head][dim] */
  int32_t *block_table;           /* [kBatch][kMaxBlocks], dense, shared by all layers */
  int32_t free_pages[kPoolPages], num_free;
  int32_t len[kBatch];           /* tokens in the cache (every layer and head alike) */
  int32_t next_token[kBatch];    /* logical id (original position) of the next token */
  int32_t budget[kBatch];        /* steady-state budget of the decode events */
  /* the program's own bookkeeping: logical token id of each slot, per layer, sequence, head */
  int32_t ids[kLayers][kBatch][kKvHeads][kMaxBlocks * kPageSize];
  double ref_h2o[kLayers][kBatch][kKvHeads][kMaxBlocks * kPageSize]; /* check 2 */
  float *scores[kLayers];         /* accumulated H2O scores, fixed capacity kCapacity */
  void *ws;
  size_t ws_bytes;
} Engine;
enum { kCapacity = kMaxBlocks * kPageSize };

static kvc_paged_kv_t paged_cache(const Engine *e, int l) {
  kvc_paged_kv_t c;
  memset(&c, 0, sizeof c);
  c.k = e->k[l], c.v = e->v[l], c.dtype = KVC_DTYPE_F32, c.num_kv_heads = kKvHeads, c.head_dim = kHeadDim;
  c.page_size = kPageSize, c.num_pages = kPoolPages;
  c.stride_page = (int64_t)kPageSize * kKvHeads * kHeadDim, c.stride_token = kKvHeads * kHeadDim;
  c.stride_head = kHeadDim;
  c.page_table = e->block_table, c.max_pages = kMaxBlocks;
  return c;
}
static float *slot_row(const Engine *e, const float *pool, int b, int slot, int h) {
  const int32_t page = e->block_table[b * kMaxBlocks + slot / kPageSize];
  return (float *)pool + ((int64_t)page * kPageSize + slot % kPageSize) * kKvHeads * kHeadDim + h * kHeadDim;
}
static void write_token(Engine *e, int l, int b, int slot, int token) {
  for (int h = 0; h < kKvHeads; ++h)
    for (int d = 0; d < kHeadDim; ++d) {
      slot_row(e, e->k[l], b, slot, h)[d] = model(0, l, b, token, h, d);
      slot_row(e, e->v[l], b, slot, h)[d] = model(1, l, b, token, h, d);
    }
}
static int32_t take_page(Engine *e) {
  CHECK(e->num_free > 0, "the page pool is exhausted");
  return e->free_pages[--e->num_free];
}
/* After a compaction: pages past ceil(len / page_size) go back to the pool (the engine's to reuse). */
static void release_pages(Engine *e, int b, int old_len) {
  for (int p = (e->len[b] + kPageSize - 1) / kPageSize; p < (old_len + kPageSize - 1) / kPageSize; ++p) {
    e->free_pages[e->num_free++] = e->block_table[b * kMaxBlocks + p];
    e->block_table[b * kMaxBlocks + p] = -1;
  }
}

/* Check 1: the pages hold the rows of the mirror's tokens. */
static void check_pages(const Engine *e, const char *event) {
  for (int l = 0; l < kLayers; ++l)
    for (int b = 0; b < kBatch; ++b)
      for (int h = 0; h < kKvHeads; ++h)
        for (int j = 0; j < e->len[b]; ++j)
          for (int d = 0; d < kHeadDim; ++d) {
            const int t = e->ids[l][b][h][j];
            CHECK(slot_row(e, e->k[l], b, j, h)[d] == model(0, l, b, t, h, d) &&
                      slot_row(e, e->v[l], b, j, h)[d] == model(1, l, b, t, h, d),
                  "%s: layer %d sequence %d head %d slot %d does not hold token %d", event, l, b, h, j, t);
          }
}

/* The spans of the prompt (per sequence): the two instructions and the guardrail. */
static void prompt_spans(int32_t *indptr, kvc_span_t *spans) {
  indptr[0] = 0;
  for (int b = 0; b < kBatch; ++b) {
    const int32_t half = kPromptLen[b] / 2;
    kvc_span_t *s = spans + 3 * b;
    s[0] = (kvc_span_t){0, half, KVC_SPAN_FAIR, 1.0f};
    s[1] = (kvc_span_t){kGuardStart, kGuardEnd, KVC_SPAN_PROTECT, 1.0f};
    s[2] = (kvc_span_t){half, kPromptLen[b], KVC_SPAN_FAIR, 1.0f};
    indptr[b + 1] = 3 * (b + 1);
  }
}

/* Check 3's spans, derived from the mirror alone: a prompt span's surviving tokens are those whose
 * logical id lies in it; they must sit contiguously (compaction keeps order), and become
 * [first slot, last slot + 1) of the head. Returns the span count; indptr has kBatch*kKvHeads+1. */
static int mirror_spans(const Engine *e, int l, int32_t *indptr, kvc_span_t *out) {
  int32_t pindptr[kBatch + 1];
  kvc_span_t pspans[3 * kBatch];
  prompt_spans(pindptr, pspans);
  int count = 0;
  indptr[0] = 0;
  for (int b = 0; b < kBatch; ++b)
    for (int h = 0; h < kKvHeads; ++h) {
      for (int s = pindptr[b]; s < pindptr[b + 1]; ++s) {
        int first = -1, last = -1;
        for (int j = 0; j < e->len[b]; ++j) {
          const int t = e->ids[l][b][h][j];
          if (t >= pspans[s].start && t < pspans[s].end) {
            CHECK(last < 0 || last == j - 1, "layer %d sequence %d head %d: span %d is not contiguous", l, b, h, s);
            if (first < 0) first = j;
            last = j;
          }
        }
        if (first >= 0) out[count++] = (kvc_span_t){first, last + 1, pspans[s].kind, pspans[s].weight};
      }
      indptr[b * kKvHeads + h + 1] = count;
    }
  return count;
}

/* A plan for the batch as it is now. */
static kvc_plan_desc_t base_desc(const Engine *e) {
  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = kQHeads, d.num_kv_heads = kKvHeads, d.head_dim = kHeadDim, d.dtype = KVC_DTYPE_F32;
  d.batch = kBatch, d.seq_lens = e->len;
  return d;
}

static void ensure_workspace(Engine *e, kvc_plan_t plan, kvc_op_t op) {
  size_t bytes = 0;
  kvc_plan_workspace_size(plan, op, &bytes);
  if (bytes <= e->ws_bytes) return;
  free_bytes(e->ws);
  e->ws = alloc_bytes(bytes), e->ws_bytes = bytes;
  CHECK(e->ws, "workspace of %zu bytes", bytes);
}

/* Check 3 for one layer: a contiguous copy of the mirror's tokens (HF layout, one page of
 * kCapacity slots per sequence), selected with a fresh plan from `scores_packed` (packed layout) or,
 * when NULL, from scores computed on the copy, then compacted; the keep rows must equal `keep` and
 * the compacted copy the paged cache (called after the paged compaction, before the mirror moves). */
static void check_from_scratch(Engine *e, int l, kvc_plan_desc_t desc, const float *scores_packed,
                               const int32_t *keep, int64_t keep_elems, const char *event) {
  /* scores_packed NULL: scored from scratch too, on the copy, with the queries made directly */
  const int64_t row = (int64_t)kKvHeads * kCapacity * kHeadDim;
  float *k = alloc_bytes(sizeof(float) * kBatch * row), *v = alloc_bytes(sizeof(float) * kBatch * row);
  for (int b = 0; b < kBatch; ++b)
    for (int h = 0; h < kKvHeads; ++h)
      for (int j = 0; j < e->len[b]; ++j)
        for (int d = 0; d < kHeadDim; ++d) {
          const int64_t at = b * row + ((int64_t)h * kCapacity + j) * kHeadDim + d;
          k[at] = model(0, l, b, e->ids[l][b][h][j], h, d);
          v[at] = model(1, l, b, e->ids[l][b][h][j], h, d);
        }
  kvc_paged_kv_t hf = {k, v, KVC_DTYPE_F32, kKvHeads, kHeadDim, kCapacity, kBatch,
                       row, kHeadDim, (int64_t)kCapacity * kHeadDim, NULL, NULL, 0};
  int32_t indptr[kBatch * kKvHeads + 1];
  kvc_span_t spans[3 * kBatch * kKvHeads];
  mirror_spans(e, l, indptr, spans);
  desc.spans_per_head = 1, desc.span_indptr = indptr, desc.spans = spans, desc.score_row_capacity = 0;
  kvc_plan_t fresh;
  KVC(e->ctx, kvc_plan_create(e->ctx, &desc, &fresh));
  kvc_plan_info_t info;
  kvc_plan_get_info(fresh, &info);
  CHECK(info.keep_elems == keep_elems, "%s: layer %d: from scratch keeps %lld, incremental %lld", event, l,
        (long long)info.keep_elems, (long long)keep_elems);
  int32_t *fresh_keep = alloc_bytes(sizeof(int32_t) * info.keep_elems);
  float *fresh_scores = NULL, *queries = NULL;
  for (int op = KVC_OP_SCORE; op <= KVC_OP_COMPACT; ++op) ensure_workspace(e, fresh, (kvc_op_t)op);
  if (!scores_packed) {
    int32_t obs_indptr[kBatch + 1];
    int32_t *obs = malloc(sizeof(int32_t) * (info.obs_total + 1));
    kvc_plan_obs_positions(fresh, obs_indptr, obs);
    queries = alloc_bytes(sizeof(float) * info.obs_total * kQHeads * kHeadDim);
    for (int b = 0; b < kBatch; ++b)
      for (int r = obs_indptr[b]; r < obs_indptr[b + 1]; ++r)
        for (int g = 0; g < kQHeads; ++g)
          for (int d = 0; d < kHeadDim; ++d)
            queries[((int64_t)r * kQHeads + g) * kHeadDim + d] = model(2, l, b, e->ids[l][b][0][obs[r]], g, d);
    free(obs);
    fresh_scores = alloc_bytes(sizeof(float) * info.score_elems);
    KVC(e->ctx, kvc_score(e->ctx, fresh, &hf, queries, NULL, fresh_scores, 0, e->ws, e->ws_bytes, NULL));
    scores_packed = fresh_scores;
  }
  KVC(e->ctx, kvc_select(e->ctx, fresh, scores_packed, fresh_keep, e->ws, e->ws_bytes, NULL));
  KVC(e->ctx, kvc_compact(e->ctx, fresh, &hf, fresh_keep, NULL, 0, e->ws, e->ws_bytes, NULL));
  wait_device();
  CHECK(!memcmp(fresh_keep, keep, sizeof(int32_t) * keep_elems), "%s: layer %d: from-scratch keep rows differ",
        event, l);
  /* after the incremental event: the paged cache holds what the from-scratch compaction left */
  int32_t new_len[kBatch];
  kvc_plan_new_lengths(fresh, new_len);
  for (int b = 0; b < kBatch; ++b)
    for (int h = 0; h < kKvHeads; ++h)
      for (int j = 0; j < new_len[b]; ++j) {
        const int64_t at = b * row + ((int64_t)h * kCapacity + j) * kHeadDim;
        CHECK(!memcmp(k + at, slot_row(e, e->k[l], b, j, h), sizeof(float) * kHeadDim) &&
                  !memcmp(v + at, slot_row(e, e->v[l], b, j, h), sizeof(float) * kHeadDim),
              "%s: layer %d sequence %d head %d slot %d differs from the from-scratch compaction", event, l, b, h, j);
      }
  kvc_plan_destroy(fresh);
  free_bytes(fresh_keep), free_bytes(fresh_scores), free_bytes(queries), free_bytes(k), free_bytes(v);
}

/* Mirror update after a compaction of layer l by `keep` (keep layout of a plan with lengths
 * e->len and keep lengths new_len). */
static void apply_keep(Engine *e, int l, const int32_t *keep, const int32_t *new_len) {
  int64_t at = 0;
  for (int b = 0; b < kBatch; ++b)
    for (int h = 0; h < kKvHeads; ++h) {
      for (int j = 0; j < new_len[b]; ++j) {
        e->ids[l][b][h][j] = e->ids[l][b][h][keep[at + j]];
        e->ref_h2o[l][b][h][j] = e->ref_h2o[l][b][h][keep[at + j]];
      }
      at += new_len[b];
    }
}

/* The per-head spans of the next event of layer l, from the library (checked against the mirror's). */
typedef struct {
  int32_t indptr[kBatch * kKvHeads + 1];
  kvc_span_t spans[3 * kBatch * kKvHeads];
} HeadSpans;

static void next_spans(Engine *e, kvc_plan_t plan, const int32_t *keep, HeadSpans *out) {
  int64_t count = 0;
  KVC(e->ctx, kvc_spans_after_compaction(e->ctx, plan, keep, NULL, 0, NULL, &count));
  CHECK(count <= 3 * kBatch * kKvHeads, "%lld spans after compaction", (long long)count);
  KVC(e->ctx, kvc_spans_after_compaction(e->ctx, plan, keep, out->spans, count, out->indptr, &count));
}

static void check_spans(const Engine *e, int l, const HeadSpans *got, const char *event) {
  HeadSpans want;
  const int count = mirror_spans(e, l, want.indptr, want.spans);
  CHECK(!memcmp(got->indptr, want.indptr, sizeof want.indptr), "%s: layer %d: span rows differ", event, l);
  for (int s = 0; s < count; ++s)
    CHECK(got->spans[s].start == want.spans[s].start && got->spans[s].end == want.spans[s].end &&
              got->spans[s].kind == want.spans[s].kind,
          "%s: layer %d: span %d is [%d, %d), the mirror says [%d, %d)", event, l, s, got->spans[s].start,
          got->spans[s].end, want.spans[s].start, want.spans[s].end);
}

/* The score layouts: capacity row (b, h) at (b * H + h) * C, packed at H * (n_0 + ..) + h * n_b. */
static void capacity_to_packed(const Engine *e, const float *capacity, float *packed) {
  int64_t at = 0;
  for (int b = 0; b < kBatch; ++b)
    for (int h = 0; h < kKvHeads; ++h, at += e->len[b])
      memcpy(packed + at, capacity + ((int64_t)b * kKvHeads + h) * kCapacity, sizeof(float) * e->len[b]);
}

/* ----------------------------------------------------------------------------- the events */

static HeadSpans g_spans[kLayers];

/* Prefill, then layer by layer: gather the plan's queries from packed q, compress. */
static void prefill(Engine *e) {
  int32_t qo_indptr_host[kBatch + 1] = {0}, span_indptr[kBatch + 1], budgets[kBatch];
  kvc_span_t spans[3 * kBatch];
  for (int b = 0; b < kBatch; ++b) {
    e->len[b] = kPromptLen[b], e->next_token[b] = kPromptLen[b], budgets[b] = kPromptLen[b] / 2;
    qo_indptr_host[b + 1] = qo_indptr_host[b] + kPromptLen[b];
    for (int p = 0; p < (kPromptLen[b] + kPageSize - 1) / kPageSize; ++p) e->block_table[b * kMaxBlocks + p] = take_page(e);
  }
  prompt_spans(span_indptr, spans);
  kvc_plan_desc_t desc = base_desc(e); /* SnapKV, pool 5 */
  desc.budgets = budgets, desc.window = kPrefillWindow, desc.fairness = 1.0f;
  desc.span_indptr = span_indptr, desc.spans = spans;
  kvc_plan_t plan;
  KVC(e->ctx, kvc_plan_create(e->ctx, &desc, &plan));
  kvc_plan_info_t info;
  kvc_plan_get_info(plan, &info);
  ensure_workspace(e, plan, KVC_OP_COMPRESS);

  const int64_t tokens = qo_indptr_host[kBatch], qrow = (int64_t)kQHeads * kHeadDim;
  float *packed_q = alloc_bytes(sizeof(float) * tokens * qrow);
  float *queries = alloc_bytes(sizeof(float) * info.obs_total * qrow);
  int32_t *qo_indptr = alloc_bytes(sizeof qo_indptr_host);
  int32_t *keep = alloc_bytes(sizeof(int32_t) * info.keep_elems);
  memcpy(qo_indptr, qo_indptr_host, sizeof qo_indptr_host);
  int32_t new_len[kBatch];
  kvc_plan_new_lengths(plan, new_len);
  for (int l = 0; l < kLayers; ++l) {
    /* the layer's prefill: its attention writes K/V into the pages; q stays packed */
    for (int b = 0; b < kBatch; ++b)
      for (int t = 0; t < kPromptLen[b]; ++t) {
        write_token(e, l, b, t, t);
        for (int h = 0; h < kKvHeads; ++h) e->ids[l][b][h][t] = t;
        for (int g = 0; g < kQHeads; ++g)
          for (int d = 0; d < kHeadDim; ++d)
            packed_q[(qo_indptr_host[b] + t) * qrow + g * kHeadDim + d] = model(2, l, b, t, g, d);
      }
    KVC(e->ctx, kvc_gather_queries(e->ctx, plan, packed_q, tokens, 0, qo_indptr, queries, NULL));
    const kvc_paged_kv_t cache = paged_cache(e, l);
    KVC(e->ctx, kvc_compress(e->ctx, plan, &cache, queries, NULL, e->ws, e->ws_bytes, NULL));
    wait_device();
    memcpy(keep, (char *)e->ws + info.keep_offset_bytes, sizeof(int32_t) * info.keep_elems);
    const int32_t *status = (const int32_t *)((char *)e->ws + info.compress_status_offset_bytes);
    for (int b = 0; b < kBatch; ++b) CHECK(status[b] == 0, "prefill: layer %d sequence %d status %d", l, b, status[b]);
    /* check 3: the same prompt scored, selected and compacted from scratch (the per-head form of
     * the same spans, derived from the mirror, queries made directly instead of gathered) */
    check_from_scratch(e, l, desc, NULL, keep, info.keep_elems, "prefill");
    apply_keep(e, l, keep, new_len);
    next_spans(e, plan, keep, &g_spans[l]);
  }
  for (int b = 0; b < kBatch; ++b) {
    const int old = e->len[b];
    e->len[b] = new_len[b], e->budget[b] = new_len[b];
    release_pages(e, b, old);
  }
  for (int l = 0; l < kLayers; ++l) check_spans(e, l, &g_spans[l], "prefill");
  check_pages(e, "prefill");
  kvc_plan_destroy(plan);
  free_bytes(packed_q), free_bytes(queries), free_bytes(qo_indptr), free_bytes(keep);
}

/* Check 2's reference: layer l's H2O contribution of sequence b's newest query (position len - 1)
 * over its len keys, mean over the GQA group, in double. */
static void reference_step(Engine *e, int l, int b) {
  const int n = e->len[b], group = kQHeads / kKvHeads, t_q = e->ids[l][b][0][n - 1];
  const double scale = 1.0 / sqrt((double)kHeadDim);
  static double logits[kCapacity];
  for (int h = 0; h < kKvHeads; ++h)
    for (int g = h * group; g < (h + 1) * group; ++g) {
      double top = -INFINITY, sum = 0.0;
      for (int j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int d = 0; d < kHeadDim; ++d)
          dot += (double)model(2, l, b, t_q, g, d) * (double)model(0, l, b, e->ids[l][b][h][j], h, d);
        logits[j] = scale * dot;
        top = logits[j] > top ? logits[j] : top;
      }
      for (int j = 0; j < n; ++j) sum += exp(logits[j] - top);
      for (int j = 0; j < n; ++j) e->ref_h2o[l][b][h][j] += exp(logits[j] - top) / sum / group;
    }
}

/* One decode step: every sequence appends a token (a new page when its last one is full); each
 * layer's H2O scores accumulate the new queries' attention. */
static void decode_step(Engine *e) {
  for (int b = 0; b < kBatch; ++b) {
    if (e->len[b] % kPageSize == 0) e->block_table[b * kMaxBlocks + e->len[b] / kPageSize] = take_page(e);
    const int token = e->next_token[b]++;
    for (int l = 0; l < kLayers; ++l) {
      write_token(e, l, b, e->len[b], token);
      for (int h = 0; h < kKvHeads; ++h) e->ids[l][b][h][e->len[b]] = token, e->ref_h2o[l][b][h][e->len[b]] = 0.0;
    }
    ++e->len[b];
  }
  /* this step's plan: H2O, the newest token of each sequence observes, nothing evicted, and the
   * fixed-capacity score layout, so the rows are the same whatever the lengths */
  kvc_plan_desc_t desc = base_desc(e);
  desc.method = KVC_SCORE_H2O, desc.window = 1, desc.budgets = e->len, desc.score_row_capacity = kCapacity;
  kvc_plan_t plan;
  KVC(e->ctx, kvc_plan_create(e->ctx, &desc, &plan));
  ensure_workspace(e, plan, KVC_OP_SCORE);
  const int64_t qrow = (int64_t)kQHeads * kHeadDim;
  float *packed_q = alloc_bytes(sizeof(float) * kBatch * qrow), *queries = alloc_bytes(sizeof(float) * kBatch * qrow);
  int32_t *qo_indptr = alloc_bytes(sizeof(int32_t) * (kBatch + 1));
  for (int b = 0; b <= kBatch; ++b) qo_indptr[b] = b; /* one packed row per sequence */
  for (int l = 0; l < kLayers; ++l) {
    for (int b = 0; b < kBatch; ++b)
      for (int g = 0; g < kQHeads; ++g)
        for (int d = 0; d < kHeadDim; ++d)
          packed_q[b * qrow + g * kHeadDim + d] = model(2, l, b, e->ids[l][b][0][e->len[b] - 1], g, d);
    const kvc_paged_kv_t cache = paged_cache(e, l);
    KVC(e->ctx, kvc_gather_queries(e->ctx, plan, packed_q, kBatch, 0, qo_indptr, queries, NULL));
    KVC(e->ctx, kvc_score(e->ctx, plan, &cache, queries, NULL, e->scores[l], 1, e->ws, e->ws_bytes, NULL));
    wait_device(); /* packed_q is rewritten for the next layer */
    for (int b = 0; b < kBatch; ++b) reference_step(e, l, b);
  }
  kvc_plan_destroy(plan);
  free_bytes(packed_q), free_bytes(queries), free_bytes(qo_indptr);
}

/* A decode event: each layer (its own plan: after the first compaction the layers' per-head spans
 * differ) selects by its accumulated H2O scores with its per-head spans and compacts, the scores
 * moving along as an extra. */
static void recompress(Engine *e, int step) {
  char event[32];
  snprintf(event, sizeof event, "decode step %d", step);
  int32_t new_len[kBatch];
  for (int l = 0; l < kLayers; ++l) {
    /* check 2: the accumulated scores against the program's own */
    for (int b = 0; b < kBatch; ++b)
      for (int h = 0; h < kKvHeads; ++h)
        for (int j = 0; j < e->len[b]; ++j) {
          const double got = e->scores[l][((int64_t)b * kKvHeads + h) * kCapacity + j], want = e->ref_h2o[l][b][h][j];
          CHECK(fabs(got - want) <= 1e-5 + 1e-4 * fabs(want), "%s: layer %d sequence %d head %d slot %d: H2O %.9g, want %.9g",
                event, l, b, h, j, got, want);
        }
    kvc_plan_desc_t desc = base_desc(e);
    desc.method = KVC_SCORE_H2O, desc.window = 1, desc.budgets = e->budget, desc.fairness = 1.0f;
    desc.recent_tokens = kRecent, desc.score_row_capacity = kCapacity;
    desc.spans_per_head = 1, desc.span_indptr = g_spans[l].indptr, desc.spans = g_spans[l].spans;
    kvc_plan_t plan;
    KVC(e->ctx, kvc_plan_create(e->ctx, &desc, &plan));
    kvc_plan_info_t info;
    kvc_plan_get_info(plan, &info);
    ensure_workspace(e, plan, KVC_OP_SELECT);
    ensure_workspace(e, plan, KVC_OP_COMPACT);
    int32_t *keep = alloc_bytes(sizeof(int32_t) * info.keep_elems);
    float *before = malloc(sizeof(float) * info.score_elems), *packed = malloc(sizeof(float) * info.score_elems);
    memcpy(before, e->scores[l], sizeof(float) * info.score_elems);
    capacity_to_packed(e, before, packed);
    const kvc_paged_kv_t cache = paged_cache(e, l);
    float *extras[1] = {e->scores[l]};
    KVC(e->ctx, kvc_select(e->ctx, plan, e->scores[l], keep, e->ws, e->ws_bytes, NULL));
    KVC(e->ctx, kvc_compact(e->ctx, plan, &cache, keep, extras, 1, e->ws, e->ws_bytes, NULL));
    wait_device();
    const int32_t *status = (const int32_t *)((char *)e->ws + info.compact_status_offset_bytes);
    for (int b = 0; b < kBatch; ++b) CHECK(status[b] == 0, "%s: layer %d sequence %d status %d", event, l, b, status[b]);
    check_from_scratch(e, l, desc, packed, keep, info.keep_elems, event);
    kvc_plan_new_lengths(plan, new_len);
    /* the extra: each row's kept scores at its front, in keep order; the rest zeroed for the next
     * accumulation (the library leaves it stale) */
    int64_t at = 0;
    for (int b = 0; b < kBatch; ++b)
      for (int h = 0; h < kKvHeads; ++h, at += new_len[b]) {
        float *row = e->scores[l] + ((int64_t)b * kKvHeads + h) * kCapacity;
        for (int j = 0; j < new_len[b]; ++j)
          CHECK(row[j] == before[((int64_t)b * kKvHeads + h) * kCapacity + keep[at + j]],
                "%s: layer %d sequence %d head %d: compacted score %d", event, l, b, h, j);
        memset(row + new_len[b], 0, sizeof(float) * (kCapacity - new_len[b]));
      }
    apply_keep(e, l, keep, new_len);
    next_spans(e, plan, keep, &g_spans[l]);
    kvc_plan_destroy(plan);
    free_bytes(keep), free(before), free(packed);
  }
  for (int b = 0; b < kBatch; ++b) {
    const int old = e->len[b];
    e->len[b] = new_len[b];
    release_pages(e, b, old);
  }
  for (int l = 0; l < kLayers; ++l) check_spans(e, l, &g_spans[l], event);
  check_pages(e, event);
}

/* What each event left: per sequence its length and, for layer 0 head 0, how many tokens of each
 * prompt span survive (the guardrail always whole; the two instructions the same share). */
static void report(const Engine *e, const char *event) {
  printf("%-15s", event);
  for (int b = 0; b < kBatch; ++b) {
    int sys = 0, guard = 0, user = 0;
    for (int j = 0; j < e->len[b]; ++j) {
      const int t = e->ids[0][b][0][j];
      guard += t >= kGuardStart && t < kGuardEnd;
      sys += t < kPromptLen[b] / 2;
      user += t >= kPromptLen[b] / 2 && t < kPromptLen[b];
    }
    printf("  seq %d: %3d tokens (guardrail %2d/%d, system %3d/%d, user %3d/%d)", b, e->len[b], guard,
           kGuardEnd - kGuardStart, sys, kPromptLen[b] / 2, user, kPromptLen[b] - kPromptLen[b] / 2);
  }
  printf("\n");
}

int main(int argc, char **argv) {
  g_cuda = argc > 1 && !strcmp(argv[1], "--cuda");
  static Engine engine;
  Engine *e = &engine;
  char detail[256] = "";
  kvc_status_t st = kvc_context_create_with_detail(g_cuda ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, 0, &e->ctx, detail,
                                                   sizeof detail);
  if (st != KVC_SUCCESS) {
    fprintf(stderr, "engine_loop: no %s context: %s (%s)\n", g_cuda ? "CUDA" : "CPU", kvc_status_name(st), detail);
    return st == KVC_ERROR_NO_DEVICE ? 77 : 1;
  }
  const size_t pool_bytes = sizeof(float) * kPoolPages * kPageSize * kKvHeads * kHeadDim;
  for (int l = 0; l < kLayers; ++l) {
    e->k[l] = alloc_bytes(pool_bytes), e->v[l] = alloc_bytes(pool_bytes);
    e->scores[l] = alloc_bytes(sizeof(float) * kBatch * kKvHeads * kCapacity);
    CHECK(e->k[l] && e->v[l] && e->scores[l], "pools of %zu bytes", pool_bytes);
  }
  e->block_table = alloc_bytes(sizeof(int32_t) * kBatch * kMaxBlocks);
  for (int i = 0; i < kBatch * kMaxBlocks; ++i) e->block_table[i] = -1;
  /* a scattered free list, as after a while of serving */
  for (int p = 0; p < kPoolPages; ++p) e->free_pages[p] = p;
  for (int p = kPoolPages - 1; p > 0; --p) {
    const int q = (int)((hash_unit((uint64_t)p) + 1.0f) * 0.5f * (float)(p + 1)) % (p + 1), t = e->free_pages[p];
    e->free_pages[p] = e->free_pages[q], e->free_pages[q] = t;
  }
  e->num_free = kPoolPages;

  printf("engine_loop: %d layers, batch %d, %d KV / %d q heads, head_dim %d, pages of %d, %s backend\n", kLayers,
         kBatch, kKvHeads, kQHeads, kHeadDim, kPageSize, g_cuda ? "CUDA" : "CPU");
  prefill(e);
  report(e, "prefill");
  for (int step = 1; step <= kDecodeSteps; ++step) {
    decode_step(e);
    if (step % kRecompressEvery == 0) {
      recompress(e, step);
      char event[32];
      snprintf(event, sizeof event, "decode step %d", step);
      report(e, event);
    }
  }
  printf("engine_loop: every check held (%d events, pages in use %d of %d)\n", 1 + kDecodeSteps / kRecompressEvery,
         kPoolPages - e->num_free, kPoolPages);
  for (int l = 0; l < kLayers; ++l) free_bytes(e->k[l]), free_bytes(e->v[l]), free_bytes(e->scores[l]);
  free_bytes(e->block_table), free_bytes(e->ws);
  kvc_context_destroy(e->ctx);
  return 0;
}
