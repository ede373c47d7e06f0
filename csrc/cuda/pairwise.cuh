// The CUDA side of the elementwise pair ops (out[i] = f(out[i], in[i])): a
// multi-tensor-apply functor with a 16-byte vectorized path when both chunk bases
// are 16-byte aligned and a scalar path otherwise, arithmetic in opmath (float
// for float32/float16/bfloat16, double for float64), and the host code that
// groups a PairPlan by dtype pair and launches.
//
// An op is a struct with kReadsOut and a device function bind<opmath_t>(double s)
// returning the per-element callable for scalar s; s comes from the host or is
// read from a one-element device tensor by each block (no host sync).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dtype_pairs.h"
#include "../pair_args.h"
#include "multi_tensor_apply.cuh"
#include "platform.cuh"

namespace wavg_ext::cuda {

// The op's scalar as the kernel receives it.
struct ScalarSource {
  double value;
  const void* ptr;  // one-element device tensor, or null: use value
  int kind;         // dtype of *ptr: 0 float32, 1 float64, 2 int64, 3 int32
};

__device__ __forceinline__ double load_scalar(const ScalarSource& s) {
  if (s.ptr == nullptr) return s.value;
  switch (s.kind) {
    case 0: return static_cast<double>(load_global(static_cast<const float*>(s.ptr)));
    case 1: return load_global(static_cast<const double*>(s.ptr));
    case 2: return static_cast<double>(load_global(static_cast<const int64_t*>(s.ptr)));
    default: return static_cast<double>(load_global(static_cast<const int32_t*>(s.ptr)));
  }
}

__device__ __forceinline__ float fma_op(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_op(double a, double b, double c) { return fma(a, b, c); }

// kVec elements of T, moved as whole 16-byte words.
template <typename T, int kVec>
struct alignas(16) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load_pack(Pack<T, kVec>& dst, const T* src) {
  static_assert(sizeof(Pack<T, kVec>) % 16 == 0, "a pack is whole 16-byte words");
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(&dst);
#pragma unroll
  for (int w = 0; w < static_cast<int>(sizeof(Pack<T, kVec>) / 16); ++w) d[w] = load_global(s + w);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, kVec>& src) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(&src);
#pragma unroll
  for (int w = 0; w < static_cast<int>(sizeof(Pack<T, kVec>) / 16); ++w) store_global(d + w, s[w]);
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// out[i] = apply(out[i], in[i], i) for i < n by one block: 16-byte packs of kVec
// elements, kILP in flight per thread, when both bases are 16-byte aligned, element by
// element otherwise and for the tail. Without kReadsOut, out is not read (apply gets 0).
template <bool kReadsOut, int kVec, int kILP, typename out_t, typename in_t, typename Apply>
__device__ __forceinline__ void apply_elements(out_t* __restrict__ out, const in_t* __restrict__ in, int64_t n,
                                               const Apply& apply) {
  int64_t done = 0;
  if (aligned16(out) && aligned16(in)) {
    const int64_t nvec = n / kVec;
    for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += static_cast<int64_t>(blockDim.x) * kILP) {
      Pack<out_t, kVec> a[kILP];
      Pack<in_t, kVec> x[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t v = v0 + j * static_cast<int64_t>(blockDim.x);
        if (v < nvec) {
          load_pack(x[j], in + v * kVec);
          if (kReadsOut) load_pack(a[j], out + v * kVec);
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t v = v0 + j * static_cast<int64_t>(blockDim.x);
        if (v < nvec) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            a[j].v[e] = apply(kReadsOut ? a[j].v[e] : out_t(0), x[j].v[e], v * kVec + e);
          }
          store_pack(out + v * kVec, a[j]);
        }
      }
    }
    done = nvec * kVec;
  }
  // Tail of an aligned chunk, or the whole of a misaligned one (e.g. x[1:]).
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    store_global(out + i, apply(kReadsOut ? load_global(out + i) : out_t(0), load_global(in + i), i));
  }
}

template <typename out_t, typename in_t, typename Op>
struct PairFunctor {
  using opmath_t = pair_opmath_t<out_t, in_t>;
  // 16 bytes of the narrower type per vector (so 16 or 32 bytes of the wider one).
  static constexpr int kVec = 16 / (sizeof(out_t) < sizeof(in_t) ? sizeof(out_t) : sizeof(in_t));
  static constexpr int kILP = 4;  // vectors in flight per thread

  __device__ __forceinline__ void operator()(void* ptrs[2], const Chunk& chunk,
                                             ScalarSource scalar) const {
    out_t* out = static_cast<out_t*>(ptrs[0]) + chunk.start;
    const in_t* in = static_cast<const in_t*>(ptrs[1]) + chunk.start;
    const double s = load_scalar(scalar);
    if (s != s) return;  // a NaN device scalar gates the update off (ScalarArg)
    const auto fn = Op::template bind<opmath_t>(s);
    apply_elements<Op::kReadsOut, kVec, kILP>(out, in, chunk.n, [&](out_t a, in_t x, int64_t) {
      return static_cast<out_t>(fn(static_cast<opmath_t>(a), static_cast<opmath_t>(x)));
    });
  }
};

