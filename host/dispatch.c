/*
 * dispatch.c - the execute calls: argument and cache-descriptor checks (host-visible data only),
 * the one place that picks the CPU or CUDA implementation of an op, and kvc_compress.
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "device.h"
#include "internal.h"

kvc_op_fn kvc_op_for(kvc_backend_t backend, kvc_op_t op) {
  static const kvc_op_fn cpu[] = {kvc_score_cpu, kvc_select_cpu, kvc_compact_cpu, kvc_retention_cpu};
#ifdef KVC_WITH_CUDA
  static const kvc_op_fn cuda[] = {kvc_score_cuda, kvc_select_cuda, kvc_compact_cuda, kvc_retention_cuda};
  if (backend == KVC_BACKEND_CUDA) return cuda[op];
#endif
  return cpu[op];
}

/* The CPU backend checks every page id an op will use before touching memory; for compaction it
 * also proves that no page belongs to two sequences (or twice to one), by sorting the ids in a
 * scratch array of at most one id per token. The CUDA backend cannot read the table on the host:
 * its compaction checks on the device. Both leave compaction's status array first. */
void kvc_carve_dispatch(const kvc_plan_view_t *plan, kvc_backend_t backend, kvc_op_t op, int32_t num_layers,
                        kvc_carver_t *ws, int32_t **page_scratch, int32_t **compact_status) {
  int32_t *status = NULL, *scratch = NULL;
  if (op == KVC_OP_COMPACT) status = (int32_t *)kvc_carve(ws, sizeof(int32_t) * (size_t)num_layers * (size_t)plan->batch);
  if (backend == KVC_BACKEND_CPU && op == KVC_OP_COMPACT)
    scratch = (int32_t *)kvc_carve(ws, sizeof(int32_t) * (size_t)plan->total_tokens);
  if (page_scratch) *page_scratch = scratch;
  if (compact_status) *compact_status = status;
}

static int compare_ids(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

/* The pools' layout: strides positive, every element and byte offset the descriptor can address
 * inside int64 (and inside the address space), no two rows of a pool overlapping, and no K row
 * overlapping a V row. Backend-independent: only the descriptor's scalars and pointers are read.
 * Without `pools` (a layer-batched call's descriptor, whose k and v are NULL) only the layout:
 * each layer's pools are then checked on their own (check_layer_pools, or on the device). */
static kvc_status_t check_layout(kvc_context_t ctx, const char *fn, const kvc_plan_view_t *plan,
                                 const kvc_paged_kv_t *c, int pools) {
  if (c->stride_page < 1 || c->stride_token < 1 || c->stride_head < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: cache strides (page %lld, token %lld, head %lld) must all be > 0", fn,
                    (long long)c->stride_page, (long long)c->stride_token, (long long)c->stride_head);
  /* The extent: 1 + the largest element offset, (num_pages - 1) stride_page + (page_size - 1)
   * stride_token + (num_kv_heads - 1) stride_head + head_dim, and its bytes, in int64. Once it
   * fits, every offset the ops compute (kernels/common.h, kvc_slot_offset, plus a column below
   * head_dim, times the element size) is a sum of non-negative terms bounded by it. */
  struct {
    const char *name;
    int64_t stride, count;
  } terms[3] = {{"stride_page", c->stride_page, c->num_pages},
                {"stride_token", c->stride_token, c->page_size},
                {"stride_head", c->stride_head, plan->num_kv_heads}};
  const int64_t elem_bytes = kvc_dtype_size(c->dtype);
  /* Typed loads need it on both backends (C on the CPU, vector loads on CUDA); it also makes the
   * distance between K and V a whole number of elements. */
  for (int i = 0; i < 2 && pools; ++i) {
    const void *pool = i ? c->v : c->k;
    if ((uintptr_t)pool % (uintptr_t)elem_bytes != 0)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->%s %p is not aligned to its %lld-byte elements", fn,
                      i ? "v" : "k", pool, (long long)elem_bytes);
  }
  int64_t extent = plan->head_dim;
  int widest = 0; /* the axis that reaches furthest, named when the bytes overflow */
  for (int i = 0; i < 3; ++i) {
    if (terms[i].count > 1 && terms[i].stride > (INT64_MAX - extent) / (terms[i].count - 1))
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: cache->%s is %lld: with %lld positions on that axis the pool's element offsets "
                      "overflow int64 (strides: page %lld, token %lld, head %lld; num_pages %d, page_size %d, "
                      "%d heads, head_dim %d)", fn, terms[i].name, (long long)terms[i].stride,
                      (long long)terms[i].count, (long long)c->stride_page, (long long)c->stride_token,
                      (long long)c->stride_head, c->num_pages, c->page_size, plan->num_kv_heads, plan->head_dim);
    extent += (terms[i].count - 1) * terms[i].stride;
    if ((terms[i].count - 1) * terms[i].stride > (terms[widest].count - 1) * terms[widest].stride) widest = i;
  }
  if (extent > INT64_MAX / elem_bytes)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: cache->%s is %lld: the pools then span %lld elements of %lld bytes, whose byte offsets "
                    "overflow int64 (strides: page %lld, token %lld, head %lld)", fn, terms[widest].name,
                    (long long)terms[widest].stride, (long long)extent, (long long)elem_bytes,
                    (long long)c->stride_page, (long long)c->stride_token, (long long)c->stride_head);
  const int64_t extent_bytes = extent * elem_bytes;
  for (int i = 0; i < 2 && pools; ++i) {
    const void *pool = i ? c->v : c->k;
    if ((uintptr_t)pool > UINTPTR_MAX - (uintptr_t)extent_bytes)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: cache->%s %p plus the pool's %lld bytes runs past the end of the address space", fn,
                      i ? "v" : "k", pool, (long long)extent_bytes);
  }
  /* No two rows (page, slot, head) of a pool may overlap, or compacting one sequence could write
   * into another's tokens. Taken by increasing stride, each axis must step past everything the
   * finer axes span (any nesting order of page, token and head is fine). */
  const kvc_pool_lattice_t lattice = kvc_pool_lattice(c, plan->num_kv_heads);
  for (int i = 0; i < lattice.n; ++i) {
    const int64_t span = plan->head_dim + lattice.reach[i];
    if (lattice.axis[i].stride < span)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: cache strides (page %lld, token %lld, head %lld) overlap: a stride of %lld is below the %lld "
                      "elements spanned by the finer axes (head_dim %d, page_size %d, %d heads)", fn,
                      (long long)c->stride_page, (long long)c->stride_token, (long long)c->stride_head,
                      (long long)lattice.axis[i].stride, (long long)span, plan->head_dim, c->page_size,
                      plan->num_kv_heads);
  }
  /* K and V may share one allocation (vLLM's (2, blocks, ...) halves, FlashInfer's (pages, 2, ...)
   * pages where K and V rows alternate) but no K row may overlap a V row. */
  if (!pools) return KVC_SUCCESS;
  if (c->k == c->v)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->k and cache->v are the same pool %p", fn, c->k);
  if (kvc_kv_rows_overlap(&lattice, c->k, c->v, extent_bytes, elem_bytes, plan->head_dim))
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: cache->v %p is %s%lld bytes from cache->k %p, which makes K rows and V rows overlap "
                    "(strides: page %lld, token %lld, head %lld; head_dim %d, %lld-byte elements): compaction "
                    "would move one pool's data over the other's", fn, c->v,
                    (uintptr_t)c->v < (uintptr_t)c->k ? "-" : "+",
                    (long long)((uintptr_t)c->v < (uintptr_t)c->k ? (uintptr_t)c->k - (uintptr_t)c->v
                                                                   : (uintptr_t)c->v - (uintptr_t)c->k),
                    c->k, (long long)c->stride_page, (long long)c->stride_token, (long long)c->stride_head,
                    plan->head_dim, (long long)elem_bytes);
  return KVC_SUCCESS;
}

