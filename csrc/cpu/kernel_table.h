// The CPU kernels of one vector ISA as a table of function pointers. The kernel
// sources (csrc/cpu/*_cpu.cpp) are compiled once per ISA of capabilities.py, each
// copy in its own namespace (cpu::DEFAULT, cpu::AVX2, cpu::AVX512, cpu::AVX512_BF16, as ATen's
// CPU_CAPABILITY); capability.cpp picks the best table the running CPU supports at
// import (WAVG_EXT_CPU_CAPABILITY can force a lower one), as ATen's DispatchStub does.
// ISA-neutral: included by the baseline code that calls the kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "../basis_args.h"
#include "../pair_args.h"

namespace wavg_ext::cpu {

struct KernelTable {
  // One runner per pair and compensated op of op_registry.h: the validated plan in,
  // the outputs updated.
#define WAVG_EXT_KERNEL_SLOT(id, ...) void (*id)(PairPlan& plan);
  WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_KERNEL_SLOT)
#undef WAVG_EXT_KERNEL_SLOT
  // 0-dim int32 CPU tensor: 1 when any element of xs is NaN or +-inf (validates xs).
  at::Tensor (*nonfinite_flag)(at::TensorList xs);
  // ema_stochastic_ on the validated plan (bfloat16 averages), random bits from seed.
  void (*ema_stochastic)(PairPlan& plan, int64_t seed);
  // ema_many_ on the validated plan: every profile's averages from one read of the weights.
  void (*ema_many)(ManyPlan& plan);
  // window_push_ on the validated plan (each pair's slot as aux).
  void (*window_push)(PairPlan& plan);
  // The row engine of the basis ops (rows_cpu.cpp): out[i*ny + j] = <a_i, y_j> in float64,
  // and y_j <- beta * y_j + sum_i m[j*na + i] * a_i.
  void (*rows_dot)(const RowPlan& plan, bool symmetric, double* out);
  void (*rows_mix)(const RowPlan& plan, const double* m, double beta, bool y_aliases_a);
};

// The selected ISA's kernels.
const KernelTable& kernels();

// Runs the kernel of pair or compensated op `spec` on a validated plan: the selected
// ISA's, or the emulated CUDA kernel while the emulation is on (register_cpu.cpp).
void run_pair_kernel(const OpSpec& spec, PairPlan& plan);

// The ISA names (capabilities.py) compiled into this build, lowest first; those the
// running CPU supports; the selected one.
std::vector<std::string> compiled_capabilities();
std::vector<std::string> supported_capabilities();
std::string selected_capability();

// Selects the ISA `name` (compiled and supported, else ValueError); returns the
// previous one. For tests (wavg_ext.testing.cpu_capability): process-wide, for the
// calls that start after it.
std::string select_capability(const std::string& name);

// Reads WAVG_EXT_CPU_CAPABILITY (at import) and selects the best ISA the CPU supports,
// or the one asked for if that is lower. Returns a warning for the user ("" if none):
// an unknown name, or an ISA this build or CPU lacks.
std::string select_capability_from_environment();

}  // namespace wavg_ext::cpu
