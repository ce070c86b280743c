/*
 * kvcompress.h - libkvcompress public API.
 *
 * libkvcompress compresses one layer of an LLM's paged KV cache by evicting tokens, with the two
 * fixes of "The Pitfalls of KV Cache Compression" (Chen et al., 2025): protected tokens
 * (whitelisting) and fair eviction (every instruction span keeps the same share of its tokens).
 *
 * ---------------------------------------------------------------------------------------------
 * Pipeline (one compression event, one layer at a time)
 *
 *   kvc_plan_create     host, once per event; validates every piece of metadata and computes
 *                       quotas, observation positions and workspace sizes. Reuse it for every layer.
 *   kvc_score           per (sequence, KV head, token) importance, fp32.
 *   kvc_select          per (sequence, KV head) the kept token indices, ascending.
 *   kvc_compact         moves kept K/V rows to the front of each sequence's own pages, in place.
 *   kvc_compact_into    writes them to other pages instead (copy-on-write of shared prefix blocks).
 *   kvc_retention       kept counts per (sequence, KV head, span): the eviction-bias monitor.
 *   kvc_compress        score + select + compact in one call.
 *   kvc_gather_queries  the observation queries the plan needs, from the engine's packed q.
 *   kvc_spans_after_compaction  host: the next event's per-head spans from a keep layout
 *                       (re-compression during decode: spans_per_head, score_row_capacity).
 *
 * Conventions that hold for every function below
 *
 *   - Every function that can fail returns kvc_status_t; results go through out-pointers; nothing
 *     aborts or prints. On failure a sentence naming the argument, the sequence and the value is
 *     kept in the context (kvc_last_error).
 *   - Units: lengths, budgets, positions, windows are in tokens; strides are in elements of the
 *     cache dtype; sizes in bytes are size_t and named *_bytes.
 *   - Memory: on the CPU backend every pointer is host memory. On the CUDA backend the pointers
 *     passed to execute calls (cache pools, page tables, queries, scores, keep indices, extras,
 *     counts, workspace) are device memory of the context's device; plan descriptors are host.
 *   - Execute calls (kvc_score, kvc_select, kvc_compact, kvc_retention, kvc_compress,
 *     kvc_gather_queries) never allocate, never synchronise and never read device memory on the
 *     host: on CUDA they only enqueue kernels on `stream` and return, so they can be captured in a
 *     CUDA graph. Their outputs are ready when the stream reaches that point. A kernel fault
 *     surfaces on the next synchronising CUDA call of the caller. On the CPU backend they run to
 *     completion before returning and `stream` is ignored.
 *   - Workspace follows CUB's two-phase pattern: ask kvc_plan_workspace_size, pass a buffer at
 *     least that large (256-byte aligned, owned by the caller, contents need not be initialised
 *     and are garbage afterwards, except as documented for kvc_compress).
 *   - Threads: the library has no global mutable state. A context may be used by one thread at a
 *     time (it holds the last error). A plan is immutable after creation (except that
 *     kvc_plan_upload points it at another device buffer) and may be shared read-only by any
 *     number of threads and contexts of the same backend and device. A CPU context may itself
 *     use several threads for one call (kvc_context_set_threads).
 *
 * Layouts of the per-token arrays ("score layout", "keep layout")
 *
 *   Sequence b has length n_b and keeps k_b = min(budgets[b], n_b) tokens per KV head.
 *   Score layout:  packed (desc.score_row_capacity 0, the default): float [num_kv_heads * sum_b n_b];
 *                  row (b, h) starts at num_kv_heads * (n_0 + ... + n_{b-1}) + h * n_b and holds
 *                  n_b values.
 *                  Fixed capacity C (desc.score_row_capacity C > 0, every n_b <= C): float
 *                  [batch * num_kv_heads * C]; row (b, h) starts at (b * num_kv_heads + h) * C and
 *                  holds n_b values, then C - n_b the library never reads or writes. The rows do
 *                  not move when seq_lens grow, so H2O scores accumulated (kvc_score with
 *                  accumulate) by the plans of successive decode steps, each one token longer,
 *                  land in the same rows, and kvc_compact compacts them as an extra in place (the
 *                  k_b kept values at the front of each row). Every op that reads or writes a score
 *                  layout (kvc_score, kvc_select, kvc_compact's extras, kvc_compress's workspace)
 *                  uses the plan's.
 *   Keep layout:   int32 [num_kv_heads * sum_b k_b]; row (b, h) starts at
 *                  num_kv_heads * (k_0 + ... + k_{b-1}) + h * k_b and holds k_b token indices.
 *   Count layout:  spans per sequence (desc.spans_per_head 0): int32 [num_kv_heads * total spans];
 *                  row (b, h) starts at num_kv_heads * span_indptr[b] + h * (span_indptr[b+1] -
 *                  span_indptr[b]).
 *                  Spans per (sequence, KV head) (desc.spans_per_head 1): int32 [total spans]; row
 *                  (b, h) is span row r = b * num_kv_heads + h and starts at span_indptr[r], one
 *                  count per span of that row, in its order.
 *   kvc_plan_get_info returns the element counts of each.
 * ---------------------------------------------------------------------------------------------
 */
#ifndef KVCOMPRESS_H
#define KVCOMPRESS_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress_version.h" /* KVC_VERSION_MAJOR, _MINOR, _PATCH, KVC_VERSION_NUMBER */

#if defined(_WIN32) && defined(KVC_BUILDING_SHARED)
#define KVC_API __declspec(dllexport)
#elif defined(__GNUC__)
#define KVC_API __attribute__((visibility("default")))
#else
#define KVC_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ============================================================================================= */
/* Status                                                                                        */
/* ============================================================================================= */

/* Explicit values; new codes are only ever appended. */
typedef enum {
  KVC_SUCCESS = 0,
  KVC_ERROR_INVALID_VALUE = 1,       /* an argument or metadata value is wrong (the detail names it) */
  KVC_ERROR_NOT_SUPPORTED = 2,       /* valid, but not implemented (e.g. head_dim 512 on CUDA)      */
  KVC_ERROR_BUDGET = 3,              /* protected tokens exceed a sequence's budget                  */
  KVC_ERROR_WORKSPACE_TOO_SMALL = 4, /* workspace_bytes below kvc_plan_workspace_size                */
  KVC_ERROR_OUT_OF_MEMORY = 5,       /* a host or device allocation failed (plan/context creation)   */
  KVC_ERROR_NO_DEVICE = 6,           /* CUDA backend asked for, but no usable device or no CUDA build */
  KVC_ERROR_CUDA = 7,                /* a CUDA runtime call failed (the detail has its error string) */
  KVC_ERROR_INTERNAL = 8             /* a bug in libkvcompress; please report it                     */
} kvc_status_t;

/* "KVC_ERROR_BUDGET"; "KVC_UNKNOWN_STATUS" for values not in the enum. Static storage. */
KVC_API const char *kvc_status_name(kvc_status_t status);
/* One sentence describing the status. Static storage. */
KVC_API const char *kvc_status_string(kvc_status_t status);

/* ============================================================================================= */
/* Version                                                                                       */
/* ============================================================================================= */

/* The library's version as KVC_VERSION_NUMBER computes it (major*10000 + minor*100 + patch), so
 * a program can compare the header it was compiled with against the library it runs with. */
KVC_API unsigned kvc_version(void);
/* "MAJOR.MINOR.PATCH". Static storage. */
KVC_API const char *kvc_version_string(void);

/* ============================================================================================= */
/* Context                                                                                       */
/* ============================================================================================= */

typedef struct kvc_context *kvc_context_t;

typedef enum {
  KVC_BACKEND_AUTO = 0, /* CUDA when built with it and a device is usable, else CPU */
  KVC_BACKEND_CPU = 1,
  KVC_BACKEND_CUDA = 2
} kvc_backend_t;

/* Creates a context on `backend`; `device` is the CUDA device ordinal (ignored on CPU).
 * A CUDA context selects the device for the calls made through it (each call sets the device and
 * restores the caller's current device before returning); it holds no library handles.
 * Returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (out is NULL, backend unknown, device < 0 or not
 * present); KVC_ERROR_NO_DEVICE (CUDA asked for and the library was built without CUDA or no device
 * is usable); KVC_ERROR_OUT_OF_MEMORY. On failure *out is set to NULL. Synchronous. A failed
 * creation has no context to keep its reason in (and the library has no global state): use
 * kvc_context_create_with_detail to get it. */
KVC_API kvc_status_t kvc_context_create(kvc_backend_t backend, int device, kvc_context_t *out);
/* kvc_context_create that also explains a failure: `detail` (caller's buffer of detail_bytes,
 * may be NULL) receives a NUL-terminated sentence, truncated to fit, naming the argument and value
 * or the runtime's reason (e.g. "cudaGetDeviceCount: cudaErrorNoDevice: no CUDA-capable device is
 * detected", "libkvcompress was built without CUDA"); "" on success. Same statuses. */
KVC_API kvc_status_t kvc_context_create_with_detail(kvc_backend_t backend, int device, kvc_context_t *out,
                                                    char *detail, size_t detail_bytes);
