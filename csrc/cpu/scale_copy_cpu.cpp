// scale_copy_: dst <- scale * src (cast to dst's dtype) on CPU.
#include <torch/library.h>

#include "../cuda/emulation/routing.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu {
namespace {

void run(PairPlan& plan) {
  apply_pairs</*reads_out=*/false>(plan, ScaleOp{plan.scalar.value});
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("scale_copy_", WAVG_EXT_CPU_OR_EMULATED((&entry_float<kScaleCopySpec, run>),
                                           ((&entry_float<kScaleCopySpec, cuda::scale_copy_cuda>))));
  m.impl("scale_copy_.Tensor", WAVG_EXT_CPU_OR_EMULATED((&entry_tensor<kScaleCopySpec, run>),
                                                  ((&entry_tensor<kScaleCopySpec, cuda::scale_copy_cuda>))));
}

}  // namespace wavg_ext::cpu
