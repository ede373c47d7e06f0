// ema_many_: P exponential averages of the same weights on CUDA (see
// cpu/ema_many_cpu.cpp): each launch updates up to kMaxProfiles profiles from one read of
// x, so P profiles move 2P + ceil(P / kMaxProfiles) tensors' bytes instead of 3P. The
// arithmetic is ema_'s (make_lerp): the same bits as P ema_ calls.
#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

// Profiles per launch: the launcher's lists are a compile-time depth (1 + profiles), and
// its metadata must still carry enough tensors per launch in 4 KiB of parameters.
constexpr int kMaxProfiles = 4;

struct ManyWeights {
  double w[kMaxProfiles];
};

// ptrs = {x, avg of profile 0, ..., avg of profile kProfiles - 1}.
template <typename out_t, typename in_t, int kProfiles>
struct EmaManyFunctor {
  using opmath_t = pair_opmath_t<out_t, in_t>;
  static constexpr int kVec = 16 / (sizeof(out_t) < sizeof(in_t) ? sizeof(out_t) : sizeof(in_t));

  __device__ __forceinline__ void operator()(void* ptrs[kProfiles + 1], const Chunk& chunk,
                                             ManyWeights weights) const {
    const in_t* __restrict__ x = static_cast<const in_t*>(ptrs[0]) + chunk.start;
    out_t* avg[kProfiles];
    LerpFn<opmath_t> lerp[kProfiles];
    bool aligned = aligned16(x);
#pragma unroll
    for (int p = 0; p < kProfiles; ++p) {
      avg[p] = static_cast<out_t*>(ptrs[p + 1]) + chunk.start;
      lerp[p] = make_lerp<opmath_t>(weights.w[p], /*copy=*/false);
      aligned = aligned && aligned16(avg[p]);
    }
    int64_t done = 0;
    if (aligned) {
      const int64_t nvec = chunk.n / kVec;
      for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        Pack<in_t, kVec> xv;
        load_pack(xv, x + v * kVec);
#pragma unroll
        for (int p = 0; p < kProfiles; ++p) {
          Pack<out_t, kVec> a;
          load_pack(a, avg[p] + v * kVec);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            a.v[e] = static_cast<out_t>(
                lerp[p](static_cast<opmath_t>(a.v[e]), static_cast<opmath_t>(xv.v[e])));
          }
          store_pack(avg[p] + v * kVec, a);
        }
      }
      done = nvec * kVec;
    }
    for (int64_t i = done + threadIdx.x; i < chunk.n; i += blockDim.x) {
      const opmath_t xi = static_cast<opmath_t>(load_global(x + i));
#pragma unroll
      for (int p = 0; p < kProfiles; ++p) {
        store_global(avg[p] + i,
                     static_cast<out_t>(lerp[p](static_cast<opmath_t>(load_global(avg[p] + i)), xi)));
      }
    }
  }
};

// One launch sequence for profiles [first, first + kProfiles) of pairs of one dtype pair.
template <typename out_t, typename in_t, int kProfiles>
void launch_profiles(const ManyPlan& plan, const std::vector<int64_t>& pairs, int64_t first,
                     cudaStream_t stream) {
  std::vector<TensorEntry<kProfiles + 1>> entries;
  entries.reserve(pairs.size());
  ManyWeights weights{};
  for (int p = 0; p < kProfiles; ++p) weights.w[p] = plan.weights[first + p];
  for (int64_t k : pairs) {
    const PairView& pair = plan.fused.pairs[k];
    TensorEntry<kProfiles + 1> e{};
    e.ptrs[0] = const_cast<void*>(pair.in);
    for (int p = 0; p < kProfiles; ++p) e.ptrs[p + 1] = plan.outs[k * plan.profiles + first + p];
    e.numel = pair.numel;
    entries.push_back(e);
  }
  multi_tensor_apply<kProfiles + 1>(entries, stream, /*work_base=*/0,
                                    EmaManyFunctor<out_t, in_t, kProfiles>{}, weights);
}

template <typename out_t, typename in_t>
void launch_many_group(const ManyPlan& plan, const std::vector<int64_t>& pairs, cudaStream_t stream) {
  for (int64_t first = 0; first < plan.profiles; first += kMaxProfiles) {
    switch (std::min<int64_t>(plan.profiles - first, kMaxProfiles)) {
      case 1: launch_profiles<out_t, in_t, 1>(plan, pairs, first, stream); break;
      case 2: launch_profiles<out_t, in_t, 2>(plan, pairs, first, stream); break;
      case 3: launch_profiles<out_t, in_t, 3>(plan, pairs, first, stream); break;
      default: launch_profiles<out_t, in_t, 4>(plan, pairs, first, stream); break;
    }
  }
}

}  // namespace

void ema_many_cuda(ManyPlan& plan) {
  static_assert(kMaxProfiles == 4, "launch_many_group's cases");
  if (!plan.fused.pairs.empty()) {
    using c10::ScalarType;
    const DeviceGuard guard(plan.fused.device);
    const cudaStream_t stream = current_stream(plan.fused.device);
    KernelMemory memory;
    add_plan_memory(memory, plan.fused);
    for (size_t k = 0; k < plan.fused.pairs.size(); ++k) {
      const PairView& pair = plan.fused.pairs[k];
      for (int64_t p = 1; p < plan.profiles; ++p) {
        memory.add(plan.outs[k * plan.profiles + p],
                   pair.numel * static_cast<int64_t>(c10::elementSize(pair.out_dtype)));
      }
    }
    std::map<std::pair<ScalarType, ScalarType>, std::vector<int64_t>> groups;
    for (size_t k = 0; k < plan.fused.pairs.size(); ++k) {
      const PairView& pair = plan.fused.pairs[k];
      groups[{pair.out_dtype, pair.in_dtype}].push_back(static_cast<int64_t>(k));
    }
    for (const auto& group : groups) {
      const ScalarType out = group.first.first, in = group.first.second;
      dispatch_average_pair(out, in, [&](auto o, auto x) {
        launch_many_group<decltype(o), decltype(x)>(plan, group.second, stream);
      });
    }
  }
  for (PairPlan& separate : plan.separate) {
    if (!separate.pairs.empty()) ema_cuda(separate);
  }
}

}  // namespace wavg_ext::cuda
