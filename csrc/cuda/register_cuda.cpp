// Registers the CUDA kernels for the CUDA dispatch key. Built only with CUDA (the
// emulated build reaches the same entries from the CPU key: cpu/register_cpu.cpp).
#include "../register_kernels.h"
#include "ops_cuda.h"

namespace wavg_ext::cuda {
namespace {

struct CudaKernels {
#define WAVG_EXT_CUDA_RUNNER(id, ...) static constexpr auto id = &id##_cuda;
  WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_CUDA_RUNNER)
#undef WAVG_EXT_CUDA_RUNNER
  static constexpr auto nonfinite_flag = &nonfinite_flag_entry;
  using Rows = CudaRows;
};

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CUDA, m) { register_kernels<CudaKernels>(m); }

}  // namespace wavg_ext::cuda
