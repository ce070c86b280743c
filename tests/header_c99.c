/* Compiled with -std=c99 -pedantic-errors and no CUDA include path (see tests/CMakeLists.txt). */
#include "kvcompress.h"

int main(void) {
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  kvc_paged_kv_t cache = {0};
  kvc_span_t span = {0, 1, KVC_SPAN_PROTECT, 1.0f};
  (void)cache;
  (void)span;
  return desc.struct_size == sizeof desc && kvc_status_name(KVC_SUCCESS) != 0 ? 0 : 1;
}
