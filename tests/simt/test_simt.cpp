// test_simt.cpp - self-tests of the SIMT emulator (kernels in test_kernels.cu). Registered twice:
// plain, and with SIMT_SEED / SIMT_INTERLEAVE set, which every test must pass as well.
#include <criterion/criterion.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "simt.h"
#include "test_capture.h"
#include "test_kernels.h"

namespace {

int poison_int() {
  int v;
  memset(&v, simt::kPoison, sizeof v);
  return v;
}

}  // namespace

Test(simt, block_reduce) {
  const int n = 1000;
  std::vector<float> in(n), sums(4);
  for (int i = 0; i < n; ++i) in[i] = (float)(i % 7);
  cr_assert_eq(run_block_reduce(in.data(), sums.data(), n), 0);
  for (int b = 0; b < 4; ++b) {
    float want = 0;
    for (int i = b * 256; i < n && i < (b + 1) * 256; ++i) want += in[i];
    cr_assert_float_eq(sums[b], want, 0, "block %d: %g != %g", b, sums[b], want);
  }
}

Test(simt, block_scan) {
  const int n = 3 * 256 + 17;
  std::vector<int> in(n), incl(n), excl(n);
  for (int i = 0; i < n; ++i) in[i] = (i * 7919) % 13 - 6;
  cr_assert_eq(run_block_scan(in.data(), incl.data(), excl.data(), n), 0);
  int acc = 0;
  for (int i = 0; i < n; ++i) {
    if (i % 256 == 0) acc = 0;
    cr_assert_eq(excl[i], acc, "exclusive[%d]", i);
    acc += in[i];
    cr_assert_eq(incl[i], acc, "inclusive[%d]", i);
  }
}

Test(simt, transpose_ragged) {
  const int rows = 70, cols = 45;
  std::vector<float> in(rows * cols), out(rows * cols, -1.f);
  for (int i = 0; i < rows * cols; ++i) in[i] = (float)i;
  cr_assert_eq(run_transpose(in.data(), out.data(), rows, cols), 0);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      cr_assert_eq(out[c * rows + r], in[r * cols + c], "(%d, %d)", r, c);
}

Test(simt, shared_histogram_atomics) {
  const int n = 5000;
  std::vector<unsigned> in(n), hist(64, 0), want(64, 0);
  for (int i = 0; i < n; ++i) want[(in[i] = (unsigned)i * 2654435761u >> 7) % 64]++;
  cr_assert_eq(run_histogram(in.data(), n, hist.data()), 0);
  for (int b = 0; b < 64; ++b) cr_assert_eq(hist[b], want[b], "bin %d", b);
}

Test(simt, early_exit_before_barrier) {
  const int n = 70;
  std::vector<int> in(256), sums(256, -7);
  std::vector<unsigned> ballots(8, 0);
  for (int i = 0; i < 256; ++i) in[i] = i + 1;
  cr_assert_eq(run_early_exit(in.data(), sums.data(), ballots.data(), n), 0);
  for (int t = 0; t < 256; ++t)
    cr_assert_eq(sums[t], t < n ? (t + 1) * (t + 2) / 2 : -7, "thread %d", t);
  cr_assert_eq(ballots[0], 0xffffffffu);
  cr_assert_eq(ballots[1], 0xffffffffu);
  cr_assert_eq(ballots[2], 0x3fu);  // lanes 64..69
  cr_assert_eq(ballots[3], 0u);
}

Test(simt, partial_masks) {
  std::vector<int> out(8 * 64, 12345);
  cr_assert_eq(run_partial_masks(out.data()), 0);
  for (int t = 0; t < 64; ++t) {
    int lane = t % 32, v = 100 + t;
    const int *o = out.data() + t;
    cr_assert_eq(o[0],
                 lane < 16       ? 100 + (t ^ 1)
                 : lane + 2 < 32 ? v + 2
                                 : v,
                 "disjoint masks, thread %d", t);
    cr_assert_eq(o[64], lane % 2 == 0 ? 0x11111111 : 0, "even ballot, thread %d", t);
    cr_assert_eq(o[128], 100 + (t & ~7) + 3, "width 8, thread %d", t);
    cr_assert_eq(o[192], lane % 16 == 0 ? v : v - 1, "up in width 16, thread %d", t);
    cr_assert_eq(o[256], lane < 8 ? poison_int() : 0, "outside the mask, thread %d", t);
    cr_assert_eq(o[320], lane >= 16 ? 3 : -5, "votes, thread %d", t);
    cr_assert_eq(o[384], lane >= 16 ? v - 16 : v, "xor 16 in width 16, thread %d", t);
    cr_assert_eq(o[448], 1);
  }
}

