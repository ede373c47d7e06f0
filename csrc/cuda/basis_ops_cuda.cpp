// The CUDA backend of the basis ops (basis_composite.h): scratch and results
// allocated here, kernels in dots.cu / combine.cu. Built with CUDA, and as host
// code in the emulated build.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "ops_cuda.h"
#include "platform.cuh"

namespace wavg_ext::cuda {

at::Tensor CudaRows::dot(const RowPlan& plan, bool /*symmetric: ny == 1 here*/) {
  TORCH_CHECK(plan.ny == 1, "wavg_ext: the CUDA backend computes dots with one partner row");
  const DeviceGuard guard(plan.device);
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(plan.device);
  if (plan.tasks.empty() || plan.na == 0) return at::zeros({plan.na}, opts);
  at::Tensor out = at::empty({plan.na}, opts);
  at::Tensor partials = at::empty({row_chunks(plan) * plan.na}, opts);
  rows_dot_cuda(plan, partials.data_ptr<double>(), out.data_ptr<double>());
  return out;
}

void CudaRows::mix(const RowPlan& plan, const at::Tensor& m, double alpha, double beta,
                   bool /*alias: element-wise in place is safe here*/) {
  const DeviceGuard guard(plan.device);
  // A CPU tensor is copied to the device; a device tensor is read by the kernel.
  const at::Tensor coef = m.to(plan.device, at::kDouble).contiguous();
  rows_mix_cuda(plan, coef.const_data_ptr<double>(), alpha, beta);
}

}  // namespace wavg_ext::cuda
