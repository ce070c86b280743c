// simt.cpp - the emulator's runtime: fibers and their context switch, the block scheduler,
// barriers, the warp exchange, launch checks and error reports. See README.md.
#include "simt.h"

#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

// The hand-written context switch on x86-64; ucontext elsewhere, or with -DSIMT_UCONTEXT to test
// it.
#if defined(__x86_64__) && !defined(SIMT_UCONTEXT)
#define SIMT_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_NO_ASAN __attribute__((no_sanitize_address))
#else
#define SIMT_NO_ASAN
#endif

#if defined(__SANITIZE_THREAD__)
#define SIMT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIMT_TSAN 1
#endif
#endif
#if defined(SIMT_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace simt {
namespace detail {
unsigned char *dyn_smem;
}

namespace {
using detail::LaunchSpec;
using detail::Op;

// ---- context switch -----------------------------------------------------------------------------

#if defined(SIMT_ASM_SWITCH)
// Saves the SysV callee-saved registers and the stack pointer of the running context in *save_sp,
// then resumes the context whose stack pointer is new_sp. No signal mask, so no system call:
// swapcontext costs ~70x more.
extern "C" void kvc_simt_switch(void **save_sp, void *new_sp);
asm(R"(
  .text
  .p2align 4
  .globl kvc_simt_switch
  .hidden kvc_simt_switch
  .type kvc_simt_switch, @function
kvc_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kvc_simt_switch, .-kvc_simt_switch
)");
#endif

struct Context {
#if defined(SIMT_ASM_SWITCH)
  void *sp = nullptr;
#else
  ucontext_t uc;
#endif
  char *stack = nullptr;  // lowest usable address, and size (for ASan)
  size_t stack_size = 0;
#if defined(SIMT_ASAN)
  void *fake_stack = nullptr;
#endif
#if defined(SIMT_TSAN)
  void *tsan_fiber = nullptr;  // created once per stack; switches synchronise, so no races
#endif
};

// Runs `to` until something switches back to `from`. A context that will never run again says so
// (dying), which lets ASan free its fake stack. The sanitizers must hear of every stack switch.
void jump(Context &from, Context &to, bool dying) {
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(dying ? nullptr : &from.fake_stack, to.stack, to.stack_size);
#else
  (void)dying;
#endif
#if defined(SIMT_TSAN)
  __tsan_switch_to_fiber(to.tsan_fiber, 0);
#endif
#if defined(SIMT_ASM_SWITCH)
  kvc_simt_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

// ---- state --------------------------------------------------------------------------------------

enum class Wait : unsigned char { None, Block, Warp, Done };

// One cp.async of 16 bytes: the source as read at issue, and where it lands at the wait.
struct AsyncCopy {
  unsigned char *dst;
  unsigned char data[16];
  const char *file;
  int line;
};

struct Fiber {
  Context ctx;
  uint3 tid;
  unsigned linear;  // x + y * blockDim.x + z * blockDim.x * blockDim.y; warp = linear / 32
  Wait wait;
  // the pending barrier or warp op, and its result
  Op op;
  unsigned mask;
  int arg, width;
  const char *file;
  int line;
  unsigned long long value, result;
  // cp.async copies not waited for, in issue order; groups[i] is the end (in `copies`) of the
  // i-th oldest committed group; copies past the last group are not committed yet
  std::vector<AsyncCopy> copies;
  std::vector<size_t> groups;
};

struct Warp {
  unsigned live;     // lanes that have not exited
  unsigned waiting;  // lanes parked in a warp op
};

// A block in flight. Several exist only when interleaving.
struct Slot {
  Fiber *fibers;
  std::vector<Warp> warps;
  std::vector<Fiber *> ring;  // runnable fibers, FIFO; each fiber is in it at most once
  size_t head = 0, count = 0;
  std::unique_ptr<unsigned char[]> smem;  // exact size, so ASan sees overflows
  std::vector<char> tls_copy;             // its static __shared__ while another slot runs
  uint3 bid;
  int live = 0;
  // __syncthreads phase
  int arrived = 0, bar_count = 0, bar_line = 0;
  const char *bar_file = nullptr;
  bool bar_reported = false;
  bool yield = false;  // return to the scheduler at the next switch (interleaving)
  bool active = false;
};

struct Config {
  unsigned long long seed = 0;
  int interleave = 1;
  size_t stack_size = 0;
};

struct Rng {
  unsigned long long s;
  unsigned long long next() {  // splitmix64
    unsigned long long z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return (size_t)(next() % n); }
  template <class T>
  void shuffle(T *v, size_t n) {
    for (size_t i = n; i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }
};

// Fiber stacks: one mapping reused across launches; the lowest page of each stack is a guard.
class Stacks {
 public:
  char *get(size_t i) const { return base_ + i * size_ + page_; }
  size_t usable() const { return size_ - page_; }
  void ensure(size_t n, size_t size) {
    if (n <= count_ && size == requested_) return;
    release();
    requested_ = size;
    page_ = (size_t)sysconf(_SC_PAGESIZE);
    size_ = (size + 2 * page_ - 1) / page_ * page_;  // rounded, plus the guard page
    void *m = mmap(nullptr, n * size_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      fprintf(stderr, "simt: cannot map %zu fiber stacks of %zu bytes\n", n, size_);
      abort();
    }
    base_ = static_cast<char *>(m);
    count_ = n;
    for (size_t i = 0; i < n; ++i) mprotect(base_ + i * size_, page_, PROT_NONE);
  }

 private:
  void release() {
    if (base_) munmap(base_, count_ * size_);
    base_ = nullptr;
    count_ = 0;
  }
  char *base_ = nullptr;
  size_t count_ = 0, requested_ = 0, size_ = 0, page_ = 0;
};

// The launch being run (one at a time, under g_mutex).
struct Run {
  const LaunchSpec *spec;
  unsigned nthreads, nwarps;
  bool seeded;
  Rng rng;
  std::vector<Slot> slots;
  std::vector<Fiber> fibers;
  Stacks stacks;
  Context sched;
  // the kernel module's TLS block on this thread: static __shared__, owned by one slot at a time
  char *tls = nullptr;
  size_t tls_size = 0;
  Slot *tls_owner = nullptr;
  std::vector<char> tls_host;  // its contents before the launch
  int errors;
};

Run g_run;
Slot *g_slot;
Fiber *g_cur;

std::mutex g_mutex;  // serialises launches, and guards everything here
Config g_config;
bool g_config_loaded;
unsigned long long g_rng_state;
int g_last_errors, g_total_errors;
cudaError_t g_sticky = cudaSuccess;
std::vector<std::pair<const void *, size_t>> g_smem_limits;  // kernels given more than 48 KiB

// ---- reports ------------------------------------------------------------------------------------

const char *op_name(Op op) {
  switch (op) {
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncCount: return "__syncthreads_count";
    case Op::SyncAnd: return "__syncthreads_and";
    case Op::SyncOr: return "__syncthreads_or";
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::SyncWarp: return "__syncwarp";
    case Op::Mma: return "mma.sync";
    case Op::Ldmatrix: return "ldmatrix";
  }
  return "?";
}

// An error found while running: printed, and counted into the launch's result.
void report(const char *fmt, ...) {
  const LaunchSpec &spec = *g_run.spec;
  fprintf(stderr, "simt: %s launched at %s:%d: ", spec.kernel, spec.file, spec.line);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  ++g_run.errors;
}

// ---- scheduling ---------------------------------------------------------------------------------

void push(Slot &s, Fiber *f) {
  size_t at = s.head + s.count++;
  s.ring[at < s.ring.size() ? at : at - s.ring.size()] = f;
}

Fiber *pop(Slot &s) {
  if (!s.count) return nullptr;
  Fiber *f = s.ring[s.head];
  if (++s.head == s.ring.size()) s.head = 0;
  --s.count;
  return f;
}

// Leaves the running context `from` for the next runnable fiber of the slot, or for the scheduler
// when there is none or the slot must yield.
void switch_away(Context &from, bool dying) {
  Slot &s = *g_slot;
  Fiber *next = s.yield ? nullptr : pop(s);
  s.yield = false;
  if (!next) return jump(from, g_run.sched, dying);
  if (&next->ctx == &from) return;  // released itself and is first in line
  g_cur = next;
  threadIdx = next->tid;
  jump(from, next->ctx, dying);
}

// All live threads reached the barrier: they become runnable, in index order (round robin) or
// shuffled. The ring is empty here, since every live fiber was waiting.
void release_block(Slot &s) {
  int count = s.bar_count, arrived = s.arrived;
  s.arrived = 0;
  s.head = 0;
  for (unsigned i = 0; i < g_run.nthreads; ++i) {
    Fiber &f = s.fibers[i];
    if (f.wait != Wait::Block) continue;
    f.wait = Wait::None;
    f.result = f.op == Op::SyncCount ? (unsigned long long)count
               : f.op == Op::SyncAnd ? count == arrived
               : f.op == Op::SyncOr  ? count != 0
                                     : 0;
    s.ring[s.count++] = &f;
  }
  if (g_run.seeded) g_run.rng.shuffle(s.ring.data(), s.count);
  s.yield = g_run.slots.size() > 1;
}

// Source lane of a shuffle, as PTX shfl.sync computes it from the lane, b and c operands (c is
// ((32 - width) << 8) | clamp, the clamp being 0 for up and 31 otherwise). Out of range: own lane.
int shfl_source(Op op, int lane, int b, int width) {
  int segmask = (32 - width) & 31, clamp = op == Op::ShflUp ? 0 : 31;
  int min_lane = lane & segmask, max_lane = min_lane | (clamp & ~segmask);
  int j;
  bool ok;
  b &= 31;
  switch (op) {
    case Op::ShflUp:
      j = lane - b;
      ok = j >= max_lane;
      break;
    case Op::ShflDown:
      j = lane + b;
      ok = j <= max_lane;
      break;
    case Op::ShflXor:
      j = lane ^ b;
      ok = j <= max_lane;
      break;
    default:
      j = min_lane | (b & ~segmask);
      ok = j <= max_lane;
      break;
  }
  return ok ? j : lane;
}

// ---- warp-wide matrix instructions and cp.async --------------------------------------------------

bool is_matrix_op(Op op) { return op == Op::Mma || op == Op::Ldmatrix; }

// What a lane of mma or ldmatrix hands the warp (Fiber::value points at it, on the lane's stack).
struct MmaLane {
  const uint32_t *a, *b;
  const float *c;
  float *d;
};
struct LdmatrixLane {
  const unsigned char *row;
  uint32_t *r;
};

// Whether [p, p + bytes) lies in the running block's dynamic or static shared memory.
bool in_shared(const void *p, size_t bytes) {
  const char *c = static_cast<const char *>(p);
  const char *dyn = reinterpret_cast<const char *>(g_slot->smem.get());
  if (c >= dyn && c + bytes <= dyn + g_run.spec->smem) return true;
  return g_run.tls_size && c >= g_run.tls && c + bytes <= g_run.tls + g_run.tls_size;
}

// Every f16 value as float, by its bits (built at load time: no guard on the hot path).
const std::vector<float> g_f16_values = [] {
  std::vector<float> table(65536);
  for (uint32_t i = 0; i < 65536; ++i) {
    __half_raw raw;
    raw.x = (unsigned short)i;
    table[i] = __half2float(__half(raw));
  }
  return table;
}();

// Element `half` (0: the low 16 bits) of a register of f16 or bf16 pairs, widened exactly.
inline double element(MmaType type, uint32_t reg, int half) {
  const uint16_t bits = (uint16_t)(reg >> (16 * half));
  if (type == MmaType::F16) return g_f16_values[bits];
  const uint32_t u = (uint32_t)bits << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// The PTX ISA's fragments of mma.m16n8k16 (f16 / bf16 multiplicands, f32 accumulators), with
// groupID g = lane >> 2 and threadID_in_group t = lane % 4, each register's low half first:
//   A (16x16, row): a0,a1 (g, 2t..2t+1)  a2,a3 (g+8, 2t..)  a4,a5 (g, 2t+8..)  a6,a7 (g+8, 2t+8..)
//   B (16x8, col):  b0,b1 (k = 2t..2t+1, n = g)  b2,b3 (k = 2t+8..2t+9, n = g)
//   C, D (16x8):    c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
// Its arrays are its own and its operands the lanes' registers (locals): not instrumented under ASan,
// where it is the emulator's hottest function.
SIMT_NO_ASAN void complete_mma(Fiber *lanes, MmaType type) {
  double a[16][16], b[16][8], d[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaLane &in = *reinterpret_cast<const MmaLane *>(lanes[lane].value);
    const int g = lane >> 2, t = lane % 4;
    for (int e = 0; e < 8; ++e) {  // element a_e sits in register e / 2, half e % 2
      const int row = g + ((e / 2) % 2) * 8, col = 2 * t + (e % 2) + (e >= 4 ? 8 : 0);
      a[row][col] = element(type, in.a[e / 2], e % 2);
    }
    for (int e = 0; e < 4; ++e) b[2 * t + (e % 2) + (e >= 2 ? 8 : 0)][g] = element(type, in.b[e / 2], e % 2);
    for (int e = 0; e < 4; ++e) d[g + (e >= 2 ? 8 : 0)][2 * t + (e % 2)] = in.c[e];
  }
  // D = C + sum over k of A(., k) B(k, .), each element summed in k order in double (exact: the
  // products are exact in fp32); k outermost, so the 128 sums proceed side by side
  for (int k = 0; k < 16; ++k)
    for (int row = 0; row < 16; ++row)
      for (int col = 0; col < 8; ++col) d[row][col] += a[row][k] * b[k][col];
  for (int lane = 0; lane < 32; ++lane) {  // every C is read above: d may alias c
    const MmaLane &out = *reinterpret_cast<const MmaLane *>(lanes[lane].value);
    const int g = lane >> 2, t = lane % 4;
    for (int e = 0; e < 4; ++e) out.d[e] = (float)d[g + (e >= 2 ? 8 : 0)][2 * t + (e % 2)];
  }
}

// ldmatrix.m8n8.x<count>.b16: lane t's register i holds the 32 bits at byte 4 (t % 4) of row t / 4
// of matrix i, whose address lane 8i + t / 4 gave.
void complete_ldmatrix(Slot &s, unsigned w, Fiber *lanes, int count) {
  for (int lane = 0; lane < 8 * count; ++lane) {
    const unsigned char *row = reinterpret_cast<const LdmatrixLane *>(lanes[lane].value)->row;
    if ((reinterpret_cast<uintptr_t>(row) & 15) || !in_shared(row, 16)) {
      report("block (%u,%u,%u) warp %u: ldmatrix at %s:%d: lane %d's row address %p is not a 16-byte aligned "
             "address in shared memory",
             s.bid.x, s.bid.y, s.bid.z, w, lanes[lane].file, lanes[lane].line, lane, (const void *)row);
      return;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const LdmatrixLane &out = *reinterpret_cast<const LdmatrixLane *>(lanes[lane].value);
    for (int i = 0; i < count; ++i) {
      const LdmatrixLane &source = *reinterpret_cast<const LdmatrixLane *>(lanes[8 * i + lane / 4].value);
      memcpy(&out.r[i], source.row + 4 * (lane % 4), 4);
    }
  }
}

// Completes the warp op of the lanes in `mask` if all of them that are still alive have arrived:
// computes every lane's result, then makes them runnable. Lanes outside the mask (or exited) read
// as kPoison.
void try_complete_warp(Slot &s, unsigned w, unsigned mask) {
  Warp &warp = s.warps[w];
  unsigned group = mask & warp.live;
  if (!group || (warp.waiting & group) != group) return;
  Fiber *lanes = s.fibers + w * 32;
  const Fiber &lead = lanes[__builtin_ctz(group)];
  unsigned ballot = 0;
  const Fiber *odd = nullptr;
  for (unsigned g = group; g; g &= g - 1) {
    Fiber &f = lanes[__builtin_ctz(g)];
    ballot |= f.value ? g & -g : 0;
    if (!odd && (f.mask != mask || f.op != lead.op || (is_matrix_op(f.op) && f.arg != lead.arg))) odd = &f;
  }
  if (odd) {
    report(
        "block (%u,%u,%u) warp %u: lanes of mask 0x%08x meet at different warp ops or masks: "
        "lane %u at %s (mask 0x%08x) %s:%d, lane %u at %s (mask 0x%08x) %s:%d",
        s.bid.x, s.bid.y, s.bid.z, w, mask, lead.linear % 32, op_name(lead.op), lead.mask,
        lead.file, lead.line, odd->linear % 32, op_name(odd->op), odd->mask, odd->file, odd->line);
  }
  if (is_matrix_op(lead.op) && !odd) {
    if (group != ~0u)
      report("block (%u,%u,%u) warp %u: %s at %s:%d with exited lanes (live 0x%08x): it needs the whole warp",
             s.bid.x, s.bid.y, s.bid.z, w, op_name(lead.op), lead.file, lead.line, group);
    else if (lead.op == Op::Mma)
      complete_mma(lanes, (MmaType)lead.arg);
    else
      complete_ldmatrix(s, w, lanes, lead.arg);
  }
  size_t start = s.count;
  for (unsigned g = group; g; g &= g - 1) {
    int lane = __builtin_ctz(g);
    Fiber &f = lanes[lane];
    switch (f.op) {
      case Op::Mma:
      case Op::Ldmatrix: f.result = 0; break;
      case Op::Ballot: f.result = ballot; break;
      case Op::Any: f.result = ballot != 0; break;
      case Op::All: f.result = ballot == group; break;
      case Op::SyncWarp: f.result = 0; break;
      default: {
        int src = shfl_source(f.op, lane, f.arg, f.width);
        f.result = src == lane ? f.value : (group >> src & 1u) ? lanes[src].value : ~0ull;
      }
    }
    f.wait = Wait::None;
    push(s, &f);
  }
  warp.waiting &= ~group;
  if (g_run.seeded) {  // shuffle the lanes just queued, in place in the ring
    size_t n = s.count - start, cap = s.ring.size();
    for (size_t i = n; i > 1; --i) {
      size_t a = (s.head + start + i - 1) % cap, b = (s.head + start + g_run.rng.below(i)) % cap;
      std::swap(s.ring[a], s.ring[b]);
    }
  }
}

// A fiber's end, and (below) its start. Neither returns, so neither may have ASan redzones: they
// would stay poisoned when the stack is reused.
[[noreturn]] SIMT_NO_ASAN void fiber_exit() {
  Slot &s = *g_slot;
  Fiber &f = *g_cur;
  if (!f.copies.empty())
    report("block (%u,%u,%u) thread (%u,%u,%u) exited with %zu cp.async copies never waited for (the first "
           "issued at %s:%d)",
           s.bid.x, s.bid.y, s.bid.z, f.tid.x, f.tid.y, f.tid.z, f.copies.size(), f.copies[0].file,
           f.copies[0].line);
  f.wait = Wait::Done;
  --s.live;
  unsigned w = f.linear / 32, bit = 1u << (f.linear % 32);
  s.warps[w].live &= ~bit;
  // exited threads count as arrived
  if (s.arrived && s.arrived == s.live) release_block(s);
  for (unsigned pending = s.warps[w].waiting; pending;) {
    unsigned mask = s.fibers[w * 32 + __builtin_ctz(pending)].mask;
    try_complete_warp(s, w, mask);
    pending &= ~mask & (pending - 1);
  }
  switch_away(f.ctx, true);
  __builtin_unreachable();
}

// Entered through the first switch to the fiber.
SIMT_NO_ASAN void fiber_entry() {
#if defined(SIMT_ASAN)
  // The first fiber of a launch is entered from the launching thread's stack: learn its bounds.
  const void *from;
  size_t from_size;
  __sanitizer_finish_switch_fiber(nullptr, &from, &from_size);
  if (!g_run.sched.stack) {
    g_run.sched.stack = static_cast<char *>(const_cast<void *>(from));
    g_run.sched.stack_size = from_size;
  }
#endif
  g_run.spec->body(g_run.spec->ctx);
  fiber_exit();
}

void init_fiber(Fiber &f) {
#if defined(SIMT_ASM_SWITCH)
  // What kvc_simt_switch pops: six registers, then fiber_entry as the return address, above which
  // a null "return address" of fiber_entry keeps the SysV alignment (rsp + 8 is 16-aligned).
  void **sp = reinterpret_cast<void **>(f.ctx.stack + f.ctx.stack_size);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void *>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp = 0 ends backtraces here
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.ctx.stack;
  f.ctx.uc.uc_stack.ss_size = f.ctx.stack_size;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry, 0);
#endif
  f.wait = Wait::None;
  f.copies.clear();
  f.groups.clear();
}

void start_block(Slot &s, size_t linear_block) {
  const LaunchSpec &spec = *g_run.spec;
  size_t gx = spec.grid.x, gy = spec.grid.y;
  s.bid = make_uint3((unsigned)(linear_block % gx), (unsigned)(linear_block / gx % gy),
                     (unsigned)(linear_block / (gx * gy)));
  s.live = (int)g_run.nthreads;
  s.arrived = 0;
  s.yield = false;
  s.head = s.count = 0;
  memset(s.smem.get(), kPoison, spec.smem);
  if (g_run.tls_size)
    memset(g_run.tls_owner == &s ? g_run.tls : s.tls_copy.data(), kPoison, g_run.tls_size);
  for (unsigned w = 0; w < g_run.nwarps; ++w) {
    unsigned n = g_run.nthreads - w * 32;
    s.warps[w] = {n >= 32 ? ~0u : (1u << n) - 1, 0};
  }
  for (unsigned i = 0; i < g_run.nthreads; ++i) {
    init_fiber(s.fibers[i]);
    s.ring[s.count++] = &s.fibers[i];
  }
  if (g_run.seeded) g_run.rng.shuffle(s.ring.data(), s.count);
  s.active = true;
}

// Makes `s` the running block: its builtins, dynamic smem and static __shared__ contents.
void activate(Slot &s) {
  Run &r = g_run;
  if (r.tls_owner != &s && r.tls_size) {
    memcpy(r.tls_owner->tls_copy.data(), r.tls, r.tls_size);
    memcpy(r.tls, s.tls_copy.data(), r.tls_size);
  }
  r.tls_owner = &s;
  g_slot = &s;
  blockIdx = s.bid;
  detail::dyn_smem = s.smem.get();
}

void report_deadlock(Slot &s) {
  struct Site {
    Op op;
    unsigned mask;
    const char *file;
    int line;
    int n;
  };
  std::vector<Site> sites;
  for (unsigned i = 0; i < g_run.nthreads; ++i) {
    Fiber &f = s.fibers[i];
    if (f.wait == Wait::Done) continue;
    unsigned mask = f.wait == Wait::Warp ? f.mask : 0;
    Site *site = nullptr;
    for (Site &x : sites)
      if (x.op == f.op && x.mask == mask && x.line == f.line && !strcmp(x.file, f.file)) site = &x;
    if (site)
      ++site->n;
    else
      sites.push_back({f.op, mask, f.file, f.line, 1});
  }
  report("deadlock in block (%u,%u,%u): every live thread waits at a barrier that cannot complete",
         s.bid.x, s.bid.y, s.bid.z);
  for (const Site &x : sites) {
    if (x.mask)
      fprintf(stderr, "simt:   %d thread(s) at %s (mask 0x%08x) %s:%d\n", x.n, op_name(x.op),
              x.mask, x.file, x.line);
    else
      fprintf(stderr, "simt:   %d thread(s) at %s %s:%d\n", x.n, op_name(x.op), x.file, x.line);
  }
}

// The TLS block that holds the anchor: dl_iterate_phdr gives each module's block on this thread.
struct TlsQuery {
  const char *anchor;
  char *lo;
  size_t size;
};

int find_tls(dl_phdr_info *info, size_t, void *data) {
  auto *q = static_cast<TlsQuery *>(data);
  char *lo = static_cast<char *>(info->dlpi_tls_data);
  if (!lo) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr) &ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_TLS && q->anchor >= lo && q->anchor < lo + ph.p_memsz) {
      q->lo = lo;
      q->size = ph.p_memsz;
      return 1;
    }
  }
  return 0;
}

// Runs a launch on the calling thread; returns the number of errors reported.
int execute(const LaunchSpec &spec, const Config &cfg) {
  Run &r = g_run;
  r.spec = &spec;
  r.errors = 0;
  r.seeded = cfg.seed != 0;
  r.rng.s = g_rng_state;
  r.sched.stack = nullptr;
#if defined(SIMT_TSAN)
  r.sched.tsan_fiber = __tsan_get_current_fiber();
#endif
  r.nthreads = spec.block.x * spec.block.y * spec.block.z;
  r.nwarps = (r.nthreads + 31) / 32;
  size_t total = (size_t)spec.grid.x * spec.grid.y * spec.grid.z;
  size_t nslots = std::min<size_t>((size_t)cfg.interleave, total);
  blockDim = spec.block;
  gridDim = spec.grid;

  // The kernel's static __shared__ variables are thread_local in its module. While the launch
  // runs, this thread runs nothing but kernels, so its instance of that module's TLS block is
  // block storage: poisoned at every block start, swapped between the blocks in flight, and
  // given back to the host code afterwards.
  TlsQuery q{static_cast<const char *>(spec.tls_anchor()), nullptr, 0};
  dl_iterate_phdr(find_tls, &q);
  r.tls = q.lo;
  r.tls_size = q.size;
  r.tls_host.assign(r.tls, r.tls + r.tls_size);

  r.stacks.ensure(nslots * r.nthreads, cfg.stack_size);
  r.fibers.resize(std::max(r.fibers.size(), nslots * r.nthreads));
  r.slots.resize(nslots);
  for (size_t i = 0; i < nslots; ++i) {
    Slot &s = r.slots[i];
    s.fibers = &r.fibers[i * r.nthreads];
    s.warps.resize(r.nwarps);
    s.ring.assign(r.nthreads, nullptr);
    s.smem.reset(new unsigned char[spec.smem]);
    s.tls_copy.resize(nslots > 1 ? r.tls_size : 0);
    s.active = false;
    for (unsigned t = 0; t < r.nthreads; ++t) {
      Fiber &f = s.fibers[t];
      f.ctx.stack = r.stacks.get(i * r.nthreads + t);
      f.ctx.stack_size = r.stacks.usable();
#if defined(SIMT_TSAN)
      if (!f.ctx.tsan_fiber) f.ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
      f.linear = t;
      f.tid = make_uint3(t % spec.block.x, t / spec.block.x % spec.block.y,
                         t / (spec.block.x * spec.block.y));
    }
  }
  r.tls_owner = &r.slots[0];

  std::vector<size_t> order;
  if (r.seeded) {
    order.resize(total);
    for (size_t i = 0; i < total; ++i) order[i] = i;
    r.rng.shuffle(order.data(), total);
  }
  size_t next = 0, active = 0, rr = 0;
  auto block_at = [&](size_t i) { return r.seeded ? order[i] : i; };
  for (Slot &s : r.slots) {
    activate(s);
    start_block(s, block_at(next++));
    ++active;
  }
  while (active) {
    size_t i;
    do i = r.seeded ? r.rng.below(nslots) : rr++ % nslots;
    while (!r.slots[i].active);
    Slot &s = r.slots[i];
    activate(s);
    Fiber *f = pop(s);
    g_cur = f;
    threadIdx = f->tid;
    jump(r.sched, f->ctx, false);
    if (s.live == 0) {
      s.active = false;
      if (next < total)
        start_block(s, block_at(next++));
      else
        --active;
    } else if (s.count == 0) {  // nothing runnable and not a yield: nothing can ever run again
      report_deadlock(s);
      break;
    }
  }
#if defined(SIMT_ASAN)
  if (active)  // aborted: the abandoned fibers' frames are still poisoned, and the stacks reused
    for (Fiber &f : r.fibers) __asan_unpoison_memory_region(f.ctx.stack, f.ctx.stack_size);
#endif
  if (r.tls_size) memcpy(r.tls, r.tls_host.data(), r.tls_size);
  g_rng_state = r.rng.s;
  g_slot = nullptr;
  g_cur = nullptr;
  return r.errors;
}

void seed_rng(unsigned long long seed) { g_rng_state = seed * 0x2545f4914f6cdd1dull; }

void load_config() {
  if (g_config_loaded) return;
  g_config_loaded = true;
  if (const char *v = getenv("SIMT_SEED")) g_config.seed = strtoull(v, nullptr, 0);
  if (const char *v = getenv("SIMT_INTERLEAVE")) g_config.interleave = std::max(1, atoi(v));
#if defined(SIMT_ASAN) || defined(SIMT_TSAN)
  size_t kib = 256;  // instrumented frames are much larger
#else
  size_t kib = 64;
#endif
  if (const char *v = getenv("SIMT_STACK_KB")) kib = std::max(16ul, strtoul(v, nullptr, 0));
  g_config.stack_size = kib * 1024;
  seed_rng(g_config.seed);
}

// Launch checks against the limits of current GPUs (compute capability 7.0 to 10.x).
bool valid_launch(const LaunchSpec &spec, cudaError_t *code) {
  const dim3 &g = spec.grid, &b = spec.block;
  const char *why = nullptr;
  if (!g.x || !g.y || !g.z)
    why = "grid has a zero dimension";
  else if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    why = "grid exceeds (2^31-1, 65535, 65535)";
  else if (!b.x || !b.y || !b.z)
    why = "block has a zero dimension";
  else if (b.x > 1024u || b.y > 1024u || b.z > 64u)
    why = "block exceeds (1024, 1024, 64)";
  else if ((unsigned long long)b.x * b.y * b.z > 1024u)
    why = "block has more than 1024 threads";
  *code = cudaErrorInvalidConfiguration;
  if (!why && spec.smem > 227u * 1024u) {
    why = "dynamic shared memory exceeds 227 KiB";
    *code = cudaErrorInvalidValue;
  }
  size_t limit = 48u * 1024u;
  for (const auto &entry : g_smem_limits)
    if (entry.first == spec.entry) limit = entry.second;
  if (!why && spec.smem > limit) {
    why = "dynamic shared memory exceeds the kernel's limit (48 KiB unless raised with cudaFuncSetAttribute)";
    *code = cudaErrorInvalidValue;
  }
  if (!why) return true;
  fprintf(
      stderr,
      "simt: %s launched at %s:%d: invalid launch, grid (%u,%u,%u) block (%u,%u,%u) smem %zu: %s\n",
      spec.kernel, spec.file, spec.line, g.x, g.y, g.z, b.x, b.y, b.z, spec.smem, why);
  return false;
}

}  // namespace

