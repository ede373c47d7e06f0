// Registers the CUDA kernels for the CUDA dispatch key. Built only with CUDA.
#include <torch/library.h>

#include "ops_cuda.h"

namespace wavg_ext::cuda {

TORCH_LIBRARY_IMPL(wavg_ext, CUDA, m) {
  m.impl("running_mean_", &entry_float<kRunningMeanSpec, running_mean_cuda>);
  m.impl("running_mean_.Tensor", &entry_tensor<kRunningMeanSpec, running_mean_cuda>);
  m.impl("ema_", &entry_float<kEmaSpec, ema_cuda>);
  m.impl("ema_.Tensor", &entry_tensor<kEmaSpec, ema_cuda>);
  m.impl("accumulate_", &entry_float<kAccumulateSpec, accumulate_cuda>);
  m.impl("accumulate_.Tensor", &entry_tensor<kAccumulateSpec, accumulate_cuda>);
  m.impl("scale_copy_", &entry_float<kScaleCopySpec, scale_copy_cuda>);
  m.impl("scale_copy_.Tensor", &entry_tensor<kScaleCopySpec, scale_copy_cuda>);
}

}  // namespace wavg_ext::cuda