/* Destroys a context; accepts NULL. Plans created on it must be destroyed first. */
KVC_API kvc_status_t kvc_context_destroy(kvc_context_t ctx);
/* Threads of a CPU context (default 1). With threads > 1 the context owns threads - 1 worker
 * threads, started here (execute calls never create threads) and joined by kvc_context_destroy or
 * the next kvc_context_set_threads; between calls they sleep. What runs in parallel: kvc_score and
 * the scoring stage of kvc_compress, split by (scoring domain, KV head), on the calling thread and
 * the workers; selection, compaction and retention stay on the calling thread. Determinism: every
 * score is computed by one thread in one fixed order, so results are bit-identical for any thread
 * count (they may differ in the last bits between CPUs with different vector instruction sets).
 * Plans: a plan's workspace holds scratch for the thread count its context had when the plan was
 * created, and a call uses min(that count, the calling context's count) threads: set threads
 * before creating plans. The context-per-thread rule stands: one thread at a time calls into a
 * context; its workers are the library's own. threads must be in [1, 256]; a CUDA context
 * accepts only 1.
 * Returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (ctx is NULL, threads out of range);
 * KVC_ERROR_NOT_SUPPORTED (threads > 1 on a CUDA context); KVC_ERROR_OUT_OF_MEMORY (the threads
 * could not be started; the context is left with 1 thread). Synchronous. */
KVC_API kvc_status_t kvc_context_set_threads(kvc_context_t ctx, int32_t threads);
/* The context's thread count. INVALID_VALUE if ctx or out is NULL. */
KVC_API kvc_status_t kvc_context_threads(kvc_context_t ctx, int32_t *out);
/* The backend the context runs on (never AUTO). INVALID_VALUE if ctx or out is NULL. */
KVC_API kvc_status_t kvc_context_backend(kvc_context_t ctx, kvc_backend_t *out);
/* Detail of the last failure of a call made with ctx: which argument, which sequence, which value.
 * "" if the last call succeeded; a fixed string when ctx is NULL. Valid until the next call on ctx. */
KVC_API const char *kvc_last_error(kvc_context_t ctx);

/* A cudaStream_t, without needing CUDA headers. NULL is the legacy default stream. Ignored on CPU. */
typedef struct CUstream_st *kvc_stream_t;

/* ============================================================================================= */
/* The paged KV cache (one layer)                                                                */
/* ============================================================================================= */

typedef enum {
  KVC_DTYPE_F32 = 0,
  KVC_DTYPE_F16 = 1,
  KVC_DTYPE_BF16 = 2,
  KVC_DTYPE_FP8_E4M3 = 3 /* OCP e4m3 ("e4m3fn", vLLM's fp8 KV cache): 1 sign, 4 exponent (bias 7),
                            3 mantissa bits, no inf, NaN = S.1111.111, largest 448. Compacted as bytes;
                            scored with the plan's k_scale / k_scales and f16 or bf16 queries
                            (query_dtype; f32 too) */
} kvc_dtype_t;

/* The dtype of kvc_score's queries and kvc_gather_queries' packed q (kvc_plan_desc_t.query_dtype).
 * 0 means "the cache dtype", so a desc written before the field existed keeps its meaning. Queries
 * of another dtype than the cache's are supported for FP8 caches only (fp8 queries are not). */
typedef enum {
  KVC_QUERY_DTYPE_AS_CACHE = 0, /* the plan's dtype (default)                                       */
  KVC_QUERY_DTYPE_F32 = 1,
  KVC_QUERY_DTYPE_F16 = 2,
  KVC_QUERY_DTYPE_BF16 = 3
} kvc_query_dtype_t;

/*
 * One descriptor serves a vLLM block table, a FlashInfer CSR page list and plain contiguous
 * tensors. Element (page p, slot s, head h, dim d) of K is
 *     k[p * stride_page + s * stride_token + h * stride_head + d]        (same for V)
 * and token t of sequence b lives in page  pages_b[t / page_size], slot t % page_size, where
 *     pages_b = page_table + b * max_pages                       (dense: page_indptr == NULL)
 *     pages_b = page_table + page_indptr[b]                      (CSR)
 *     pages_b[i] = b                                              (page_table == NULL: sequence b
 *                                                                  is page b, "one page per sequence")
 * Only the first ceil(n_b / page_size) entries of pages_b are ever read, and only those pages are
 * read or written. Page ids must lie in [0, num_pages): the CPU backend checks every id it would
 * use before touching memory, and kvc_compact / kvc_compress also check that no page is used by
 * two sequences (KVC_ERROR_INVALID_VALUE). The CUDA backend cannot read the table on the host, so
 * its kernels guard instead: compaction leaves a sequence untouched if any page id it uses lies
 * outside [0, num_pages) or its CSR list is too short, and scoring reads such tokens as zero keys.
 * CUDA compaction also detects, on the device, a page used by two sequences (or twice by one) and
 * leaves every sequence involved untouched. It reports what it skipped in a per-sequence status
 * array it leaves in its workspace (kvc_compact_status_t, below), which the engine reads after the
 * stream; the CPU backend fills the same array (all zeros: it refuses a bad table with
 * KVC_ERROR_INVALID_VALUE before moving anything).
 *
 * Layout rules, checked by both backends from the descriptor alone (KVC_ERROR_INVALID_VALUE, the
 * detail naming the field and value) before any byte is touched:
 *   - Offsets are bounded: the pool extent, (num_pages - 1) * stride_page + (page_size - 1) *
 *     stride_token + (num_kv_heads - 1) * stride_head + head_dim elements, and its size in bytes
 *     must fit int64, and k, v plus that many bytes must not pass the end of the address space.
 *     Every element and byte offset the descriptor can address is then below it.
 *   - No two rows (page, slot, head) of a pool overlap: taken by increasing stride, each axis with
 *     more than one position steps at least past everything the finer axes span (head_dim for the
 *     finest). Any nesting order of page, slot and head is fine.
 *   - k and v are aligned to the element size (so they are a whole number of elements apart).
 *   - No K row overlaps a V row: K and V may share one allocation (vLLM's (2, blocks, ...) halves,
 *     FlashInfer's (pages, 2, ...) pages where K and V rows alternate) or lie anywhere apart, as
 *     long as no element of any K row (p, s, h), p < num_pages, is an element of any V row. k == v
 *     is always rejected.
 *
 *   NHD (vLLM, FlashInfer default): stride_token = H*D, stride_head = D, stride_page = page_size*H*D
 *   HND (TensorRT-LLM, FlashInfer HND): stride_head = page_size*D, stride_token = D
 *   HF-style [batch][H][n][D] tensor: page_size = n, page_table = NULL, stride_page = H*n*D,
 *                                     stride_head = n*D, stride_token = D
 *   K/V in one tensor (vLLM (2, blocks, ...), FlashInfer (pages, 2, ...)): point k and v at the two
 *   halves; they share strides.
 * head_dim is contiguous (stride 1). Strides are int64 so offsets past 2^31 elements are fine.
 */
typedef struct {
  void *k, *v;            /* pools with identical layout; device memory on CUDA                  */
  kvc_dtype_t dtype;      /* must equal the plan's dtype                                         */
  int32_t num_kv_heads;   /* must equal the plan's                                               */
  int32_t head_dim;       /* must equal the plan's                                               */
  int32_t page_size;      /* tokens per page, >= 1                                               */
  int32_t num_pages;      /* pool capacity: valid page ids are [0, num_pages)                    */
  int64_t stride_page, stride_token, stride_head; /* elements, all > 0                          */
  const int32_t *page_table;  /* dense [batch][max_pages], CSR indices, or NULL (see above)      */
  const int32_t *page_indptr; /* [batch+1] CSR offsets, or NULL for dense; host memory on CPU,
                                 device memory on CUDA, like the table                           */
  int32_t max_pages;          /* row length of the dense table (ignored for CSR / NULL table)    */
} kvc_paged_kv_t;

/* ============================================================================================= */
/* Spans                                                                                         */
/* ============================================================================================= */

typedef enum {
  KVC_SPAN_FAIR = 0,   /* an instruction partition: gets a quota proportional to weight * length */
  KVC_SPAN_PROTECT = 1 /* whitelisted: every token is always kept                                */
} kvc_span_kind_t;

/* Token range [start, end) of one sequence. Per span row (a sequence, or with spans_per_head a
 * (sequence, KV head)), spans are sorted by start; FAIR spans do not overlap each other and PROTECT
 * spans do not overlap each other, but a PROTECT span may lie inside (or across) FAIR spans.
 * weight (> 0, finite) matters for FAIR spans only and is not checked for PROTECT spans.
 *
 * Per-head spans (desc.spans_per_head = 1). After one compaction a span's kept tokens are
 * contiguous in every KV head, but where they land differs per head, so a second event needs spans
 * per (sequence, KV head): span_indptr then has batch * num_kv_heads + 1 entries and span row
 * r = b * num_kv_heads + h lists the spans of sequence b in KV head h (kvc_spans_after_compaction
 * makes them from a compaction's keep layout). Every rule above holds per row, against n_b. The
 * protected set, the partitions and their quotas (selection semantics) are then computed per
 * (sequence, KV head); k_b stays one per sequence: the budget policy compares it with the largest
 * protected count of the sequence's heads (KVC_BUDGET_CLAMP raises k_b to that largest count).
 * Rejected with KVC_ERROR_INVALID_VALUE, the detail naming the field:
 *   - method TOVA, which selects one set for all KV heads, unless the spans of every head of a
 *     sequence are identical (same count, starts, ends, kinds, FAIR weights) to head 0's: TOVA then
 *     selects by head 0's spans, as it does with per-sequence spans;
 *   - span_local = 1: its scoring domains are the FAIR spans, which would differ per head while
 *     scoring has one set of domains per sequence.
 * kvc_plan_span_quotas and the count layout follow the rows. */