namespace detail {

int launch(const LaunchSpec &spec) {
  std::lock_guard<std::mutex> lock(g_mutex);
  load_config();
  cudaError_t code = cudaSuccess;
  int errors = 1;
  if (valid_launch(spec, &code)) {
    errors = execute(spec, g_config);
    code = errors ? cudaErrorLaunchFailure : cudaSuccess;
  }
  g_last_errors = errors;
  g_total_errors += errors;
  if (code != cudaSuccess) g_sticky = code;
  return errors;
}

int block_sync(Op op, int pred, const char *file, int line) {
  Slot &s = *g_slot;
  Fiber &f = *g_cur;
  if (s.arrived == 0) {
    s.bar_file = file;
    s.bar_line = line;
    s.bar_count = 0;
    s.bar_reported = false;
  } else if (!s.bar_reported &&
             (line != s.bar_line || (file != s.bar_file && strcmp(file, s.bar_file)))) {
    s.bar_reported = true;
    report(
        "block (%u,%u,%u): divergent barrier: thread (%u,%u,%u) reached %s at %s:%d while "
        "others wait at %s:%d",
        s.bid.x, s.bid.y, s.bid.z, f.tid.x, f.tid.y, f.tid.z, op_name(op), file, line, s.bar_file,
        s.bar_line);
  }
  s.bar_count += pred != 0;
  f.op = op;
  f.file = file;
  f.line = line;
  f.wait = Wait::Block;
  if (++s.arrived == s.live) release_block(s);
  switch_away(f.ctx, false);
  return (int)f.result;
}

unsigned long long warp_op(Op op, unsigned mask, unsigned long long value, int arg, int width,
                           const char *file, int line) {
  Slot &s = *g_slot;
  Fiber &f = *g_cur;
  unsigned w = f.linear / 32, lane = f.linear % 32;
  if (!(mask >> lane & 1u)) {
    report(
        "block (%u,%u,%u) thread (%u,%u,%u): %s at %s:%d with mask 0x%08x that excludes the "
        "calling lane %u",
        s.bid.x, s.bid.y, s.bid.z, f.tid.x, f.tid.y, f.tid.z, op_name(op), file, line, mask, lane);
    mask |= 1u << lane;
  }
  if (width < 1 || width > 32 || (width & (width - 1))) {
    report("%s at %s:%d: width %d is not a power of two in [1, 32]", op_name(op), file, line,
           width);
    width = 32;
  }
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.file = file;
  f.line = line;
  f.wait = Wait::Warp;
  s.warps[w].waiting |= 1u << lane;
  try_complete_warp(s, w, mask);
  switch_away(f.ctx, false);
  return f.result;
}

unsigned active_mask() { return g_slot->warps[g_cur->linear / 32].live; }

}  // namespace detail

