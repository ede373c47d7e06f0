// scale_copy_: dst <- scale * src (cast to dst's dtype) on CPU.
#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

void scale_copy_cpu(PairPlan& plan) {
  apply_pairs<spec::scale_copy.reads_out>(plan, ScaleOp{plan.scalar.value});
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
