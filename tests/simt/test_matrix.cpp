// test_matrix.cpp - self-tests of the emulator's warp-level matrix instructions and cp.async
// (kernels/mma.cuh; kernels in test_matrix_kernels.cu), each against a scalar reference written
// from the PTX ISA's definitions. Part of test_simt, so they also run in the shuffled order.
#include <criterion/criterion.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "simt.h"
#include "test_capture.h"
#include "test_matrix_kernels.h"

namespace {

uint16_t to_bits(float x, bool bf16) {
  if (bf16) return __nv_bfloat16_raw(__float2bfloat16(x)).x;
  return __half_raw(__float2half(x)).x;
}

float from_bits(uint16_t bits, bool bf16) {
  uint32_t u = (uint32_t)bits << 16;
  float f;
  if (bf16) {
    memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// Deterministic values: small integers (every sum exact in fp32) or fractions of both signs.
float value(unsigned i, bool integers) {
  unsigned h = i * 2654435761u;
  h ^= h >> 15;
  return integers ? (float)((int)(h % 17) - 8) : ((float)(h % 2001) - 1000.f) / 256.f;
}

// d = a * b + c in double, rounded once (a m x k, b k x n row-major).
std::vector<float> reference(const std::vector<float> &a, const std::vector<float> &b, const std::vector<float> &c,
                             int m, int n, int k) {
  std::vector<float> d(m * n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double sum = c[i * n + j];
      for (int x = 0; x < k; ++x) sum += (double)a[i * k + x] * b[x * n + j];
      d[i * n + j] = (float)sum;
    }
  return d;
}

void check_mma(bool bf16, bool integers) {
  const int warps = 4;
  std::vector<uint16_t> a(warps * 256), b(warps * 128);
  std::vector<float> c(warps * 128), d(warps * 128, NAN);
  for (int i = 0; i < warps * 256; ++i) a[i] = to_bits(value(i, integers), bf16);
  for (int i = 0; i < warps * 128; ++i) b[i] = to_bits(value(i + 5000, integers), bf16);
  for (int i = 0; i < warps * 128; ++i) c[i] = value(i + 9000, integers);
  cr_assert_eq(run_mma_fragments(bf16, a.data(), b.data(), c.data(), d.data(), warps), 0);
  for (int w = 0; w < warps; ++w) {
    std::vector<float> fa(256), fb(128), fc(c.begin() + w * 128, c.begin() + (w + 1) * 128);
    for (int i = 0; i < 256; ++i) fa[i] = from_bits(a[w * 256 + i], bf16);
    for (int i = 0; i < 128; ++i) fb[i] = from_bits(b[w * 128 + i], bf16);
    std::vector<float> want = reference(fa, fb, fc, 16, 8, 16);
    for (int i = 0; i < 128; ++i)
      cr_assert_eq(d[w * 128 + i], want[i], "%s warp %d: D(%d, %d) = %.9g, want %.9g", bf16 ? "bf16" : "f16", w,
                   i / 8, i % 8, d[w * 128 + i], want[i]);
  }
}

}  // namespace

Test(simt_matrix, mma_f16_small_integers) { check_mma(false, true); }
Test(simt_matrix, mma_f16_fractions) { check_mma(false, false); }
Test(simt_matrix, mma_bf16_small_integers) { check_mma(true, true); }
Test(simt_matrix, mma_bf16_fractions) { check_mma(true, false); }

// S = Q K^T + C, Q and K row-major through shared memory and ldmatrix.x4, as the scoring kernels
// load their tiles: checks the ldmatrix-to-mma fragment correspondence stated in mma.cuh.
Test(simt_matrix, qk_through_ldmatrix_and_mma) {
  for (int type = 0; type < 2; ++type) {
    const bool bf16 = type == 1;
    const int warps = 4;
    std::vector<uint16_t> q(warps * 256), k(warps * 256);
    std::vector<float> c(warps * 256), s(warps * 256, NAN);
    for (int i = 0; i < warps * 256; ++i) {
      q[i] = to_bits(value(i + 17, false), bf16);
      k[i] = to_bits(value(i + 40000, false), bf16);
      c[i] = value(i + 80000, false);
    }
    cr_assert_eq(run_qk_through_ldmatrix(bf16, q.data(), k.data(), c.data(), s.data(), warps), 0);
    for (int w = 0; w < warps; ++w) {
      std::vector<float> fq(256), kt(256), fc(c.begin() + w * 256, c.begin() + (w + 1) * 256);
      for (int i = 0; i < 256; ++i) fq[i] = from_bits(q[w * 256 + i], bf16);
      for (int key = 0; key < 16; ++key)  // K^T: row d, column key
        for (int dim = 0; dim < 16; ++dim) kt[dim * 16 + key] = from_bits(k[w * 256 + key * 16 + dim], bf16);
      std::vector<float> want = reference(fq, kt, fc, 16, 16, 16);
      for (int i = 0; i < 256; ++i)
        cr_assert_eq(s[w * 256 + i], want[i], "%s warp %d: S(%d, %d) = %.9g, want %.9g", bf16 ? "bf16" : "f16", w,
                     i / 16, i % 16, s[w * 256 + i], want[i]);
    }
  }
}

// PTX ISA: each address is the start of a matrix row (lanes 8i .. 8i + 7: rows of matrix i); lane t
// receives elements (t / 4, 2 (t % 4)) and (t / 4, 2 (t % 4) + 1) of matrix i in register i.
Test(simt_matrix, ldmatrix_x1_x2_x4_layouts) {
  std::vector<int> slot_of(32);
  for (int i = 0; i < 32; ++i) slot_of[i] = (i * 11 + 5) % 32;  // rows out of order in memory
  for (int count : {1, 2, 4}) {
    std::vector<uint32_t> out(32 * 4, 0);
    cr_assert_eq(run_ldmatrix_layout(count, slot_of.data(), out.data()), 0);
    for (int t = 0; t < 32; ++t)
      for (int i = 0; i < count; ++i) {
        const uint32_t lo = 64 * i + 8 * (t / 4) + 2 * (t % 4), want = lo | (lo + 1) << 16;
        cr_assert_eq(out[t * 4 + i], want, ".x%d lane %d register %d: 0x%08x, want 0x%08x", count, t, i,
                     out[t * 4 + i], want);
      }
  }
}

// A group lands at the wait that covers it (not before: the emulator defers the copy to the
// latest point the PTX ISA allows), zero-filled past src-size, visible to other threads after a
// barrier.
Test(simt_matrix, cp_async_groups_land_at_their_wait) {
  std::vector<uint32_t> src0(256), src1(256), src2(256), seen(64 * 6 * 4, 0);
  std::vector<int> src_bytes(64);
  for (int i = 0; i < 256; ++i) src0[i] = 0x10000000u + i, src1[i] = 0x20000000u + i, src2[i] = 0x30000000u + i;
  for (int t = 0; t < 64; ++t) src_bytes[t] = t % 4 == 0 ? 0 : t % 4 == 1 ? 8 : 16;
  cr_assert_eq(run_cp_async_groups(src0.data(), src1.data(), src2.data(), src_bytes.data(), seen.data()), 0);
  const uint32_t poison = 0xffffffffu;
  auto chunk2 = [&](int t, int word) { return 4 * word < src_bytes[t] ? src2[4 * t + word] : 0u; };
  for (int t = 0; t < 64; ++t)
    for (int word = 0; word < 4; ++word) {
      const uint32_t *mine = &seen[t * 24];
      cr_assert_eq(mine[0 * 4 + word], poison, "thread %d: buf0 before any wait", t);
      cr_assert_eq(mine[1 * 4 + word], src0[4 * t + word], "thread %d: buf0 after wait_group 2", t);
      cr_assert_eq(mine[2 * 4 + word], poison, "thread %d: buf1 after wait_group 2", t);
      cr_assert_eq(mine[3 * 4 + word], src1[4 * t + word], "thread %d: buf1 after wait_group 1", t);
      cr_assert_eq(mine[4 * 4 + word], chunk2(t, word), "thread %d: buf2 after wait_group 0", t);
      cr_assert_eq(mine[5 * 4 + word], chunk2((t + 1) % 64, word), "thread %d: neighbour's buf2 after a barrier", t);
    }
}

// The double-buffered pipeline is right with a barrier after the wait, and some thread order
// exposes the missing barrier without it.
Test(simt_matrix, cp_async_pipeline_needs_its_barrier) {
  const int tiles = 5;
  std::vector<float> in(tiles * 512), sums(128), want(128, 0.f);
  for (int i = 0; i < tiles * 512; ++i) in[i] = (float)(i % 97);
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < tiles; ++i)
      for (int e = 0; e < 4; ++e) want[t] += in[i * 512 + ((7 * t) % 128) * 4 + e];
  int wrong = 0;
  for (unsigned long long seed = 0; seed <= 8; ++seed) {
    simt::set_seed(seed);
    cr_assert_eq(run_cp_async_pipeline(in.data(), tiles, sums.data(), true), 0);
    cr_assert(sums == want, "with the barrier, seed %llu", seed);
    cr_assert_eq(run_cp_async_pipeline(in.data(), tiles, sums.data(), false), 0);
    wrong += sums != want;
  }
  cr_assert_gt(wrong, 0, "no order exposed the missing barrier");
}

Test(simt_matrix, cp_async_never_waited_is_reported) {
  std::vector<uint32_t> src(128, 7u), seen(128, 0);
  int errors = -1;
  std::string text = capture_stderr([&] { errors = run_cp_async_never_waited(src.data(), seen.data()); });
  cr_assert_eq(errors, 32, "one report per thread, got %d", errors);
  cr_assert(contains(text, "never waited for"), "%s", text.c_str());
  for (uint32_t word : seen) cr_assert_eq(word, 0xffffffffu, "the copy landed without a wait");
  cr_assert_eq(cudaGetLastError(), cudaErrorLaunchFailure);
}

Test(simt_matrix, cp_async_to_global_memory_is_reported) {
  std::vector<uint32_t> src(4, 7u), dst(4, 0);
  int errors = -1;
  std::string text = capture_stderr([&] { errors = run_cp_async_to_global(src.data(), dst.data()); });
  cr_assert_eq(errors, 1);
  cr_assert(contains(text, "16-byte aligned shared memory"), "%s", text.c_str());
  cr_assert_eq(cudaGetLastError(), cudaErrorLaunchFailure);
}

Test(simt_matrix, ldmatrix_with_exited_lanes_is_reported) {
  std::vector<uint32_t> out(32, 0);
  int errors = -1;
  std::string text = capture_stderr([&] { errors = run_ldmatrix_half_warp(out.data()); });
  cr_assert_eq(errors, 1);
  cr_assert(contains(text, "needs the whole warp"), "%s", text.c_str());
  cr_assert_eq(cudaGetLastError(), cudaErrorLaunchFailure);
}
