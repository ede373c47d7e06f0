// Whether the calling thread routes CPU tensors to the emulated CUDA kernels
// (wavg_ext.testing.cuda_emulation()), and the runner that follows it:
//   WAVG_EXT_CPU_OR_EMULATED(ema, plan)  ->  cuda::ema_cuda(plan) or cpu::ema_cpu(plan)
// In a build without the emulator the CUDA entry is not named and the CPU one runs.
#pragma once

#include "../ops_cuda.h"

namespace wavg_ext {

#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
namespace emu {
bool enabled();
}
inline bool cuda_emulation_on() { return emu::enabled(); }
#define WAVG_EXT_CPU_OR_EMULATED(op, ...)                                              \
  (::wavg_ext::cuda_emulation_on() ? ::wavg_ext::cuda::op##_cuda(__VA_ARGS__) \
                                   : ::wavg_ext::cpu::op##_cpu(__VA_ARGS__))
#else
inline bool cuda_emulation_on() { return false; }
#define WAVG_EXT_CPU_OR_EMULATED(op, ...) ::wavg_ext::cpu::op##_cpu(__VA_ARGS__)
#endif

}  // namespace wavg_ext
