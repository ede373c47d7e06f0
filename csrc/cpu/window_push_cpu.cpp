// window_push_: sum <- sum + (x - slot), slot <- x on CPU: one read of sum, slot and x,
// one write of sum and slot (LAWA's window sum moves by the new sample minus the one
// leaving the window). The difference and the sum are taken in the pair's opmath type
// (float64 for float64 sums); the slot gets x's bits.
#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {
namespace {

template <typename sum_t, typename in_t>
void window_range(sum_t* sum, in_t* slot, const in_t* x, int64_t n) {
  using opmath_t = pair_opmath_t<sum_t, in_t>;
  using SumIO = VecIO<sum_t, opmath_t>;
  using InIO = VecIO<in_t, opmath_t>;
  using Vec = typename SumIO::Vec;
  constexpr int64_t kStep = SumIO::kStep;
  auto block = [&](sum_t* s, in_t* o, const in_t* xp) {
    Vec s0, s1, o0, o1, x0, x1;
    InIO::load(xp, x0, x1);
    InIO::load(o, o0, o1);
    SumIO::load(s, s0, s1);
    SumIO::store(s, s0 + (x0 - o0), s1 + (x1 - o1));
    std::memcpy(o, xp, kStep * sizeof(in_t));
  };
  run_blocks3<kStep>(sum, slot, x, n, block);
}

}  // namespace

void window_push_cpu(PairPlan& plan) {
  for_pair_items(plan, [&](const PairView& pair, int64_t begin, int64_t end) {
    dispatch_pair(pair.out_dtype, pair.in_dtype, [&](auto o, auto x) {
      using sum_t = decltype(o);
      using in_t = decltype(x);
      window_range(static_cast<sum_t*>(pair.out) + begin, static_cast<in_t*>(pair.aux) + begin,
                   static_cast<const in_t*>(pair.in) + begin, end - begin);
    });
  });
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
