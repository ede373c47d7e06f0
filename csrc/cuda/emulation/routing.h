// Routes a CPU-key kernel to its CUDA twin built for the emulator, while
// wavg_ext.testing.cuda_emulation() is on in the calling thread:
//   m.impl("ema_", WAVG_EXT_CPU_OR_EMULATED((&cpu_entry), (&cuda_entry)));
// In a build without the emulator (WAVG_EXT_CUDA_EMULATION_BUILT undefined) the
// CUDA entry is not named at all, and the CPU kernel runs as before.
#pragma once

#include "../ops_cuda.h"

namespace wavg_ext {

#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
namespace emu {
bool enabled();
}
inline bool cuda_emulation_on() { return emu::enabled(); }
#define WAVG_EXT_EMULATED(...) (__VA_ARGS__)
#else
inline bool cuda_emulation_on() { return false; }
#define WAVG_EXT_EMULATED(...) nullptr
#endif

template <auto kCpu, auto kEmulated>
struct Routed;
template <typename R, typename... A, R (*kCpu)(A...), R (*kEmulated)(A...)>
struct Routed<kCpu, kEmulated> {
  static R call(A... args) {
    if constexpr (kEmulated != nullptr) {
      if (cuda_emulation_on()) return kEmulated(args...);
    }
    return kCpu(args...);
  }
};

}  // namespace wavg_ext

#define WAVG_EXT_CPU_OR_EMULATED(cpu, emulated) \
  (&::wavg_ext::Routed<cpu, static_cast<decltype(cpu)>(WAVG_EXT_EMULATED emulated)>::call)
