// The CUDA side of the basis ops with one partner row (dots, combine_; project_ and
// orthonormalize_ are built from them in basis_ops_cuda.cpp): multi-tensor-apply
// functors over (a = basis rows [0, na), y = partner) with row stride numel, and the
// host code that groups a RowPlan by dtype pair and launches.
//
// rows_dot: every block writes the float64 inner products of its chunk with the na
// rows into its own slot of `partials` (chunk index x na); a second kernel adds the
// slots in chunk order. No atomics: the same bits every run.
#pragma once

#include <map>
#include <utility>
#include <vector>

#include "../basis_args.h"
#include "multi_tensor_apply.cuh"
#include "pairwise.cuh"
#include "platform.cuh"

namespace wavg_ext::cuda {

constexpr int kRowsPerPass = 8;  // rows whose sums a thread keeps in registers at once
constexpr int kCleanupThreads = 256;

template <typename a_t, typename y_t>
struct RowDotFunctor {
  using opmath_t = at::opmath_type<a_t>;
  // Products and sums in float64 (exact products of float32 values): memory-bound, so free.
  __device__ __forceinline__ void operator()(void* ptrs[2], const Chunk& chunk, int64_t na,
                                             double* partials) const {
    const a_t* __restrict__ a = static_cast<const a_t*>(ptrs[0]) + chunk.start;
    const y_t* __restrict__ y = static_cast<const y_t*>(ptrs[1]) + chunk.start;
    constexpr int kWarps = kBlockSize / 32;
    __shared__ SharedArray<double, kRowsPerPass * kWarps> warp_sums;  // [row][warp]
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    for (int64_t i0 = 0; i0 < na; i0 += kRowsPerPass) {
      double acc[kRowsPerPass];
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) acc[r] = 0.0;
      for (int64_t e = threadIdx.x; e < chunk.n; e += blockDim.x) {
        const double yv = static_cast<double>(static_cast<opmath_t>(load_global(y + e)));
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
          if (i0 + r < na) {
            const double av =
                static_cast<double>(static_cast<opmath_t>(load_global(a + (i0 + r) * chunk.numel + e)));
            acc[r] = fma(av, yv, acc[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        for (int offset = 16; offset > 0; offset /= 2) {
          acc[r] += __shfl_down_sync(0xffffffffu, acc[r], offset);
        }
        if (lane == 0) warp_sums[r * kWarps + warp] = acc[r];
      }
      __syncthreads();
      if (threadIdx.x < kRowsPerPass && i0 + threadIdx.x < na) {
        double s = 0.0;
        for (int w = 0; w < warps; ++w) s += warp_sums[threadIdx.x * kWarps + w];
        store_global(partials + chunk.work * na + i0 + threadIdx.x, s);
      }
      __syncthreads();
    }
  }
};

template <typename a_t, typename y_t>
struct RowMixFunctor {
  using opmath_t = at::opmath_type<a_t>;
  static constexpr int kILP = 4;  // elements in flight per thread
  // y <- beta*y + sum_i (alpha*m[i]) * a_i, with the CPU kernel's arithmetic: the
  // coefficient rounded once from float64, then FMAs in row order. Every element is
  // read before it is written by the same thread, so y may be the single a row (alias).
  __device__ __forceinline__ void operator()(void* ptrs[2], const Chunk& chunk, int64_t na,
                                             const double* m, double alpha, double beta) const {
    const a_t* a = static_cast<const a_t*>(ptrs[0]) + chunk.start;
    y_t* y = static_cast<y_t*>(ptrs[1]) + chunk.start;
    const opmath_t beta_o = static_cast<opmath_t>(beta);
    const int64_t stride = static_cast<int64_t>(blockDim.x) * kILP;
    for (int64_t e0 = threadIdx.x; e0 < chunk.n; e0 += stride) {
      opmath_t acc[kILP];
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t e = e0 + j * static_cast<int64_t>(blockDim.x);
        acc[j] = (beta != 0.0 && e < chunk.n) ? static_cast<opmath_t>(load_global(y + e)) * beta_o
                                              : opmath_t(0);
      }
      for (int64_t i = 0; i < na; ++i) {
        const opmath_t c = static_cast<opmath_t>(alpha * load_global(m + i));
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int64_t e = e0 + j * static_cast<int64_t>(blockDim.x);
          if (e < chunk.n) {
            acc[j] = fma_op(c, static_cast<opmath_t>(load_global(a + i * chunk.numel + e)), acc[j]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int64_t e = e0 + j * static_cast<int64_t>(blockDim.x);
        if (e < chunk.n) store_global(y + e, static_cast<y_t>(acc[j]));
      }
    }
  }
};

// The memory the row kernels of a plan may touch: rows [0, na) of each task's basis
// block and its partner (row stride numel), as the functors index them.
inline void add_row_memory(KernelMemory& memory, const RowPlan& plan) {
  auto rows_bytes = [](const RowBlock& r, int64_t rows, int64_t numel) -> int64_t {
    return rows == 0 ? 0 : ((rows - 1) * r.row_stride + numel) * static_cast<int64_t>(c10::elementSize(r.dtype));
  };
  for (const RowTask& t : plan.tasks) {
    memory.add(t.a.data, rows_bytes(t.a, plan.na, t.numel));
    memory.add(t.y.data, rows_bytes(t.y, plan.ny, t.numel));
  }
}

// Calls f(a_t{}, y_t{}, entries) for each (basis, partner) dtype group of the plan, in a
// fixed order, with the group's first chunk index.
template <typename F>
void for_row_groups(const RowPlan& plan, const F& f) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  std::map<std::pair<ScalarType, ScalarType>, std::vector<TensorEntry<2>>> groups;
  for (const RowTask& t : plan.tasks) {
    groups[{t.a.dtype, t.y.dtype}].push_back({{t.a.data, t.y.data}, t.numel});
  }
  int64_t work_base = 0;
  for (const auto& [dtypes, entries] : groups) {
    const auto [a, y] = dtypes;
    if (a == ScalarType::Double && y == ScalarType::Double) {
      f(double{}, double{}, entries, work_base);
    } else if (a == ScalarType::Float && y == ScalarType::Float) {
      f(float{}, float{}, entries, work_base);
    } else if (a == ScalarType::Float && y == ScalarType::Half) {
      f(float{}, Half{}, entries, work_base);
    } else if (a == ScalarType::Float && y == ScalarType::BFloat16) {
      f(float{}, BFloat16{}, entries, work_base);
    } else if (a == ScalarType::BFloat16 && y == ScalarType::Float) {
      f(BFloat16{}, float{}, entries, work_base);
    } else if (a == ScalarType::BFloat16 && y == ScalarType::Half) {
      f(BFloat16{}, Half{}, entries, work_base);
    } else if (a == ScalarType::BFloat16 && y == ScalarType::BFloat16) {
      f(BFloat16{}, BFloat16{}, entries, work_base);
    } else {
      TORCH_CHECK(false, "wavg_ext: unsupported basis/partner dtypes ", a, " / ", y);  // validated
    }
    work_base += count_chunks(entries);
  }
}

// Launches Functor<a_t, y_t>{} over every dtype group of the plan on the current stream.
template <template <typename, typename> class Functor, typename... Args>
void launch_rows(const RowPlan& plan, cudaStream_t stream, Args... args) {
  for_row_groups(plan, [&](auto a0, auto y0, const std::vector<TensorEntry<2>>& entries,
                           int64_t work_base) {
    using a_t = decltype(a0);
    using y_t = decltype(y0);
    multi_tensor_apply<2>(entries, stream, work_base, Functor<a_t, y_t>{}, args...);
  });
}

}  // namespace wavg_ext::cuda
