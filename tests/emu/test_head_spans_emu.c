/*
 * test_head_spans_emu.c - re-compression during decode on the CUDA backend through the SIMT
 * emulator (kernels/select.cu with per-row partition tables, retention.cu's per-head count layout,
 * score.cu and compact.cu in the fixed-capacity score layout), against the same oracles as
 * tests/test_head_spans.c (tests/support/decode_events.c). Odd rounds of the random cases split
 * rows into segments of 128 tokens, so the multi-pass selection runs per (sequence, head) too.
 */
#include <criterion/criterion.h>

#include "decode_events.h"
#include "kvcompress.h"

Test(head_spans_emu, random_per_head_spans_against_the_oracle) {
  char why[1024] = "";
  cr_assert_eq(kvc_test_head_spans_rounds(KVC_BACKEND_CUDA, 20261202, 16, why, sizeof why), 0, "%s", why);
}

Test(head_spans_emu, spans_after_a_real_compaction_and_after_a_second_one) {
  char why[1024] = "";
  cr_assert_eq(kvc_test_spans_after_compaction_rounds(KVC_BACKEND_CUDA, 78, 6, why, sizeof why), 0, "%s", why);
}

Test(head_spans_emu, two_events_with_accumulated_h2o_scores_equal_a_from_scratch_computation) {
  char why[1024] = "";
  for (uint64_t seed = 1; seed <= 2; ++seed)
    cr_assert_eq(kvc_test_two_event_decode(KVC_BACKEND_CUDA, seed, why, sizeof why), 0, "seed %llu: %s",
                 (unsigned long long)seed, why);
}