typedef struct {
  int32_t start, end;
  int32_t kind;  /* kvc_span_kind_t */
  float weight;  /* 1 = share proportional to length */
} kvc_span_t;

/* ============================================================================================= */
/* The plan                                                                                      */
/* ============================================================================================= */

typedef enum {
  KVC_SCORE_SNAPKV = 0,   /* window attention, mean over queries, pooled; window keys protected   */
  KVC_SCORE_H2O = 1,      /* attention received / number of queries that see the key              */
  KVC_SCORE_TOVA = 2,     /* last query's attention, mean over all query heads; last token kept   */
  KVC_SCORE_KNORM = 3,    /* -||k||_2 (low-norm keys kept; FP8 keys: -k_scale_h ||k_fp8||_2)       */
  KVC_SCORE_STREAMING = 4 /* recency (use sink_tokens = 4)                                         */
} kvc_score_method_t;

typedef enum { KVC_POOL_AVG = 0, KVC_POOL_MAX = 1 } kvc_pool_t;
typedef enum { KVC_REDUCE_MEAN = 0, KVC_REDUCE_MAX = 1 } kvc_reduce_t;

/* How the quotas' rounding remainder is shared (selection step 3). */
typedef enum {
  KVC_QUOTA_LARGEST_REMAINDER = 0, /* the largest fractional shares get the leftover tokens (default) */
  KVC_QUOTA_LATER_FIRST = 1        /* every partition gets the floor of its share; the leftover tokens
                                      go one each to the latest partitions with room, last first. For
                                      two spans this is the paper code's floor(k * L_1 / n) for the
                                      earlier and the rest for the later */
} kvc_quota_rounding_t;

/* Whether the method's own observation positions (SNAPKV's window, TOVA's last token of each
 * domain) are protected (selection step 1). */
typedef enum {
  KVC_WINDOW_PROTECTED = 0, /* always kept: they count in P, raise their partition's lower bound lo_p
                               and |P| > k is KVC_ERROR_BUDGET (default) */
  KVC_WINDOW_RANKED = 1     /* not in P: they keep their +inf score, so they rank first in their
                               partition but count against its quota like any token; a quota smaller
                               than the window keeps its latest positions. The paper code's rule
                               (window keys get their span's highest score) */
} kvc_window_protection_t;

typedef struct kvc_plan *kvc_plan_t;

/* What kvc_plan_create does with a sequence whose protected tokens exceed its budget
 * (|P| > min(budget, n), selection rule 1 below). */
typedef enum {
  KVC_BUDGET_FAIL = 0,  /* the whole plan fails with KVC_ERROR_BUDGET, naming the sequence (default) */
  KVC_BUDGET_CLAMP = 1, /* the sequence's budget is raised to |P|: it keeps exactly its protected tokens */
  KVC_BUDGET_SKIP = 2   /* the sequence is left uncompressed: k = n, nothing of it moves            */
} kvc_budget_policy_t;

/* Where a CUDA plan's metadata lives on the device (see "Plans in a caller's device buffer"). */
typedef enum {
  KVC_PLAN_MEMORY_OWNED = 0, /* kvc_plan_create allocates it and uploads it synchronously (default) */
  KVC_PLAN_MEMORY_CALLER = 1 /* the caller's buffer, filled by kvc_plan_upload on a stream          */
} kvc_plan_memory_t;

/* What the plan does to each sequence (kvc_plan_outcomes). Explicit values; only ever appended. */
typedef enum {
  KVC_OUTCOME_COMPRESSED = 0,    /* k = budget < n: the sequence is compressed as asked              */
  KVC_OUTCOME_WITHIN_BUDGET = 1, /* budget >= n: k = n, nothing to evict, nothing moves              */
  KVC_OUTCOME_CLAMPED = 2,       /* KVC_BUDGET_CLAMP raised k from the budget to |P| (<= n; k = n
                                    means nothing moves)                                            */
  KVC_OUTCOME_SKIPPED = 3        /* KVC_BUDGET_SKIP left it uncompressed: k = n, nothing moves       */
} kvc_outcome_t;

/*
 * Scoring semantics (n = sequence length; a domain is [0, n), or with span_local each FAIR span):
 *   Observation queries: without span_local, the last min(window, n) positions. With span_local the
 *   window is split across the FAIR spans in order: span i of S gets min(len_i, ceil(R / (S - i)))
 *   where R is what earlier spans left of `window`; each span uses its own last tokens. A query at
 *   position p in domain [lo, hi) sees keys [lo, p]; a_gij = softmax_j(scale * <q_gi, k_hj>), where
 *   an FP8 key is k_hj = k_scale_h * (its e4m3 value) (desc.k_scale / k_scales).
 *   SNAPKV     keys of a domain before its first query: mean over its queries of a_gij, pooled
 *              (kernel pool_kernel, stride 1, zero padding, AVG divides by pool_kernel; MAX ignores
 *              padding) inside that key range, then group_reduce over the GQA group. Query
 *              positions are protected.
 *   H2O        every key of a domain: sum_i a_gij / #(queries of the domain that see j), group_reduce.
 *   TOVA       window is ignored: one query per domain, its last token (protected). a_{g,last,j}
 *              averaged over ALL query heads; every KV head gets the same scores and selection.
 *   KNORM      -||k_hj||_2. No queries.
 *   STREAMING  j, or (j - lo) / (hi - lo) with span_local. No queries.
 *   Keys a method does not score (protected query positions, keys outside every domain) get +inf.
 *   pool_kernel applies to SNAPKV only; group_reduce to SNAPKV and H2O.
 *   Non-finite data, one rule on both backends: a NaN or +-inf among a query row's logits makes
 *   that whole softmax row NaN, so every key it observes gets a NaN contribution (torch's softmax
 *   does so for NaN and +inf; for -inf it would give that key 0 as a mask, but no mask is applied
 *   here: a -inf logit only comes from corrupt data, and is reported as such); MAX pooling and MAX
 *   group-reduce propagate NaN; pool_kernel 1 is the identity; KNORM is computed without
 *   intermediate overflow: finite for every finite key, a norm beyond FLT_MAX stored as -FLT_MAX.
 *   Selection orders NaN below -inf.
 *
 * Selection semantics for one (sequence b, KV head h), k = min(budgets[b], n); "the spans" are
 * sequence b's, or (b, h)'s with spans_per_head:
 *   1. Protected set P = first sink_tokens + last recent_tokens + PROTECT spans + the method's own
 *      protected positions (unless window_protection is KVC_WINDOW_RANKED). |P| > k is
 *      KVC_ERROR_BUDGET at plan time, unless budget_policy says otherwise: KVC_BUDGET_CLAMP
 *      sets k = |P|, KVC_BUDGET_SKIP sets k = n (then every token is kept and nothing moves).
 *      Everything below uses that k.
 *   2. Partitions: the FAIR spans in order, then one implicit partition (weight 1) of every token
 *      in no FAIR span, if any. Partition p has length L_p, weight w_p, protected count lo_p.
 *   3. F = max(sum lo_p, floor(fairness * k + 0.5)); integer quotas lo_p <= q_p <= L_p, sum q_p = F,
 *      q_p = clamp(mu * w_p * L_p, lo_p, L_p) with mu solving the sum exactly, rounded by largest
 *      remainder, ties to the later partition (or, with KVC_QUOTA_LATER_FIRST, floors plus one
 *      leftover token each for the latest partitions).
 *   4. Keep P; in each partition its top (q_p - lo_p) unprotected tokens; then the top (k - F) of
 *      all tokens not yet kept.
 *   5. "Top" orders by score descending, equal scores by position descending, NaN below -inf
 *      (-0 equals +0). Output indices ascending. Deterministic and identical on CPU and CUDA.
 */
