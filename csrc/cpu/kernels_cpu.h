// Declarations of the CPU kernels of one ISA, for the per-ISA kernel sources
// (csrc/cpu/*_cpu.cpp, compiled once per ISA of capabilities.py with CPU_CAPABILITY
// set: see kernel_table.h). Everything ISA-specific lives in the namespace
// wavg_ext::cpu::CPU_CAPABILITY, so that the copies of one function compiled for
// different ISAs never share a symbol.
#pragma once

#ifndef CPU_CAPABILITY
#error "kernels_cpu.h belongs to the per-ISA kernel sources (compiled with CPU_CAPABILITY set)"
#endif

#include "kernel_table.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

// <id>_cpu for every op of op_registry.h, defined in <id>_cpu.cpp (the compensated
// ops in compensated_cpu.cpp).
#define WAVG_EXT_DECLARE_CPU_KERNEL(id, ...) void id##_cpu(PairPlan& plan);
WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_DECLARE_CPU_KERNEL)
#undef WAVG_EXT_DECLARE_CPU_KERNEL
at::Tensor nonfinite_flag_cpu(at::TensorList xs);
void ema_stochastic_cpu(PairPlan& plan, int64_t seed);
void ema_many_cpu(ManyPlan& plan);
void window_push_cpu(PairPlan& plan);
void rows_dot(const RowPlan& plan, bool symmetric, double* out);
void rows_mix_(const RowPlan& plan, const double* m, double beta, bool y_aliases_a);

// This ISA's table (kernel_table_cpu.cpp).
const KernelTable& kernel_table();

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