/* Every sequence's list in the table of `c` (host memory): a CSR range that starts at >= 0 and holds
 * the pages of its n_b tokens (its k_b kept tokens for a destination table, `dst`), and every id of
 * those pages in [0, num_pages), appended to scratch (may be NULL) at *used. */
static kvc_status_t check_lists(kvc_context_t ctx, const char *fn, const kvc_plan_view_t *plan,
                                const kvc_paged_kv_t *c, int dst, int32_t *scratch, int64_t *used) {
  const char *table = dst ? "dst" : "cache", *list = dst ? "destination list" : "table";
  for (int32_t b = 0; b < plan->batch; ++b) {
    const int32_t tokens = dst ? plan->keep_lens[b] : plan->seq_lens[b];
    const int32_t need = (int32_t)kvc_pages_needed(tokens, c->page_size);
    if (c->page_indptr) {
      /* in int64: an arbitrary indptr (INT_MIN, INT_MAX) must not overflow the difference */
      const int64_t first = c->page_indptr[b], have = (int64_t)c->page_indptr[b + 1] - first;
      if (first < 0 || have < need)
        return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                        "%s: %s->page_indptr gives sequence %d %lld pages ([%d, %d)) but its %d %stokens need %d", fn,
                        table, b, (long long)have, c->page_indptr[b], c->page_indptr[b + 1], tokens,
                        dst ? "kept " : "", need);
    }
    const int32_t *pages = kvc_seq_pages(c, b);
    for (int32_t i = 0; i < need; ++i) {
      if (pages[i] < 0 || pages[i] >= c->num_pages)
        return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                        "%s: %spage id %d (sequence %d, page %d of its %s) is outside [0, num_pages = %d)", fn,
                        dst ? "dst " : "", pages[i], b, i, list, c->num_pages);
      if (scratch) scratch[(*used)++] = pages[i];
    }
  }
  return KVC_SUCCESS;
}

/* The cache descriptor and, on CPU, its page table. A layer-batched call (`layered`) takes its
 * pools from kvc_layers_t: the descriptor's must then be NULL, and its pools are checked per layer
 * (check_layer_pools) where the host can read them. */