typedef struct {
  size_t struct_size;          /* sizeof(kvc_plan_desc_t); set by KVC_PLAN_DESC_INIT / kvc_plan_desc_init */
  int32_t num_q_heads;         /* >= 1, a multiple of num_kv_heads                                  */
  int32_t num_kv_heads;        /* >= 1                                                              */
  int32_t head_dim;            /* 1..256 on CPU; 64, 128, 256 or any multiple of 8 up to 256 on CUDA */
  kvc_dtype_t dtype;           /* cache dtype, and the queries' unless query_dtype says (default F16) */
  int32_t batch;               /* >= 1 sequences                                                    */
  const int32_t *seq_lens;     /* host [batch], each >= 1                                           */
  const int32_t *budgets;      /* host [batch], each >= 1: tokens kept per KV head; >= seq_len keeps all */
  const int32_t *span_indptr;  /* host [rows+1] CSR into spans, span_indptr[0] = 0, rows = batch (or
                                  batch * num_kv_heads with spans_per_head); or NULL: no spans      */
  const kvc_span_t *spans;     /* host                                                              */
  kvc_score_method_t method;   /* default SNAPKV                                                    */
  int32_t window;              /* observation queries per sequence (SNAPKV, H2O), >= 1; default 64.
                                  H2O over the whole prompt: pass a value >= the longest sequence */
  int32_t pool_kernel;         /* odd, >= 1; 1 = none; default 5                                     */
  kvc_pool_t pool;             /* default AVG                                                       */
  kvc_reduce_t group_reduce;   /* default MEAN                                                      */
  float scale;                 /* softmax scale, finite, >= 0; 0 = 1/sqrt(head_dim) (default)       */
  int32_t span_local;          /* 0 or 1: each FAIR span is its own scoring domain; then every token
                                  outside FAIR spans must be protected, and SNAPKV / H2O need
                                  window >= the number of FAIR spans of every sequence (one query
                                  per span at least)                                                */
  int32_t sink_tokens;         /* >= 0, protected prefix; default 0                                 */
  int32_t recent_tokens;       /* >= 0, protected suffix; default 0                                 */
  float fairness;              /* lambda in [0, 1]: 0 = plain policy, 1 = fully fair; default 0     */
  kvc_budget_policy_t budget_policy; /* a sequence with |P| > its budget: fail the plan (default),
                                  clamp its budget or skip it; kvc_plan_outcomes says which happened */
  kvc_plan_memory_t device_memory; /* CUDA: OWNED (default) allocates and uploads the plan's device
                                  copy in kvc_plan_create; CALLER allocates nothing and waits for
                                  kvc_plan_upload into the caller's buffer. Ignored on CPU.         */
  kvc_quota_rounding_t quota_rounding;       /* default KVC_QUOTA_LARGEST_REMAINDER              */
  kvc_window_protection_t window_protection; /* default KVC_WINDOW_PROTECTED                     */
  int32_t spans_per_head;      /* 0 (default): span_indptr has batch + 1 entries, one span row per
                                  sequence; 1: batch * num_kv_heads + 1, span row b * num_kv_heads + h
                                  for (sequence b, KV head h) (see "Per-head spans" under Spans)   */
  int32_t score_row_capacity;  /* 0 (default): packed score layout; C >= 1: every score row has room
                                  for C tokens, C >= every seq_lens[b] (see "Layouts" at the top)   */
  /* FP8 keys (dtype KVC_DTYPE_FP8_E4M3), vLLM style: key k_hj = k_scale_h * (fp8 value), so logits
   * are scale * k_scale_h * <q, fp8 key> and KNORM is -k_scale_h * ||fp8 key||. The scales are
   * copied into the plan (on CUDA with its metadata, so an uploaded plan carries them and a graph
   * replays with the new values: they may differ between kvc_plan_compatible plans). */
  kvc_query_dtype_t query_dtype; /* dtype of the queries; AS_CACHE (default) = dtype. Another value
                                  than dtype's needs an FP8 cache (else KVC_ERROR_NOT_SUPPORTED);
                                  FP8 with SNAPKV / H2O / TOVA needs F16 or BF16 (tensor cores on
                                  CUDA) or F32 (exact fp32 on both backends): AS_CACHE there is
                                  KVC_ERROR_NOT_SUPPORTED (there are no fp8 queries)            */
  float k_scale;               /* FP8: the per-tensor scale, finite and > 0; default 1. Other dtypes:
                                  must be 1 or 0 (no scale; a desc without the field has 0)   */
  const float *k_scales;       /* FP8: host [num_kv_heads] per-KV-head scales, each finite and > 0,
                                  used instead of k_scale (not read then); NULL: k_scale for every
                                  head (default). Other dtypes: must be NULL                    */
} kvc_plan_desc_t;

#define KVC_PLAN_DESC_INIT                                                                         \
  {                                                                                                \
    sizeof(kvc_plan_desc_t), 0, 0, 0, KVC_DTYPE_F16, 0, NULL, NULL, NULL, NULL, KVC_SCORE_SNAPKV, \
        64, 5, KVC_POOL_AVG, KVC_REDUCE_MEAN, 0.0f, 0, 0, 0, 0.0f, KVC_BUDGET_FAIL,               \
        KVC_PLAN_MEMORY_OWNED, KVC_QUOTA_LARGEST_REMAINDER, KVC_WINDOW_PROTECTED, 0, 0,            \
        KVC_QUERY_DTYPE_AS_CACHE, 1.0f, NULL                                                       \
  }

/* Fills *desc with the defaults of KVC_PLAN_DESC_INIT (for callers that cannot use the macro,
 * e.g. FFI). No-op on NULL. */
KVC_API void kvc_plan_desc_init(kvc_plan_desc_t *desc);

/* Validates `desc` and builds an immutable plan on ctx's backend. Copies everything it needs: the
 * desc's arrays may be freed after the call. On CUDA with device_memory KVC_PLAN_MEMORY_OWNED (the
 * default) it allocates and uploads the plan's metadata to the device (synchronously); this is the
 * only place the pipeline allocates. With KVC_PLAN_MEMORY_CALLER it touches no device memory and
 * the plan needs kvc_plan_upload before any execute call.
 * Returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (any bad field: the detail names field, sequence,
 * span and value; k_scale / k_scales not finite and > 0, or set for a dtype other than FP8);
 * KVC_ERROR_NOT_SUPPORTED (head_dim or dtype the backend does not handle; a query_dtype other than
 * the cache's for a non-FP8 cache, or none for FP8 with SNAPKV / H2O / TOVA; CUDA: FP8 keys with
 * head_dim not a multiple of 16);
 * KVC_ERROR_BUDGET (protected tokens exceed a budget and budget_policy is KVC_BUDGET_FAIL: the
 * detail names the sequence and counts);
 * KVC_ERROR_OUT_OF_MEMORY; KVC_ERROR_CUDA. On failure *out is NULL. Synchronous.
 * Sizes: every array and workspace size is computed with overflow checks. A plan may have at most
 * 2^48 (query head, token) pairs, num_q_heads * sum of seq_lens (a 1 PiB score array), which keeps
 * every size it implies inside 64 bits; a larger one, or one whose workspace would still pass
 * SIZE_MAX, is KVC_ERROR_INVALID_VALUE (the detail names the counts), never a wrapped size. */
KVC_API kvc_status_t kvc_plan_create(kvc_context_t ctx, const kvc_plan_desc_t *desc, kvc_plan_t *out);
/* Frees the plan (its host memory and the device copy it owns; never a kvc_plan_upload buffer).
 * Accepts NULL. The caller must make sure no work that uses the plan, its upload included, is
 * still queued on a stream (e.g. synchronise first). */
KVC_API kvc_status_t kvc_plan_destroy(kvc_plan_t plan);

/* Host read-outs of a plan. */
typedef struct {
  int32_t batch;
  int32_t num_kv_heads;
  int64_t total_tokens;     /* sum of seq_lens                                                    */
  int64_t total_kept;       /* sum of k_b                                                         */
  int64_t obs_total;        /* observation queries, all sequences: rows of the `queries` array    */
  int64_t score_elems;      /* floats in the score layout = num_kv_heads * total_tokens (packed),
                               batch * num_kv_heads * score_row_capacity (fixed capacity)           */
  int64_t keep_elems;       /* int32 in the keep layout  = num_kv_heads * total_kept              */
  int64_t total_spans;      /* span_indptr[span rows]: batch or batch * num_kv_heads span rows    */
  int64_t count_elems;      /* int32 in the count layout = num_kv_heads * total_spans, or
                               total_spans with spans_per_head                                     */
  size_t keep_offset_bytes; /* where kvc_compress leaves the keep layout inside its workspace     */
  size_t compact_status_offset_bytes;  /* where kvc_compact leaves its status array (int32 [batch],
                                          kvc_compact_status_t) inside its workspace             */
  size_t compress_status_offset_bytes; /* the same array inside kvc_compress's workspace          */
} kvc_plan_info_t;

/* INVALID_VALUE if plan or info is NULL. */
KVC_API kvc_status_t kvc_plan_get_info(kvc_plan_t plan, kvc_plan_info_t *info);

/* Observation query positions the engine must supply queries for, as CSR: indptr [batch+1] and
 * positions [obs_total] (sequence b's are positions[indptr[b] .. indptr[b+1]), ascending). Row r
 * of `queries` ([obs_total][num_q_heads][head_dim]) must hold the post-RoPE query of position
 * positions[r] of its sequence. Either output may be NULL. INVALID_VALUE if plan is NULL. */
KVC_API kvc_status_t kvc_plan_obs_positions(kvc_plan_t plan, int32_t *indptr, int32_t *positions);

/* New length of every sequence after compaction: k_b, i.e. min(budgets[b], seq_lens[b]), or what
 * budget_policy made of it (|P| when clamped, n when skipped). host [batch]. The keep layout's rows
 * have these lengths. INVALID_VALUE if plan or new_lens is NULL. */
KVC_API kvc_status_t kvc_plan_new_lengths(kvc_plan_t plan, int32_t *new_lens);

/* What the plan does to every sequence: host int32 [batch] of kvc_outcome_t values (COMPRESSED,
 * WITHIN_BUDGET, CLAMPED, SKIPPED), e.g. to tell the scheduler which sequences did not shrink to
 * their budget. With the default KVC_BUDGET_FAIL only COMPRESSED and WITHIN_BUDGET occur.
 * INVALID_VALUE if plan or outcomes is NULL. Host only, no device work. */
KVC_API kvc_status_t kvc_plan_outcomes(kvc_plan_t plan, int32_t *outcomes);

/* Per user span (CSR order of the desc): FAIR span -> its quota q_p (tokens of it kept for sure);
 * PROTECT span -> its length. host [total_spans]. `implicit` (host [span rows]: batch, or
 * batch * num_kv_heads with spans_per_head; may be NULL) gets the implicit partition's quota of
 * each span row, or -1 where a row has none. With per-sequence spans the same for every KV head. */
KVC_API kvc_status_t kvc_plan_span_quotas(kvc_plan_t plan, int32_t *quotas, int32_t *implicit);

