// accumulate_: sum <- sum + alpha * x on CPU.
#include <torch/library.h>

#include "../cuda/emulation/routing.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  apply_pairs</*reads_out=*/true>(plan, AxpyOp{plan.scalar.value});
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("accumulate_", WAVG_EXT_CPU_OR_EMULATED((&entry_float<kAccumulateSpec, run>),
                                           ((&entry_float<kAccumulateSpec, cuda::accumulate_cuda>))));
  m.impl("accumulate_.Tensor", WAVG_EXT_CPU_OR_EMULATED((&entry_tensor<kAccumulateSpec, run>),
                                                  ((&entry_tensor<kAccumulateSpec, cuda::accumulate_cuda>))));
}

}  // namespace wavg_ext::cpu
