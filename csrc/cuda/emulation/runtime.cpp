// The CUDA emulation's runtime (see emulation.h): blocks in parallel, the threads
// of a block as ucontext fibers under a scheduler that runs every thread to each
// barrier before releasing it, in a different order at every sweep; memcheck,
// racecheck and initcheck bookkeeping; the launch-limit checks.
#include "emulation.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace wavg_ext::emu {
namespace {

thread_local bool t_enabled = false;
thread_local uint64_t t_schedule_seed = 0;
std::atomic<int64_t> g_launches{0}, g_blocks{0}, g_threads{0};

struct Region {
  uintptr_t lo, hi;
};
thread_local std::vector<Region> t_regions;  // the calling (host) thread's KernelMemory

// What every block of one launch shares: read-only but for the error list.
struct LaunchState {
  const char* kernel;
  uint64_t schedule_seed;
  LaunchBody body;
  std::vector<Region> regions;  // sorted, overlaps merged
  std::mutex mu;
  std::vector<std::string> messages;
  int64_t errors = 0;
};

enum class FiberState { kRunnable, kBarrier, kWarp, kDone };

// Context switches: on x86-64 a register-only switch (callee-saved registers, the
// FP control words, the stack pointer), tens of times cheaper than swapcontext,
// which also saves the signal mask with a system call; ucontext elsewhere.
#if defined(__x86_64__) && defined(__linux__)
#define WAVG_EMU_FAST_SWITCH 1
extern "C" void wavg_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl wavg_emu_switch
  .hidden wavg_emu_switch
  .type wavg_emu_switch, @function
wavg_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size wavg_emu_switch, .-wavg_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

struct Fiber {
#ifdef WAVG_EMU_FAST_SWITCH
  void* sp;
#else
  ucontext_t ctx;
#endif
  FiberState state;
  unsigned mask;       // kWarp: the lanes that sync
  unsigned shuffles;   // shuffles done: the parity picks the exchange slot
  alignas(8) unsigned char slot[2][8];
};

// Word-level shared-memory bookkeeping: who touched it since the last barrier.
struct Word {
  uint64_t epoch = 0;
  int writer = -1, reader = -1;
  bool many_writers = false, many_readers = false, initialized = false;
};

constexpr size_t kStackBytes = 128 * 1024;

// Fiber stacks of one OS thread, reused by every block it runs (a guard page below each).
class StackPool {
 public:
  ~StackPool() {
    for (char* s : stacks_) munmap(s, kStackBytes + page());
  }
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
      mprotect(p, page(), PROT_NONE);
      stacks_.push_back(static_cast<char*>(p));
    }
    return stacks_[i] + page();
  }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<char*> stacks_;
};

struct Block {
  LaunchState* launch = nullptr;
  unsigned nthreads = 0;
  unsigned current = 0;
  uint64_t epoch = 1;
  std::vector<Fiber> fibers;
#ifdef WAVG_EMU_FAST_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  std::unordered_map<const void*, Word> shared;
  // memcheck's last hit, valid for this block's launch
  uintptr_t hit_lo = 1, hit_hi = 0;
  StackPool stacks;
};
thread_local Block t_block;
thread_local bool t_in_block = false;

Block& block() {
  TORCH_CHECK(t_in_block, "CUDA emulation: device code called outside a launch");
  return t_block;
}

uint3 coords(unsigned linear, dim3 d) {
  return {linear % d.x, linear / d.x % d.y, linear / (d.x * d.y)};
}

void add_error(Block& b, const std::string& what) {
  const uint3 t = threadIdx, g = blockIdx;
  char where[96];
  std::snprintf(where, sizeof where, " (block (%u,%u,%u), thread (%u,%u,%u))", g.x, g.y, g.z, t.x,
                t.y, t.z);
  std::lock_guard<std::mutex> lock(b.launch->mu);
  ++b.launch->errors;
  if (b.launch->messages.size() < 8) b.launch->messages.push_back(what + where);
}

void fiber_entry() {
  Block& b = t_block;
  b.launch->body.run(b.launch->body.state);
  b.fibers[b.current].state = FiberState::kDone;
#ifdef WAVG_EMU_FAST_SWITCH
  wavg_emu_switch(&b.fibers[b.current].sp, b.scheduler_sp);
  std::abort();  // a finished fiber is never resumed
#endif
  // (ucontext: returning resumes uc_link, the scheduler)
}

