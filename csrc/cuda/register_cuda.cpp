// Registers the CUDA kernels for the CUDA dispatch key. Built only with CUDA.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "ops_cuda.h"

namespace wavg_ext::cuda {
namespace {

at::Tensor nonfinite_flag(at::TensorList xs) {
  const std::vector<at::Tensor> ts = prepare_flag_inputs(xs);
  at::Tensor flag = at::zeros({}, xs[0].options().dtype(at::kInt));
  nonfinite_flag_cuda(ts, flag.data_ptr<int>());
  return flag;
}

}  // namespace

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
  m.impl("nonfinite_flag", &nonfinite_flag);
}

}  // namespace wavg_ext::cuda
