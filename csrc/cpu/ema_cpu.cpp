// ema_: avg <- avg + weight * (x - avg) on CPU.
#include <torch/library.h>

#include "../cuda/emulation/routing.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  apply_pairs</*reads_out=*/true>(plan, LerpOp{plan.scalar.value});
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("ema_", WAVG_EXT_CPU_OR_EMULATED((&entry_float<kEmaSpec, run>),
                                           ((&entry_float<kEmaSpec, cuda::ema_cuda>))));
  m.impl("ema_.Tensor", WAVG_EXT_CPU_OR_EMULATED((&entry_tensor<kEmaSpec, run>),
                                                  ((&entry_tensor<kEmaSpec, cuda::ema_cuda>))));
}

}  // namespace wavg_ext::cpu