static kvc_status_t check_cache(kvc_context_t ctx, const char *fn, const kvc_plan_view_t *plan,
                                const kvc_paged_kv_t *c, int32_t *page_scratch, int layered) {
  if (!c) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache is NULL", fn);
  if (layered && (c->k || c->v))
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: cache->%s is %p, must be NULL: a layer-batched call takes every layer's pools from layers->k "
                    "and layers->v", fn, c->k ? "k" : "v", c->k ? c->k : c->v);
  if (!layered && (!c->k || !c->v))
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->%s is NULL", fn, c->k ? "v" : "k");
  if (c->dtype != plan->dtype)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->dtype is %d but the plan's dtype is %d", fn,
                    (int)c->dtype, (int)plan->dtype);
  if (c->num_kv_heads != plan->num_kv_heads)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->num_kv_heads is %d but the plan's is %d", fn,
                    c->num_kv_heads, plan->num_kv_heads);
  if (c->head_dim != plan->head_dim)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->head_dim is %d but the plan's is %d", fn, c->head_dim,
                    plan->head_dim);
  if (c->page_size < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->page_size is %d, must be >= 1", fn, c->page_size);
  if (c->num_pages < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->num_pages is %d, must be >= 1", fn, c->num_pages);
  kvc_status_t status = check_layout(ctx, fn, plan, c, !layered);
  if (status != KVC_SUCCESS) return status;
  if (!c->page_table) {
    if (plan->max_seq_len > c->page_size)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: cache->page_table is NULL (one page per sequence) but page_size %d is below the longest "
                      "sequence (%d tokens)", fn, c->page_size, plan->max_seq_len);
    if (c->num_pages < plan->batch)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: cache->page_table is NULL (page b = sequence b) but num_pages %d < batch %d", fn,
                      c->num_pages, plan->batch);
    return KVC_SUCCESS;
  }
  if (!c->page_indptr && c->max_pages < kvc_pages_needed(plan->max_seq_len, c->page_size))
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: cache->max_pages is %d but the longest sequence (%d tokens) needs %lld pages of %d", fn,
                    c->max_pages, plan->max_seq_len, (long long)kvc_pages_needed(plan->max_seq_len, c->page_size),
                    c->page_size);
  if (c->page_indptr && c->page_indptr == c->page_table)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: cache->page_indptr aliases page_table", fn);
  if (ctx->backend != KVC_BACKEND_CPU) return KVC_SUCCESS;

  /* CPU: the tables are host memory, so every id used is checked here. */
  int64_t used = 0;
  status = check_lists(ctx, fn, plan, c, 0, page_scratch, &used);
  if (status != KVC_SUCCESS) return status;
  if (page_scratch) {
    qsort(page_scratch, (size_t)used, sizeof(int32_t), compare_ids);
    for (int64_t i = 1; i < used; ++i)
      if (page_scratch[i] == page_scratch[i - 1])
        return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                        "%s: page id %d is used twice by the page table (by two sequences or twice by one); "
                        "compacting would mix their tokens", fn, page_scratch[i]);
  }
  return KVC_SUCCESS;
}

/* Sequence and entry of the first use of page `page` in the first `pages_of(b)` entries of the lists
 * of `c` (pages_of: ceil(k_b / page_size) with kept != 0, else ceil(n_b / page_size)), skipping the
 * first `skip` uses. -1 in *b when there is none. For the error messages only. */
static void find_page_use(const kvc_plan_view_t *plan, const kvc_paged_kv_t *c, int kept, int32_t page, int skip,
                          int32_t *b_out, int32_t *i_out) {
  *b_out = -1;
  *i_out = -1;
  for (int32_t b = 0; b < plan->batch; ++b) {
    const int32_t need = (int32_t)kvc_pages_needed(kept ? plan->keep_lens[b] : plan->seq_lens[b], c->page_size);
    for (int32_t i = 0; i < need; ++i)
      if (kvc_page_of(c, kvc_seq_pages(c, b), b, i * c->page_size) == page && skip-- == 0) {
        *b_out = b;
        *i_out = i;
        return;
      }
  }
}

/* The destination table of an out-of-place compaction: its shape from the descriptor; on CPU (host
 * memory) every id of the first ceil(k_b / page_size) entries, then, with the ids sorted in the page
 * check's scratch (at most one per kept token), that no page is a destination twice and that no
 * source page of any sequence is a destination. */
static kvc_status_t check_dst_table(kvc_context_t ctx, const char *fn, const kvc_plan_view_t *plan,
                                    const kvc_paged_kv_t *c, const kvc_page_table_t *dst, int32_t *scratch) {
  if (!dst) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: dst is NULL", fn);
  if (!dst->page_table)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: dst->page_table is NULL: an out-of-place compaction needs its destination pages listed", fn);
  if (dst->page_indptr && dst->page_indptr == dst->page_table)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: dst->page_indptr aliases dst->page_table", fn);
  const int64_t most = kvc_pages_needed(plan->max_keep_len, c->page_size);
  if (!dst->page_indptr && dst->max_pages < most)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: dst->max_pages is %d but the sequence keeping the most (%d tokens) needs %lld pages of %d", fn,
                    dst->max_pages, plan->max_keep_len, (long long)most, c->page_size);
  if (ctx->backend != KVC_BACKEND_CPU || !scratch) return KVC_SUCCESS;

  const kvc_paged_kv_t to = kvc_with_table(c, dst);
  int64_t used = 0;
  kvc_status_t status = check_lists(ctx, fn, plan, &to, 1, scratch, &used);
  if (status != KVC_SUCCESS) return status;
  qsort(scratch, (size_t)used, sizeof(int32_t), compare_ids);
  int32_t b0, i0, b1, i1;
  for (int64_t i = 1; i < used; ++i)
    if (scratch[i] == scratch[i - 1]) {
      find_page_use(plan, &to, 1, scratch[i], 0, &b0, &i0);
      find_page_use(plan, &to, 1, scratch[i], 1, &b1, &i1);
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: dst page id %d is page %d of sequence %d's destination list and page %d of sequence %d's: "
                      "every kept token needs its own destination slot", fn, scratch[i], i0, b0, i1, b1);
    }
  for (int32_t b = 0; b < plan->batch; ++b) {
    const int32_t need = (int32_t)kvc_pages_needed(plan->seq_lens[b], c->page_size);
    const int32_t *pages = kvc_seq_pages(c, b);
    for (int32_t i = 0; i < need; ++i) {
      const int32_t page = kvc_page_of(c, pages, b, i * c->page_size);
      if (!bsearch(&page, scratch, (size_t)used, sizeof(int32_t), compare_ids)) continue;
      find_page_use(plan, &to, 1, page, 0, &b0, &i0);
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: dst page id %d (sequence %d, page %d of its destination list) is also a source page "
                      "(sequence %d, page %d of its table): source pages are only read, the destination must be "
                      "other pages", fn, page, b0, i0, b, i);
    }
  }
  return KVC_SUCCESS;
}