/* The next event's per-head spans after a compaction by `plan`: for every (sequence b, KV head h)
 * and every span of the plan's span row of (b, h), the span's kept tokens, which kvc_compact made
 * contiguous: [c(start), c(end)) with c(t) the number of keep row (b, h)'s indices below t. Spans
 * left with no kept token are dropped (an empty span is invalid in a plan); kind and weight are
 * kept; rows stay sorted and non-overlapping, so the output is a valid spans_per_head = 1 input
 * for the next plan of the same batch and num_kv_heads whose seq_lens are the compacted lengths
 * (kvc_plan_new_lengths) plus whatever tokens the engine appended after them (decode steps): the
 * new tokens lie in no span (the implicit partition) and every span ends at or before k_b.
 * keep: HOST int32 keep layout of the plan (kvc_select's output, on CUDA copied back first), only
 * read. out_indptr: host int32 [batch * num_kv_heads + 1], written (out_indptr[0] = 0).
 * out_spans: host kvc_span_t [out_capacity], written; may be NULL to ask for the size.
 * *out_count (required) gets the number of spans the output has, whether or not they were
 * written: call once with out_spans NULL (out_capacity ignored, out_indptr may be NULL too), size
 * the buffer, call again. Without spans in the plan every row is empty and *out_count is 0.
 * The caller owns every buffer; nothing is kept. Host only, synchronous, on any backend's plan
 * (ctx, of the plan's backend, holds the detail of a failure).
 * Returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (ctx, plan, keep or out_count NULL; plan of another
 * backend or device; a keep row with an index outside [0, n_b) or not strictly ascending: the
 * detail names the sequence, head, position and value, nothing is written; out_spans given with
 * out_indptr NULL or out_capacity below *out_count: the detail names out_capacity and the count
 * needed, nothing but *out_count is written; more than 2^31 - 1 spans in all). */
KVC_API kvc_status_t kvc_spans_after_compaction(kvc_context_t ctx, kvc_plan_t plan, const int32_t *keep,
                                                kvc_span_t *out_spans, int64_t out_capacity, int32_t *out_indptr,
                                                int64_t *out_count);

typedef enum {
  KVC_OP_SCORE = 0,
  KVC_OP_SELECT = 1,
  KVC_OP_COMPACT = 2,
  KVC_OP_RETENTION = 3,
  KVC_OP_COMPRESS = 4
} kvc_op_t;

/* Workspace bytes the execute call `op` needs with this plan on its backend (may be 0; a NULL
 * workspace is then fine). The CUDA score workspace of SNAPKV, H2O and TOVA is the sum of these
 * terms, in this order, each but the last rounded up to a multiple of 256:
 *   [ obs_total * num_q_heads * C * 8 ]   normaliser partials (max, sum) per key split; only when
 *                                         C > 1
 *   + obs_total * num_q_heads * 4         normalisers (log-sum-exp), carved even when kvc_score
 *                                         gets the engine's `lse`
 *   + num_q_heads * total_tokens * 4      attention per query head, before pooling
 * C is the number of splits of the keys for the normaliser kernel, chosen so that short
 * observation sets (SnapKV's window) still fill the device: with n_max the longest sequence,
 * G = num_q_heads / num_kv_heads, obs_b the observation queries of sequence b and
 * R = num_kv_heads * sum_b ceil(G * obs_b / 64) (blocks of 64 (query, q head) rows),
 *     C0 = max(1, min(ceil(1024 / R), ceil(n_max / 512))),  S = 64 * ceil(ceil(n_max / C0) / 64),
 *     C = ceil(n_max / S)   (keys per split: S).
 * Never the [heads x window x n] attention matrix, nor any logit. 0 for KNORM and STREAMING.
 * Over L layers (kvc_plan_workspace_layout) each of the three terms is L times its size, before
 * the rounding: every layer's normalisers and head scores live at once (one launch for all).
 * SELECT on CUDA, with R = num_kv_heads rows per sequence (1 for TOVA) and P the batch's partitions
 * (FAIR spans, plus one implicit partition per sequence that has tokens outside them): 16 * R * P
 * bytes of partition thresholds (with spans_per_head R = 1 and P the partitions of every
 * (sequence, KV head) row); and for the rows split across blocks (sequences longer than the
 * plan's segment length S, 4k..16k tokens chosen for the device so that every resident block gets a
 * segment; KVC_SELECT_SEGMENT overrides it, read once by kvc_plan_create) 1 KiB per (row, split
 * partition) of global histograms, 20 bytes per row of state and arrival counter and 4 per (row,
 * segment of S tokens). On CPU 17 bytes per token of the longest sequence (one row at a time).
 * COMPACT: the status array, int32 [batch], first; then on CPU 4 * total_tokens (the page-id check's
 * scratch); on CUDA 12 bytes per chunk of consecutive keep-layout writers (at most
 * num_kv_heads * total_kept of them, fewer at large sizes), 8 + 4 * batch, and the page-claim table
 * of the shared-page check: 8 * 2^ceil(log2(2 * total_tokens)) bytes (one slot for every page a
 * sequence could use, at page size 1). RETENTION needs none. COMPRESS is the keep and score
 * layouts, then the largest of the score, select and compact workspaces (compaction's status
 * array at its start). The layer-batched calls: kvc_plan_workspace_layout.
 * INVALID_VALUE if plan or bytes is NULL or op unknown. */
KVC_API kvc_status_t kvc_plan_workspace_size(kvc_plan_t plan, kvc_op_t op, size_t *bytes);

/* ============================================================================================= */
/* Plans in a caller's device buffer (CUDA graphs)                                               */
/* ============================================================================================= */
/*
 * FlashInfer-style plan/run: a CUDA plan made with device_memory KVC_PLAN_MEMORY_CALLER allocates
 * no device memory; kvc_plan_upload copies its metadata (the "image", host memory the plan owns)
 * into a device buffer the caller owns, asynchronously on a stream, and points the plan at it.
 * The execute calls then read that buffer. An engine keeps one buffer (and one workspace, cache
 * descriptor, query and lse buffers at fixed addresses) and captures kvc_compress (or the stage
 * calls) into a CUDA graph once; at every later event of the same shapes it builds the event's
 * plan, uploads it into the same buffer on the graph's stream and replays the graph.
 *
 * Why "the same shapes". A graph freezes each kernel's grid and its by-value arguments. The
 * kernels get the plan by value: its scalars (batch, heads, head_dim, dtype, method, pooling,
 * scale, token / kept / observation totals and maxima) and its array pointers, which are fixed
 * offsets into the buffer once the arrays have the same sizes. The launchers also read part of the
 * plan on the host while enqueuing (per-sequence lengths, observation rows, scoring domains,
 * partition counts). Only the contents of the device arrays may differ between replays: span
 * boundaries, kinds and weights, quotas, the protected-token bitmask, the global fill. So two
 * plans are interchangeable exactly when kvc_plan_compatible says so, which holds when their descs
 * differ only in
 *     span start / end / kind / weight (the same spans_per_head, the same number of spans per span
 *     row, the same number of FAIR spans, and tokens outside every FAIR span in both or in
 *     neither), sink_tokens,
 *     recent_tokens, fairness, budgets and budget_policy (as long as every sequence keeps the same
 *     number of tokens), and device_memory;
 * with span_local the FAIR spans must also sit where they sat (they are the scoring domains).
 * Everything else, seq_lens, score_row_capacity and the resulting keep lengths included, must be
 * equal: a graph does
 * not replay across different lengths. Steady-state decode re-compression is the case that does:
 * every sequence compressed to its budget, then grown by the same N decode steps, gives the same
 * lengths at every event. (Moving the totals out of the by-value view, into device arrays with
 * capacity-sized grids, would lift that restriction; it is not done.)
 * kvc_plan_upload itself is not meant to be captured: enqueue it before the replay on the same
 * stream.
 *
 * The CPU backend has no device memory: kvc_plan_device_bytes gives 0, device_memory is ignored,
 * kvc_plan_upload checks ctx and plan and does nothing else, and plans always read their image.
 */

/* Bytes of device memory the plan's metadata takes (the size kvc_plan_upload needs); 0 on CPU.
 * INVALID_VALUE if plan or bytes is NULL. Host only. */
KVC_API kvc_status_t kvc_plan_device_bytes(kvc_plan_t plan, size_t *bytes);

/* The plan's host image, the source kvc_plan_upload copies from: *image (owned by the plan, valid
 * and unchanged until kvc_plan_destroy; page-aligned, in pages no other allocation shares) and
 * *bytes (kvc_plan_device_bytes on CUDA). A caller that wants the copy truly asynchronous may
 * page-lock it (cudaHostRegister(image, bytes, 0), and cudaHostUnregister before destroying the
 * plan); from pageable memory the CUDA runtime stages the copy itself. INVALID_VALUE if an
 * argument is NULL. Host only. */
KVC_API kvc_status_t kvc_plan_host_image(kvc_plan_t plan, const void **image, size_t *bytes);

/* Enqueues on `stream` the copy of the plan's image into `device_buffer` (device memory of ctx's
 * device, at least kvc_plan_device_bytes bytes, 256-byte aligned; owned by the caller, who frees
 * it after the plan's last use) and makes every later execute call with the plan read that buffer.
 * Works on OWNED plans too (they then read the caller's buffer; their own copy stays until
 * destroy). Asynchronous: returns once the copy is enqueued (cudaMemcpyAsync, no device
 * synchronisation, no allocation). Work on `stream` after it sees the new metadata; work on other
 * streams must be ordered after it by the caller (events). The image must stay valid until the
 * stream has passed the copy, so do not destroy the plan before that; nor may the buffer be
 * overwritten (by uploading another plan into it) while work that reads it is still queued,
 * unless that upload is on the same stream, behind that work. This call changes the plan: do not
 * make it while another thread uses the same plan.
 * Returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (ctx or plan NULL, plan from another backend or
 * device, device_buffer NULL or not 256-byte aligned); KVC_ERROR_WORKSPACE_TOO_SMALL (bytes below
 * kvc_plan_device_bytes); KVC_ERROR_CUDA (the copy could not be enqueued). On failure the plan is
 * unchanged. CPU backend: KVC_SUCCESS and nothing happens (device_buffer and bytes are ignored). */
