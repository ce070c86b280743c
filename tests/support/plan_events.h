/*
 * plan_events.h - compression events of one batch for the graph-reuse tests (kvc_plan_upload,
 * kvc_plan_compatible): a base event, events whose descs differ only in what changes device data
 * (spans moved, sinks / recents / fairness / budgets changed without changing a keep length), and
 * events that differ in one thing a captured graph freezes.
 */
#ifndef KVC_PLAN_EVENTS_H
#define KVC_PLAN_EVENTS_H

#include <stdint.h>

#include "kvcompress.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_TEST_EVENT_BATCH 3
#define KVC_TEST_EVENT_HEADS 2   /* KV heads; 4 query heads per KV head */
#define KVC_TEST_EVENT_DIM 64

typedef struct {
  int32_t seq_lens[KVC_TEST_EVENT_BATCH], budgets[KVC_TEST_EVENT_BATCH];
  int32_t span_indptr[KVC_TEST_EVENT_BATCH + 1];
  kvc_span_t spans[8];
  kvc_plan_desc_t desc; /* points into this struct: do not copy the struct */
} kvc_test_event_t;

enum { KVC_TEST_EVENTS = 10 };

/* Fills event `which` (0 = the base) with `dtype` and `memory`. */
void kvc_test_event(kvc_test_event_t *e, int which, kvc_dtype_t dtype, kvc_plan_memory_t memory);
/* What event `which` changes relative to the base, and whether a graph of the base replays it. */
const char *kvc_test_event_name(int which);
int kvc_test_event_replays(int which);

#ifdef __cplusplus
}
#endif

#endif /* KVC_PLAN_EVENTS_H */
