// scale_copy_: dst <- scale * src (cast to dst's dtype) on CPU.
#include <torch/library.h>

#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  apply_pairs</*reads_out=*/false>(plan, ScaleOp{plan.scalar.value});
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("scale_copy_", &entry_float<kScaleCopySpec, run>);
  m.impl("scale_copy_.Tensor", &entry_tensor<kScaleCopySpec, run>);
}

}  // namespace wavg_ext::cpu
