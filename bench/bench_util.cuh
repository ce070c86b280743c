/*
 * bench_util.cuh - the one place the GPU benchmarks share their timing and reporting code.
 *
 *   KVC_BENCH_CHECK(call)        abort the program with the call's text and CUDA's error string
 *   bench::fill_random(...)      deterministic pseudo-random values in [-1.7, 1.7) of f32/f16/bf16,
 *                                written on the device (never time on zeros: METHOD.md)
 *   bench::L2Flusher             READS a buffer of 2x the device's L2 before every timed repetition,
 *                                so each repetition starts from a cold L2, as a real compression
 *                                event does (it follows a prefill that streamed gigabytes). A read,
 *                                not a memset: a written buffer leaves ~2x L2 of dirty lines whose
 *                                write-back the timed kernel would pay for.
 *   bench::busy(ms)              keeps every SM busy for `ms` of device time (the GPU idles at a
 *                                few hundred MHz and takes a while to clock up): 200 ms when a
 *                                program starts, 20 ms before each measured point
 *   bench::time_gpu(fn, ...)     cudaEvent timing: a busy spell, `warmup` untimed calls, then
 *                                `iters` timed ones, each after an L2 flush; returns the statistics
 *   bench::Floor, add_floor      the analytic floor of a point (least bytes moved, flops, exponentials)
 *                                beside its time; see "Floors" below
 *   bench::Stats                 median, p10, p90 (ms) of a set of times
 *   bench::copy_bandwidth_gbps() cudaMemcpy device-to-device of a buffer >> L2, counting bytes read
 *                                plus bytes written: the memory ceiling measured in the same run
 *   bench::Json                  builds one JSON line ({"key":value,...}) and prints it to stdout
 *   bench::device_json()         the device's name, SM count, L2 size, memory, driver and runtime
 *   bench::Progress              "[  3/40] label" progress lines on stderr; also the step budget:
 *                                with KVC_BENCH_BUDGET_S=<s> in the environment, the first step()
 *                                after <s> seconds of the program prints a {"record":"skipped"} line
 *                                for the points not run and exits 0 (bench/run_device.sh sets it, so
 *                                a step ends itself instead of being killed)
 *   bench::split / parse_list    comma-separated command-line lists
 *
 * Every program prints JSON lines only on stdout (one per measured point, plus one "device" and one
 * "ceiling" line), each flushed as soon as it is measured, so bench/report.py can join them with
 * the Python peers' lines, whose keys match. Header-only (inline / templates): each bench_*.cu is
 * one translation unit.
 */
#ifndef KVC_BENCH_UTIL_CUH
#define KVC_BENCH_UTIL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cost_model.h"
#include "kvcompress.h"

