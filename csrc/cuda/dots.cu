// dots on CUDA: per-chunk float64 partials of <row i, x>, then an ordered cleanup.
#include "ops_cuda.h"
#include "rows.cuh"

namespace wavg_ext::cuda {

// Defined here, not in rows.cuh: a __global__ function defined in a header would be
// defined once per .cu that includes it, and _C_cuda would not link.
// out[i] = sum over chunks w (in order, fixed tree) of partials[w * na + i]; one block per i.
__global__ void __launch_bounds__(kCleanupThreads)
    sum_partials_kernel(const double* partials, int64_t chunks, int64_t na, double* out) {
  __shared__ SharedArray<double, kCleanupThreads> sums;
  const int64_t i = blockIdx.x;
  double s = 0.0;
  for (int64_t w = threadIdx.x; w < chunks; w += blockDim.x) s += load_global(partials + w * na + i);
  sums[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kCleanupThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) store_global(out + i, static_cast<double>(sums[0]));
}

int64_t row_chunks(const RowPlan& plan) {
  int64_t chunks = 0;
  for (const RowTask& t : plan.tasks) chunks += (t.numel + kChunkSize - 1) / kChunkSize;
  return chunks;
}

void rows_dot_cuda(const RowPlan& plan, double* partials, double* out) {
  TORCH_CHECK(plan.ny == 1, "wavg_ext: the CUDA rows_dot takes one partner row");
  if (plan.tasks.empty() || plan.na == 0) return;
  const DeviceGuard guard(plan.device);
  const cudaStream_t stream = current_stream(plan.device);
  const int64_t na = plan.na;
  const int64_t chunks = row_chunks(plan);
  KernelMemory memory;
  add_row_memory(memory, plan);
  memory.add(partials, chunks * na * static_cast<int64_t>(sizeof(double)));
  memory.add(out, na * static_cast<int64_t>(sizeof(double)));
  launch_rows<RowDotFunctor>(plan, stream, na, partials);
  launch_kernel("sum_partials", sum_partials_kernel, dim3(static_cast<unsigned>(na)),
                dim3(kCleanupThreads), stream, partials, chunks, na, out);
}

}  // namespace wavg_ext::cuda
