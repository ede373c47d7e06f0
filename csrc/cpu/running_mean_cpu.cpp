// running_mean_: avg <- avg + (x - avg) / (count + 1) on CPU; count 0 copies.
#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

void running_mean_cpu(PairPlan& plan) {
  const double count = plan.scalar.value;
  if (count == 0) {
    // The first sample is a copy, whatever the average held (NaN/inf included).
    apply_pairs</*reads_out=*/false>(plan, ScaleOp{1.0});
  } else {
    apply_pairs<spec::running_mean.reads_out>(plan, LerpOp{1.0 / (count + 1.0)});
  }
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
