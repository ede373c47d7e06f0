// ema_stochastic_: avg <- avg + weight * (x - avg) in float32 (ema_'s formula), rounded to
// the bfloat16 average stochastically (../stochastic_rounding.h) on CPU. The hash runs in
// int32 vector lanes; the rounded float32 values have zero low halves, so the bfloat16
// store (round to nearest) is exact.
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <vector>

#include "../stochastic_rounding.h"
#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {
namespace {

using FVec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
static_assert(FVec::size() == IVec::size(), "one int32 lane per float lane");

// x >> s with zeros shifted in (the int32 lanes shift arithmetically).
inline IVec shift_right_logical(const IVec& x, int s) {
  return (x >> IVec(s)) & IVec(static_cast<int32_t>(0xFFFFFFFFu >> s));
}

// sr::noise16 and sr::round_to_bfloat16 for one vector: v rounded at the elements
// `element` (low 32 bits), as float32 values that are exact bfloat16 values (NaN/inf as is).
inline FVec round_lanes(const FVec& v, const IVec& element, const IVec& key) {
  alignas(64) int32_t buf[IVec::size()];
  v.store(buf);
  const IVec bits = IVec::loadu(buf);
  IVec h = element ^ key;  // lowbias32
  h = h ^ shift_right_logical(h, 16);
  h = h * IVec(0x7FEB352D);
  h = h ^ shift_right_logical(h, 15);
  h = h * IVec(static_cast<int32_t>(0x846CA68Bu));
  h = h ^ shift_right_logical(h, 16);
  const IVec noise = shift_right_logical(h, 16);
  const IVec exponent(static_cast<int32_t>(sr::kExponentMask));
  const IVec nonfinite = (bits & exponent) == exponent;  // all ones in NaN/inf lanes
  const IVec rounded =
      (bits + (noise & (nonfinite ^ IVec(-1)))) & (IVec(static_cast<int32_t>(0xFFFF0000u)) | nonfinite);
  rounded.store(buf);
  return FVec::loadu(buf);
}

// Elements [first, first + n) of one pair (first: the index of out[0] in the pair), whose
// elements share the block key `key`.
template <typename in_t>
void run_range(c10::BFloat16* out, const in_t* in, int64_t n, uint32_t first, uint32_t key,
               double weight) {
  using OutIO = VecIO<c10::BFloat16, float>;
  using InIO = VecIO<in_t, float>;
  constexpr int64_t kStep = OutIO::kStep;
  constexpr int kLanes = FVec::size();
  const auto lerp = LerpOp{weight}.template bind<float>();  // ema_'s arithmetic
  alignas(64) int32_t lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  const IVec lanes = IVec::loadu(lane);
  const IVec vkey(static_cast<int32_t>(key));
  auto step = [&](c10::BFloat16* o, const in_t* x, uint32_t e) {
    FVec a0, a1, x0, x1;
    InIO::load(x, x0, x1);
    OutIO::load(o, a0, a1);
    const IVec e0 = IVec(static_cast<int32_t>(e)) + lanes;
    const IVec e1 = IVec(static_cast<int32_t>(e + kLanes)) + lanes;
    OutIO::store(o, round_lanes(lerp(a0, x0), e0, vkey), round_lanes(lerp(a1, x1), e1, vkey));
  };
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) step(out + i, in + i, first + static_cast<uint32_t>(i));
  if (i < n) {
    // The tail through the same vector code (element indices past n are computed and dropped).
    const int64_t rest = n - i;
    alignas(64) c10::BFloat16 obuf[kStep] = {};
    alignas(64) in_t ibuf[kStep] = {};
    std::memcpy(ibuf, in + i, rest * sizeof(in_t));
    std::memcpy(obuf, out + i, rest * sizeof(c10::BFloat16));
    step(obuf, ibuf, first + static_cast<uint32_t>(i));
    std::memcpy(out + i, obuf, rest * sizeof(c10::BFloat16));
  }
}

}  // namespace

void ema_stochastic_cpu(PairPlan& plan, int64_t seed) {
  std::vector<uint64_t> keys(plan.pairs.size());
  for (size_t p = 0; p < keys.size(); ++p) keys[p] = sr::pair_key(seed, plan.pairs[p].index);
  const double weight = plan.scalar.value;
  static_assert((int64_t{1} << 32) % kItemElements == 0, "no work item straddles a 2^32 block");
  for_pair_items(plan, [&](const PairView& pair, int64_t begin, int64_t end) {
    const uint64_t pk = keys[&pair - plan.pairs.data()];
    const uint32_t key = sr::block_key(pk, static_cast<uint64_t>(begin) >> 32);
    auto* out = static_cast<c10::BFloat16*>(pair.out) + begin;
    const auto first = static_cast<uint32_t>(begin);
    if (pair.in_dtype == c10::ScalarType::Float) {
      run_range(out, static_cast<const float*>(pair.in) + begin, end - begin, first, key, weight);
    } else {  // bfloat16 (validated)
      run_range(out, static_cast<const c10::BFloat16*>(pair.in) + begin, end - begin, first, key, weight);
    }
  });
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
