// Host entry points of the CUDA kernels (defined in the .cu files and
// basis_ops_cuda.cpp; registered for the CUDA dispatch key in register_cuda.cpp,
// and, in the emulated build, reached from the CPU key: emulation/routing.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../basis_args.h"
#include "../pair_args.h"

namespace wavg_ext::cuda {

// <id>_cuda for every op of op_registry.h, defined in <id>.cu (the compensated ops
// in compensated.cu).
#define WAVG_EXT_DECLARE_CUDA_KERNEL(id, ...) void id##_cuda(PairPlan& plan);
WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_DECLARE_CUDA_KERNEL)
#undef WAVG_EXT_DECLARE_CUDA_KERNEL
// Sets *flag (a device int, zeroed by the caller) to 1 when any element of xs
// (validated, dense, on one device) is NaN or +-inf.
void nonfinite_flag_cuda(const std::vector<at::Tensor>& xs, int* flag);
// The nonfinite_flag op: validates, allocates the flag on the tensors' device, runs.
at::Tensor nonfinite_flag_entry(at::TensorList xs);

// ema_stochastic_ on the validated plan (ema_stochastic.cu).
void ema_stochastic_cuda(PairPlan& plan, int64_t seed);

// ema_many_ on the validated plan (ema_many.cu).
void ema_many_cuda(ManyPlan& plan);

// window_push_ on the validated plan (window_push.cu).
void window_push_cuda(PairPlan& plan);

// Basis ops with one partner row (plan.ny == 1). rows_dot_cuda writes out[i] = <row i, y>
// (float64 [na], device) using partials (float64 [row_chunks(plan) * na], device) as
// scratch; rows_mix_cuda does y <- beta*y + alpha * m @ rows (m: float64 [na], device).
int64_t row_chunks(const RowPlan& plan);
void rows_dot_cuda(const RowPlan& plan, double* partials, double* out);
void rows_mix_cuda(const RowPlan& plan, const double* m, double alpha, double beta);

// The CUDA backend of basis_composite.h (scratch and results on the plan's device).
struct CudaRows {
  static at::Tensor dot(const RowPlan& plan, bool symmetric);
  static void mix(const RowPlan& plan, const at::Tensor& m, double alpha, double beta, bool alias);
};

}  // namespace wavg_ext::cuda