KVC_API kvc_status_t kvc_plan_upload(kvc_context_t ctx, kvc_plan_t plan, void *device_buffer, size_t bytes,
                                     kvc_stream_t stream);

/* *compatible = 1 when a graph captured with plan `a` replays plan `b`'s event correctly once `b`
 * is uploaded into the buffer `a` read during the capture (the same workspace, cache descriptor,
 * queries and lse buffers, at the same addresses, holding `b`'s event); else 0. See "Why the same
 * shapes" above for what may differ. Symmetric. Host only, reads both plans' host data.
 * INVALID_VALUE if an argument is NULL. */
KVC_API kvc_status_t kvc_plan_compatible(kvc_plan_t a, kvc_plan_t b, int *compatible);

/* ============================================================================================= */
/* Execute calls (never allocate, never synchronise; see the conventions at the top)             */
/* Each returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (NULL ctx/plan/pointer, plan from another   */
/* backend, cache descriptor not matching the plan or breaking its layout rules, bad page size,  */
/* CPU: page id out of range or shared); KVC_ERROR_WORKSPACE_TOO_SMALL; KVC_ERROR_NOT_SUPPORTED; */
/* KVC_ERROR_CUDA (a launch failed, or an error of the caller's earlier CUDA work was already    */
/* pending on the calling thread: then nothing is enqueued, the detail says so and the error is */
/* left pending, since cudaGetLastError would otherwise report it as the library's).             */
/* ============================================================================================= */

/* Scores every token. `queries`: [obs_total][num_q_heads][head_dim] in the plan's query dtype, row order
 * of kvc_plan_obs_positions (NULL allowed when obs_total is 0). `scores`: score layout, written,
 * or added to when accumulate != 0 (H2O accumulated across decode steps). The cache is only read.
 * On CUDA the methods that read K (all but STREAMING) copy it and the queries 16 bytes at a time:
 * the K pool's address, its three strides in bytes and `queries` must be multiples of 16 (true of
 * every layout above with cudaMalloc'd pools, head_dim being a multiple of 8), else
 * KVC_ERROR_NOT_SUPPORTED (the detail gives the values). FP8 keys on CUDA: head_dim must be a
 * multiple of 16 (whole 16-byte copies of a row; kvc_plan_create checks it); the fp8 bytes are
 * copied as they are and widened to the query dtype in shared memory (exactly: every e4m3 value
 * is an f16 and a bf16 value), k_scale folded into the logit scale.
 *
 * `lse` (optional; NULL: the library computes it) is the softmax normaliser of every observation
 * row, as the engine's attention kernel already has it: float [obs_total][num_q_heads] (same
 * memory space as `queries`), row r and q head g holding the natural-log log-sum-exp
 *     lse[r][g] = ln( sum over the keys j the row sees of exp(scale * <q_rg, k_hj>) )
 * with the plan's resolved scale (1/sqrt(head_dim) when desc.scale is 0), over exactly the keys
 * [lo_r, p_r] of the scoring semantics above: without span_local that is the causal prefix
 * [0, p_r], i.e. what a causal prefill's attention normalises over. With it the attention methods
 * skip their normaliser pass (on CUDA the normaliser kernel: about half of the scoring work).
 * Ignored by KNORM and STREAMING. With `lse`, a NaN or inf entry makes that row's contribution NaN
 * (as a non-finite logit does without it). A non-finite logit then poisons the whole row on the
 * CPU backend, which computes every logit a row sees anyway, but only its own (row, key)
 * contribution on CUDA, whose kernels see a row's logits in separate key tiles once the normaliser
 * pass is gone (finding it would take that pass back).
 * Where an engine has it:
 *   FlashAttention (flash_attn_func / flash_attn_varlen_func with return_attn_probs=True; FA3's
 *   flash_attn_func returns it too): softmax_lse is exactly this (natural log, of the logits times
 *   softmax_scale), laid out [batch][num_heads][seqlen_q] or, varlen, [num_heads][total_q]: take
 *   the observation rows and transpose to [row][head].
 *   FlashInfer (the prefill / decode wrappers' run(..., return_lse=True)): [total_q][num_qo_heads],
 *   but in base 2 by default (its kernels fold log2 e into the scale and return
 *   max + log2(sum of exp2), i.e. this lse divided by ln 2): multiply by ln 2 = 0.6931471806
 *   (releases that take lse_base="ln" return this convention directly), then take the rows.
 *   Either way with the plan's scale as the softmax scale and causal. Under span_local, passing the
 *   causal prefix's normaliser instead (what the engine's attention has) scores each span with the
 *   full causal softmax sliced to the span's keys, as the paper's code does, rather than a softmax
 *   over the span alone. */
KVC_API kvc_status_t kvc_score(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                               const void *queries, const float *lse, float *scores, int accumulate,
                               void *workspace, size_t workspace_bytes, kvc_stream_t stream);

/* Selects the kept tokens from `scores` (score layout, read only) into `keep` (keep layout):
 * exactly k_b ascending indices per row, by the selection semantics of the plan. */
KVC_API kvc_status_t kvc_select(kvc_context_t ctx, kvc_plan_t plan, const float *scores,
                                int32_t *keep, void *workspace, size_t workspace_bytes,
                                kvc_stream_t stream);

/* Per-sequence result of a compaction, int32 flags ORed together; 0: the sequence was compacted
 * (or needed no move). Nonzero: the sequence was left untouched, every head, pool and extra. The
 * CUDA backend checks a sequence's first ceil(n_b / page_size) page-table entries on the device;
 * the CPU backend refuses every such table with KVC_ERROR_INVALID_VALUE instead, so its array is
 * all zeros after a successful call. */
typedef enum {
  KVC_COMPACT_OK = 0,
  KVC_COMPACT_BAD_PAGE_ID = 1,     /* a page id it uses lies outside [0, num_pages)                   */
  KVC_COMPACT_SHORT_PAGE_LIST = 2, /* CSR: page_indptr[b] < 0, or fewer entries than its tokens need  */
  KVC_COMPACT_SHARED_PAGE = 4,     /* a page it uses is also used by another sequence, or twice by it
                                      (every sequence using that page gets the flag)                */
  KVC_COMPACT_BAD_POOL = 8,        /* layer-batched call on CUDA: this layer's k or v is NULL, k == v,
                                      K and V rows overlap, a pool runs past the address space or is
                                      not aligned to the copy width (kvc_compact_layers)            */
  /* out-of-place compaction on CUDA (kvc_compact_into and the other *_into calls) */
  KVC_COMPACT_DST_BAD_PAGE_ID = 16,     /* a destination page id it uses lies outside [0, num_pages) */
  KVC_COMPACT_DST_SHORT_PAGE_LIST = 32, /* destination CSR: dst page_indptr[b] < 0, or fewer entries
                                           than its kept tokens need                                 */
  KVC_COMPACT_DST_OVERLAP = 64          /* a destination page it uses is a source page of any sequence
                                           of the batch, or is also a destination page of another
                                           sequence (or twice of its own; both sequences flagged)    */
} kvc_compact_status_t;

/* In place, for every (sequence, KV head) and j < k_b: slot j <- slot keep[j] for K and V, and for
 * each of the `num_extras` per-token fp32 arrays extras[e] (the plan's score layout, e.g.
 * accumulated H2O scores: after the call, row (b, h) of an extra holds its k_b kept values at the
 * front of the row, the rest is unchanged; with a fixed score_row_capacity the row stays where it
 * is, so the next event's plans, with seq_lens k_b + appended tokens and the same capacity,
 * continue accumulating into it: the caller zeroes positions [k_b, n'_b) of each row, which still
 * hold stale values, before the first accumulate of the new tokens). `extras` is a host array of num_extras pointers (NULL when 0). `keep`
 * must come from kvc_select with this plan (strictly ascending, in [0, n_b)): the CPU backend checks
 * every row and returns INVALID_VALUE before moving anything; the CUDA backend ignores out-of-range
 * entries, and a non-ascending row can scramble that sequence's own tokens but never touches
 * another sequence's pages. On CUDA the pools must be aligned to their element size. Slots >= k_b
 * keep stale data and pages past ceil(k_b / page_size) are the engine's to free. Positions are not
 * rewritten: cached keys keep their RoPE and the engine continues positions from the old length. Sequences whose
 * budget >= length are not touched.
 * Status: the call leaves int32 [batch] kvc_compact_status_t flags in its workspace at byte offset
 * kvc_plan_info_t.compact_status_offset_bytes (valid once the stream has run the call, after a
 * KVC_SUCCESS return; read it back like any device result). */
KVC_API kvc_status_t kvc_compact(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                 const int32_t *keep, float *const *extras, int32_t num_extras,
                                 void *workspace, size_t workspace_bytes, kvc_stream_t stream);

/* Counts, per (sequence, KV head, user span), the kept indices inside the span (count layout; with
 * spans_per_head, the spans of each (sequence, KV head)'s own row). */
