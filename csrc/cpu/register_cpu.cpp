// Registers the CPU kernels for the CPU dispatch key. In a build with the CUDA
// emulation (WAVG_EXT_CUDA_EMULATION_BUILT), each runner hands the validated plan to
// the emulated CUDA kernel instead while wavg_ext.testing.cuda_emulation() is on in
// the calling thread (validation is shared; its scalar rule follows the switch too).
#include "../cuda/emulation/routing.h"
#include "../register_kernels.h"
#include "ops_cpu.h"
#include "rows_cpu.h"

namespace wavg_ext::cpu {
namespace {

struct CpuKernels {
  static void running_mean(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(running_mean, p); }
  static void ema(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(ema, p); }
  static void accumulate(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(accumulate, p); }
  static void scale_copy(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(scale_copy, p); }
  static void running_mean_compensated(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(running_mean_compensated, p);
  }
  static void ema_compensated(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(ema_compensated, p); }
  static at::Tensor nonfinite_flag(at::TensorList xs) {
#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
    if (cuda_emulation_on()) return cuda::nonfinite_flag_entry(xs);
#endif
    return nonfinite_flag_cpu(xs);
  }
  struct Rows {
    static at::Tensor dot(const RowPlan& plan, bool symmetric) {
#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
      if (cuda_emulation_on()) return cuda::CudaRows::dot(plan, symmetric);
#endif
      return CpuRows::dot(plan, symmetric);
    }
    static void mix(const RowPlan& plan, const at::Tensor& m, double alpha, double beta, bool alias) {
#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
      if (cuda_emulation_on()) return cuda::CudaRows::mix(plan, m, alpha, beta, alias);
#endif
      CpuRows::mix(plan, m, alpha, beta, alias);
    }
  };
};

}  // namespace

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) { register_kernels<CpuKernels>(m); }

}  // namespace wavg_ext::cpu