inline ScalarSource scalar_source(const ScalarArg& s) {
  ScalarSource src{s.value, s.device_ptr, 0};
  if (s.on_device()) {
    switch (s.device_dtype) {
      case c10::ScalarType::Float: src.kind = 0; break;
      case c10::ScalarType::Double: src.kind = 1; break;
      case c10::ScalarType::Long: src.kind = 2; break;
      case c10::ScalarType::Int: src.kind = 3; break;
      default: TORCH_CHECK(false, "wavg_ext: unsupported scalar dtype ", s.device_dtype);
    }
  }
  return src;
}

// The memory the kernels of a pair plan may touch: every pair's out, in and aux, and
// the device scalar.
inline void add_plan_memory(KernelMemory& memory, const PairPlan& plan) {
  for (const PairView& p : plan.pairs) {
    memory.add(p.out, p.numel * static_cast<int64_t>(c10::elementSize(p.out_dtype)));
    memory.add(p.in, p.numel * static_cast<int64_t>(c10::elementSize(p.in_dtype)));
    if (p.aux != nullptr) memory.add(p.aux, p.numel * static_cast<int64_t>(c10::elementSize(p.out_dtype)));
  }
  if (plan.scalar.on_device()) {
    memory.add(plan.scalar.device_ptr, static_cast<int64_t>(c10::elementSize(plan.scalar.device_dtype)));
  }
}

template <typename out_t, typename in_t, typename Op>
void launch_group(const std::vector<TensorEntry<2>>& entries, cudaStream_t stream,
                  const ScalarSource& scalar) {
  multi_tensor_apply<2>(entries, stream, /*work_base=*/0, PairFunctor<out_t, in_t, Op>{}, scalar);
}

// dispatch_pair for the read-modify-write kernels: calls f(out_t{}, in_t{}) for the pairs
// an average (or sum) may form with its input (kAveragePair, the only pairs validation
// admits there), so that no kernel is compiled for the assignment-only pairs.
template <typename F>
void dispatch_average_pair(c10::ScalarType out, c10::ScalarType in, const F& f) {
  dispatch_pair(out, in, [&](auto o, auto x) {
    if constexpr (kAveragePair<decltype(o), decltype(x)>) {
      f(o, x);
    } else {
      TORCH_CHECK(false, "wavg_ext: unsupported dtype pair ", out, " / ", in);
    }
  });
}

// Runs Op over every pair of the plan: one multi-tensor-apply sequence per
// (out dtype, in dtype) group, all on the current stream of the tensors' device.
template <typename Op>
void launch_pairs(const PairPlan& plan) {
  if (plan.pairs.empty()) return;
  using c10::ScalarType;
  const DeviceGuard guard(plan.device);
  const cudaStream_t stream = current_stream(plan.device);
  const ScalarSource scalar = scalar_source(plan.scalar);
  KernelMemory memory;
  add_plan_memory(memory, plan);

  std::map<std::pair<ScalarType, ScalarType>, std::vector<TensorEntry<2>>> groups;
  for (const PairView& p : plan.pairs) {
    groups[{p.out_dtype, p.in_dtype}].push_back({{p.out, const_cast<void*>(p.in)}, p.numel});
  }
  for (const auto& group : groups) {
    const c10::ScalarType out = group.first.first, in = group.first.second;
    dispatch_pair(out, in, [&](auto o, auto x) {
      using out_t = decltype(o);
      using in_t = decltype(x);
      // (no read-modify-write kernel for the pairs that only assign: validated away)
      if constexpr (!Op::kReadsOut || kAveragePair<out_t, in_t>) {
        launch_group<out_t, in_t, Op>(group.second, stream, scalar);
      } else {
        TORCH_CHECK(false, "wavg_ext: unsupported dtype pair ", out, " / ", in);
      }
    });
  }
}

// out <- lerp(out, in, w) with torch.lerp's formula (the same fused form as the
// CPU kernels and ATen's lerp). copy_first: running_mean_'s count 0 copies.
template <typename T>
struct LerpFn {
  T coeff;
  bool small;
  bool copy;
  __device__ __forceinline__ T operator()(T a, T x) const {
    return copy ? x : fma_op(coeff, x - a, small ? a : x);
  }
};

template <typename T>
__device__ __forceinline__ LerpFn<T> make_lerp(double weight, bool copy) {
  const T w = static_cast<T>(weight);
  const bool small = (w < T(0) ? -w : w) < T(0.5);
  return {small ? w : w - T(1), small, copy};
}

}  // namespace wavg_ext::cuda
