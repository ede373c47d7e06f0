// window_push_: sum <- sum + (x - slot), slot <- x on CUDA (see cpu/window_push_cpu.cpp):
// the same opmath arithmetic, so the same bits as the CPU kernels.
#include <map>
#include <utility>
#include <vector>

#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

// ptrs = {sum, x, slot}.
template <typename sum_t, typename in_t>
struct WindowPushFunctor {
  using opmath_t = pair_opmath_t<sum_t, in_t>;
  __device__ __forceinline__ void operator()(void* ptrs[3], const Chunk& chunk) const {
    sum_t* __restrict__ sum = static_cast<sum_t*>(ptrs[0]) + chunk.start;
    const in_t* __restrict__ x = static_cast<const in_t*>(ptrs[1]) + chunk.start;
    in_t* __restrict__ slot = static_cast<in_t*>(ptrs[2]) + chunk.start;
    for (int64_t i = threadIdx.x; i < chunk.n; i += blockDim.x) {
      const in_t xi = load_global(x + i);
      const opmath_t d = static_cast<opmath_t>(xi) - static_cast<opmath_t>(load_global(slot + i));
      store_global(sum + i, static_cast<sum_t>(static_cast<opmath_t>(load_global(sum + i)) + d));
      store_global(slot + i, xi);
    }
  }
};

}  // namespace

void window_push_cuda(PairPlan& plan) {
  if (plan.pairs.empty()) return;
  using c10::ScalarType;
  const DeviceGuard guard(plan.device);
  const cudaStream_t stream = current_stream(plan.device);
  KernelMemory memory;
  for (const PairView& p : plan.pairs) {  // (the slot has x's dtype, not the sum's: add_plan_memory would not do)
    memory.add(p.out, p.numel * static_cast<int64_t>(c10::elementSize(p.out_dtype)));
    memory.add(p.in, p.numel * static_cast<int64_t>(c10::elementSize(p.in_dtype)));
    memory.add(p.aux, p.numel * static_cast<int64_t>(c10::elementSize(p.in_dtype)));
  }
  std::map<std::pair<ScalarType, ScalarType>, std::vector<TensorEntry<3>>> groups;
  for (const PairView& p : plan.pairs) {
    groups[{p.out_dtype, p.in_dtype}].push_back({{p.out, const_cast<void*>(p.in), p.aux}, p.numel});
  }
  for (const auto& group : groups) {
    const ScalarType out = group.first.first, in = group.first.second;
    dispatch_average_pair(out, in, [&](auto o, auto x) {
      multi_tensor_apply<3>(group.second, stream, /*work_base=*/0,
                            WindowPushFunctor<decltype(o), decltype(x)>{});
    });
  }
}

}  // namespace wavg_ext::cuda
