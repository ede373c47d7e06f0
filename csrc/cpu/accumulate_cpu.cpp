// accumulate_: sum <- sum + alpha * x on CPU.
#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

void accumulate_cpu(PairPlan& plan) {
  apply_pairs<spec::accumulate.reads_out>(plan, AxpyOp{plan.scalar.value});
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