KVC_API kvc_status_t kvc_retention(kvc_context_t ctx, kvc_plan_t plan, const int32_t *keep,
                                   int32_t *counts, void *workspace, size_t workspace_bytes,
                                   kvc_stream_t stream);

/* kvc_score (accumulate = 0) + kvc_select + kvc_compact (no extras) on the caller's workspace
 * (kvc_plan_workspace_size(plan, KVC_OP_COMPRESS)). `lse` as for kvc_score (may be NULL).
 * Afterwards the keep layout is left in the workspace at byte offset
 * kvc_plan_info_t.keep_offset_bytes, e.g. for kvc_retention, and compaction's status array at
 * kvc_plan_info_t.compress_status_offset_bytes. Returns what the stages return, a failure naming
 * the stage's call; compaction's host-side checks of the cache and its page table (on CPU: a page
 * shared by two sequences) run first, so a cache that compaction would refuse costs no scoring. */
KVC_API kvc_status_t kvc_compress(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                  const void *queries, const float *lse, void *workspace,
                                  size_t workspace_bytes, kvc_stream_t stream);

/* ============================================================================================= */
/* Observation queries from the engine's packed q                                                */
/* ============================================================================================= */
/*
 * Engines keep the queries of a forward pass packed, FlashInfer / vLLM style: q [tokens][Hq][D]
 * with qo_indptr [batch+1], sequence b's tokens being rows qo_indptr[b] .. qo_indptr[b+1]. Those
 * rows are the sequence's NEWEST len_b = qo_indptr[b+1] - qo_indptr[b] tokens: they hold positions
 * [n_b - len_b, n_b) in order, where n_b = seq_lens[b] of the plan, the convention FlashInfer's
 * causal mask uses (query i of a request sits at kv_len - qo_len + i). So a whole prefill
 * (len_b = n_b), the last chunk of a chunked prefill and a decode step (len_b = 1) are all
 * described by qo_indptr alone. kvc_gather_queries copies the plan's observation rows out of it.
 *
 * Compressing layer by layer inside the forward pass (nothing stashed, the usual choice):
 *     plan = kvc_plan_create(...)                      once per event, before the forward pass
 *     for each layer l:
 *         attention(q_l, k_l, v_l) writes layer l's K/V into its pages   (the engine's kernel)
 *         kvc_gather_queries(ctx, plan, q_l, tokens, 0, qo_indptr, queries, stream)
 *         kvc_compress(ctx, plan, &cache_l, queries, lse_l or NULL, ws, ws_bytes, stream)
 * One `queries` buffer (obs_total * Hq * D elements) and one workspace serve every layer: each
 * layer's gather is ordered after the previous layer's compress on the stream (kvpress compresses
 * in the same place, a forward hook after each attention layer); the next step's attention sees
 * kvc_plan_new_lengths tokens per sequence. Stashing instead (gather every layer's rows during the
 * pass, compress all layers afterwards) costs num_layers * obs_total * Hq * D elements of memory
 * but keeps the forward pass free of compression kernels. Either way the prefill's own outputs do
 * not change: layer l's attention ran on its full K/V before layer l was compressed. With a chunked prefill, compress after
 * the last chunk; if that chunk is shorter than the observation window (or span_local puts
 * observation rows in earlier chunks), stash those rows from earlier chunks yourself or lower
 * `window`: the gather reads only the packed rows it is given.
 */

/* Gathers the plan's observation queries from packed q into `queries`
 * ([obs_total][num_q_heads][head_dim], row order of kvc_plan_obs_positions, kvc_score's layout).
 * packed_q: num_tokens rows, token t's element (head g, dim d) at
 *     packed_q[t * token_stride + g * head_dim + d]      (query dtype; heads contiguous in a row)
 * token_stride in elements, 0 = num_q_heads * head_dim (packed q), larger for q inside a fused qkv
 * tensor. qo_indptr: int32 [batch+1] as described above. Row r, of sequence b at position p, gets
 * packed row qo_indptr[b] + p - (n_b - len_b). packed_q and queries must not overlap.
 * Memory: packed_q, qo_indptr and queries are device memory on CUDA (host memory on CPU).
 * On CUDA the pointers must be aligned to the dtype's size; rows are copied in 16-byte vectors
 * when the pointers and the byte stride allow. Nothing is allocated; asynchronous on CUDA like
 * every execute call (capturable in a graph), synchronous on CPU.
 * Bad rows: the CPU backend checks qo_indptr first and copies nothing when qo_indptr[0] < 0, an
 * entry is below the one before or past num_tokens, a sequence has more packed rows than tokens,
 * or its packed rows do not reach back to its first observation position. The CUDA backend, which
 * cannot read qo_indptr on the host, writes every row it cannot find that way as zeros (and reads
 * nothing outside [0, num_tokens) rows of packed_q).
 * With obs_total 0 (KNORM, STREAMING) nothing is read or written and the pointers may be NULL.
 * Returns KVC_SUCCESS; KVC_ERROR_INVALID_VALUE (NULL ctx / plan / pointer, plan of another backend
 * or without its device copy, num_tokens < 0, token_stride below num_q_heads * head_dim, an
 * extent past 64-bit offsets, CUDA: a misaligned pointer, CPU: the qo_indptr checks above);
 * KVC_ERROR_CUDA (the launch failed). */
KVC_API kvc_status_t kvc_gather_queries(kvc_context_t ctx, kvc_plan_t plan, const void *packed_q, int64_t num_tokens,
                                        int64_t token_stride, const int32_t *qo_indptr, void *queries,
                                        kvc_stream_t stream);

/* ============================================================================================= */
/* Every layer in one call                                                                       */
/* ============================================================================================= */

/*
 * An engine compresses all layers of a model in one event: the same sequences, budgets and spans
 * (one plan), the same page table and pool layout (one cache descriptor), but per-layer K and V
 * pools and per-layer queries. The layer-batched calls below take them as arrays of num_layers
 * pointers and run each stage once for all layers (one launch per kernel, the layer a grid axis),
 * with results identical to num_layers single-layer calls.
 *
 * The cache descriptor passed beside kvc_layers_t gives the layout and the page table; its k and v
 * must be NULL (the layers' pools replace them; a non-NULL one is KVC_ERROR_INVALID_VALUE, so a
 * single-layer descriptor is not passed by mistake). Per-layer arrays of the other arguments are
 * the single-layer layouts stacked: layer l's scores at scores + l * score_elems, its keep layout at
 * keep + l * keep_elems, its counts at counts + l * count_elems (kvc_plan_info_t element counts).
 *
 * Memory of the pointer arrays: host memory on CPU, where every layer's pools are checked like a
 * single-layer descriptor's (present, distinct) before anything moves, the failure naming the
 * layer. On CUDA, device memory the kernels read (so the
 * call is capturable in a CUDA graph, and the pointers may change between replays without a new
 * capture); the arrays are not read on the host, so the CUDA backend checks their entries on the
 * device: a layer whose pools fail the checks a single-layer descriptor's pools get (present,
 * distinct, no K row overlapping a V row, aligned) is left untouched by compaction
 * (KVC_COMPACT_BAD_POOL).
 * Scoring on CUDA (kvc_score_layers, the first stage of kvc_compress_layers) likewise reads the
 * arrays only in its kernels. A layer they cannot read: layers->k[l] NULL or not 16-byte aligned
 * (every method but STREAMING, which reads neither K nor queries), or, for SNAPKV, H2O and TOVA
 * with observation queries, layers->queries[l] NULL or not 16-byte aligned or layers->lse[l] not
 * 4-byte aligned. Such a layer is not read at all and scores as if every element of its K pool
 * were NaN (the non-finite rule): NaN for every key the method scores (accumulating too: NaN + x
 * is NaN), +inf for the keys it does not score, as always; the other layers are unaffected. NaN
 * rather than leaving the scores as they were, so that stale or uninitialised scores never pass for
 * real ones: the engine can see the bad layer in its scores, and selection orders NaN below every
 * number. In kvc_compress_layers a NULL or misaligned K pool also fails compaction's pool check,
 * which leaves that layer untouched (KVC_COMPACT_BAD_POOL); a layer with bad queries but good
 * pools is compacted by its NaN scores (nothing flags it), so an engine that cannot rule that out
 * should score with kvc_score_layers and check. The CPU backend reads the arrays on the host and
 * refuses a NULL pool or query pointer with KVC_ERROR_INVALID_VALUE naming the layer, before
 * anything is written (it needs no 16-byte alignment). On CUDA num_layers * num_kv_heads must be
 * at most 65535 (the score kernels' grid), else KVC_ERROR_NOT_SUPPORTED, from
 * kvc_plan_workspace_layout (SCORE, COMPRESS) as from the calls.
 */
typedef struct {
  int32_t num_layers;          /* L >= 1                                                          */
  void *const *k;              /* [L] K pool of each layer (layout of the cache descriptor)      */
  void *const *v;              /* [L] V pool of each layer                                       */
  const void *const *queries;  /* [L] each as kvc_score's `queries`, or NULL (as a whole) when the
                                  plan has no observation queries; read by scoring only          */
  const float *const *lse;     /* [L] each as kvc_score's `lse` (an entry may be NULL: computed),
                                  or NULL as a whole; read by scoring only                       */
} kvc_layers_t;

