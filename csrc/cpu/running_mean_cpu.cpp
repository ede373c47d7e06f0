// running_mean_: avg <- avg + (x - avg) / (count + 1) on CPU; count 0 copies.
#include <torch/library.h>

#include "../cuda/emulation/routing.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  const double count = plan.scalar.value;
  if (count == 0) {
    // The first sample is a copy, whatever the average held (NaN/inf included).
    apply_pairs</*reads_out=*/false>(plan, ScaleOp{1.0});
  } else {
    apply_pairs</*reads_out=*/true>(plan, LerpOp{1.0 / (count + 1.0)});
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("running_mean_", WAVG_EXT_CPU_OR_EMULATED((&entry_float<kRunningMeanSpec, run>),
                                           ((&entry_float<kRunningMeanSpec, cuda::running_mean_cuda>))));
  m.impl("running_mean_.Tensor", WAVG_EXT_CPU_OR_EMULATED((&entry_tensor<kRunningMeanSpec, run>),
                                                  ((&entry_tensor<kRunningMeanSpec, cuda::running_mean_cuda>))));
}

}  // namespace wavg_ext::cpu
