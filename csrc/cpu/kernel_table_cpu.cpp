// This ISA's kernel table (see kernel_table.h), filled from the op registry.
#include "kernels_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

const KernelTable& kernel_table() {
  static const KernelTable table{
#define WAVG_EXT_KERNEL_ENTRY(id, ...) &id##_cpu,
      WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_KERNEL_ENTRY)
#undef WAVG_EXT_KERNEL_ENTRY
      &nonfinite_flag_cpu,
      &ema_stochastic_cpu,
      &ema_many_cpu,
      &window_push_cpu,
      &rows_dot,
      &rows_mix_,
  };
  return table;
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