void resume(Block& b, unsigned t) {
  b.current = t;
  threadIdx = coords(t, blockDim);
  b.fibers[t].state = FiberState::kRunnable;
#ifdef WAVG_EMU_FAST_SWITCH
  wavg_emu_switch(&b.scheduler_sp, b.fibers[t].sp);
#else
  swapcontext(&b.scheduler, &b.fibers[t].ctx);
#endif
}

void yield(Block& b, FiberState state, unsigned mask = 0) {
  Fiber& f = b.fibers[b.current];
  f.state = state;
  f.mask = mask;
#ifdef WAVG_EMU_FAST_SWITCH
  wavg_emu_switch(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.ctx, &b.scheduler);
#endif
}

#ifdef WAVG_EMU_FAST_SWITCH
// A new fiber's stack as wavg_emu_switch expects to find it: FP control words, six
// callee-saved registers, then fiber_entry as the return address, above it a null
// return address for fiber_entry itself (which never returns), 16-byte aligned as
// at a call.
void* initial_stack(char* stack, size_t bytes) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                              // fiber_entry's return address
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);       // wavg_emu_switch returns here
  for (int r = 0; r < 6; ++r) *--sp = 0;                  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = uint64_t{mxcsr} | (uint64_t{fpucw} << 32);
  return sp;
}
#endif

// The order of one sweep: with seed 0 forward, reverse, then shuffled in turn; with
// another seed shuffled every time. Fixed by (seed, block, sweep): runs repeat exactly.
void sweep_order(std::vector<unsigned>& order, uint64_t sweep, uint64_t block_linear, uint64_t seed) {
  std::iota(order.begin(), order.end(), 0u);
  if (seed == 0 && sweep % 3 == 0) return;
  if (seed == 0 && sweep % 3 == 1) {
    std::reverse(order.begin(), order.end());
    return;
  }
  std::mt19937_64 rng(0x9E3779B97F4A7C15ull * (block_linear + 1) + sweep + 0xD1B54A32D192ED03ull * seed);
  std::shuffle(order.begin(), order.end(), rng);
}

// Releases the lanes of warps whose mask is complete; false if none could go.
bool release_warps(Block& b) {
  bool released = false;
  for (unsigned w0 = 0; w0 < b.nthreads; w0 += kWarpSize) {
    const unsigned lanes = std::min<unsigned>(kWarpSize, b.nthreads - w0);
    int first = -1;
    for (unsigned l = 0; l < lanes; ++l) {
      if (b.fibers[w0 + l].state == FiberState::kWarp) {
        first = static_cast<int>(l);
        break;
      }
    }
    if (first < 0) continue;
    const unsigned mask = b.fibers[w0 + first].mask;
    bool ready = true;
    for (unsigned l = 0; l < kWarpSize && ready; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (l >= lanes) {
        b.current = w0 + first;
        threadIdx = coords(b.current, blockDim);
        add_error(b, "warp sync mask names lane " + std::to_string(l) + ", past the block's last thread");
        continue;
      }
      const Fiber& f = b.fibers[w0 + l];
      if (f.state == FiberState::kDone) {
        b.current = w0 + first;
        threadIdx = coords(b.current, blockDim);
        add_error(b, "warp sync mask names lane " + std::to_string(l) + ", which has exited");
      } else if (f.state != FiberState::kWarp) {
        ready = false;
      } else if (f.mask != mask) {
        b.current = w0 + l;
        threadIdx = coords(b.current, blockDim);
        add_error(b, "lanes of one warp sync with different masks");
      }
    }
    if (!ready) continue;
    for (unsigned l = 0; l < lanes; ++l) {
      Fiber& f = b.fibers[w0 + l];
      if (f.state == FiberState::kWarp && (mask >> l & 1u)) {
        f.state = FiberState::kRunnable;
        released = true;
      }
    }
  }
  return released;
}