void mma_m16n8k16(MmaType type, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                  const char *file, int line) {
  MmaLane lane{a, b, c, d};
  detail::warp_op(Op::Mma, ~0u, reinterpret_cast<uintptr_t>(&lane), (int)type, 32, file, line);
}

void ldmatrix(int count, uint32_t *r, const void *row, const char *file, int line) {
  LdmatrixLane lane{static_cast<const unsigned char *>(row), r};
  if (count != 1 && count != 2 && count != 4) {
    report("ldmatrix at %s:%d: .x%d is not .x1, .x2 or .x4", file, line, count);
    count = 1;
  }
  detail::warp_op(Op::Ldmatrix, ~0u, reinterpret_cast<uintptr_t>(&lane), count, 32, file, line);
}

void cp_async_16(void *smem, const void *global, int src_bytes, const char *file, int line) {
  Fiber &f = *g_cur;
  const Slot &s = *g_slot;
  if ((reinterpret_cast<uintptr_t>(smem) & 15) || !in_shared(smem, 16) || src_bytes < 0 || src_bytes > 16 ||
      (src_bytes > 0 && (reinterpret_cast<uintptr_t>(global) & 15))) {
    report("block (%u,%u,%u) thread (%u,%u,%u): cp.async at %s:%d: destination %p must be 16-byte aligned "
           "shared memory, source %p 16-byte aligned, src-size %d in [0, 16]",
           s.bid.x, s.bid.y, s.bid.z, f.tid.x, f.tid.y, f.tid.z, file, line, smem, global, src_bytes);
    return;
  }
  AsyncCopy copy;
  copy.dst = static_cast<unsigned char *>(smem);
  memset(copy.data, 0, sizeof copy.data);
  if (src_bytes > 0) memcpy(copy.data, global, (size_t)src_bytes);
  copy.file = file;
  copy.line = line;
  f.copies.push_back(copy);
}

