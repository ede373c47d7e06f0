// Entry points of the CPU kernels (defined in the *_cpu.cpp files; registered for
// the CPU dispatch key in register_cpu.cpp). The basis ops' CPU backend is CpuRows
// (rows_cpu.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../pair_args.h"

namespace wavg_ext::cpu {

void running_mean_cpu(PairPlan& plan);
void ema_cpu(PairPlan& plan);
void accumulate_cpu(PairPlan& plan);
void scale_copy_cpu(PairPlan& plan);
void running_mean_compensated_cpu(PairPlan& plan);
void ema_compensated_cpu(PairPlan& plan);
at::Tensor nonfinite_flag_cpu(at::TensorList xs);

}  // namespace wavg_ext::cpu
