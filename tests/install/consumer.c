/* A program outside the project, built against an installed libkvcompress (tests/install_consumers.cmake).
 * K-Norm keeps the keys of lowest norm: odd tokens have norm ~1, even ones ~10, so a budget of 4 of 8
 * keeps tokens 1 3 5 7, and compaction moves value row 2j + 1 to slot j. */
#include <kvcompress.h>
#include <stdio.h>
#include <stdlib.h>

int main(void) {
  enum { N = 8, D = 4, BUDGET = 4 };
  float k[N * D] = {0}, v[N * D] = {0};
  for (int t = 0; t < N; ++t) k[t * D] = (t % 2 ? 1.0f : 10.0f) + 0.01f * (float)t, v[t * D] = (float)t;
  int32_t len = N, budget = BUDGET;
  kvc_plan_desc_t desc = KVC_PLAN_DESC_INIT;
  desc.num_q_heads = 1, desc.num_kv_heads = 1, desc.head_dim = D, desc.dtype = KVC_DTYPE_F32;
  desc.batch = 1, desc.seq_lens = &len, desc.budgets = &budget, desc.method = KVC_SCORE_KNORM;
  kvc_context_t ctx;
  kvc_plan_t plan;
  kvc_plan_info_t info;
  size_t bytes;
  void *ws;
  if (kvc_context_create(KVC_BACKEND_CPU, 0, &ctx) || kvc_plan_create(ctx, &desc, &plan)) return 1;
  kvc_plan_get_info(plan, &info);
  kvc_plan_workspace_size(plan, KVC_OP_COMPRESS, &bytes);
  if (posix_memalign(&ws, 256, bytes ? bytes : 256)) return 1;
  kvc_paged_kv_t cache = {k, v, KVC_DTYPE_F32, 1, D, N, 1, N * D, D, N * D, NULL, NULL, 0};
  kvc_status_t st = kvc_compress(ctx, plan, &cache, NULL, NULL, ws, bytes, NULL);
  const int32_t *keep = (const int32_t *)((char *)ws + info.keep_offset_bytes);
  printf("consumer: libkvcompress %s %s, kept", kvc_version_string(), kvc_status_name(st));
  for (int j = 0; j < BUDGET; ++j) printf(" %d", (int)keep[j]);
  int moved = 1;
  for (int j = 0; j < BUDGET; ++j) moved &= v[j * D] == (float)(2 * j + 1);
  printf(", values moved: %s\n", moved ? "yes" : "no");
  kvc_plan_destroy(plan), kvc_context_destroy(ctx), free(ws);
  return st != KVC_SUCCESS;
}