kvc_status_t kvc_check_plan_context(kvc_context_t ctx, kvc_plan_t plan, const char *fn) {
  if (!ctx) return KVC_ERROR_INVALID_VALUE;
  ctx->detail[0] = '\0';
  if (!plan) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: plan is NULL", fn);
  if (plan->backend != ctx->backend || plan->device != ctx->device)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: the plan was made for backend %d device %d, the context runs backend %d device %d", fn,
                    (int)plan->backend, plan->device, (int)ctx->backend, ctx->device);
  return KVC_SUCCESS;
}

static kvc_status_t check_common(kvc_context_t ctx, kvc_plan_t plan, const char *fn) {
  kvc_status_t status = kvc_check_plan_context(ctx, plan, fn);
  if (status != KVC_SUCCESS) return status;
  if (plan->backend == KVC_BACKEND_CUDA && !plan->view_on_device)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: the plan has no device copy yet (device_memory KVC_PLAN_MEMORY_CALLER): call "
                    "kvc_plan_upload first", fn);
  return KVC_SUCCESS;
}

/* The workspace of `op` over num_layers layers: large enough and aligned. *layout gets its pieces. */
static kvc_status_t check_workspace(kvc_context_t ctx, kvc_plan_t plan, kvc_op_t op, int32_t num_layers,
                                    const char *fn, const void *workspace, size_t bytes, kvc_layout_t *layout) {
  kvc_layout_t own;
  if (!layout) layout = &own;
  if (num_layers == 1) { /* sized at plan time */
    memset(layout, 0, sizeof *layout);
    layout->bytes = plan->workspace[op];
    if (op == KVC_OP_COMPRESS) {
      kvc_status_t status = kvc_plan_layout(plan, op, 1, layout, ctx->detail, sizeof ctx->detail);
      if (status != KVC_SUCCESS) return status;
    }
  } else {
    kvc_status_t status = kvc_plan_layout(plan, op, num_layers, layout, ctx->detail, sizeof ctx->detail);
    if (status != KVC_SUCCESS) { /* too many layers for size_t, or for an op's grid */
      char inner[KVC_DETAIL_CAP];
      memcpy(inner, ctx->detail, sizeof inner);
      return kvc_fail(ctx, status, "%s: %s", fn, inner);
    }
  }
  if (bytes < layout->bytes) {
    if (num_layers == 1)
      return kvc_fail(ctx, KVC_ERROR_WORKSPACE_TOO_SMALL, "%s: workspace_bytes is %zu, the plan needs %zu", fn, bytes,
                      layout->bytes);
    return kvc_fail(ctx, KVC_ERROR_WORKSPACE_TOO_SMALL,
                    "%s: workspace_bytes is %zu, the plan needs %zu for %d layers (kvc_plan_workspace_layout)", fn,
                    bytes, layout->bytes, num_layers);
  }
  if (layout->bytes > 0 && !workspace)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: workspace is NULL but %zu bytes are needed", fn, layout->bytes);
  if ((uintptr_t)workspace % KVC_WORKSPACE_ALIGN != 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: workspace %p is not %d-byte aligned", fn, workspace,
                    KVC_WORKSPACE_ALIGN);
  return KVC_SUCCESS;
}

/* Ops tell the sizing call (base NULL) from a run by the base, so a run without workspace (the
 * plan needs none and the caller passed NULL) gets this non-NULL base, of which it carves 0 bytes. */
static char no_workspace[KVC_WORKSPACE_ALIGN];

/* Runs `fn` (the op of the call named `name`) with the plan and the context in args, with the
 * device selected around the call. */
static kvc_status_t run_fn(kvc_context_t ctx, kvc_plan_t plan, const char *name, kvc_op_fn fn, kvc_op_args_t *args,
                           kvc_carver_t *ws) {
  args->plan = plan->view;
  args->host_plan = &plan->host;
  args->workers = ctx->workers;
  args->detail = ctx->detail;
  args->detail_cap = sizeof ctx->detail;
  if (plan->backend != KVC_BACKEND_CUDA) return fn(args, ws);
  int previous;
  kvc_status_t status = kvc_device_enter(plan->device, &previous, ctx->detail, sizeof ctx->detail);
  if (status != KVC_SUCCESS) return status;
  /* An error the caller's earlier CUDA work left pending would be read back by the ops' launch
   * check as theirs: report it as the caller's before enqueuing, and leave it pending. */
  status = kvc_device_check_pending(name, ctx->detail, sizeof ctx->detail);
  if (status == KVC_SUCCESS) status = fn(args, ws);
  kvc_device_restore(previous);
  return status;
}

/* Runs one op on its slice of the workspace. */
static kvc_status_t run_op(kvc_context_t ctx, kvc_plan_t plan, kvc_op_t op, kvc_op_args_t *args, void *workspace) {
  kvc_carver_t ws = {workspace ? (char *)workspace : no_workspace, 0};
  if (args->num_layers < 1) args->num_layers = 1;
  /* the page scratch was checked by check_cache_for */
  kvc_carve_dispatch(&plan->host, plan->backend, op, args->num_layers, &ws, NULL, &args->compact_status);
  static const char *const names[] = {"kvc_score", "kvc_select", "kvc_compact", "kvc_retention"};
  return run_fn(ctx, plan, names[op], kvc_op_for(plan->backend, op), args, &ws);
}

/* Validates the cache for an op that touches it; the scratch for the CPU's page check is carved
 * from the op's workspace exactly as run_op will carve it. */