Test(simt, shuffle_types) {
  __half h[32];
  __nv_bfloat16 b[32];
  double d[32];
  unsigned long long u[32];
  cr_assert_eq(run_shfl_types(h, b, d, u), 0);
  for (int lane = 0; lane < 32; ++lane) {
    int src = (lane + 1) % 32;
    cr_assert_eq(__half2float(h[lane]), (float)src);
    cr_assert_eq(__bfloat162float(b[lane]), (float)src);
    cr_assert_eq(d[lane], src + 0.5);
    cr_assert_eq(u[lane], (unsigned long long)src << 40);
  }
}

Test(simt, grid_3d) {
  const unsigned blocks = 3 * 2 * 2, size = 4 * 3 * 2;
  std::vector<unsigned> ids(blocks * size, ~0u), dims(6, 0);
  cr_assert_eq(run_grid_ids(ids.data(), dims.data()), 0);
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < size; ++t) cr_assert_eq(ids[b * size + t], b * 1000 + t);
  unsigned want[6] = {3, 2, 2, 4, 3, 2};
  for (int i = 0; i < 6; ++i) cr_assert_eq(dims[i], want[i], "dim %d", i);
}

Test(simt, dynamic_smem_half_bf16) {
  const int n = 150;  // three blocks of 64, the last one ragged
  std::vector<float> in(n);
  std::vector<__half> h(n, __float2half(-1.f));
  std::vector<__nv_bfloat16> b(n, __float2bfloat16(-1.f));
  unsigned short poison[3] = {0, 0, 0};
  for (int i = 0; i < n; ++i) in[i] = 0.25f * (float)i;
  cr_assert_eq(run_reverse_half(in.data(), h.data(), b.data(), n, poison), 0);
  for (int i = 0; i < 128; ++i) {
    int src = i / 64 * 64 + 63 - i % 64;
    cr_assert_eq(__half2float(h[i]), in[src], "half %d", i);
    cr_assert_eq(__bfloat162float(b[i]), __bfloat162float(__float2bfloat16(in[src])), "bf16 %d", i);
  }
  for (int i = 0; i < 3; ++i) cr_assert_eq(poison[i], 0xffff, "block %d saw 0x%04x", i, poison[i]);
  cr_assert(__hisnan(__ushort_as_half(poison[0])));
}

Test(simt, sync_votes) {
  std::vector<int> pred(96, 1), out(4, -1);
  for (int t = 0; t < 96; t += 3) pred[t] = 0;  // 20 zeros among the 60 that stay
  pred[90] = 0;                                 // an exited thread: must not count
  cr_assert_eq(run_sync_votes(pred.data(), 60, out.data()), 0);
  cr_assert_eq(out[0], 40, "count");
  cr_assert_eq(out[1], 0, "and");
  cr_assert_eq(out[2], 1, "or");
  cr_assert_eq(out[3], 0, "or of nothing");
  std::vector<int> ones(96, 1);
  cr_assert_eq(run_sync_votes(ones.data(), 96, out.data()), 0);
  cr_assert_eq(out[0], 96);
  cr_assert_eq(out[1], 1);
}

Test(simt, static_shared_poisoned_per_block) {
  std::vector<int> first(6, 0);
  cr_assert_eq(run_static_smem_first_read(first.data(), 6), 0);
  for (int b = 0; b < 6; ++b) cr_assert_eq(first[b], poison_int(), "block %d saw %d", b, first[b]);
}

Test(simt, interleaved_blocks) {
  simt::set_seed(0);
  simt::set_interleave(2);
  std::vector<int> log(12, -1);
  int pos = 0;
  cr_assert_eq(run_phase_log(log.data(), &pos, 4), 0);
  // two blocks in flight, switching at every barrier; each keeps its own static __shared__
  const int want[12] = {0, 10, 1, 11, 2, 12, 20, 30, 21, 31, 22, 32};
  cr_assert_eq(pos, 12);
  for (int i = 0; i < 12; ++i) cr_assert_eq(log[i], want[i], "entry %d", i);
}

