// Registers the CUDA kernels for the CUDA dispatch key. Built only with CUDA (the
// emulated build reaches the same entries from the CPU key: emulation/routing.h).
#include <torch/library.h>

#include "../basis_composite.h"
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
  m.impl("running_mean_compensated_",
         &entry_compensated_float<kRunningMeanCompensatedSpec, running_mean_compensated_cuda>);
  m.impl("running_mean_compensated_.Tensor",
         &entry_compensated_tensor<kRunningMeanCompensatedSpec, running_mean_compensated_cuda>);
  m.impl("ema_compensated_", &entry_compensated_float<kEmaCompensatedSpec, ema_compensated_cuda>);
  m.impl("ema_compensated_.Tensor",
         &entry_compensated_tensor<kEmaCompensatedSpec, ema_compensated_cuda>);
  m.impl("nonfinite_flag", &nonfinite_flag_entry);
  m.impl("dots", &dots_impl<CudaRows>);
  m.impl("combine_", &combine_impl<CudaRows>);
  m.impl("project_", &project_impl<CudaRows>);
  m.impl("orthonormalize_", &orthonormalize_impl<CudaRows>);
}

}  // namespace wavg_ext::cuda
