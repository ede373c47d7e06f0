// The op schemas and the registrations shared by every backend (Meta, the fallback
// of backends without kernels, Autograd), all generated from the op registry
// (op_registry.h for the pair ops, basis_ops.h for the others). Each backend's
// kernels register in cpu/register_cpu.cpp and cuda/register_cuda.cpp.
#include <torch/library.h>

#include <string>
#include <vector>

#include "op_entries.h"

namespace wavg_ext {
namespace {

// "ema_(Tensor(a!)[] avgs, Tensor[] xs, float weight) -> ()" and its ".Tensor" overload.
std::vector<std::string> pair_schemas(const OpSpec& s) {
  const std::string lists =
      s.compensated ? std::string("Tensor(a!)[] ") + s.out_name + ", Tensor(b!)[] comps, Tensor[] " + s.in_name
                    : std::string("Tensor(a!)[] ") + s.out_name + ", Tensor[] " + s.in_name;
  const std::string dflt = *s.scalar_default ? std::string("=") + s.scalar_default : "";
  return {std::string(s.name) + "(" + lists + ", float " + s.scalar_name + dflt + ") -> ()",
          std::string(s.name) + ".Tensor(" + lists + ", Tensor " + s.scalar_name + ") -> ()"};
}

}  // namespace
}  // namespace wavg_ext

TORCH_LIBRARY(wavg_ext, m) {
  for (const wavg_ext::OpSpec* s : wavg_ext::kPairOpSpecs) {
    for (const std::string& schema : wavg_ext::pair_schemas(*s)) m.def(schema.c_str());
  }
  wavg_ext::BasisOps::for_each([&](auto* op) { m.def(std::remove_pointer_t<decltype(op)>::kSchema); });
}

// Registers Entries<spec, double>::kind and Entries<spec, const at::Tensor&>::kind as
// the two overloads of every pair and compensated op, and BasisEntries<Op>::kind for
// the others.
#define WAVG_EXT_IMPL_PAIR(id, ...)                                                      \
  m.impl(#id "_", &wavg_ext::PairEntries<wavg_ext::spec::id, double>::WAVG_EXT_KIND);    \
  m.impl(#id "_.Tensor", &wavg_ext::PairEntries<wavg_ext::spec::id, const at::Tensor&>::WAVG_EXT_KIND);
#define WAVG_EXT_IMPL_COMPENSATED(id, ...)                                                    \
  m.impl(#id "_", &wavg_ext::CompensatedEntries<wavg_ext::spec::id, double>::WAVG_EXT_KIND);  \
  m.impl(#id "_.Tensor",                                                                       \
         &wavg_ext::CompensatedEntries<wavg_ext::spec::id, const at::Tensor&>::WAVG_EXT_KIND);
#define WAVG_EXT_IMPL_ALL                                                          \
  WAVG_EXT_PAIR_OPS(WAVG_EXT_IMPL_PAIR)                                            \
  WAVG_EXT_COMPENSATED_OPS(WAVG_EXT_IMPL_COMPENSATED)                              \
  wavg_ext::BasisOps::for_each([&](auto* op) {                                     \
    using Op = std::remove_pointer_t<decltype(op)>;                                \
    m.impl(Op::kName, &wavg_ext::BasisEntries<Op>::WAVG_EXT_KIND);                 \
  });

// Meta (FakeTensor, torch.compile tracing): validate, compute nothing.
TORCH_LIBRARY_IMPL(wavg_ext, Meta, m) {
#define WAVG_EXT_KIND meta
  WAVG_EXT_IMPL_ALL
#undef WAVG_EXT_KIND
}

// Any other backend, and calls with no tensor at all: validate, then refuse non-empty
// work clearly. wavg_ext.ops routes such devices to the pure-PyTorch reference.
TORCH_LIBRARY_IMPL(wavg_ext, CompositeExplicitAutograd, m) {
#define WAVG_EXT_KIND fallback
  WAVG_EXT_IMPL_ALL
#undef WAVG_EXT_KIND
}

TORCH_LIBRARY_IMPL(wavg_ext, Autograd, m) {
#define WAVG_EXT_KIND autograd
  WAVG_EXT_IMPL_ALL
#undef WAVG_EXT_KIND
}