Test(simt, shuffled_order_catches_missing_barrier) {
  const int blocks = 4, n = blocks * 128;
  std::vector<int> in(n), out(n), want(n);
  for (int i = 0; i < n; ++i) in[i] = 3 * i + 1;
  for (int i = 0; i < n; ++i) want[i] = in[i % 128 ? i - 1 : i];
  int wrong = 0;
  for (unsigned long long seed = 1; seed <= 8; ++seed) {
    simt::set_seed(seed);
    cr_assert_eq(run_neighbour_copy(in.data(), out.data(), blocks, true), 0);
    cr_assert(out == want, "with the barrier, seed %llu", seed);
    cr_assert_eq(run_neighbour_copy(in.data(), out.data(), blocks, false), 0);
    wrong += out != want;
  }
  cr_assert_gt(wrong, 0, "no seed exposed the missing barrier");
  simt::set_seed(0);  // round robin runs each thread to its end in index order: no difference
  cr_assert_eq(run_neighbour_copy(in.data(), out.data(), blocks, false), 0);
  cr_assert(out == want);
}

Test(simt, divergent_barrier_reported) {
  int lines[2] = {0, 0}, errors = -1;
  std::string text = capture_stderr([&] { errors = run_divergent_barrier(lines); });
  cr_assert_eq(errors, 1);
  cr_assert_eq(simt::last_launch_errors(), 1);
  cr_assert_eq(simt::get_last_error(), cudaErrorLaunchFailure);
  cr_assert_eq(simt::get_last_error(), cudaSuccess, "get_last_error clears the error");
  cr_assert(lines[0] > 0 && lines[1] > lines[0]);
  for (int line : lines) {
    std::string site = "test_kernels.cu:" + std::to_string(line);
    cr_assert(contains(text, site), "report lacks %s:\n%s", site.c_str(), text.c_str());
  }
  cr_assert(contains(text, "divergent barrier"));
}

Test(simt, deadlock_reported_and_recovered) {
  std::vector<int> out(32, -1);
  int errors = -1;
  std::string text = capture_stderr([&] { errors = run_deadlock(out.data(), 3); });
  cr_assert_eq(errors, 1);
  cr_assert(contains(text, "deadlock"));
  cr_assert(contains(text, "16 thread(s) at __shfl_sync (mask 0xffffffff)"), "%s", text.c_str());
  cr_assert(contains(text, "16 thread(s) at __syncthreads"), "%s", text.c_str());
  cudaError_t error = cudaGetLastError();
  cr_assert_eq(error, cudaErrorLaunchFailure);
  cr_assert_str_eq(cudaGetErrorString(error), "unspecified launch failure");
  // the emulator is usable again
  std::vector<float> in(256, 1.f), sums(1);
  cr_assert_eq(run_block_reduce(in.data(), sums.data(), 256), 0);
  cr_assert_float_eq(sums[0], 256.f, 0);
  cr_assert_eq(simt::launch_errors(), 1);
}

Test(simt, mismatched_warp_ops_reported) {
  std::vector<int> out(32, 0);
  int errors = -1;
  std::string text = capture_stderr([&] { errors = run_warp_mismatch(out.data()); });
  cr_assert_eq(errors, 1);
  cr_assert(contains(text, "different warp ops or masks"), "%s", text.c_str());
  cr_assert_eq(cudaGetLastError(), cudaErrorLaunchFailure);
}

