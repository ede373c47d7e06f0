// The basis ops for the CUDA dispatch key: the CUDA backend of basis_composite.h
// (scratch and results allocated here, kernels in dots.cu / combine.cu). Built only
// with CUDA.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../basis_composite.h"
#include "ops_cuda.h"

namespace wavg_ext::cuda {
namespace {

struct CudaRows {
  static at::Tensor dot(const RowPlan& plan, bool /*symmetric: ny == 1 here*/) {
    TORCH_CHECK(plan.ny == 1, "wavg_ext: the CUDA backend computes dots with one partner row");
    const c10::cuda::CUDAGuard guard(plan.device);
    const auto opts = at::TensorOptions().dtype(at::kDouble).device(plan.device);
    if (plan.tasks.empty() || plan.na == 0) return at::zeros({plan.na}, opts);
    at::Tensor out = at::empty({plan.na}, opts);
    at::Tensor partials = at::empty({row_chunks(plan) * plan.na}, opts);
    rows_dot_cuda(plan, partials.data_ptr<double>(), out.data_ptr<double>());
    return out;
  }
  static void mix(const RowPlan& plan, const at::Tensor& m, double alpha, double beta,
                  bool /*alias: element-wise in place is safe here*/) {
    const c10::cuda::CUDAGuard guard(plan.device);
    // A CPU tensor is copied to the device; a device tensor is read by the kernel.
    const at::Tensor coef = m.to(plan.device, at::kDouble).contiguous();
    rows_mix_cuda(plan, coef.const_data_ptr<double>(), alpha, beta);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CUDA, m) {
  m.impl("dots", &dots_impl<CudaRows>);
  m.impl("combine_", &combine_impl<CudaRows>);
  m.impl("project_", &project_impl<CudaRows>);
  m.impl("orthonormalize_", &orthonormalize_impl<CudaRows>);
}

}  // namespace wavg_ext::cuda
