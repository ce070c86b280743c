/*
 * decode_events.h - re-compression during decode, run on one backend (CPU, or the CUDA backend
 * through the SIMT emulator) and checked against oracles computed here: per-head spans against the
 * sorting oracle of select_oracle.c with quotas cross-checked against one-row plans, per-head spans
 * identical across heads against per-sequence spans, kvc_spans_after_compaction against spans
 * recomputed from the keep indices, and a two-event decode scenario (compress, append tokens,
 * accumulate H2O scores in a fixed-capacity score layout, re-compress with the helper's spans)
 * against a from-scratch computation in double. Each returns 0, or 1 with the first failure in
 * `why` (cap bytes).
 */
#ifndef KVC_DECODE_EVENTS_H
#define KVC_DECODE_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

/* `rounds` random batches with per-head spans (and, every other round, a fixed score capacity):
 * selection and retention against the oracles, and the same batch with every head given its
 * sequence's spans against the per-sequence plan (keep, quotas and counts equal). */
int kvc_test_head_spans_rounds(kvc_backend_t backend, uint64_t seed, int rounds, char *why, size_t cap);

/* A real compaction (every method, per-sequence spans, then again from the helper's per-head spans;
 * kvc_compress in the fixed-capacity score layout against the packed one):
 * the helper's output against spans recomputed from the keep indices, and its two-phase size. */
int kvc_test_spans_after_compaction_rounds(kvc_backend_t backend, uint64_t seed, int rounds, char *why, size_t cap);

/* The two-event decode scenario with H2O scores in the fixed-capacity layout (see above). */
int kvc_test_two_event_decode(kvc_backend_t backend, uint64_t seed, char *why, size_t cap);

#ifdef __cplusplus
}
#endif

#endif /* KVC_DECODE_EVENTS_H */