static kvc_status_t check_cache_for(kvc_context_t ctx, kvc_plan_t plan, kvc_op_t op, int32_t num_layers,
                                    const char *fn, const kvc_paged_kv_t *cache, int layered, void *workspace,
                                    const kvc_page_table_t *dst) {
  kvc_carver_t ws = {(char *)workspace, 0};
  int32_t *scratch = NULL;
  kvc_carve_dispatch(&plan->host, plan->backend, op, num_layers, &ws, &scratch, NULL);
  /* out of place the source pages are only read: they may be shared, the destination may not */
  kvc_status_t status = check_cache(ctx, fn, &plan->host, cache, dst ? NULL : scratch, layered);
  if (status == KVC_SUCCESS && dst) status = check_dst_table(ctx, fn, &plan->host, cache, dst, scratch);
  return status;
}

/* The layer arrays' own fields (never their entries: on CUDA they are device memory). */
static kvc_status_t check_layers(kvc_context_t ctx, const char *fn, const kvc_layers_t *layers) {
  if (!layers) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: layers is NULL", fn);
  if (layers->num_layers < 1)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: layers->num_layers is %d, must be >= 1", fn, layers->num_layers);
  if (!layers->k || !layers->v)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: layers->%s is NULL", fn, layers->k ? "v" : "k");
  return KVC_SUCCESS;
}

/* Layer l's pools, where the host may read the arrays (CPU): present and not one pool, through the
 * single-layer check of a descriptor carrying them. */
static kvc_status_t check_layer_pools(kvc_context_t ctx, const char *fn, const kvc_plan_view_t *plan,
                                      const kvc_paged_kv_t *cache, const kvc_layers_t *layers, int32_t l,
                                      kvc_paged_kv_t *layer_cache) {
  *layer_cache = *cache;
  layer_cache->k = layers->k[l];
  layer_cache->v = layers->v[l];
  if (!layer_cache->k || !layer_cache->v)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: layers->%s[%d] is NULL", fn, layer_cache->k ? "v" : "k", l);
  kvc_status_t status = check_cache(ctx, fn, plan, layer_cache, NULL, 0);
  if (status != KVC_SUCCESS) {
    char inner[KVC_DETAIL_CAP];
    memcpy(inner, ctx->detail, sizeof inner);
    return kvc_fail(ctx, status, "layer %d: %s", l, inner);
  }
  return KVC_SUCCESS;
}

/* kvc_score and kvc_score_layers: one op call for all layers. The CPU reads the layer arrays here
 * (host memory); on CUDA they are device memory that only the kernels read (kvc_layers_t). */
static kvc_status_t score_layers(kvc_context_t ctx, kvc_plan_t plan, const char *fn, const kvc_paged_kv_t *cache,
                                 const kvc_layers_t *layers, const void *queries, const float *lse, float *scores,
                                 int accumulate, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  kvc_status_t status = check_common(ctx, plan, fn);
  if (status == KVC_SUCCESS && layers) status = check_layers(ctx, fn, layers);
  const int32_t num_layers = layers ? layers->num_layers : 1;
  if (status == KVC_SUCCESS)
    status = check_workspace(ctx, plan, KVC_OP_SCORE, num_layers, fn, workspace, workspace_bytes, NULL);
  if (status == KVC_SUCCESS) status = check_cache_for(ctx, plan, KVC_OP_SCORE, 1, fn, cache, layers != NULL, workspace, NULL);
  if (status != KVC_SUCCESS) return status;
  if (!scores) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: scores is NULL", fn);
  const int64_t obs = plan->host.obs_total;
  if (!layers && obs > 0 && !queries)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: queries is NULL but the plan has %lld observation queries", fn,
                    (long long)obs);
  if (layers && obs > 0 && !layers->queries)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: layers->queries is NULL but the plan has %lld observation queries", fn, (long long)obs);
  for (int32_t l = 0; layers && plan->backend == KVC_BACKEND_CPU && l < num_layers; ++l) {
    kvc_paged_kv_t layer_cache;
    status = check_layer_pools(ctx, fn, &plan->host, cache, layers, l, &layer_cache);
    if (status != KVC_SUCCESS) return status;
    if (obs > 0 && !layers->queries[l])
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: layers->queries[%d] is NULL but the plan has %lld observation queries", fn, l, (long long)obs);
  }
  kvc_op_args_t args;
  memset(&args, 0, sizeof args);
  args.cache = cache;
  args.queries = queries;
  args.lse = lse;
  args.scores = scores;
  args.accumulate = accumulate != 0;
  args.num_layers = num_layers;
  args.layers = layers;
  args.stream = stream;
  return run_op(ctx, plan, KVC_OP_SCORE, &args, workspace);
}

kvc_status_t kvc_score(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache, const void *queries,
                       const float *lse, float *scores, int accumulate, void *workspace, size_t workspace_bytes,
                       kvc_stream_t stream) {
  return score_layers(ctx, plan, "kvc_score", cache, NULL, queries, lse, scores, accumulate, workspace,
                      workspace_bytes, stream);
}

kvc_status_t kvc_score_layers(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                              const kvc_layers_t *layers, float *scores, int accumulate, void *workspace,
                              size_t workspace_bytes, kvc_stream_t stream) {
  if (!layers && ctx) {
    ctx->detail[0] = '\0';
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "kvc_score_layers: layers is NULL");
  }
  return score_layers(ctx, plan, "kvc_score_layers", cache, layers, NULL, NULL, scores, accumulate, workspace,
                      workspace_bytes, stream);
}

static kvc_status_t check_num_layers(kvc_context_t ctx, const char *fn, int32_t num_layers) {
  if (num_layers < 1) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: num_layers is %d, must be >= 1", fn, num_layers);
  return KVC_SUCCESS;
}

