// combine_ on CUDA: y <- beta*y + alpha * sum_i m[i] * row_i, coefficients read on the device.
#include "ops_cuda.h"
#include "rows.cuh"

namespace wavg_ext::cuda {

void rows_mix_cuda(const RowPlan& plan, const double* m, double alpha, double beta) {
  TORCH_CHECK(plan.ny == 1, "wavg_ext: the CUDA rows_mix_ writes one partner row");
  if (plan.tasks.empty()) return;
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.device.index()).stream();
  launch_rows<RowMixFunctor>(plan, stream, plan.na, m, alpha, beta);
}

}  // namespace wavg_ext::cuda