void run_block(LaunchState& st, uint64_t linear, dim3 grid, dim3 block_dim) {
  Block& b = t_block;
  b.launch = &st;
  b.nthreads = block_dim.x * block_dim.y * block_dim.z;
  b.epoch = 1;
  b.shared.clear();
  b.hit_lo = 1;
  b.hit_hi = 0;
  blockIdx = coords(static_cast<unsigned>(linear), grid);
  gridDim = grid;
  blockDim = block_dim;
  b.fibers.resize(b.nthreads);
#ifndef WAVG_EMU_FAST_SWITCH
  ucontext_t base;
  getcontext(&base);
#endif
  for (unsigned t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
#ifdef WAVG_EMU_FAST_SWITCH
    f.sp = initial_stack(b.stacks.get(t), kStackBytes);
#else
    f.ctx = base;
    f.ctx.uc_stack.ss_sp = b.stacks.get(t);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
    f.state = FiberState::kRunnable;
    f.shuffles = 0;
  }
  t_in_block = true;
  std::vector<unsigned> order(b.nthreads);
  unsigned live = b.nthreads;
  for (uint64_t sweep = 0; live > 0; ++sweep) {
    sweep_order(order, sweep, linear, st.schedule_seed);
    bool progressed = false;
    for (unsigned t : order) {
      if (b.fibers[t].state != FiberState::kRunnable) continue;
      resume(b, t);
      progressed = true;
      if (b.fibers[t].state == FiberState::kDone) --live;
    }
    if (live == 0) break;
    if (release_warps(b)) continue;
    if (progressed) continue;
    // Nobody can run: a barrier that every live thread reached, or a deadlock.
    unsigned at_barrier = 0, at_warp = 0;
    for (const Fiber& f : b.fibers) {
      at_barrier += f.state == FiberState::kBarrier;
      at_warp += f.state == FiberState::kWarp;
    }
    if (at_barrier == live && at_warp == 0) {
      if (live != b.nthreads) {
        threadIdx = {0, 0, 0};
        add_error(b, "__syncthreads reached by " + std::to_string(live) + " of " +
                         std::to_string(b.nthreads) + " threads (the others exited)");
      }
      for (Fiber& f : b.fibers) {
        if (f.state == FiberState::kBarrier) f.state = FiberState::kRunnable;
      }
      ++b.epoch;
      continue;
    }
    threadIdx = {0, 0, 0};
    add_error(b, "deadlock: " + std::to_string(at_barrier) + " threads wait at __syncthreads, " +
                     std::to_string(at_warp) + " at a warp sync that cannot complete, " +
                     std::to_string(b.nthreads - live) + " exited");
    break;  // the waiting fibers are abandoned (their stacks are reused)
  }
  t_in_block = false;
}

}  // namespace

bool enabled() { return t_enabled; }
bool set_enabled(bool on) {
  const bool previous = t_enabled;
  t_enabled = on;
  return previous;
}
Stats stats() { return {g_launches.load(), g_blocks.load(), g_threads.load()}; }
uint64_t set_schedule_seed(uint64_t seed) {
  const uint64_t previous = t_schedule_seed;
  t_schedule_seed = seed;
  return previous;
}

KernelMemory::KernelMemory() : first_(t_regions.size()) {}
KernelMemory::~KernelMemory() { t_regions.resize(first_); }
void KernelMemory::add(const void* ptr, int64_t bytes) {
  if (ptr == nullptr || bytes <= 0) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(ptr);
  t_regions.push_back({lo, lo + static_cast<uintptr_t>(bytes)});
}

bool check_global(const void* p, size_t bytes, size_t align, bool write) {
  Block& b = block();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  char what[160];
  if (a % align != 0) {
    std::snprintf(what, sizeof what, "memcheck: misaligned %zu-byte global %s at 0x%" PRIxPTR,
                  bytes, write ? "write" : "read", a);
    add_error(b, what);
    return false;
  }
  if (a >= b.hit_lo && a + bytes <= b.hit_hi) return true;
  const std::vector<Region>& r = b.launch->regions;
  auto it = std::upper_bound(r.begin(), r.end(), a,
                             [](uintptr_t x, const Region& reg) { return x < reg.lo; });
  if (it != r.begin()) {
    --it;
    if (a + bytes <= it->hi) {
      b.hit_lo = it->lo;
      b.hit_hi = it->hi;
      return true;
    }
  }
  std::snprintf(what, sizeof what,
                "memcheck: %zu-byte global %s at 0x%" PRIxPTR " outside the memory of the call",
                bytes, write ? "write" : "read", a);
  add_error(b, what);
  return false;
}

