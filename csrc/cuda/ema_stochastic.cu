// ema_stochastic_: avg <- avg + weight * (x - avg) in float32 (ema_'s formula), rounded to
// the bfloat16 average stochastically (../stochastic_rounding.h) on CUDA: the same bits as
// the CPU kernels for the same seed.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

#include "../stochastic_rounding.h"
#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

// ptrs = {avg, x, key}: the third slot of the launcher's entry carries the pair's 64-bit
// key (sr::pair_key), not an address; it is never dereferenced.
template <typename in_t>
struct StochasticEmaFunctor {
  static constexpr int kVec = 8;  // 16 bytes of bfloat16
  static constexpr int kILP = 4;

  __device__ __forceinline__ void operator()(void* ptrs[3], const Chunk& chunk, double weight) const {
    c10::BFloat16* __restrict__ out = static_cast<c10::BFloat16*>(ptrs[0]) + chunk.start;
    const in_t* __restrict__ in = static_cast<const in_t*>(ptrs[1]) + chunk.start;
    const uint64_t pair_key = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptrs[2]));
    // (chunks of kChunkSize never straddle a 2^32 block: kChunkSize divides 2^32)
    const uint32_t key = sr::block_key(pair_key, static_cast<uint64_t>(chunk.start) >> 32);
    const uint32_t first = static_cast<uint32_t>(chunk.start);
    const LerpFn<float> lerp = make_lerp<float>(weight, /*copy=*/false);
    apply_elements<true, kVec, kILP>(out, in, chunk.n, [&](c10::BFloat16 a, in_t x, int64_t i) {
      const float v = lerp(static_cast<float>(a), static_cast<float>(x));
      return sr::round_to_bfloat16(v, sr::noise16(key, first + static_cast<uint32_t>(i)));
    });
  }
};

}  // namespace

void ema_stochastic_cuda(PairPlan& plan, int64_t seed) {
  if (plan.pairs.empty()) return;
  static_assert((int64_t{1} << 32) % kChunkSize == 0, "no chunk straddles a 2^32 block");
  const DeviceGuard guard(plan.device);
  const cudaStream_t stream = current_stream(plan.device);
  KernelMemory memory;
  add_plan_memory(memory, plan);
  std::vector<TensorEntry<3>> from_float, from_bfloat16;
  for (const PairView& p : plan.pairs) {
    void* key = reinterpret_cast<void*>(static_cast<uintptr_t>(sr::pair_key(seed, p.index)));
    (p.in_dtype == c10::ScalarType::Float ? from_float : from_bfloat16)
        .push_back({{p.out, const_cast<void*>(p.in), key}, p.numel});
  }
  const double weight = plan.scalar.value;
  if (!from_float.empty()) {
    multi_tensor_apply<3>(from_float, stream, 0, StochasticEmaFunctor<float>{}, weight);
  }
  if (!from_bfloat16.empty()) {
    multi_tensor_apply<3>(from_bfloat16, stream, 0, StochasticEmaFunctor<c10::BFloat16>{}, weight);
  }
}

}  // namespace wavg_ext::cuda
