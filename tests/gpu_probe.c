/* gpu_probe - exits 0 when the CUDA backend has a device, 77 (ctest's "skipped") otherwise, so
 * the GPU tests show up as skipped on machines without one instead of as passed. */
#include "kvcompress.h"

int main(void) {
  kvc_context_t ctx;
  if (kvc_context_create(KVC_BACKEND_CUDA, 0, &ctx) != KVC_SUCCESS) return 77;
  kvc_context_destroy(ctx);
  return 0;
}
