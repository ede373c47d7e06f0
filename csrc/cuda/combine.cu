// combine_ on CUDA: y <- beta*y + alpha * sum_i m[i] * row_i, coefficients read on the device.
#include "ops_cuda.h"
#include "rows.cuh"

namespace wavg_ext::cuda {

void rows_mix_cuda(const RowPlan& plan, const double* m, double alpha, double beta) {
  TORCH_CHECK(plan.ny == 1, "wavg_ext: the CUDA rows_mix_ writes one partner row");
  if (plan.tasks.empty()) return;
  const DeviceGuard guard(plan.device);
  const cudaStream_t stream = current_stream(plan.device);
  KernelMemory memory;
  add_row_memory(memory, plan);
  memory.add(m, plan.na * static_cast<int64_t>(sizeof(double)));
  launch_rows<RowMixFunctor>(plan, stream, plan.na, m, alpha, beta);
}

}  // namespace wavg_ext::cuda