Test(simt, invalid_configurations) {
  std::string text = capture_stderr([] {
    cr_assert_eq(run_config(1, 64, 32, 0), 1);
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
    cr_assert_eq(run_config(1, 1025, 1, 0), 1);
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
    cr_assert_eq(run_config(0, 32, 1, 0), 1);
    cr_assert_eq(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
    cr_assert_eq(run_config(1, 32, 1, 300 * 1024), 1);
    cr_assert_eq(cudaGetLastError(), cudaErrorInvalidValue);
  });
  cr_assert(contains(text, "more than 1024 threads"));
  cr_assert(contains(text, "block exceeds (1024, 1024, 64)"));
  cr_assert(contains(text, "zero dimension"));
  cr_assert(contains(text, "exceeds 227 KiB"));
  cr_assert_eq(run_config(2, 32, 32, 48 * 1024), 0);
  cr_assert_eq(cudaGetLastError(), cudaSuccess);
  cr_assert_eq(simt::launch_errors(), 4);
}

Test(simt, atomics_grid_wide) {
  AtomicCounters c{};
  c.imin = 1;
  c.bits_and = ~0u;
  const int blocks = 3, threads = 96, n = blocks * threads;
  cr_assert_eq(run_atomics(&c, blocks, threads), 0);
  cr_assert_eq(c.i, n);
  cr_assert_eq(c.u, 2u * n);
  cr_assert_eq(c.ull, (unsigned long long)n << 33);
  cr_assert_float_eq(c.f, 0.5f * n, 0);
  cr_assert_float_eq(c.d, 0.25 * n, 0);
  cr_assert_eq(c.imax, n - 1);
  cr_assert_eq(c.imin, -(n - 1));
  cr_assert_eq(c.umax, 3u * (n - 1));
  cr_assert_eq(c.ullmax, (unsigned long long)(n - 1) << 34);
  cr_assert_eq(c.cas, n);
  cr_assert_eq(c.bits_or, ~0u);
  cr_assert_eq(c.bits_and, 0xffff0000u);
  cr_assert_lt(c.exch_seen, 1000000u, "more than one thread saw the initial value");
}

Test(simt, launch_arguments) {
  int out[4] = {0, 0, 0, 0}, counter = 7;
  cr_assert_eq(run_args_once(out, &counter), 0);
  cr_assert_eq(counter, 8, "arguments must be evaluated once per launch");
  for (int v : out) cr_assert_eq(v, 7 + 23);
}

Test(simt, intrinsics) {
  cr_assert_eq(__popc(0xf0f0u), 8);
  cr_assert_eq(__popcll(~0ull), 64);
  cr_assert_eq(__clz(0), 32);
  cr_assert_eq(__clz(1), 31);
  cr_assert_eq(__clz(-1), 0);
  cr_assert_eq(__clzll(1ll << 40), 23);
  cr_assert_eq(__clzll(0), 64);
  cr_assert_eq(__ffs(0), 0);
  cr_assert_eq(__ffs(0x50), 5);
  cr_assert_eq(__ffsll(1ll << 50), 51);
  cr_assert_eq(__brev(1u), 0x80000000u);
  cr_assert_eq(__brev(0x12345678u), 0x1e6a2c48u);
  cr_assert_eq(__float_as_uint(1.f), 0x3f800000u);
  cr_assert_eq(__uint_as_float(0xbf800000u), -1.f);
  cr_assert_eq(__float_as_int(-0.f), (int)0x80000000u);
  cr_assert_eq(__int_as_float(0x40000000), 2.f);
  cr_assert_float_eq(__expf(1.f), 2.7182818f, 1e-6f);
  cr_assert_float_eq(__logf(8.f), 2.0794415f, 1e-6f);
  cr_assert_float_eq(__fdividef(1.f, 4.f), 0.25f, 0);
  cr_assert_float_eq(rsqrtf(16.f), 0.25f, 0);
  float x = 3.f;
  cr_assert_eq(__ldg(&x), 3.f);
  cr_assert_eq(min(3, 5u), 3u);
  cr_assert_eq(max(-1, 2ll), 2ll);
  cr_assert_eq(min(2.f, NAN), 2.f);
  cr_assert_eq(fmaxf(1.f, 2.f), 2.f);
}

// As on a GPU: more than 48 KiB of dynamic shared memory only after cudaFuncSetAttribute.
Test(simt, dynamic_smem_over_48k_needs_the_kernel_attribute) {
  int out = 0, errors = -1;
  const size_t bytes = 100 * 1024;
  std::string text = capture_stderr([&] { errors = run_big_dynamic_smem(&out, bytes, false); });
  cr_assert_eq(errors, 1);
  cr_assert(contains(text, "exceeds the kernel's limit"), "%s", text.c_str());
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidValue);
  cr_assert_eq(run_big_dynamic_smem(&out, bytes, true), 0);
  cr_assert_eq(out, (int)(bytes / sizeof(int)) - 1);
  cr_assert_eq(cudaGetLastError(), cudaSuccess);
}