#define KVC_BENCH_CHECK(call)                                                                  \
  do {                                                                                         \
    cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                 \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

namespace bench {

/* ------------------------------------------------------------------------------------------ */
/* Data                                                                                       */
/* ------------------------------------------------------------------------------------------ */

__global__ void fill_random_kernel(void *data, size_t count, kvc_dtype_t dtype, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    unsigned x = (unsigned)i * 2654435761u ^ (unsigned)(i >> 32) * 0x9e3779b9u ^ seed * 0x85ebca6bu;
    x ^= x >> 15, x *= 2246822519u, x ^= x >> 13, x *= 3266489917u, x ^= x >> 16;
    const float value = ((x & 0xffffffu) / 16777216.0f - 0.5f) * 3.4f;
    if (dtype == KVC_DTYPE_FP8_E4M3) /* e4m3 codes of magnitude below 4 (exponent field 0..8), never NaN */
      ((unsigned char *)data)[i] = (unsigned char)((x >> 24 & 0x80u) | (x >> 8) % 9u << 3 | (x & 7u));
    else if (dtype == KVC_DTYPE_F32) ((float *)data)[i] = value;
    else if (dtype == KVC_DTYPE_F16) ((__half *)data)[i] = __float2half(value);
    else ((__nv_bfloat16 *)data)[i] = __float2bfloat16(value);
  }
}

/* `count` elements of `dtype` (F32, F16, BF16 or FP8_E4M3) at `data`, enqueued on `stream`. */
inline void fill_random(void *data, size_t count, kvc_dtype_t dtype, unsigned seed, cudaStream_t stream = 0) {
  if (!count) return;
  fill_random_kernel<<<1024, 256, 0, stream>>>(data, count, dtype, seed);
  KVC_BENCH_CHECK(cudaGetLastError());
}

inline size_t dtype_bytes(kvc_dtype_t dtype) { return dtype == KVC_DTYPE_F32 ? 4 : dtype == KVC_DTYPE_FP8_E4M3 ? 1 : 2; }

inline kvc_dtype_t dtype_of(const std::string &name) {
  if (name == "f32") return KVC_DTYPE_F32;
  if (name == "f16") return KVC_DTYPE_F16;
  if (name == "bf16") return KVC_DTYPE_BF16;
  if (name == "fp8" || name == "fp8_e4m3") return KVC_DTYPE_FP8_E4M3;
  fprintf(stderr, "unknown dtype %s (f32, f16, bf16, fp8)\n", name.c_str());
  exit(2);
}

/* ------------------------------------------------------------------------------------------ */
/* Statistics and timing                                                                      */
/* ------------------------------------------------------------------------------------------ */

struct Stats {
  double median_ms = 0, p10_ms = 0, p90_ms = 0, min_ms = 0;
  int reps = 0;
};

/* Quantiles by nearest rank over the sorted times. */
inline Stats stats_of(std::vector<float> times) {
  Stats s;
  if (times.empty()) return s;
  std::sort(times.begin(), times.end());
  auto at = [&](double q) { return (double)times[std::min(times.size() - 1, (size_t)(q * (times.size() - 1) + 0.5))]; };
  s.median_ms = times.size() % 2 ? at(0.5) : 0.5 * (times[times.size() / 2 - 1] + times[times.size() / 2]);
  s.p10_ms = at(0.1), s.p90_ms = at(0.9), s.min_ms = times.front();
  s.reps = (int)times.size();
  return s;
}

/* Folds a buffer with 16-byte loads. The store depends on every load (so the compiler keeps them)
 * but almost never happens (one thread in 2^32), so the buffer's lines stay clean in L2. */
__global__ void l2_read_kernel(const uint4 *data, size_t count, unsigned *sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = data[i];
    acc ^= v.x + v.y + v.z + v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

/* A buffer of 2x the L2 of the current device; flush() reads all of it on `stream`, evicting (and
 * writing back) whatever the previous repetition left in L2 before the next timed one starts. */
class L2Flusher {
 public:
  L2Flusher() {
    int dev = 0, l2 = 0, sms = 0;
    KVC_BENCH_CHECK(cudaGetDevice(&dev));
    KVC_BENCH_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    KVC_BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    bytes_ = std::max<size_t>(2 * (size_t)l2, 8u << 20) & ~(size_t)15;
    blocks_ = 4 * std::max(sms, 1);
    KVC_BENCH_CHECK(cudaMalloc(&buffer_, bytes_));
    KVC_BENCH_CHECK(cudaMalloc(&sink_, sizeof(unsigned)));
    fill_random(buffer_, bytes_ / 4, KVC_DTYPE_F32, 99u);
    KVC_BENCH_CHECK(cudaDeviceSynchronize());
  }
  ~L2Flusher() {
    cudaFree(buffer_);
    cudaFree(sink_);
  }
  L2Flusher(const L2Flusher &) = delete;
  L2Flusher &operator=(const L2Flusher &) = delete;
  void flush(cudaStream_t stream) {
    l2_read_kernel<<<blocks_, 256, 0, stream>>>((const uint4 *)buffer_, bytes_ / sizeof(uint4), sink_);
    KVC_BENCH_CHECK(cudaGetLastError());
  }
  size_t bytes() const { return bytes_; }

 private:
  void *buffer_ = nullptr;
  unsigned *sink_ = nullptr;
  size_t bytes_ = 0;
  int blocks_ = 1;
};

/* ------------------------------------------------------------------------------------------ */
/* Clocks up                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* Every thread spins on the device's nanosecond timer until `until_ns`, with FMAs in between. */
__global__ void busy_kernel(unsigned long long until_ns, float *sink) {
  float x = threadIdx.x * 1e-3f, y = 1.0f;
  unsigned long long now = 0;
  do {
#pragma unroll 16
    for (int i = 0; i < 256; ++i) x = fmaf(x, 0.999f, y);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now < until_ns);
  if (x == 12345.0f) sink[0] = x;
}

__global__ void device_time_kernel(unsigned long long *out) {
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  *out = now;
}

/* Keeps every SM busy for `ms` of device time on `stream` and waits for it. */
inline void busy(double ms, cudaStream_t stream = 0) {
  static unsigned long long *clock_ns = nullptr;
  static float *sink = nullptr;
  static int blocks = 0;
  if (!clock_ns) {
    int dev = 0, sms = 0;
    KVC_BENCH_CHECK(cudaGetDevice(&dev));
    KVC_BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    blocks = 2 * std::max(sms, 1);
    KVC_BENCH_CHECK(cudaMalloc(&clock_ns, sizeof *clock_ns));
    KVC_BENCH_CHECK(cudaMalloc(&sink, sizeof *sink));
  }
  unsigned long long start = 0;
  device_time_kernel<<<1, 1, 0, stream>>>(clock_ns);
  KVC_BENCH_CHECK(cudaMemcpyAsync(&start, clock_ns, sizeof start, cudaMemcpyDeviceToHost, stream));
  KVC_BENCH_CHECK(cudaStreamSynchronize(stream));
  busy_kernel<<<blocks, 256, 0, stream>>>(start + (unsigned long long)(ms * 1e6), sink);
  KVC_BENCH_CHECK(cudaGetLastError());
  KVC_BENCH_CHECK(cudaStreamSynchronize(stream));
}

/* Device time before each measured point (the host set up the point meanwhile; the clocks fall). */
constexpr double kPointBusyMs = 20.0;
/* Device time when a program starts: from idle clocks (345 MHz seen on an H200 here) to full ones. */
constexpr double kStartBusyMs = 200.0;

/* Runs a busy spell (kPointBusyMs), fn(stream) `warmup` times untimed, then `iters` times between
 * two events, each repetition after an L2 flush (when `flusher` is given), and returns the
 * statistics. fn must only enqueue
 * work on the stream. `setup(stream)`, when given, runs before each repetition outside the timed
 * region (e.g. to restore a cache that the timed call compacts in place). */
template <class Fn, class Setup>
Stats time_gpu(Fn &&fn, Setup &&setup, cudaStream_t stream, int warmup, int iters, L2Flusher *flusher) {
  cudaEvent_t start, stop;
  KVC_BENCH_CHECK(cudaEventCreate(&start));
  KVC_BENCH_CHECK(cudaEventCreate(&stop));
  busy(kPointBusyMs, stream);
  for (int i = 0; i < warmup; ++i) {
    setup(stream);
    fn(stream);
  }
  KVC_BENCH_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> times;
  times.reserve(iters);
  for (int i = 0; i < iters; ++i) {
    setup(stream);
    if (flusher) flusher->flush(stream);
    KVC_BENCH_CHECK(cudaEventRecord(start, stream));
    fn(stream);
    KVC_BENCH_CHECK(cudaEventRecord(stop, stream));
    KVC_BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    KVC_BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  KVC_BENCH_CHECK(cudaGetLastError());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return stats_of(times);
}

template <class Fn>
Stats time_gpu(Fn &&fn, cudaStream_t stream, int warmup, int iters, L2Flusher *flusher) {
  return time_gpu(fn, [](cudaStream_t) {}, stream, warmup, iters, flusher);
}

/* Device-to-device cudaMemcpy of `bytes` (default 1 GiB, >> any L2), median of `iters`, in GB/s
 * counting bytes read plus bytes written (2 * bytes): the copy ceiling the memory-bound ops are
 * compared with. */
inline double copy_bandwidth_gbps(size_t bytes = (size_t)1 << 30, int iters = 10) {
  void *a = nullptr, *b = nullptr;
  KVC_BENCH_CHECK(cudaMalloc(&a, bytes));
  KVC_BENCH_CHECK(cudaMalloc(&b, bytes));
  fill_random(a, bytes / 4, KVC_DTYPE_F32, 7u);
  cudaStream_t stream;
  KVC_BENCH_CHECK(cudaStreamCreate(&stream));
  Stats s = time_gpu([&](cudaStream_t st) { KVC_BENCH_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st)); },
                     stream, 2, iters, nullptr);
  cudaStreamDestroy(stream);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * (double)bytes / (s.median_ms * 1e-3) / 1e9;
}

/* ------------------------------------------------------------------------------------------ */
/* JSON lines                                                                                 */
/* ------------------------------------------------------------------------------------------ */

class Json {
 public:
  Json &add(const char *key, const std::string &value) {
    key_(key);
    text_ += '"';
    for (char c : value) {
      if (c == '"' || c == '\\') text_ += '\\';
      if ((unsigned char)c >= 0x20) text_ += c;
    }
    text_ += '"';
    return *this;
  }
  Json &add(const char *key, const char *value) { return add(key, std::string(value ? value : "")); }
  Json &add(const char *key, double value) {
    key_(key);
    char buf[64];
    if (std::isfinite(value)) snprintf(buf, sizeof buf, "%.6g", value);
    else snprintf(buf, sizeof buf, "null");
    text_ += buf;
    return *this;
  }
  Json &add(const char *key, float value) { return add(key, (double)value); }
  Json &add(const char *key, int value) { return add(key, (long long)value); }
  Json &add(const char *key, long value) { return add(key, (long long)value); }
  Json &add(const char *key, long long value) {
    key_(key);
    text_ += std::to_string(value);
    return *this;
  }
  Json &add(const char *key, unsigned long value) { return add(key, (long long)value); }
  Json &add(const char *key, unsigned long long value) { return add(key, (long long)value); }
  Json &add(const char *key, bool value) {
    key_(key);
    text_ += value ? "true" : "false";
    return *this;
  }
  /* median_ms, p10_ms, p90_ms, reps */
  Json &add_stats(const Stats &s) {
    return add("median_ms", s.median_ms).add("p10_ms", s.p10_ms).add("p90_ms", s.p90_ms).add("reps", s.reps);
  }
  std::string str() const { return "{" + text_ + "}"; }
  void print() const {
    printf("%s\n", str().c_str());
    fflush(stdout);
  }

 private:
  void key_(const char *key) {
    if (!text_.empty()) text_ += ',';
    text_ += '"';
    text_ += key;
    text_ += "\":";
  }
  std::string text_;
};

/* {"record":"device", "bench":..., "gpu":..., "sms":..., "l2_bytes":..., "mem_bytes":...,
 *  "driver":..., "runtime":..., "kvc_version":...} */
inline double program_seconds();

inline Json device_json(const char *bench_name) {
  (void)program_seconds(); /* the step budget counts from here */
  int dev = 0, driver = 0, runtime = 0;
  KVC_BENCH_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  KVC_BENCH_CHECK(cudaGetDeviceProperties(&prop, dev));
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  Json j;
  j.add("record", "device").add("bench", bench_name).add("gpu", prop.name).add("cc", prop.major * 10 + prop.minor);
  j.add("sms", prop.multiProcessorCount).add("l2_bytes", (long long)prop.l2CacheSize);
  j.add("mem_bytes", (long long)prop.totalGlobalMem).add("driver", driver).add("runtime", runtime);
  j.add("kvc_version", kvc_version_string());
  return j;
}

/* ------------------------------------------------------------------------------------------ */
/* Floors                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* The analytic floor of one measured point: the fewest bytes any implementation must move
 * through device memory, the tensor flops and the exponentials of the algorithm (METHOD.md's "two
 * numbers", plus the MUFU term of attention). Its time is the largest of bytes / the copy ceiling
 * and flops / the bf16 GEMM ceiling, both measured in the same run (the copy one by
 * print_device_and_copy_ceiling in every program; the GEMM one by bench_ceilings, passed on by
 * bench/run_device.sh as KVC_BENCH_GEMM_TFLOPS), and exps / the MUFU rate of bench/cost_model.h
 * (derived from the chip's clock and unit count, not measured). bench/cost_model.h gives each op's
 * counts (kvc_floor_<op>); a program writes add_floor(j, floor, stats) beside its times. */
struct Floor {
  double bytes = 0, flops = 0, exps = 0;
};

/* The run's ceilings: copy GB/s (read + written), bf16 GEMM TFLOP/s (0 when not measured). */
struct Ceilings {
  double copy_gbps = 0, gemm_tflops = 0;
};
inline Ceilings &ceilings() {
  static Ceilings c = [] {
    Ceilings init;
    if (const char *t = getenv("KVC_BENCH_GEMM_TFLOPS")) init.gemm_tflops = atof(t);
    return init;
  }();
  return c;
}

/* ms of the floor, or 0 when a term has no ceiling measured for it. */
inline double floor_ms(const Floor &f) {
  const Ceilings &c = ceilings();
  if ((f.bytes > 0 && c.copy_gbps <= 0) || (f.flops > 0 && c.gemm_tflops <= 0)) return 0;
  const double memory_ms = f.bytes > 0 ? f.bytes / (c.copy_gbps * 1e9) * 1e3 : 0;
  const double math_ms = f.flops > 0 ? f.flops / (c.gemm_tflops * 1e12) * 1e3 : 0;
  const double mufu_ms = f.exps / KVC_H200_MUFU_EXP2_PER_S * 1e3;
  return std::max(std::max(memory_ms, math_ms), mufu_ms);
}

/* Prints the device line and the copy ceiling line, after keeping the GPU busy for kStartBusyMs;
 * returns the copy bandwidth (GB/s), also kept in ceilings() for the floors. */
inline double print_device_and_copy_ceiling(const char *bench_name) {
  device_json(bench_name).print();
  busy(kStartBusyMs);
  const double gbps = copy_bandwidth_gbps();
  ceilings().copy_gbps = gbps;
  Json().add("record", "ceiling").add("bench", bench_name).add("kind", "copy").add("gbps", gbps).print();
  return gbps;
}

/* floor_bytes, floor_flops, floor_ms and pct_of_floor (floor / measured median, in %) beside the
 * times of a point whose stats were added with add_stats. */
inline Json &add_floor(Json &j, const Floor &f, const Stats &s) {
  const double ms = floor_ms(f);
  j.add("floor_bytes", f.bytes).add("floor_flops", f.flops).add("floor_exps", f.exps);
  if (ms > 0) j.add("floor_ms", ms).add("pct_of_floor", s.median_ms > 0 ? 100.0 * ms / s.median_ms : 0.0);
  return j;
}

/* ------------------------------------------------------------------------------------------ */
/* Progress, the step budget and command lines                                                */
/* ------------------------------------------------------------------------------------------ */

/* Seconds since the program started (its first call). */
inline double program_seconds() {
  static const auto start = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

class Progress {
 public:
  Progress(const char *name, int total) : name_(name), total_(total) {
    (void)program_seconds();
    if (const char *b = getenv("KVC_BENCH_BUDGET_S")) budget_s_ = atof(b);
  }
  /* Announces the next point; past the step budget, records the points left and ends the program. */
  void step(const char *fmt, ...) {
    if (budget_s_ > 0 && program_seconds() > budget_s_) {
      fprintf(stderr, "[%s] step budget of %.0f s spent: %d of %d points not run\n", name_, budget_s_, total_ - done_,
              total_);
      Json().add("record", "skipped").add("bench", name_).add("reason", "step budget").add("budget_s", budget_s_)
          .add("done", done_).add("total", total_).print();
      fflush(stderr);
      exit(0);
    }
    ++done_;
    char buf[256];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof buf, fmt, args);
    va_end(args);
    fprintf(stderr, "[%s %3d/%d] %s\n", name_, done_, total_, buf);
    fflush(stderr);
  }

 private:
  const char *name_;
  int total_, done_ = 0;
  double budget_s_ = 0;
};

inline std::vector<std::string> split(const char *list) {
  std::vector<std::string> out;
  std::string s(list);
  for (size_t at = 0; at <= s.size();) {
    size_t comma = s.find(',', at);
    if (comma == std::string::npos) comma = s.size();
    if (comma > at) out.push_back(s.substr(at, comma - at));
    at = comma + 1;
  }
  return out;
}

inline std::vector<int> parse_ints(const char *list) {
  std::vector<int> out;
  for (const std::string &s : split(list)) out.push_back(atoi(s.c_str()));
  return out;
}

inline std::vector<double> parse_doubles(const char *list) {
  std::vector<double> out;
  for (const std::string &s : split(list)) out.push_back(atof(s.c_str()));
  return out;
}

/* kvpress's compute_n_kept: int(n * (1 - ratio)), at least 1 (ratio < 1). */
inline int kept_of(int n, double ratio) { return std::max(1, (int)(n * (1.0 - ratio))); }

/* Method names shared with the Python peers. */
inline const char *method_name(kvc_score_method_t m) {
  static const char *names[] = {"snapkv", "h2o", "tova", "knorm", "streaming"};
  return (int)m >= 0 && (int)m < 5 ? names[m] : "?";
}

inline kvc_score_method_t method_of(const std::string &name) {
  for (int m = 0; m < 5; ++m)
    if (name == method_name((kvc_score_method_t)m)) return (kvc_score_method_t)m;
  fprintf(stderr, "unknown method %s (snapkv, h2o, tova, knorm, streaming)\n", name.c_str());
  exit(2);
}

inline void check_kvc(kvc_status_t status, kvc_context_t ctx, const char *what) {
  if (status == KVC_SUCCESS) return;
  fprintf(stderr, "%s: %s (%s)\n", what, kvc_status_name(status), kvc_last_error(ctx));
  exit(1);
}

/* ------------------------------------------------------------------------------------------ */
/* A paged NHD cache on the device (identity block table), or an HF-style contiguous one       */
/* ------------------------------------------------------------------------------------------ */

/* batch sequences of n tokens; layout "paged" (NHD pages of page_size, block table [batch][pages])
 * or "hf" ([batch][kv_heads][n][head_dim], page_table NULL). K and V random; V only when with_v. */
struct DeviceCache {
  kvc_paged_kv_t desc{};
  void *k = nullptr, *v = nullptr;
  int32_t *table = nullptr;
  size_t pool_bytes = 0;

  DeviceCache(const std::string &layout, int batch, int n, int kv_heads, int head_dim, kvc_dtype_t dtype,
              int page_size, bool with_v, unsigned seed, cudaStream_t stream = 0) {
    const size_t elem = dtype_bytes(dtype);
    desc.dtype = dtype;
    desc.num_kv_heads = kv_heads;
    desc.head_dim = head_dim;
    if (layout == "hf") {
      desc.page_size = n;
      desc.num_pages = batch;
      desc.stride_token = head_dim;
      desc.stride_head = (int64_t)n * head_dim;
      desc.stride_page = (int64_t)kv_heads * n * head_dim;
      pool_bytes = (size_t)batch * kv_heads * n * head_dim * elem;
    } else {
      const int pages_per_seq = (n + page_size - 1) / page_size, num_pages = pages_per_seq * batch;
      desc.page_size = page_size;
      desc.num_pages = num_pages;
      desc.stride_token = (int64_t)kv_heads * head_dim;
      desc.stride_head = head_dim;
      desc.stride_page = (int64_t)page_size * kv_heads * head_dim;
      desc.max_pages = pages_per_seq;
      pool_bytes = (size_t)num_pages * page_size * kv_heads * head_dim * elem;
      /* sequences' pages interleaved (page p of sequence b is b + p * batch), as a pool that
       * served several requests would hand them out, not one contiguous run per sequence */
      std::vector<int32_t> host(num_pages);
      for (int b = 0; b < batch; ++b)
        for (int p = 0; p < pages_per_seq; ++p) host[(size_t)b * pages_per_seq + p] = b + p * batch;
      KVC_BENCH_CHECK(cudaMalloc(&table, sizeof(int32_t) * host.size()));
      KVC_BENCH_CHECK(cudaMemcpy(table, host.data(), sizeof(int32_t) * host.size(), cudaMemcpyHostToDevice));
      desc.page_table = table;
    }
    KVC_BENCH_CHECK(cudaMalloc(&k, pool_bytes));
    KVC_BENCH_CHECK(cudaMalloc(&v, with_v ? pool_bytes : 256));
    fill_random(k, pool_bytes / elem, dtype, seed, stream);
    if (with_v) fill_random(v, pool_bytes / elem, dtype, seed + 1, stream);
    desc.k = k;
    desc.v = v;
  }
  ~DeviceCache() {
    cudaFree(k);
    cudaFree(v);
    cudaFree(table);
  }
  DeviceCache(const DeviceCache &) = delete;
  DeviceCache &operator=(const DeviceCache &) = delete;
};

}  // namespace bench

#endif /* KVC_BENCH_UTIL_CUH */
