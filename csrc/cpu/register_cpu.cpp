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
  static void running_mean(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(running_mean_cpu, cuda::running_mean_cuda, p);
  }
  static void ema(PairPlan& p) { WAVG_EXT_CPU_OR_EMULATED(ema_cpu, cuda::ema_cuda, p); }
  static void accumulate(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(accumulate_cpu, cuda::accumulate_cuda, p);
  }
  static void scale_copy(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(scale_copy_cpu, cuda::scale_copy_cuda, p);
  }
  static void running_mean_compensated(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(running_mean_compensated_cpu, cuda::running_mean_compensated_cuda, p);
  }
  static void ema_compensated(PairPlan& p) {
    WAVG_EXT_CPU_OR_EMULATED(ema_compensated_cpu, cuda::ema_compensated_cuda, p);
  }
  static at::Tensor nonfinite_flag(at::TensorList xs) {
    return WAVG_EXT_CPU_OR_EMULATED(nonfinite_flag_cpu, cuda::nonfinite_flag_entry, xs);
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

}  // namespace wavg_ext::cpu
