// Registers the CPU kernels for the CPU dispatch key: each op calls the selected
// ISA's kernel (capability.cpp). In a build with the CUDA emulation
// (WAVG_EXT_CUDA_EMULATION_BUILT) it hands the validated plan to the emulated CUDA
// kernel instead while wavg_ext.testing.cuda_emulation() is on in the calling thread
// (validation is shared; its scalar rule follows the switch too).
#include <ATen/ops/zeros.h>

#include "../cuda/emulation/routing.h"
#include "../register_kernels.h"
#include "kernel_table.h"

namespace wavg_ext::cpu {

// The CPU backend of basis_composite.h.
struct CpuRows {
  static at::Tensor dot(const RowPlan& plan, bool symmetric) {
    at::Tensor out = at::zeros({plan.na * plan.ny}, at::TensorOptions().dtype(at::kDouble));
    kernels().rows_dot(plan, symmetric, out.data_ptr<double>());
    return out;
  }
  static void mix(const RowPlan& plan, const at::Tensor& m, double alpha, double beta, bool alias) {
    std::vector<double> scaled = host_coefficients(m);
    for (double& v : scaled) v *= alpha;
    kernels().rows_mix(plan, scaled.data(), beta, alias);
  }
};

namespace {

struct CpuKernels {
#define WAVG_EXT_CPU_RUNNER(id, ...) \
  static void id(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(kernels().id, cuda::id##_cuda, p); }
  WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_CPU_RUNNER)
#undef WAVG_EXT_CPU_RUNNER
  static at::Tensor nonfinite_flag(at::TensorList xs) {
    return WAVG_EXT_CPU_OR_EMULATED(kernels().nonfinite_flag, cuda::nonfinite_flag_entry, xs);
  }
  static void ema_stochastic(PairPlan& p, int64_t seed) {
    WAVG_EXT_CPU_OR_EMULATED(kernels().ema_stochastic, cuda::ema_stochastic_cuda, p, seed);
  }
  static void ema_many(ManyPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(kernels().ema_many, cuda::ema_many_cuda, p);
  }
  static void window_push(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(kernels().window_push, cuda::window_push_cuda, p);
  }
  struct Rows {
    static at::Tensor dot(const RowPlan& plan, bool symmetric) {
      return WAVG_EXT_CPU_OR_EMULATED(CpuRows::dot, cuda::CudaRows::dot, plan, symmetric);
    }
    static void mix(const RowPlan& plan, const at::Tensor& m, double alpha, double beta, bool alias) {
      WAVG_EXT_CPU_OR_EMULATED(CpuRows::mix, cuda::CudaRows::mix, plan, m, alpha, beta, alias);
    }
  };
};

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) { register_kernels<CpuKernels>(m); }

void run_pair_kernel(const OpSpec& spec, PairPlan& plan) {
#define WAVG_EXT_RUN_IF(id, ...) \
  if (&spec == &spec::id) return CpuKernels::id(plan);
  WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_RUN_IF)
#undef WAVG_EXT_RUN_IF
  TORCH_CHECK(false, "run_pair_kernel: ", spec.name, " is not a pair op");
}

}  // namespace wavg_ext::cpu
