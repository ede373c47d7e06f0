// ema_: avg <- avg + weight * (x - avg) on CPU.
#include <torch/library.h>

#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  apply_pairs</*reads_out=*/true>(plan, LerpOp{plan.scalar.value});
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("ema_", &entry_float<kEmaSpec, run>);
  m.impl("ema_.Tensor", &entry_tensor<kEmaSpec, run>);
}

}  // namespace wavg_ext::cpu
