// ema_many_: P exponential averages of the same weights on CPU, each x read once.
//
// An EMA step reads avg and x and writes avg: 3 tensor-sized streams. P separate ema_
// calls move 3P; one pass over the profiles moves 2P + 1 (x once), so two profiles cost
// at best 5/3 of one EMA rather than 2. Every element gets LerpOp's arithmetic, the
// same bits as ema_ (and torch.lerp), whatever the profile count or the element's place.
#include <algorithm>
#include <vector>

#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {
namespace {

// Profiles per pass over x: a compile-time count keeps every profile's weight in a
// register and the loop unrolled; more profiles take further passes of up to kMaxProfiles.
constexpr int kMaxProfiles = 4;

// outs[p] + begin .. + end for kProfiles profiles, from in + begin: one vector of x, then
// each profile's lerp of it. The tail runs through the same code via small buffers.
template <int kProfiles, typename out_t, typename in_t>
void many_range(void* const* outs, const double* weights, const in_t* in, int64_t begin, int64_t end) {
  using opmath_t = pair_opmath_t<out_t, in_t>;
  using OutIO = VecIO<out_t, opmath_t>;
  using InIO = VecIO<in_t, opmath_t>;
  using Vec = typename OutIO::Vec;
  using Lerp = decltype(LerpOp{0.0}.template bind<opmath_t>());
  constexpr int64_t kStep = OutIO::kStep;
  // (lambdas are not default-constructible: built in place)
  const Lerp lerps[kMaxProfiles] = {
      LerpOp{weights[0]}.template bind<opmath_t>(),
      LerpOp{kProfiles > 1 ? weights[1] : 0.0}.template bind<opmath_t>(),
      LerpOp{kProfiles > 2 ? weights[2] : 0.0}.template bind<opmath_t>(),
      LerpOp{kProfiles > 3 ? weights[3] : 0.0}.template bind<opmath_t>()};
  out_t* avg[kProfiles];
  for (int p = 0; p < kProfiles; ++p) avg[p] = static_cast<out_t*>(outs[p]);
  Vec a0, a1, x0, x1;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    InIO::load(in + i, x0, x1);
    for (int p = 0; p < kProfiles; ++p) {
      OutIO::load(avg[p] + i, a0, a1);
      OutIO::store(avg[p] + i, lerps[p](a0, x0), lerps[p](a1, x1));
    }
  }
  if (i < end) {
    const int64_t rest = end - i;
    alignas(64) in_t ibuf[kStep] = {};
    std::memcpy(ibuf, in + i, rest * sizeof(in_t));
    InIO::load(ibuf, x0, x1);
    for (int p = 0; p < kProfiles; ++p) {
      alignas(64) out_t obuf[kStep] = {};
      std::memcpy(obuf, avg[p] + i, rest * sizeof(out_t));
      OutIO::load(obuf, a0, a1);
      OutIO::store(obuf, lerps[p](a0, x0), lerps[p](a1, x1));
      std::memcpy(avg[p] + i, obuf, rest * sizeof(out_t));
    }
  }
}

}  // namespace

void ema_many_cpu(ManyPlan& plan) {
  const int64_t profiles = plan.profiles;
  const PairView* first = plan.fused.pairs.data();
  for_pair_items(plan.fused, [&](const PairView& pair, int64_t begin, int64_t end) {
    void* const* outs = plan.outs.data() + (&pair - first) * profiles;
    dispatch_pair(pair.out_dtype, pair.in_dtype, [&](auto o, auto x) {
      using out_t = decltype(o);
      using in_t = decltype(x);
      const in_t* in = static_cast<const in_t*>(pair.in);
      for (int64_t p = 0; p < profiles; p += kMaxProfiles) {
        const double* w = plan.weights.data() + p;
        switch (std::min<int64_t>(profiles - p, kMaxProfiles)) {
          case 1: many_range<1, out_t>(outs + p, w, in, begin, end); break;
          case 2: many_range<2, out_t>(outs + p, w, in, begin, end); break;
          case 3: many_range<3, out_t>(outs + p, w, in, begin, end); break;
          default: many_range<4, out_t>(outs + p, w, in, begin, end); break;
        }
      }
    });
  });
  for (PairPlan& separate : plan.separate) {
    if (!separate.pairs.empty()) ema_cpu(separate);
  }
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
