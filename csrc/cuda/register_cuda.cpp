// wavg_ext._C_cuda: registers the CUDA kernels for the CUDA dispatch key when loaded.
// Built only with CUDA, as a module of its own, so that wavg_ext._C (the schemas and the
// CPU kernels) needs no CUDA library: wavg_ext loads this module only under a torch with
// CUDA (wavg_ext/__init__.py). The emulated build reaches the same entries from the CPU
// key instead (cpu/register_cpu.cpp).
#include <torch/extension.h>

#include "../register_kernels.h"
#include "ops_cuda.h"

// Written by setup.py / CMakeLists.txt.
#include "wavg_ext_build_config.h"

namespace wavg_ext::cuda {
namespace {

struct CudaKernels {
#define WAVG_EXT_CUDA_RUNNER(id, ...) static constexpr auto id = &id##_cuda;
  WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_CUDA_RUNNER)
#undef WAVG_EXT_CUDA_RUNNER
  static constexpr auto nonfinite_flag = &nonfinite_flag_entry;
  static constexpr auto ema_stochastic = &ema_stochastic_cuda;
  static constexpr auto ema_many = &ema_many_cuda;
  static constexpr auto window_push = &window_push_cuda;
  using Rows = CudaRows;
};

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CUDA, m) { register_kernels<CudaKernels>(m); }

}  // namespace wavg_ext::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wavg_ext's CUDA kernels (registered with the dispatcher on import)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["version"] = WAVG_EXT_VERSION;
    info["cuda_version"] = WAVG_EXT_CUDA_VERSION;
    info["cuda_archs"] = WAVG_EXT_CUDA_ARCH_LIST;
    info["torch_version"] = WAVG_EXT_TORCH_VERSION;
    return info;
  });
}
