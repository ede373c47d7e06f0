// Host entry points of the CUDA kernels (defined in the .cu files, registered
// for the CUDA dispatch key in register_cuda.cpp).
#pragma once

#include "../pair_args.h"

namespace wavg_ext::cuda {

void running_mean_cuda(PairPlan& plan);
void ema_cuda(PairPlan& plan);
void accumulate_cuda(PairPlan& plan);
void scale_copy_cuda(PairPlan& plan);

}  // namespace wavg_ext::cuda
