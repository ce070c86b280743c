/* plan_events.c - see plan_events.h. */
#include "plan_events.h"

#include <string.h>

static const struct {
  const char *name;
  int replays;
} events[KVC_TEST_EVENTS] = {
    {"base", 1},
    {"spans moved, sinks / recents / fairness changed", 1},
    {"budget above a length, budget_policy CLAMP without a conflict", 1},
    {"one sequence longer", 0},
    {"one keep length different", 0},
    {"window different", 0},
    {"one span fewer", 0},
    {"an implicit partition appears", 0},
    {"method different", 0},
    {"scale different", 0},
};

const char *kvc_test_event_name(int which) { return events[which].name; }
int kvc_test_event_replays(int which) { return events[which].replays; }

void kvc_test_event(kvc_test_event_t *e, int which, kvc_dtype_t dtype, kvc_plan_memory_t memory) {
  memset(e, 0, sizeof *e);
  const int32_t lens[] = {200, 150, 90}, budgets[] = {64, 100, 90};
  memcpy(e->seq_lens, lens, sizeof lens);
  memcpy(e->budgets, budgets, sizeof budgets);
  /* sequence 0: two FAIR spans covering it and a PROTECT span; 1: one FAIR span and a PROTECT
   * span; 2: none (an implicit partition of every token) */
  const kvc_span_t base[] = {{0, 100, KVC_SPAN_FAIR, 1.0f}, {20, 30, KVC_SPAN_PROTECT, 1.0f},
                             {100, 200, KVC_SPAN_FAIR, 1.0f}, {0, 150, KVC_SPAN_FAIR, 1.0f},
                             {5, 9, KVC_SPAN_PROTECT, 1.0f}};
  const kvc_span_t moved[] = {{0, 60, KVC_SPAN_FAIR, 2.0f}, {60, 200, KVC_SPAN_FAIR, 1.0f},
                              {150, 170, KVC_SPAN_PROTECT, 1.0f}, {0, 150, KVC_SPAN_FAIR, 0.5f},
                              {100, 140, KVC_SPAN_PROTECT, 1.0f}};
  memcpy(e->spans, which == 1 ? moved : base, sizeof base);
  e->span_indptr[0] = 0, e->span_indptr[1] = 3, e->span_indptr[2] = 5, e->span_indptr[3] = 5;

  kvc_plan_desc_t d = KVC_PLAN_DESC_INIT;
  d.num_q_heads = 4 * KVC_TEST_EVENT_HEADS;
  d.num_kv_heads = KVC_TEST_EVENT_HEADS;
  d.head_dim = KVC_TEST_EVENT_DIM;
  d.dtype = dtype;
  d.batch = KVC_TEST_EVENT_BATCH;
  d.method = KVC_SCORE_SNAPKV;
  d.window = 16;
  d.sink_tokens = 4;
  d.fairness = 1.0f;
  d.device_memory = memory;
  switch (which) {
    case 1: d.sink_tokens = 2, d.recent_tokens = 3, d.fairness = 0.5f; break;
    case 2: e->budgets[2] = 500, d.budget_policy = KVC_BUDGET_CLAMP; break;
    case 3: e->seq_lens[1] = 151, e->spans[3].end = 151; break;
    case 4: e->budgets[0] = 65; break;
    case 5: d.window = 32; break;
    case 6: e->span_indptr[2] = e->span_indptr[3] = 4; break;
    case 7: e->spans[3].end = 140; break;
    case 8: d.method = KVC_SCORE_H2O; break;
    case 9: d.scale = 0.5f; break;
    default: break;
  }
  d.seq_lens = e->seq_lens;
  d.budgets = e->budgets;
  d.span_indptr = e->span_indptr;
  d.spans = e->spans;
  e->desc = d;
}