void cp_async_commit(const char *, int) {
  Fiber &f = *g_cur;
  f.groups.push_back(f.copies.size());
}

void cp_async_wait(int pending, const char *, int) {
  Fiber &f = *g_cur;
  if (pending < 0) pending = 0;
  if (f.groups.size() <= (size_t)pending) return;
  const size_t drop = f.groups.size() - (size_t)pending, done = f.groups[drop - 1];
  for (size_t i = 0; i < done; ++i) memcpy(f.copies[i].dst, f.copies[i].data, sizeof f.copies[i].data);
  f.copies.erase(f.copies.begin(), f.copies.begin() + (std::ptrdiff_t)done);
  f.groups.erase(f.groups.begin(), f.groups.begin() + (std::ptrdiff_t)drop);
  for (size_t &end : f.groups) end -= done;
}

void set_seed(unsigned long long seed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  load_config();
  g_config.seed = seed;
  seed_rng(seed);
}

void set_interleave(int blocks) {
  std::lock_guard<std::mutex> lock(g_mutex);
  load_config();
  g_config.interleave = std::max(1, blocks);
}

int last_launch_errors() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_last_errors;
}

int launch_errors() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_total_errors;
}

cudaError_t set_max_dynamic_smem(const void *kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (bytes > 227u * 1024u) return cudaErrorInvalidValue;
  for (auto &entry : g_smem_limits)
    if (entry.first == kernel) {
      entry.second = bytes;
      return cudaSuccess;
    }
  g_smem_limits.emplace_back(kernel, bytes);
  return cudaSuccess;
}

cudaError_t get_last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return std::exchange(g_sticky, cudaSuccess);
}

cudaError_t peek_last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_sticky;
}

// The CUDA runtime's texts for the codes an emulated build meets.
const char *error_string(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unrecognized error code";
  }
}

}  // namespace simt
