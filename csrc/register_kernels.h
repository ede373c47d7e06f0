// The kernel registrations of one backend's dispatch key, written once for every
// backend (cpu/register_cpu.cpp, cuda/register_cuda.cpp). Kernels provides
//   running_mean, ema, accumulate, scale_copy,
//   running_mean_compensated, ema_compensated   void(PairPlan&) runners (after validation)
//   nonfinite_flag                               at::Tensor(at::TensorList)
//   Rows                                         the row backend of basis_composite.h
#pragma once

#include <torch/library.h>

#include "basis_composite.h"
#include "pair_args.h"

namespace wavg_ext {

template <typename Kernels>
void register_kernels(torch::Library& m) {
  m.impl("running_mean_", &entry_float<kRunningMeanSpec, Kernels::running_mean>);
  m.impl("running_mean_.Tensor", &entry_tensor<kRunningMeanSpec, Kernels::running_mean>);
  m.impl("ema_", &entry_float<kEmaSpec, Kernels::ema>);
  m.impl("ema_.Tensor", &entry_tensor<kEmaSpec, Kernels::ema>);
  m.impl("accumulate_", &entry_float<kAccumulateSpec, Kernels::accumulate>);
  m.impl("accumulate_.Tensor", &entry_tensor<kAccumulateSpec, Kernels::accumulate>);
  m.impl("scale_copy_", &entry_float<kScaleCopySpec, Kernels::scale_copy>);
  m.impl("scale_copy_.Tensor", &entry_tensor<kScaleCopySpec, Kernels::scale_copy>);
  m.impl("running_mean_compensated_",
         &entry_compensated_float<kRunningMeanCompensatedSpec, Kernels::running_mean_compensated>);
  m.impl("running_mean_compensated_.Tensor",
         &entry_compensated_tensor<kRunningMeanCompensatedSpec, Kernels::running_mean_compensated>);
  m.impl("ema_compensated_", &entry_compensated_float<kEmaCompensatedSpec, Kernels::ema_compensated>);
  m.impl("ema_compensated_.Tensor",
         &entry_compensated_tensor<kEmaCompensatedSpec, Kernels::ema_compensated>);
  m.impl("nonfinite_flag", Kernels::nonfinite_flag);
  m.impl("dots", &dots_impl<typename Kernels::Rows>);
  m.impl("combine_", &combine_impl<typename Kernels::Rows>);
  m.impl("project_", &project_impl<typename Kernels::Rows>);
  m.impl("orthonormalize_", &orthonormalize_impl<typename Kernels::Rows>);
}

}  // namespace wavg_ext