static kvc_status_t select_layers(kvc_context_t ctx, kvc_plan_t plan, const char *fn, int32_t num_layers,
                                  const float *scores, int32_t *keep, void *workspace, size_t workspace_bytes,
                                  kvc_stream_t stream) {
  kvc_status_t status = check_common(ctx, plan, fn);
  if (status == KVC_SUCCESS) status = check_num_layers(ctx, fn, num_layers);
  if (status == KVC_SUCCESS)
    status = check_workspace(ctx, plan, KVC_OP_SELECT, num_layers, fn, workspace, workspace_bytes, NULL);
  if (status != KVC_SUCCESS) return status;
  if (!scores) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: scores is NULL", fn);
  if (!keep) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: keep is NULL", fn);
  kvc_op_args_t args;
  memset(&args, 0, sizeof args);
  args.scores = (float *)scores; /* read only: the op's argument block is shared by all ops */
  args.keep = keep;
  args.num_layers = num_layers;
  args.stream = stream;
  return run_op(ctx, plan, KVC_OP_SELECT, &args, workspace);
}

kvc_status_t kvc_select(kvc_context_t ctx, kvc_plan_t plan, const float *scores, int32_t *keep, void *workspace,
                        size_t workspace_bytes, kvc_stream_t stream) {
  return select_layers(ctx, plan, "kvc_select", 1, scores, keep, workspace, workspace_bytes, stream);
}

kvc_status_t kvc_select_layers(kvc_context_t ctx, kvc_plan_t plan, int32_t num_layers, const float *scores,
                               int32_t *keep, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  return select_layers(ctx, plan, "kvc_select_layers", num_layers, scores, keep, workspace, workspace_bytes, stream);
}

static kvc_status_t compact_layers(kvc_context_t ctx, kvc_plan_t plan, const char *fn, const kvc_paged_kv_t *cache,
                                   const kvc_layers_t *layers, const kvc_page_table_t *dst, const int32_t *keep,
                                   float *const *extras, int32_t num_extras, void *workspace, size_t workspace_bytes,
                                   int cache_checked, kvc_stream_t stream) {
  kvc_status_t status = check_common(ctx, plan, fn);
  if (status == KVC_SUCCESS && layers) status = check_layers(ctx, fn, layers);
  const int32_t num_layers = layers ? layers->num_layers : 1;
  if (status == KVC_SUCCESS)
    status = check_workspace(ctx, plan, KVC_OP_COMPACT, num_layers, fn, workspace, workspace_bytes, NULL);
  if (status == KVC_SUCCESS && !cache_checked)
    status = check_cache_for(ctx, plan, KVC_OP_COMPACT, num_layers, fn, cache, layers != NULL, workspace, dst);
  if (status != KVC_SUCCESS) return status;
  if (layers && plan->backend == KVC_BACKEND_CPU) /* the CUDA backend's arrays are device memory */
    for (int32_t l = 0; l < num_layers; ++l) {
      kvc_paged_kv_t layer_cache;
      status = check_layer_pools(ctx, fn, &plan->host, cache, layers, l, &layer_cache);
      if (status != KVC_SUCCESS) return status;
    }
  if (!keep) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: keep is NULL", fn);
  if (num_extras < 0) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: num_extras is %d, must be >= 0", fn, num_extras);
  if (num_extras > 0 && !extras)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: extras is NULL but num_extras is %d", fn, num_extras);
  for (int32_t e = 0; e < num_extras; ++e)
    if (!extras[e]) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: extras[%d] is NULL", fn, e);
  kvc_op_args_t args;
  memset(&args, 0, sizeof args);
  args.cache = cache;
  args.keep = (int32_t *)keep; /* read only */
  args.extras = extras;
  args.num_extras = num_extras;
  args.num_layers = num_layers;
  args.layers = layers;
  args.dst_table = dst;
  args.stream = stream;
  return run_op(ctx, plan, KVC_OP_COMPACT, &args, workspace);
}

kvc_status_t kvc_compact(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache, const int32_t *keep,
                         float *const *extras, int32_t num_extras, void *workspace, size_t workspace_bytes,
                         kvc_stream_t stream) {
  return compact_layers(ctx, plan, "kvc_compact", cache, NULL, NULL, keep, extras, num_extras, workspace,
                        workspace_bytes, 0, stream);
}

kvc_status_t kvc_compact_layers(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                const kvc_layers_t *layers, const int32_t *keep, float *const *extras,
                                int32_t num_extras, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  if (!layers && ctx) {
    ctx->detail[0] = '\0';
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "kvc_compact_layers: layers is NULL");
  }
  return compact_layers(ctx, plan, "kvc_compact_layers", cache, layers, NULL, keep, extras, num_extras, workspace,
                        workspace_bytes, 0, stream);
}

static kvc_status_t retention_layers(kvc_context_t ctx, kvc_plan_t plan, const char *fn, int32_t num_layers,
                                     const int32_t *keep, int32_t *counts, void *workspace, size_t workspace_bytes,
                                     kvc_stream_t stream) {
  kvc_status_t status = check_common(ctx, plan, fn);
  if (status == KVC_SUCCESS) status = check_num_layers(ctx, fn, num_layers);
  if (status == KVC_SUCCESS)
    status = check_workspace(ctx, plan, KVC_OP_RETENTION, num_layers, fn, workspace, workspace_bytes, NULL);
  if (status != KVC_SUCCESS) return status;
  if (!keep) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: keep is NULL", fn);
  if (!counts && plan->host.total_spans > 0) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: counts is NULL", fn);
  if (plan->host.total_spans == 0) return KVC_SUCCESS;
  kvc_op_args_t args;
  memset(&args, 0, sizeof args);
  args.keep = (int32_t *)keep; /* read only */
  args.counts = counts;
  args.num_layers = num_layers;
  args.stream = stream;
  return run_op(ctx, plan, KVC_OP_RETENTION, &args, workspace);
}

