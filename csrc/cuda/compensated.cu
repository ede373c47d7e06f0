// running_mean_compensated_ / ema_compensated_ and nonfinite_flag on CUDA (the
// arithmetic is described in cpu/compensated_cpu.cpp): float64 per element,
// the average split back into the nearest avg and the remainder comp.
#include <ATen/ops/zeros.h>

#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

template <typename T>
__device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_double<double>(double v) {
  return v;
}
template <typename T>
__device__ __forceinline__ T from_double(double v) {
  return static_cast<T>(static_cast<float>(v));  // as torch casts: 16-bit types through float
}
template <>
__device__ __forceinline__ double from_double<double>(double v) {
  return v;
}

template <typename T, typename in_t>
struct CompensatedFunctor {
  bool running_mean;  // the scalar is a count (0: copy), else the EMA weight

  __device__ __forceinline__ void operator()(void* ptrs[3], const Chunk& chunk,
                                             ScalarSource scalar) const {
    const double s = load_scalar(scalar);
    if (s != s) return;  // a NaN device scalar gates the update off
    const bool copy = running_mean && s == 0.0;
    const double w = running_mean ? 1.0 / (s + 1.0) : s;
    T* __restrict__ avg = static_cast<T*>(ptrs[0]) + chunk.start;
    const in_t* __restrict__ x = static_cast<const in_t*>(ptrs[1]) + chunk.start;
    T* __restrict__ comp = static_cast<T*>(ptrs[2]) + chunk.start;
    for (int64_t i = threadIdx.x; i < chunk.n; i += blockDim.x) {
      const double xv = to_double(load_global(x + i));
      double v = xv;
      if (!copy) {
        const double sv = to_double(load_global(avg + i)) + to_double(load_global(comp + i));
        v = fma(w, xv - sv, sv);
      }
      const T hi = from_double<T>(v);
      store_global(avg + i, hi);
      store_global(comp + i, from_double<T>(v - to_double(hi)));
    }
  }
};

template <typename T, typename in_t>
void launch_compensated(const std::vector<TensorEntry<3>>& entries, cudaStream_t stream,
                        const ScalarSource& scalar, bool running_mean) {
  multi_tensor_apply<3>(entries, stream, /*work_base=*/0,
                        CompensatedFunctor<T, in_t>{running_mean}, scalar);
}

// One launch sequence per (average dtype, input dtype) group of the validated pairs.
void run_compensated(const PairPlan& plan, bool running_mean) {
  if (plan.pairs.empty()) return;
  using c10::ScalarType;
  const DeviceGuard guard(plan.device);
  const cudaStream_t stream = current_stream(plan.device);
  const ScalarSource scalar = scalar_source(plan.scalar);
  KernelMemory memory;
  add_plan_memory(memory, plan);
  std::map<std::pair<ScalarType, ScalarType>, std::vector<TensorEntry<3>>> groups;
  for (const PairView& p : plan.pairs) {
    groups[{p.out_dtype, p.in_dtype}].push_back(
        {{p.out, const_cast<void*>(p.in), p.aux}, p.numel});
  }
  for (const auto& group : groups) {
    const c10::ScalarType out = group.first.first, in = group.first.second;
    dispatch_average_pair(out, in, [&](auto o, auto x) {
      launch_compensated<decltype(o), decltype(x)>(group.second, stream, scalar, running_mean);
    });
  }
}

// Every block whose chunk holds a NaN/inf writes 1: all writers write the same
// value, so the result does not depend on their order.
template <typename T>
struct NonfiniteFunctor {
  __device__ __forceinline__ void operator()(void* ptrs[1], const Chunk& chunk, int* flag) const {
    const T* __restrict__ p = static_cast<const T*>(ptrs[0]) + chunk.start;
    bool bad = false;
    for (int64_t i = threadIdx.x; i < chunk.n; i += blockDim.x) {
      bad |= !isfinite(to_double(load_global(p + i)));
    }
    if (bad) store_global(flag, 1);
  }
};

}  // namespace

void running_mean_compensated_cuda(PairPlan& plan) { run_compensated(plan, true); }
void ema_compensated_cuda(PairPlan& plan) { run_compensated(plan, false); }

void nonfinite_flag_cuda(const std::vector<at::Tensor>& xs, int* flag) {
  if (xs.empty()) return;
  using c10::ScalarType;
  const DeviceGuard guard(xs[0].device());
  const cudaStream_t stream = current_stream(xs[0].device());
  KernelMemory memory;
  memory.add(flag, sizeof(int));
  std::map<ScalarType, std::vector<TensorEntry<1>>> groups;
  for (const at::Tensor& t : xs) {
    groups[t.scalar_type()].push_back({{const_cast<void*>(t.const_data_ptr())}, t.numel()});
    memory.add(t.const_data_ptr(), t.numel() * static_cast<int64_t>(t.element_size()));
  }
  for (const auto& [dtype, entries] : groups) {
    switch (dtype) {
      case ScalarType::Float:
        multi_tensor_apply<1>(entries, stream, 0, NonfiniteFunctor<float>{}, flag);
        break;
      case ScalarType::Double:
        multi_tensor_apply<1>(entries, stream, 0, NonfiniteFunctor<double>{}, flag);
        break;
      case ScalarType::Half:
        multi_tensor_apply<1>(entries, stream, 0, NonfiniteFunctor<c10::Half>{}, flag);
        break;
      case ScalarType::BFloat16:
        multi_tensor_apply<1>(entries, stream, 0, NonfiniteFunctor<c10::BFloat16>{}, flag);
        break;
      default: TORCH_CHECK(false, "nonfinite_flag: unsupported dtype ", dtype);  // validated
    }
  }
}

at::Tensor nonfinite_flag_entry(at::TensorList xs) {
  const std::vector<at::Tensor> ts = prepare_flag_inputs(xs);
  at::Tensor flag = at::zeros({}, xs[0].options().dtype(at::kInt));
  nonfinite_flag_cuda(ts, flag.data_ptr<int>());
  return flag;
}

}  // namespace wavg_ext::cuda
