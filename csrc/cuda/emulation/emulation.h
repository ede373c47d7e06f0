// CUDA emulation on the host: what wavg_ext's device code needs from CUDA, so that
// the same kernel and launch source nvcc compiles also builds as host C++ and runs
// on CPU tensors (wavg_ext.testing.cuda_emulation()). Included through
// ../platform.cuh when WAVG_EXT_CUDA_EMULATION is defined; never under nvcc.
//
// A launch runs its blocks in parallel (at::parallel_for); the threads of a block
// are cooperative fibers on one OS thread, so __syncthreads() is a real barrier:
// every thread runs up to it before any passes it. Each sweep over the runnable
// threads takes another order (forward, reverse, then shuffled with a fixed seed),
// so code that relies on an order between threads sees it change. Checked as the
// hardware or compute-sanitizer would:
//   - memcheck: every global access made through load_global/store_global lands
//     inside the memory the host code declared for the call (KernelMemory), at the
//     type's natural alignment (16 bytes for uint4);
//   - racecheck: two threads touching one SharedArray element between barriers
//     while one of them writes; initcheck: a shared element read before any thread
//     of the block wrote it; shared indices in range;
//   - the barrier and warp rules: __syncthreads reached by every live thread of
//     the block, shuffle masks naming only lanes that take part, no deadlock;
//   - the launch limits: kernel parameters within kParamBytes (a compile error,
//     as in nvcc), at most 1024 threads per block, grid dimensions in range.
// Errors are collected while the launch runs (the bad access is not performed)
// and raised as one c10::Error when it ends, like a sticky CUDA error.
#pragma once

#include <math.h>

#include <c10/core/Device.h>

#include "control.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Per block: a block's threads all run on one OS thread, one block at a time.
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;

// The running thread's coordinates; the scheduler sets them before resuming a fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace wavg_ext::emu {

#ifndef WAVG_EXT_EMULATED_PARAM_BYTES
#define WAVG_EXT_EMULATED_PARAM_BYTES 32764  // CUDA >= 12.1 on Volta and newer
#endif
constexpr int kParamBytes = WAVG_EXT_EMULATED_PARAM_BYTES;
constexpr int kWarpSize = 32;

// ---- memory -------------------------------------------------------------------
// The global memory the kernels of one call may touch: registered for the lifetime
// of the object (nested scopes add up), snapshotted by every launch.
class KernelMemory {
 public:
  KernelMemory();
  ~KernelMemory();
  KernelMemory(const KernelMemory&) = delete;
  KernelMemory& operator=(const KernelMemory&) = delete;
  void add(const void* ptr, int64_t bytes);

 private:
  size_t first_;
};

// Checks one access of `bytes` at p (natural alignment `align`); false: recorded as
// an error, do not perform it.
bool check_global(const void* p, size_t bytes, size_t align, bool write);
// Records a read or write of a shared element by the running thread; false: error.
bool note_shared(const void* p, size_t bytes, bool write, bool in_range);

// ---- synchronization (the running fiber yields to its block's scheduler) ---------
void syncthreads();
void warp_sync(unsigned mask);
// The running thread's 8-byte exchange slot for its current shuffle, lane `lane`'s
// slot of the same shuffle, and the end of the shuffle.
void* shuffle_slot();
const void* shuffle_slot_of(unsigned lane);
void shuffle_done();
void report(const char* what);  // records an error for the running thread

// ---- launching -------------------------------------------------------------------
struct LaunchBody {
  void (*run)(const void* state);  // runs the kernel once, as the current thread
  const void* state;
};
void run_launch(const char* kernel, dim3 grid, dim3 block, const LaunchBody& body);

template <typename... P>
constexpr size_t param_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return offset;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, A&&... args) {
  static_assert(param_bytes<P...>() <= static_cast<size_t>(kParamBytes),
                "kernel parameters exceed the parameter space of this build");
  struct State {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;  // converted once, like the launch's copy
  } state{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  // Each thread gets its own copy of the parameters, as each sees the launch's.
  const LaunchBody body{[](const void* s) {
                          const State& st = *static_cast<const State*>(s);
                          std::apply(st.kernel, st.params);
                        },
                        &state};
  run_launch(name, grid, block, body);
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream(c10::Device) { return nullptr; }

// ---- shared memory ------------------------------------------------------------------
template <typename T>
class SharedRef {
 public:
  explicit SharedRef(T* p, bool in_range) : p_(p), in_range_(in_range) {}
  operator T() const {  // NOLINT: reads like the element
    return note_shared(p_, sizeof(T), false, in_range_) ? *p_ : T{};
  }
  SharedRef& operator=(const T& v) {
    if (note_shared(p_, sizeof(T), true, in_range_)) *p_ = v;
    return *this;
  }
  SharedRef& operator=(const SharedRef& other) { return *this = static_cast<T>(other); }
  SharedRef& operator+=(const T& v) { return *this = static_cast<T>(*this) + v; }

 private:
  T* p_;
  bool in_range_;
};

// __shared__ SharedArray<T, N> name; elements checked by racecheck and initcheck.
template <typename T, int N>
struct SharedArray {
  T v[N];
  SharedRef<T> operator[](int64_t i) {
    const bool ok = i >= 0 && i < N;
    return SharedRef<T>(ok ? &v[i] : &v[0], ok);
  }
};

template <typename T>
inline T load_global(const T* p) {
  T v{};
  if (check_global(p, sizeof(T), alignof(T), false)) std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void store_global(T* p, const T& v) {
  if (check_global(p, sizeof(T), alignof(T), true)) std::memcpy(p, &v, sizeof(T));
}

}  // namespace wavg_ext::emu

// ---- warp intrinsics -----------------------------------------------------------------
inline void __syncthreads() { wavg_ext::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { wavg_ext::emu::warp_sync(mask); }

namespace wavg_ext::emu {
// Every lane in mask deposits v, then reads lane src_of(lane)'s value.
template <typename T, typename SrcOf>
T shuffle(unsigned mask, T v, int width, SrcOf src_of) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  std::memcpy(shuffle_slot(), &v, sizeof(T));
  warp_sync(mask);
  const unsigned lane = threadIdx.x % kWarpSize;
  const unsigned base = lane / width * width;
  const int src = src_of(static_cast<int>(lane - base));
  T out = v;
  if (src >= 0 && src < width) {
    const unsigned src_lane = base + static_cast<unsigned>(src);
    if ((mask >> src_lane & 1u) == 0) {
      report("shuffle reads a lane that is not in its mask");
    } else {
      std::memcpy(&out, shuffle_slot_of(src_lane), sizeof(T));
    }
  }
  shuffle_done();
  return out;
}
}  // namespace wavg_ext::emu

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return wavg_ext::emu::shuffle(mask, v, width, [&](int l) {
    return l + static_cast<int>(delta) < width ? l + static_cast<int>(delta) : l;
  });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return wavg_ext::emu::shuffle(mask, v, width, [&](int l) {
    return l - static_cast<int>(delta) >= 0 ? l - static_cast<int>(delta) : l;
  });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return wavg_ext::emu::shuffle(mask, v, width, [&](int l) { return l ^ lane_mask; });
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return wavg_ext::emu::shuffle(mask, v, width, [&](int) { return ((src % width) + width) % width; });
}