kvc_status_t kvc_retention(kvc_context_t ctx, kvc_plan_t plan, const int32_t *keep, int32_t *counts, void *workspace,
                           size_t workspace_bytes, kvc_stream_t stream) {
  return retention_layers(ctx, plan, "kvc_retention", 1, keep, counts, workspace, workspace_bytes, stream);
}

kvc_status_t kvc_retention_layers(kvc_context_t ctx, kvc_plan_t plan, int32_t num_layers, const int32_t *keep,
                                  int32_t *counts, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  return retention_layers(ctx, plan, "kvc_retention_layers", num_layers, keep, counts, workspace, workspace_bytes,
                          stream);
}

/* kvc_compress and kvc_compress_layers: the stages on the layout of kvc_plan_layout; the stage calls
 * check their own arguments (compaction's cache checks before scoring), and a failure names the
 * stage's function. */
static kvc_status_t compress_layers(kvc_context_t ctx, kvc_plan_t plan, const char *fn, const kvc_paged_kv_t *cache,
                                    const kvc_layers_t *layers, const kvc_page_table_t *dst, const void *queries,
                                    const float *lse, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  kvc_status_t status = check_common(ctx, plan, fn);
  if (status == KVC_SUCCESS && layers) status = check_layers(ctx, fn, layers);
  const int32_t num_layers = layers ? layers->num_layers : 1;
  kvc_layout_t layout;
  if (status == KVC_SUCCESS)
    status = check_workspace(ctx, plan, KVC_OP_COMPRESS, num_layers, fn, workspace, workspace_bytes, &layout);
  if (status != KVC_SUCCESS) return status;
  char *base = (char *)workspace;
  int32_t *keep = (int32_t *)(base + layout.keep_offset);
  float *scores = (float *)(base + layout.scores_offset);
  char *stage = base + layout.stage_offset;
  size_t stage_bytes = workspace_bytes - layout.stage_offset;
  static const char *const compact_names[2][2] = {{"kvc_compact", "kvc_compact_into"},
                                                  {"kvc_compact_layers", "kvc_compact_layers_into"}};
  const char *compact_fn = compact_names[layers != NULL][dst != NULL];
  /* compaction's page-table checks (shared pages, the destination table) first: a table it would
   * refuse costs no scoring work, and the compaction stage does not repeat them */
  status = check_cache_for(ctx, plan, KVC_OP_COMPACT, num_layers, compact_fn, cache, layers != NULL, stage, dst);
  if (status != KVC_SUCCESS) return status;
  if (layers) {
    status = kvc_score_layers(ctx, plan, cache, layers, scores, 0, stage, stage_bytes, stream);
    if (status == KVC_SUCCESS) status = kvc_select_layers(ctx, plan, num_layers, scores, keep, stage, stage_bytes, stream);
  } else {
    status = kvc_score(ctx, plan, cache, queries, lse, scores, 0, stage, stage_bytes, stream);
    if (status == KVC_SUCCESS) status = kvc_select(ctx, plan, scores, keep, stage, stage_bytes, stream);
  }
  if (status == KVC_SUCCESS)
    status = compact_layers(ctx, plan, compact_fn, cache, layers, dst, keep, NULL, 0, stage, stage_bytes, 1, stream);
  return status;
}

kvc_status_t kvc_compress(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache, const void *queries,
                          const float *lse, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  return compress_layers(ctx, plan, "kvc_compress", cache, NULL, NULL, queries, lse, workspace, workspace_bytes,
                         stream);
}

kvc_status_t kvc_compress_layers(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                 const kvc_layers_t *layers, void *workspace, size_t workspace_bytes,
                                 kvc_stream_t stream) {
  if (!layers && ctx) {
    ctx->detail[0] = '\0';
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "kvc_compress_layers: layers is NULL");
  }
  return compress_layers(ctx, plan, "kvc_compress_layers", cache, layers, NULL, NULL, NULL, workspace,
                         workspace_bytes, stream);
}

/* ---------------------------------------------------------------------------------------------
 * Out-of-place compaction (kvc_compact_into and the other *_into calls): the in-place calls with a
 * destination table, which they require.
 */

/* A required pointer argument of a public call that the shared path treats as optional. */
static int missing(kvc_context_t ctx, const void *arg, const char *fn, const char *name) {
  if (arg || !ctx) return !arg;
  ctx->detail[0] = '\0';
  kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: %s is NULL", fn, name);
  return 1;
}

kvc_status_t kvc_compact_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                              const kvc_page_table_t *dst, const int32_t *keep, float *const *extras,
                              int32_t num_extras, void *workspace, size_t workspace_bytes, kvc_stream_t stream) {
  if (missing(ctx, dst, "kvc_compact_into", "dst")) return KVC_ERROR_INVALID_VALUE;
  return compact_layers(ctx, plan, "kvc_compact_into", cache, NULL, dst, keep, extras, num_extras, workspace,
                        workspace_bytes, 0, stream);
}

kvc_status_t kvc_compress_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                               const kvc_page_table_t *dst, const void *queries, const float *lse, void *workspace,
                               size_t workspace_bytes, kvc_stream_t stream) {
  if (missing(ctx, dst, "kvc_compress_into", "dst")) return KVC_ERROR_INVALID_VALUE;
  return compress_layers(ctx, plan, "kvc_compress_into", cache, NULL, dst, queries, lse, workspace, workspace_bytes,
                         stream);
}