bool note_shared(const void* p, size_t, bool write, bool in_range) {
  Block& b = block();
  if (!in_range) {
    add_error(b, std::string("memcheck: shared ") + (write ? "write" : "read") +
                     " with an index outside the array");
    return false;
  }
  Word& w = b.shared[p];
  if (w.epoch != b.epoch) {
    w.epoch = b.epoch;
    w.writer = w.reader = -1;
    w.many_writers = w.many_readers = false;
  }
  const int t = static_cast<int>(b.current);
  if (write) {
    const bool other_writer = w.writer >= 0 && (w.many_writers || w.writer != t);
    const bool other_reader = w.reader >= 0 && (w.many_readers || w.reader != t);
    if (other_writer || other_reader) {
      add_error(b, std::string("racecheck: shared write after a ") +
                       (other_writer ? "write" : "read") + " by another thread (thread " +
                       std::to_string(other_writer ? w.writer : w.reader) +
                       ") with no __syncthreads between");
    }
    if (w.writer >= 0 && w.writer != t) w.many_writers = true;
    w.writer = t;
    w.initialized = true;
    return true;
  }
  if (!w.initialized) {
    add_error(b, "initcheck: shared read of an element no thread of the block has written");
    return false;
  }
  if (w.writer >= 0 && (w.many_writers || w.writer != t)) {
    add_error(b, "racecheck: shared read after a write by another thread (thread " +
                     std::to_string(w.writer) + ") with no __syncthreads between");
  }
  if (w.reader >= 0 && w.reader != t) w.many_readers = true;
  w.reader = t;
  return true;
}

void syncthreads() { yield(block(), FiberState::kBarrier); }

void warp_sync(unsigned mask) {
  Block& b = block();
  const unsigned lane = b.current % kWarpSize;
  if (!(mask >> lane & 1u)) add_error(b, "warp sync by a lane outside its own mask");
  yield(b, FiberState::kWarp, mask | (1u << lane));
}

// Two slots per lane, alternating: a lane writes the next shuffle's slot only after
// that shuffle's warp sync, which every lane reaches after reading this one's, so
// one warp sync per shuffle suffices.
void* shuffle_slot() {
  Fiber& f = block().fibers[t_block.current];
  return f.slot[f.shuffles & 1];
}
const void* shuffle_slot_of(unsigned lane) {
  Block& b = block();
  const unsigned parity = b.fibers[b.current].shuffles & 1;
  return b.fibers[b.current / kWarpSize * kWarpSize + lane].slot[parity];
}
void shuffle_done() { ++block().fibers[t_block.current].shuffles; }

void report(const char* what) { add_error(block(), what); }

void run_launch(const char* kernel, dim3 grid, dim3 block_dim, const LaunchBody& body) {
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  TORCH_CHECK(block_dim.x >= 1 && block_dim.y >= 1 && block_dim.z >= 1 && block_dim.x <= 1024 &&
                  block_dim.y <= 1024 && block_dim.z <= 64 && threads <= 1024,
              "CUDA emulation: ", kernel, ": invalid configuration argument: block (", block_dim.x,
              ", ", block_dim.y, ", ", block_dim.z, ") (at most 1024 threads)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u &&
                  grid.y <= 65535 && grid.z <= 65535,
              "CUDA emulation: ", kernel, ": invalid configuration argument: grid (", grid.x, ", ",
              grid.y, ", ", grid.z, ")");
  TORCH_CHECK(!t_in_block, "CUDA emulation: a launch from device code");
  LaunchState st;
  st.kernel = kernel;
  st.schedule_seed = t_schedule_seed;
  st.body = body;
  st.regions = t_regions;
  std::sort(st.regions.begin(), st.regions.end(),
            [](const Region& a, const Region& b) { return a.lo < b.lo; });
  std::vector<Region> merged;
  for (const Region& r : st.regions) {
    if (!merged.empty() && r.lo < merged.back().hi) {
      merged.back().hi = std::max(merged.back().hi, r.hi);
    } else {
      merged.push_back(r);
    }
  }
  st.regions = std::move(merged);
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  g_launches += 1;
  g_blocks += blocks;
  g_threads += blocks * static_cast<int64_t>(threads);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_block(st, static_cast<uint64_t>(i), grid, block_dim);
  });
  if (st.errors > 0) {
    std::string all;
    for (const std::string& m : st.messages) all += "\n  " + m;
    TORCH_CHECK(false, "CUDA emulation: kernel ", kernel, " made ", st.errors, " error(s):", all);
  }
}

}  // namespace wavg_ext::emu
