// The kernel registrations of one backend's dispatch key, generated from the op
// registry (op_registry.h) and written once for every backend
// (cpu/register_cpu.cpp, cuda/register_cuda.cpp). Kernels provides
//   <id> for every op of op_registry.h   void(PairPlan&) runners (after validation)
//   nonfinite_flag                       at::Tensor(at::TensorList)
//   ema_stochastic                       void(PairPlan&, int64_t seed) (after validation)
//   ema_many                             void(ManyPlan&) (after validation)
//   window_push                          void(PairPlan&) (after validation; aux: the slots)
//   Rows                                 the row backend of basis_composite.h
#pragma once

#include <torch/library.h>

#include <type_traits>

#include "basis_ops.h"
#include "pair_args.h"

namespace wavg_ext {

template <typename Kernels>
void register_kernels(torch::Library& m) {
#define WAVG_EXT_IMPL_PAIR_KERNEL(id, ...)                                     \
  m.impl(#id "_", &entry_float<spec::id, Kernels::id>);                        \
  m.impl(#id "_.Tensor", &entry_tensor<spec::id, Kernels::id>);
  WAVG_EXT_PAIR_OPS(WAVG_EXT_IMPL_PAIR_KERNEL)
#undef WAVG_EXT_IMPL_PAIR_KERNEL
#define WAVG_EXT_IMPL_COMPENSATED_KERNEL(id, ...)                              \
  m.impl(#id "_", &entry_compensated_float<spec::id, Kernels::id>);            \
  m.impl(#id "_.Tensor", &entry_compensated_tensor<spec::id, Kernels::id>);
  WAVG_EXT_COMPENSATED_OPS(WAVG_EXT_IMPL_COMPENSATED_KERNEL)
#undef WAVG_EXT_IMPL_COMPENSATED_KERNEL
  BasisOps::for_each([&](auto* op) {
    using Op = std::remove_pointer_t<decltype(op)>;
    m.impl(Op::kName, &Op::template run<Kernels>);
  });
}

}  // namespace wavg_ext
