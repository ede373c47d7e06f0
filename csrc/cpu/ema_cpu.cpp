// ema_: avg <- avg + weight * (x - avg) on CPU.
#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

void ema_cpu(PairPlan& plan) {
  apply_pairs<spec::ema.reads_out>(plan, LerpOp{plan.scalar.value});
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
