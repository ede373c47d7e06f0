// dots on CUDA: per-chunk float64 partials of <row i, x>, then an ordered cleanup.
#include "ops_cuda.h"
#include "rows.cuh"

namespace wavg_ext::cuda {

int64_t row_chunks(const RowPlan& plan) {
  int64_t chunks = 0;
  for (const RowTask& t : plan.tasks) chunks += (t.numel + kChunkSize - 1) / kChunkSize;
  return chunks;
}

void rows_dot_cuda(const RowPlan& plan, double* partials, double* out) {
  TORCH_CHECK(plan.ny == 1, "wavg_ext: the CUDA rows_dot takes one partner row");
  if (plan.tasks.empty() || plan.na == 0) return;
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.device.index()).stream();
  const int64_t na = plan.na;
  launch_rows<RowDotFunctor>(plan, stream, na, partials);
  sum_partials_kernel<<<static_cast<unsigned>(na), kCleanupThreads, 0, stream>>>(
      partials, row_chunks(plan), na, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace wavg_ext::cuda
