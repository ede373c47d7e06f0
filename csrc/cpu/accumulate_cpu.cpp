// accumulate_: sum <- sum + alpha * x on CPU.
#include <torch/library.h>

#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  apply_pairs</*reads_out=*/true>(plan, AxpyOp{plan.scalar.value});
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("accumulate_", &entry_float<kAccumulateSpec, run>);
  m.impl("accumulate_.Tensor", &entry_tensor<kAccumulateSpec, run>);
}

}  // namespace wavg_ext::cpu
