// Whether the calling thread routes CPU tensors to the emulated CUDA kernels
// (wavg_ext.testing.cuda_emulation()), and the call that follows it:
//   WAVG_EXT_CPU_OR_EMULATED(cpu_fn, cuda_fn, args...)  ->  cuda_fn(args...) or cpu_fn(args...)
// In a build without the emulator cuda_fn is not named and cpu_fn runs.
#pragma once

#include "../ops_cuda.h"

namespace wavg_ext {

#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
namespace emu {
bool enabled();
}
inline bool cuda_emulation_on() { return emu::enabled(); }
#define WAVG_EXT_CPU_OR_EMULATED(cpu_fn, cuda_fn, ...) \
  (::wavg_ext::cuda_emulation_on() ? cuda_fn(__VA_ARGS__) : cpu_fn(__VA_ARGS__))
#else
inline bool cuda_emulation_on() { return false; }
#define WAVG_EXT_CPU_OR_EMULATED(cpu_fn, cuda_fn, ...) cpu_fn(__VA_ARGS__)
#endif

}  // namespace wavg_ext
