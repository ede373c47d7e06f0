// Registers the CUDA kernels for the CUDA dispatch key. Built only with CUDA (the
// emulated build reaches the same entries from the CPU key: cpu/register_cpu.cpp).
#include "../register_kernels.h"
#include "ops_cuda.h"

namespace wavg_ext::cuda {
namespace {

struct CudaKernels {
  static constexpr auto running_mean = &running_mean_cuda;
  static constexpr auto ema = &ema_cuda;
  static constexpr auto accumulate = &accumulate_cuda;
  static constexpr auto scale_copy = &scale_copy_cuda;
  static constexpr auto running_mean_compensated = &running_mean_compensated_cuda;
  static constexpr auto ema_compensated = &ema_compensated_cuda;
  static constexpr auto nonfinite_flag = &nonfinite_flag_entry;
  using Rows = CudaRows;
};

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CUDA, m) { register_kernels<CudaKernels>(m); }

}  // namespace wavg_ext::cuda