/* Workspace of the layer-batched call of `op` over num_layers layers (num_layers 1: the single-layer
 * call's, kvc_plan_workspace_size), and where the call leaves its results in it:
 *   keep_offset_bytes     COMPRESS: layer l's keep layout starts at keep_offset_bytes
 *                         + l * 4 * keep_elems (0 for the other ops)
 *   status_offset_bytes   COMPACT, COMPRESS: the int32 [num_layers][batch] kvc_compact_status_t
 *                         array (layer l's sequence b at index l * batch + b; 0 for other ops)
 * Which terms of kvc_plan_workspace_size's list scale with num_layers: SELECT on CUDA all of them
 * (each layer's thresholds and split-row histograms), on CPU none (one row at a time); COMPACT the
 * status array and the chunk flags, while the page-table check (CPU scratch, CUDA claim table) is
 * done once for all layers; SCORE on CUDA all of them (the three terms of kvc_plan_workspace_size
 * for SNAPKV, H2O and TOVA, each L times: all layers are scored in one launch per kernel), on CPU
 * none (one layer after another); COMPRESS the keep and score layouts, then the largest stage. So
 * the plan needs no layer count: ask here for the L you will pass. INVALID_VALUE if plan or layout
 * is NULL, op unknown or num_layers < 1 (or the size overflows); NOT_SUPPORTED (SCORE, COMPRESS on
 * CUDA) if num_layers * num_kv_heads exceeds 65535. */
typedef struct {
  size_t workspace_bytes;
  size_t keep_offset_bytes;
  size_t status_offset_bytes;
} kvc_workspace_layout_t;

KVC_API kvc_status_t kvc_plan_workspace_layout(kvc_plan_t plan, kvc_op_t op, int32_t num_layers,
                                               kvc_workspace_layout_t *layout);

/* kvc_score for every layer: layer l scores from layers->k[l] (and v's layout) with
 * layers->queries[l] and layers->lse[l] into its stacked score layout, all layers in one launch per
 * kernel. accumulate as kvc_score. On CUDA a layer whose pointers the kernels cannot read scores
 * NaN (see kvc_layers_t); on CUDA, for the methods that read K (all but STREAMING), the
 * descriptor's K strides must still be multiples of 16 bytes (KVC_ERROR_NOT_SUPPORTED, as for
 * kvc_score). */
KVC_API kvc_status_t kvc_score_layers(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                      const kvc_layers_t *layers, float *scores, int accumulate,
                                      void *workspace, size_t workspace_bytes, kvc_stream_t stream);

/* kvc_select for every layer: num_layers stacked score layouts in, stacked keep layouts out. */
KVC_API kvc_status_t kvc_select_layers(kvc_context_t ctx, kvc_plan_t plan, int32_t num_layers,
                                       const float *scores, int32_t *keep, void *workspace,
                                       size_t workspace_bytes, kvc_stream_t stream);

/* kvc_compact for every layer: layer l's pools layers->k[l], layers->v[l] are compacted by its
 * stacked keep layout; each extras[e] (host array of num_extras pointers) holds num_layers stacked
 * score layouts. The page table is checked once for all layers; the status array is
 * [num_layers][batch] (kvc_plan_workspace_layout). On CUDA every layer's pools must be aligned to
 * the widest of 16, 8, 4, 2, 1 bytes that divides head_dim * element size and every byte stride
 * (the pointers are not read on the host); a layer that is not is left untouched and flagged. */
KVC_API kvc_status_t kvc_compact_layers(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                        const kvc_layers_t *layers, const int32_t *keep,
                                        float *const *extras, int32_t num_extras, void *workspace,
                                        size_t workspace_bytes, kvc_stream_t stream);

/* kvc_retention for every layer: stacked keep layouts in, stacked count layouts out. */
KVC_API kvc_status_t kvc_retention_layers(kvc_context_t ctx, kvc_plan_t plan, int32_t num_layers,
                                          const int32_t *keep, int32_t *counts, void *workspace,
                                          size_t workspace_bytes, kvc_stream_t stream);

/* kvc_compress for every layer (score, select, compact) on the workspace of
 * kvc_plan_workspace_layout(plan, KVC_OP_COMPRESS, layers->num_layers), which tells where the
 * stacked keep layouts and the status array are left. */
KVC_API kvc_status_t kvc_compress_layers(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                         const kvc_layers_t *layers, void *workspace,
                                         size_t workspace_bytes, kvc_stream_t stream);

/* ============================================================================================= */
/* Out-of-place compaction (copy-on-write of shared prefix blocks)                               */
/* ============================================================================================= */
/*
 * With prefix caching an engine shares full blocks between requests (vLLM), so compacting them in
 * place would corrupt every other request that reads them. The *_into calls write each sequence's
 * kept rows to pages the engine has just allocated instead, in the same pools (vLLM's copy-on-write
 * allocates the new blocks from the same pool): the source pages are only read.
 *
 * The destination table has the source table's shape rules, with k_b kept tokens instead of n_b:
 * kept token j of sequence b goes to page dpages_b[j / page_size], slot j % page_size, where
 *     dpages_b = page_table + b * max_pages            (dense: page_indptr == NULL)
 *     dpages_b = page_table + page_indptr[b]           (CSR)
 * and only the first ceil(k_b / page_size) entries of dpages_b are read. The cache descriptor's
 * pools, dtype, strides, page_size and num_pages serve both tables.
 *
 * What is written: for every (sequence b, KV head h) and j < k_b, destination slot j <- source
 * slot keep[j] for K and V (k_b = n_b, a sequence the plan does not compress: a plain copy of its
 * n_b tokens, its keep rows not read), so that afterwards the destination table describes every
 * sequence of the batch, each with kvc_plan_new_lengths tokens. Nothing else changes: no source
 * page, no slot of a destination page past k_b (the tail of the last one), no other page. The
 * extras are not in pages and are compacted in place exactly as by kvc_compact.
 *
 * Rules for the tables (dst pages are the first ceil(k_b / page_size) entries of each sequence's
 * destination list, source pages the first ceil(n_b / page_size) of its source list):
 *   - ids in [0, num_pages); a CSR list with page_indptr[b] >= 0 and enough entries;
 *   - no dst page is a source page of ANY sequence of the batch, and no page is the dst page of
 *     two sequences or twice of one;
 *   - source pages MAY be shared between sequences (the prefix-caching case): they are only read.
 * The CPU backend checks all of it on the host before moving anything (KVC_ERROR_INVALID_VALUE,
 * the detail naming the table, sequence, list index and page). The CUDA backend checks the same on
 * the device and leaves every offending sequence untouched (no destination page written, extras
 * unchanged) with KVC_COMPACT_DST_BAD_PAGE_ID, _DST_SHORT_PAGE_LIST or _DST_OVERLAP in the status
 * array (plus KVC_COMPACT_BAD_PAGE_ID / _SHORT_PAGE_LIST for a bad source list, as in place);
 * KVC_COMPACT_SHARED_PAGE does not occur. The other sequences are compacted. So whatever the
 * tables hold, no byte outside a sequence's own destination pages is written, and never a source
 * page. Keep rows as for kvc_compact: checked on the CPU (INVALID_VALUE); on CUDA an entry outside
 * [0, n_b) leaves its destination slot unwritten.
 *
 * Synchronicity, memory and workspace as for the in-place call it mirrors: the same workspace size
 * (kvc_plan_workspace_size / kvc_plan_workspace_layout of the same op) and the same status array
 * in it. The destination table is host memory on CPU and device memory on CUDA (like the source
 * table); the kvc_page_table_t struct itself is host memory, read during the call only.
 * Returns what the in-place call returns, and KVC_ERROR_INVALID_VALUE when dst is NULL, its
 * page_table is NULL, its page_indptr aliases its page_table, a dense dst table's max_pages is below
 * ceil(max k_b / page_size), or (CPU) the table rules above fail. The source table is checked as
 * for the in-place call except that shared source pages are allowed.
 */
typedef struct {
  const int32_t *page_table;  /* dense [batch][max_pages] or CSR indices; never NULL             */
  const int32_t *page_indptr; /* [batch+1] CSR offsets, or NULL for dense                        */
  int32_t max_pages;          /* row length of the dense table (ignored for CSR)                 */
} kvc_page_table_t;

/* kvc_compact, out of place: keep rows of the source pages of `cache` into the pages of `dst`. */
KVC_API kvc_status_t kvc_compact_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                      const kvc_page_table_t *dst, const int32_t *keep, float *const *extras,
                                      int32_t num_extras, void *workspace, size_t workspace_bytes,
                                      kvc_stream_t stream);

/* kvc_compress with its compaction out of place (kvc_compact_into); the cache is scored from the
 * source pages. Workspace and what it leaves there as for kvc_compress; the destination table is
 * among compaction's checks that run before scoring (all of its checks on CPU), the failure naming
 * kvc_compact_into (kvc_compact_layers_into for the layered call). */
KVC_API kvc_status_t kvc_compress_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                       const kvc_page_table_t *dst, const void *queries, const float *lse,
                                       void *workspace, size_t workspace_bytes, kvc_stream_t stream);

/* kvc_compact_layers, out of place: one destination table for every layer (the tables are
 * checked once; on CUDA a flagged sequence is left untouched in every layer). */
KVC_API kvc_status_t kvc_compact_layers_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                             const kvc_layers_t *layers, const kvc_page_table_t *dst,
                                             const int32_t *keep, float *const *extras, int32_t num_extras,
                                             void *workspace, size_t workspace_bytes, kvc_stream_t stream);

/* kvc_compress_layers with its compaction out of place (kvc_compact_layers_into). */
KVC_API kvc_status_t kvc_compress_layers_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                              const kvc_layers_t *layers, const kvc_page_table_t *dst,
                                              void *workspace, size_t workspace_bytes, kvc_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* KVCOMPRESS_H */