kvc_status_t kvc_compact_layers_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                     const kvc_layers_t *layers, const kvc_page_table_t *dst, const int32_t *keep,
                                     float *const *extras, int32_t num_extras, void *workspace,
                                     size_t workspace_bytes, kvc_stream_t stream) {
  const char *fn = "kvc_compact_layers_into";
  if (missing(ctx, layers, fn, "layers") || missing(ctx, dst, fn, "dst")) return KVC_ERROR_INVALID_VALUE;
  return compact_layers(ctx, plan, fn, cache, layers, dst, keep, extras, num_extras, workspace, workspace_bytes, 0,
                        stream);
}

kvc_status_t kvc_compress_layers_into(kvc_context_t ctx, kvc_plan_t plan, const kvc_paged_kv_t *cache,
                                      const kvc_layers_t *layers, const kvc_page_table_t *dst, void *workspace,
                                      size_t workspace_bytes, kvc_stream_t stream) {
  const char *fn = "kvc_compress_layers_into";
  if (missing(ctx, layers, fn, "layers") || missing(ctx, dst, fn, "dst")) return KVC_ERROR_INVALID_VALUE;
  return compress_layers(ctx, plan, fn, cache, layers, dst, NULL, NULL, workspace, workspace_bytes, stream);
}

/* ---------------------------------------------------------------------------------------------
 * kvc_gather_queries: observation rows from the engine's packed q
 */

/* The gather needs no workspace, so it is not one of kvc_op_t's ops: its own entry. */
static kvc_op_fn gather_op_for(kvc_backend_t backend) {
#ifdef KVC_WITH_CUDA
  if (backend == KVC_BACKEND_CUDA) return kvc_gather_cuda;
#endif
  return kvc_gather_cpu;
}

/* CPU: qo_indptr is host memory, so every sequence's packed rows are checked against its
 * observation positions before anything is copied (CUDA guards in the kernel instead). */
static kvc_status_t check_qo_indptr(kvc_context_t ctx, const char *fn, const kvc_plan_view_t *plan,
                                    const int32_t *qo_indptr, int64_t num_tokens) {
  if (qo_indptr[0] < 0) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: qo_indptr[0] is %d, must be >= 0", fn, qo_indptr[0]);
  for (int32_t b = 0; b < plan->batch; ++b) {
    const int32_t start = qo_indptr[b], end = qo_indptr[b + 1], n = plan->seq_lens[b];
    if (end < start)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: qo_indptr[%d] = %d is below qo_indptr[%d] = %d", fn, b + 1,
                      end, b, start);
    if (end > num_tokens)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: qo_indptr[%d] = %d is past num_tokens = %lld", fn, b + 1, end,
                      (long long)num_tokens);
    if (end - start > n)
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: sequence %d has %d packed rows (qo_indptr [%d, %d)) but only %d tokens", fn, b, end - start,
                      start, end, n);
    const int32_t first_obs = plan->obs_indptr[b];
    if (first_obs < plan->obs_indptr[b + 1] && plan->obs_pos[first_obs] < n - (end - start))
      return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                      "%s: sequence %d's %d packed rows (qo_indptr [%d, %d)) hold its positions [%d, %d), but its "
                      "observation queries start at position %d", fn, b, end - start, start, end, n - (end - start),
                      n, plan->obs_pos[first_obs]);
  }
  return KVC_SUCCESS;
}

kvc_status_t kvc_gather_queries(kvc_context_t ctx, kvc_plan_t plan, const void *packed_q, int64_t num_tokens,
                                int64_t token_stride, const int32_t *qo_indptr, void *queries, kvc_stream_t stream) {
  const char *fn = "kvc_gather_queries";
  kvc_status_t status = check_common(ctx, plan, fn);
  if (status != KVC_SUCCESS) return status;
  const kvc_plan_view_t *host = &plan->host;
  const int64_t row = (int64_t)host->num_q_heads * host->head_dim, elem = kvc_dtype_size(host->query_dtype);
  if (num_tokens < 0)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: num_tokens is %lld, must be >= 0", fn, (long long)num_tokens);
  if (token_stride == 0) token_stride = row;
  if (token_stride < row)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: token_stride is %lld, must be 0 or >= num_q_heads * head_dim = %lld", fn,
                    (long long)token_stride, (long long)row);
  if (num_tokens > 0 && token_stride > INT64_MAX / elem / num_tokens)
    return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE,
                    "%s: num_tokens %lld x token_stride %lld elements overflows a 64-bit byte offset", fn,
                    (long long)num_tokens, (long long)token_stride);
  if (host->obs_total == 0) return KVC_SUCCESS; /* nothing to read or write */
  if (!packed_q) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: packed_q is NULL", fn);
  if (!qo_indptr) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: qo_indptr is NULL", fn);
  if (!queries) return kvc_fail(ctx, KVC_ERROR_INVALID_VALUE, "%s: queries is NULL", fn);
  if (plan->backend == KVC_BACKEND_CPU) {
    status = check_qo_indptr(ctx, fn, host, qo_indptr, num_tokens);
    if (status != KVC_SUCCESS) return status;
  }
  kvc_op_args_t args;
  memset(&args, 0, sizeof args);
  args.packed_q = packed_q;
  args.packed_tokens = num_tokens;
  args.packed_stride = token_stride;
  args.qo_indptr = qo_indptr;
  args.gathered = queries;
  args.stream = stream;
  kvc_carver_t ws = {no_workspace, 0};
  return run_fn(ctx, plan, "kvc_gather_queries", gather_op_for(plan->backend), &args, &ws);
}
