// wavg_ext._C: the op schemas (the one place they are written), the Meta and
// Autograd registrations shared by all backends, and a small pybind11 module
// (build information, argument checks for the reference path).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "basis_args.h"
#include "cuda/emulation/control.h"
#include "cpu/rows_cpu.h"
#include "pair_args.h"

// Written by setup.py / CMakeLists.txt: WAVG_EXT_CPU_CAPABILITY,
// WAVG_EXT_CUDA_ARCH_LIST, WAVG_EXT_CUDA_VERSION, WAVG_EXT_TORCH_VERSION (strings).
#include "wavg_ext_build_config.h"

namespace wavg_ext {
namespace {

// Each op in two overloads: the scalar as a float, or as a one-element tensor
// (read on the device by CUDA kernels: no host sync, CUDA-graph capturable).
constexpr const char* kSchemas[] = {
    "running_mean_(Tensor(a!)[] avgs, Tensor[] xs, float count) -> ()",
    "running_mean_.Tensor(Tensor(a!)[] avgs, Tensor[] xs, Tensor count) -> ()",
    "ema_(Tensor(a!)[] avgs, Tensor[] xs, float weight) -> ()",
    "ema_.Tensor(Tensor(a!)[] avgs, Tensor[] xs, Tensor weight) -> ()",
    "accumulate_(Tensor(a!)[] sums, Tensor[] xs, float alpha=1.0) -> ()",
    "accumulate_.Tensor(Tensor(a!)[] sums, Tensor[] xs, Tensor alpha) -> ()",
    "scale_copy_(Tensor(a!)[] dsts, Tensor[] srcs, float scale=1.0) -> ()",
    "scale_copy_.Tensor(Tensor(a!)[] dsts, Tensor[] srcs, Tensor scale) -> ()",
    // Compensated averages: the value is avg + comp (see cpu/compensated_cpu.cpp).
    "running_mean_compensated_(Tensor(a!)[] avgs, Tensor(b!)[] comps, Tensor[] xs, float count) "
    "-> ()",
    "running_mean_compensated_.Tensor(Tensor(a!)[] avgs, Tensor(b!)[] comps, Tensor[] xs, "
    "Tensor count) -> ()",
    "ema_compensated_(Tensor(a!)[] avgs, Tensor(b!)[] comps, Tensor[] xs, float weight) -> ()",
    "ema_compensated_.Tensor(Tensor(a!)[] avgs, Tensor(b!)[] comps, Tensor[] xs, Tensor weight) "
    "-> ()",
    // 0-dim int32 on the tensors' device: 1 when any element is NaN or +-inf (no host sync).
    "nonfinite_flag(Tensor[] xs) -> Tensor",
    // Basis ops (TWA): a basis is one [capacity, *param.shape] tensor per parameter.
    "dots(Tensor[] basis, Tensor[] xs, int k) -> Tensor",
    "combine_(Tensor(a!)[] outs, Tensor[] basis, Tensor coeffs, float alpha=1.0, "
    "float beta=0.0) -> ()",
    "project_(Tensor(a!)[] grads, Tensor[] basis, int k) -> ()",
    "orthonormalize_(Tensor(a!)[] basis, int k, int passes=2) -> Tensor",
};

// Any other backend, and calls with no tensor at all (empty lists and a float
// scalar): validate, then refuse non-empty work clearly. wavg_ext.ops routes such
// devices to the pure-PyTorch reference before they get here.
template <const OpSpec& kSpec, typename Scalar>
void no_kernel(at::TensorList outs, at::TensorList ins, Scalar scalar) {
  prepare_pairs(kSpec, outs, ins, scalar, /*plan_layout=*/false);
  TORCH_CHECK_NOT_IMPLEMENTED(outs.empty(), kSpec.name, ": no wavg_ext kernel for tensors on ",
                              outs[0].device(),
                              " in this build; call wavg_ext.ops.", kSpec.name,
                              " (it falls back to the reference implementation)");
}

// Meta (FakeTensor, torch.compile tracing): validate, compute nothing.
template <const OpSpec& kSpec, typename Scalar>
void validate_only(at::TensorList outs, at::TensorList ins, Scalar scalar) {
  prepare_pairs(kSpec, outs, ins, scalar, /*plan_layout=*/false);
}

template <typename Scalar>
using PairOpSignature = void(at::TensorList, at::TensorList, Scalar);

template <const OpSpec& kSpec, typename Scalar>
const c10::TypedOperatorHandle<PairOpSignature<Scalar>>& typed_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((std::string("wavg_ext::") + kSpec.name).c_str(),
                             std::is_same_v<Scalar, double> ? "" : "Tensor")
          .template typed<PairOpSignature<Scalar>>();
  return op;
}

// Averaging is not differentiable and must not join the autograd graph even when
// xs require grad (they are parameters). Like an in-place op under no_grad: run
// the backend kernel below autograd, then bump the outputs' version counters so
// autograd still notices if a saved tensor was modified.
template <const OpSpec& kSpec, typename Scalar>
void autograd_kernel(at::TensorList outs, at::TensorList ins, Scalar scalar) {
  for (size_t i = 0; i < outs.size(); ++i) {
    TORCH_CHECK(!outs[i].defined() || !outs[i].is_inference(), kSpec.name, ": ", kSpec.out_name,
                "[", i, "] is an inference tensor; update it inside torch.inference_mode()");
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    typed_op<kSpec, Scalar>().call(outs, ins, scalar);
  }
  for (const at::Tensor& t : outs) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}

// Tensors borrowed from a Python list or tuple without touching refcounts: the
// list keeps them alive for the call (the GIL is held throughout). Converting
// through torch.ops costs ~90 ns a tensor, this ~2 ns: for 2000 small tensors
// that is the difference between the call overhead dominating or not.
class BorrowedTensors {
 public:
  BorrowedTensors(const char* op, const char* name, pybind11::handle seq) {
    PyObject* obj = seq.ptr();
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      throw pybind11::type_error(std::string(op) + ": " + name +
                                 " must be a list or tuple of tensors, got " +
                                 Py_TYPE(obj)->tp_name);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    // Check every item before borrowing any: a throw with borrows in the vector
    // would let ~vector drop references it never took.
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        throw pybind11::type_error(std::string(op) + ": " + name + "[" + std::to_string(i) +
                                   "] is a " + Py_TYPE(items[i])->tp_name + ", not a Tensor");
      }
    }
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(items[i])));
    }
  }
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// The averaging wrappers hand the parameter objects themselves to the ops, so a
// parameter whose storage was replaced (`p.data = t`) is read and written where it
// lives now. Before each base step they must still notice what the ops would refuse
// only after it: a parameter *object* replaced in the base optimizer's param_groups,
// one added or removed behind their back, or a parameter whose dtype, device or
// size changed (`Module.half()/.double()/.to()`, `p.data = other`). ParamMetadata
// records the parameters' TensorImpls with their dtype, device and numel when the
// wrapper (re)reads them. Cold (after a training step streamed the caches), every
// TensorImpl read is a cache miss, about 20-40 ns: the check reads only the one
// cache line that holds dtype, device and numel. (A reshape that keeps numel is
// refused by the update's own validation, with the same message.)
class ParamMetadata {
 public:
  explicit ParamMetadata(pybind11::handle params) {
    PyObject* obj = params.ptr();
    TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), "ParamMetadata: params must be a list");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    entries_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      TORCH_CHECK_TYPE(THPVariable_Check(items[i]), "ParamMetadata: params[", i, "] is not a Tensor");
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      // A Python tensor keeps its TensorImpl for life (`p.data = t` changes the impl's
      // fields, not the impl): the check reads it directly.
      entries_.push_back({t.getIntrusivePtr(), t.numel(), t.scalar_type(), t.device()});
    }
  }
  size_t size() const { return entries_.size(); }
  // Whether tensor i (the same Python object as when recorded) has the recorded
  // dtype, device and number of elements.
  bool matches(size_t i) const {
    if (i + kAhead < entries_.size()) {
      // Cold, each TensorImpl is a cache miss: ask for those a few tensors ahead now, so
      // that the misses overlap (numel, dtype and device sit ~150 bytes into the impl).
      const char* ahead = reinterpret_cast<const char*>(entries_[i + kAhead].impl.get());
      __builtin_prefetch(ahead + 128);
      __builtin_prefetch(ahead + 176);
    }
    const Entry& e = entries_[i];
    const c10::TensorImpl* t = e.impl.get();
    return t->numel() == e.numel && c10::typeMetaToScalarType(t->dtype()) == e.dtype &&
           t->device() == e.device;
  }

 private:
  struct Entry {
    c10::intrusive_ptr<c10::TensorImpl> impl;
    int64_t numel;
    c10::ScalarType dtype;
    c10::Device device;
  };
  std::vector<Entry> entries_;
  static constexpr size_t kAhead = 24;
};

// The positions where `groups` (the param_groups, or their "params" lists, in order) differ
// from `params` (the objects the wrapper holds) by identity or, with `metadata`, in
// dtype, device or numel from what was recorded; None when the number of tensors
// differs. A few ns a parameter when the caches are warm.
pybind11::object changed_params(pybind11::handle groups, pybind11::handle params,
                                pybind11::handle metadata_capsule) {
  // A capsule, not a bound class: no type-registry lookup on the per-step path.
  const ParamMetadata* metadata = nullptr;
  if (!metadata_capsule.is_none()) {
    metadata = static_cast<const ParamMetadata*>(
        PyCapsule_GetPointer(metadata_capsule.ptr(), "wavg_ext.ParamMetadata"));
    if (metadata == nullptr) throw pybind11::error_already_set();
  }
  auto items_of = [](const char* what, pybind11::handle seq, Py_ssize_t& n) {
    PyObject* obj = seq.ptr();
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      throw pybind11::type_error(std::string("changed_params: ") + what + " must be a list, got " +
                                 Py_TYPE(obj)->tp_name);
    }
    n = PySequence_Fast_GET_SIZE(obj);
    return PySequence_Fast_ITEMS(obj);
  };
  Py_ssize_t ngroups, nparams;
  PyObject** group_items = items_of("groups", groups, ngroups);
  PyObject** param_items = items_of("params", params, nparams);
  TORCH_CHECK_VALUE(metadata == nullptr || metadata->size() == static_cast<size_t>(nparams),
                    "changed_params: metadata of ", metadata ? metadata->size() : 0, " tensors for ",
                    nparams, " params");
  pybind11::list changed;
  Py_ssize_t pos = 0;
  for (Py_ssize_t g = 0; g < ngroups; ++g) {
    // A param group (a dict: its "params" list, read here rather than in a Python
    // comprehension each step) or a list.
    PyObject* group = group_items[g];
    if (PyDict_Check(group)) {
      group = PyDict_GetItemString(group, "params");  // borrowed
      if (group == nullptr) throw pybind11::value_error("changed_params: a param group has no 'params'");
    }
    Py_ssize_t n;
    PyObject** items = items_of("groups[i]", group, n);
    if (pos + n > nparams) return pybind11::none();
    for (Py_ssize_t j = 0; j < n; ++j, ++pos) {
      PyObject* now = items[j];
      // (the same object as recorded: the same TensorImpl, read through the metadata)
      const bool same = now == param_items[pos] && (metadata == nullptr || metadata->matches(pos));
      if (!same) changed.append(pos);
    }
  }
  if (pos != nparams) return pybind11::none();
  return std::move(changed);
}

// Reads (outs, ins, scalar) from Python for both Python entries, the kernels' fast
// path and the reference path's checks, and calls f(outs, ins, scalar) with the
// scalar as a tensor or a double.
template <typename F>
void with_python_args(const OpSpec& spec, pybind11::handle outs, pybind11::handle ins,
                      pybind11::handle scalar, const F& f) {
  BorrowedTensors o(spec.name, spec.out_name, outs);
  BorrowedTensors i(spec.name, spec.in_name, ins);
  if (THPVariable_Check(scalar.ptr())) {
    f(o.list(), i.list(), THPVariable_Unpack(scalar.ptr()));
    return;
  }
  double value;
  try {
    value = scalar.cast<double>();
  } catch (const pybind11::cast_error&) {
    throw pybind11::type_error(std::string(spec.name) + ": " + spec.scalar_name +
                               " must be a number or a one-element tensor, got " +
                               Py_TYPE(scalar.ptr())->tp_name);
  }
  f(o.list(), i.list(), value);
}

// The Python fast path: ops.ema_(avgs, xs, w) -> _C.ema_(...) -> the dispatcher.
template <const OpSpec& kSpec>
void call_from_python(pybind11::handle outs, pybind11::handle ins, pybind11::handle scalar) {
  with_python_args(kSpec, outs, ins, scalar, [](at::TensorList o, at::TensorList i, const auto& s) {
    if constexpr (std::is_same_v<std::decay_t<decltype(s)>, double>) {
      typed_op<kSpec, double>().call(o, i, s);
    } else {
      typed_op<kSpec, const at::Tensor&>().call(o, i, s);
    }
  });
}

// ---- compensated averages and nonfinite_flag: Meta, Autograd, fallback, Python ------

template <typename Scalar>
using CompensatedSignature = void(at::TensorList, at::TensorList, at::TensorList, Scalar);

template <const OpSpec& kSpec, typename Scalar>
const c10::TypedOperatorHandle<CompensatedSignature<Scalar>>& typed_compensated_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((std::string("wavg_ext::") + kSpec.name).c_str(),
                             std::is_same_v<Scalar, double> ? "" : "Tensor")
          .template typed<CompensatedSignature<Scalar>>();
  return op;
}

template <const OpSpec& kSpec, typename Scalar>
void compensated_validate_only(at::TensorList avgs, at::TensorList comps, at::TensorList xs,
                               Scalar scalar) {
  prepare_compensated(kSpec, avgs, comps, xs, scalar, /*plan_layout=*/false);
}

template <const OpSpec& kSpec, typename Scalar>
void compensated_no_kernel(at::TensorList avgs, at::TensorList comps, at::TensorList xs,
                           Scalar scalar) {
  prepare_compensated(kSpec, avgs, comps, xs, scalar, /*plan_layout=*/false);
  TORCH_CHECK_NOT_IMPLEMENTED(avgs.empty(), kSpec.name, ": no wavg_ext kernel for tensors on ",
                              avgs[0].device(), " in this build; call wavg_ext.ops.", kSpec.name,
                              " (it falls back to the reference implementation)");
}

void bump_versions(at::TensorList ts);
void check_not_inference(const char* op, const char* list, at::TensorList ts);

template <const OpSpec& kSpec, typename Scalar>
void compensated_autograd(at::TensorList avgs, at::TensorList comps, at::TensorList xs,
                          Scalar scalar) {
  check_not_inference(kSpec.name, "avgs", avgs);
  check_not_inference(kSpec.name, "comps", comps);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    typed_compensated_op<kSpec, Scalar>().call(avgs, comps, xs, scalar);
  }
  bump_versions(avgs);
  bump_versions(comps);
}

template <const OpSpec& kSpec>
void compensated_from_python(pybind11::handle avgs, pybind11::handle comps, pybind11::handle xs,
                             pybind11::handle scalar) {
  BorrowedTensors c(kSpec.name, "comps", comps);
  with_python_args(kSpec, avgs, xs, scalar, [&](at::TensorList a, at::TensorList x, const auto& s) {
    using S = std::decay_t<decltype(s)>;
    if constexpr (std::is_same_v<S, double>) {
      typed_compensated_op<kSpec, double>().call(a, c.list(), x, s);
    } else {
      typed_compensated_op<kSpec, const at::Tensor&>().call(a, c.list(), x, s);
    }
  });
}

const c10::TypedOperatorHandle<at::Tensor(at::TensorList)>& nonfinite_flag_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("wavg_ext::nonfinite_flag", "")
                             .typed<at::Tensor(at::TensorList)>();
  return op;
}
at::Tensor nonfinite_flag_meta(at::TensorList xs) {
  prepare_flag_inputs(xs);
  return at::empty({}, at::TensorOptions().dtype(at::kInt).device(c10::kMeta));
}
at::Tensor nonfinite_flag_fallback(at::TensorList xs) {
  prepare_flag_inputs(xs);
  TORCH_CHECK_NOT_IMPLEMENTED(xs.empty(), "nonfinite_flag: no wavg_ext kernel for tensors on ",
                              xs.empty() ? c10::Device(c10::kCPU) : xs[0].device(),
                              " in this build; call wavg_ext.ops.nonfinite_flag");
  return at::zeros({}, at::TensorOptions().dtype(at::kInt));
}
at::Tensor nonfinite_flag_autograd(at::TensorList xs) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return nonfinite_flag_op().call(xs);
}

// ---- basis ops: Meta, Autograd and fallback kernels, Python entries ----------------

using DotsSig = at::Tensor(at::TensorList, at::TensorList, int64_t);
using CombineSig = void(at::TensorList, at::TensorList, const at::Tensor&, double, double);
using ProjectSig = void(at::TensorList, at::TensorList, int64_t);
using OrthoSig = at::Tensor(at::TensorList, int64_t, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> basis_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}
const c10::TypedOperatorHandle<DotsSig>& dots_op() {
  static const auto op = basis_op<DotsSig>("wavg_ext::dots");
  return op;
}
const c10::TypedOperatorHandle<CombineSig>& combine_op() {
  static const auto op = basis_op<CombineSig>("wavg_ext::combine_");
  return op;
}
const c10::TypedOperatorHandle<ProjectSig>& project_op() {
  static const auto op = basis_op<ProjectSig>("wavg_ext::project_");
  return op;
}
const c10::TypedOperatorHandle<OrthoSig>& orthonormalize_op() {
  static const auto op = basis_op<OrthoSig>("wavg_ext::orthonormalize_");
  return op;
}

at::Tensor dots_meta(at::TensorList basis, at::TensorList xs, int64_t k) {
  plan_dots(basis, xs, k, /*plan_layout=*/false);
  return at::empty({k}, at::TensorOptions().dtype(basis_result_dtype(basis)).device(c10::kMeta));
}
void combine_meta(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs, double alpha,
                  double beta) {
  plan_combine(outs, basis, coeffs, alpha, beta, /*plan_layout=*/false);
}
void project_meta(at::TensorList grads, at::TensorList basis, int64_t k) {
  plan_project(grads, basis, k, /*plan_layout=*/false);
}
at::Tensor orthonormalize_meta(at::TensorList basis, int64_t k, int64_t passes) {
  check_orthonormalize(basis, k, passes);
  return at::empty({}, at::TensorOptions().dtype(basis_result_dtype(basis)).device(c10::kMeta));
}

// No tensors at all (empty lists): validate and return the empty sums. Tensors on a
// backend without kernels: refuse clearly (wavg_ext.ops routes them to the reference).
[[noreturn]] void no_basis_kernel(const char* op, const at::Tensor& t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": no wavg_ext kernel for tensors on ", t.device(),
                              " in this build; call wavg_ext.ops.", op,
                              " (it falls back to the reference implementation)");
}
at::Tensor dots_fallback(at::TensorList basis, at::TensorList xs, int64_t k) {
  plan_dots(basis, xs, k, /*plan_layout=*/false);
  if (!basis.empty()) no_basis_kernel("dots", basis[0]);
  return at::zeros({k}, at::TensorOptions().dtype(at::kFloat));
}
void combine_fallback(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                      double alpha, double beta) {
  plan_combine(outs, basis, coeffs, alpha, beta, /*plan_layout=*/false);
  if (!basis.empty()) no_basis_kernel("combine_", basis[0]);
}
void project_fallback(at::TensorList grads, at::TensorList basis, int64_t k) {
  plan_project(grads, basis, k, /*plan_layout=*/false);
  if (!basis.empty()) no_basis_kernel("project_", basis[0]);
}
at::Tensor orthonormalize_fallback(at::TensorList basis, int64_t k, int64_t passes) {
  check_orthonormalize(basis, k, passes);
  if (!basis.empty()) no_basis_kernel("orthonormalize_", basis[0]);
  return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
}

void bump_versions(at::TensorList ts) {
  for (const at::Tensor& t : ts) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}
void check_not_inference(const char* op, const char* list, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(!ts[i].defined() || !ts[i].is_inference(), op, ": ", list, "[", i,
                "] is an inference tensor; update it inside torch.inference_mode()");
  }
}
// Below autograd, like the pairwise ops: never recorded, version counters bumped.
at::Tensor dots_autograd(at::TensorList basis, at::TensorList xs, int64_t k) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return dots_op().call(basis, xs, k);
}
void combine_autograd(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                      double alpha, double beta) {
  check_not_inference("combine_", "outs", outs);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    combine_op().call(outs, basis, coeffs, alpha, beta);
  }
  bump_versions(outs);
}
void project_autograd(at::TensorList grads, at::TensorList basis, int64_t k) {
  check_not_inference("project_", "grads", grads);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    project_op().call(grads, basis, k);
  }
  bump_versions(grads);
}
at::Tensor orthonormalize_autograd(at::TensorList basis, int64_t k, int64_t passes) {
  check_not_inference("orthonormalize_", "basis", basis);
  at::Tensor norm;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    norm = orthonormalize_op().call(basis, k, passes);
  }
  bump_versions(basis);
  return norm;
}

// Python entries of the basis ops: the lists are borrowed (see BorrowedTensors).
at::Tensor dots_from_python(pybind11::handle basis, pybind11::handle xs, int64_t k) {
  BorrowedTensors b("dots", "basis", basis), x("dots", "xs", xs);
  return dots_op().call(b.list(), x.list(), k);
}
void combine_from_python(pybind11::handle outs, pybind11::handle basis, const at::Tensor& coeffs,
                         double alpha, double beta) {
  BorrowedTensors o("combine_", "outs", outs), b("combine_", "basis", basis);
  combine_op().call(o.list(), b.list(), coeffs, alpha, beta);
}
void project_from_python(pybind11::handle grads, pybind11::handle basis, int64_t k) {
  BorrowedTensors g("project_", "grads", grads), b("project_", "basis", basis);
  project_op().call(g.list(), b.list(), k);
}
at::Tensor orthonormalize_from_python(pybind11::handle basis, int64_t k, int64_t passes) {
  BorrowedTensors b("orthonormalize_", "basis", basis);
  return orthonormalize_op().call(b.list(), k, passes);
}

// The batch orthonormalization's two CPU building blocks (wavg_ext.ops.orthonormalize_many_):
// the Gram block <rows a, rows y> and the row update y <- beta*y + m @ a, on rows of
// one validated basis.
void check_row_range(const char* op, const char* what, int64_t first, int64_t count,
                     int64_t capacity) {
  TORCH_CHECK_VALUE(first >= 0 && count >= 0 && first + count <= capacity, op, ": ", what,
                    " rows [", first, ", ", first + count, ") are outside the basis (capacity ",
                    capacity, ")");
}
at::TensorList cpu_basis(const char* op, const BorrowedTensors& b) {
  const at::TensorList basis = b.list();
  for (size_t i = 0; i < basis.size(); ++i) {
    TORCH_CHECK_VALUE(basis[i].device().is_cpu(), op, ": basis[", i,
                      "] is not on the CPU (this entry is the CPU kernel)");
  }
  return basis;
}
at::Tensor basis_gram(pybind11::handle basis_py, int64_t a_first, int64_t na, int64_t y_first,
                      int64_t ny) {
  const char* op = "basis_gram";
  BorrowedTensors b(op, "basis", basis_py);
  const at::TensorList basis = cpu_basis(op, b);
  const int64_t capacity = check_basis(op, basis);
  check_row_range(op, "a", a_first, na, capacity);
  check_row_range(op, "y", y_first, ny, capacity);
  const RowPlan plan = plan_basis_rows(basis, a_first, na, y_first, ny);
  at::Tensor out = at::zeros({na, ny}, at::TensorOptions().dtype(at::kDouble));
  cpu::rows_dot(plan, a_first == y_first && na == ny, out.data_ptr<double>());
  return out;
}
void basis_mix_(pybind11::handle basis_py, int64_t y_first, int64_t ny, int64_t a_first,
                int64_t na, const at::Tensor& m, double beta) {
  const char* op = "basis_mix_";
  BorrowedTensors b(op, "basis", basis_py);
  const at::TensorList basis = cpu_basis(op, b);
  const int64_t capacity = check_basis(op, basis);
  check_row_range(op, "a", a_first, na, capacity);
  check_row_range(op, "y", y_first, ny, capacity);
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == ny && m.size(1) == na, op, ": m must have shape [",
                    ny, ", ", na, "], got ", m.sizes());
  TORCH_CHECK_VALUE(std::isfinite(beta), op, ": beta must be finite, got ", beta);
  const std::vector<double> coef = host_coefficients(m.reshape({-1}));
  const RowPlan plan = plan_basis_rows(basis, a_first, na, y_first, ny);
  const bool alias = y_first < a_first + na && a_first < y_first + ny;
  cpu::rows_mix_(plan, coef.data(), beta, alias);
  for (const at::Tensor& t : basis) t.unsafeGetTensorImpl()->bump_version();
}

// How many distinct threads at::parallel_for really uses (OpenMP can silently
// fall back to one when the extension is built without -fopenmp).
int64_t parallel_threads_used() {
  std::mutex mu;
  std::set<std::thread::id> ids;
  const int64_t n = at::get_num_threads();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

bool openmp_enabled() {
#if defined(_OPENMP) && AT_PARALLEL_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace wavg_ext

TORCH_LIBRARY(wavg_ext, m) {
  for (const char* schema : wavg_ext::kSchemas) m.def(schema);
}

// Registers kernel<spec, double> and kernel<spec, const at::Tensor&> as the two
// overloads of every op.
#define WAVG_EXT_IMPL_OP(op, spec, kernel)                         \
  m.impl(op, &wavg_ext::kernel<wavg_ext::spec, double>);           \
  m.impl(op ".Tensor", &wavg_ext::kernel<wavg_ext::spec, const at::Tensor&>)
#define WAVG_EXT_IMPL_ALL_OPS(kernel)                              \
  WAVG_EXT_IMPL_OP("running_mean_", kRunningMeanSpec, kernel);     \
  WAVG_EXT_IMPL_OP("ema_", kEmaSpec, kernel);                      \
  WAVG_EXT_IMPL_OP("accumulate_", kAccumulateSpec, kernel);        \
  WAVG_EXT_IMPL_OP("scale_copy_", kScaleCopySpec, kernel)

// Registers the basis ops' kernels of one kind: dots_<kind>, combine_<kind>, ...
#define WAVG_EXT_IMPL_BASIS_OPS(kind)                              \
  m.impl("dots", &wavg_ext::dots_##kind);                          \
  m.impl("combine_", &wavg_ext::combine_##kind);                   \
  m.impl("project_", &wavg_ext::project_##kind);                   \
  m.impl("orthonormalize_", &wavg_ext::orthonormalize_##kind)

// The compensated ops' two overloads, and nonfinite_flag, for one kind of kernel.
#define WAVG_EXT_IMPL_COMPENSATED_OPS(kernel, flag)                                        \
  m.impl("running_mean_compensated_",                                                      \
         &wavg_ext::kernel<wavg_ext::kRunningMeanCompensatedSpec, double>);                \
  m.impl("running_mean_compensated_.Tensor",                                               \
         &wavg_ext::kernel<wavg_ext::kRunningMeanCompensatedSpec, const at::Tensor&>);     \
  m.impl("ema_compensated_", &wavg_ext::kernel<wavg_ext::kEmaCompensatedSpec, double>);    \
  m.impl("ema_compensated_.Tensor",                                                        \
         &wavg_ext::kernel<wavg_ext::kEmaCompensatedSpec, const at::Tensor&>);             \
  m.impl("nonfinite_flag", &wavg_ext::flag)

TORCH_LIBRARY_IMPL(wavg_ext, Meta, m) {
  WAVG_EXT_IMPL_ALL_OPS(validate_only);
  WAVG_EXT_IMPL_COMPENSATED_OPS(compensated_validate_only, nonfinite_flag_meta);
  WAVG_EXT_IMPL_BASIS_OPS(meta);
}

TORCH_LIBRARY_IMPL(wavg_ext, CompositeExplicitAutograd, m) {
  WAVG_EXT_IMPL_ALL_OPS(no_kernel);
  WAVG_EXT_IMPL_COMPENSATED_OPS(compensated_no_kernel, nonfinite_flag_fallback);
  WAVG_EXT_IMPL_BASIS_OPS(fallback);
}

TORCH_LIBRARY_IMPL(wavg_ext, Autograd, m) {
  WAVG_EXT_IMPL_ALL_OPS(autograd_kernel);
  WAVG_EXT_IMPL_COMPENSATED_OPS(compensated_autograd, nonfinite_flag_autograd);
  WAVG_EXT_IMPL_BASIS_OPS(autograd);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "wavg_ext compiled kernels (ops are registered as torch.ops.wavg_ext.*)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["cpu"] = true;
    info["cpu_capability"] = WAVG_EXT_CPU_CAPABILITY;
    info["openmp"] = wavg_ext::openmp_enabled();
#ifdef WAVG_EXT_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
    info["cuda_emulation"] = true;
#else
    info["cuda_emulation"] = false;
#endif
    info["cuda_version"] = WAVG_EXT_CUDA_VERSION;
    info["cuda_archs"] = WAVG_EXT_CUDA_ARCH_LIST;
    info["torch_version"] = WAVG_EXT_TORCH_VERSION;
    return info;
  });
#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
  m.def("_set_cuda_emulation", &wavg_ext::emu::set_enabled,
        "Routes this thread's ops on CPU tensors to the emulated CUDA kernels (on=True); "
        "returns the previous setting.");
  m.def("_cuda_emulation_enabled", &wavg_ext::emu::enabled,
        "Whether this thread routes ops on CPU tensors to the emulated CUDA kernels.");
  m.def("_cuda_emulation_stats", []() {
    const wavg_ext::emu::Stats s = wavg_ext::emu::stats();
    pybind11::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    return d;
  }, "Emulated kernel launches, blocks and threads run so far (all threads).");
  m.def("_set_cuda_emulation_schedule_seed", &wavg_ext::emu::set_schedule_seed,
        "Seeds the thread order of this thread's emulated launches; returns the previous seed.");
  m.def("_cuda_emulation_selftest", &wavg_ext::emu::selftest,
        "Runs one of the emulator's own test kernels (see emulation/selftest.cpp).");
#endif
  m.def("running_mean_", &wavg_ext::call_from_python<wavg_ext::kRunningMeanSpec>);
  m.def("ema_", &wavg_ext::call_from_python<wavg_ext::kEmaSpec>);
  m.def("accumulate_", &wavg_ext::call_from_python<wavg_ext::kAccumulateSpec>);
  m.def("scale_copy_", &wavg_ext::call_from_python<wavg_ext::kScaleCopySpec>);
  m.def("running_mean_compensated_",
        &wavg_ext::compensated_from_python<wavg_ext::kRunningMeanCompensatedSpec>);
  m.def("ema_compensated_", &wavg_ext::compensated_from_python<wavg_ext::kEmaCompensatedSpec>);
  m.def("nonfinite_flag", [](pybind11::handle xs) {
    wavg_ext::BorrowedTensors x("nonfinite_flag", "xs", xs);
    return wavg_ext::nonfinite_flag_op().call(x.list());
  });
  m.def("check_nonfinite_flag", [](pybind11::handle xs) {
    wavg_ext::BorrowedTensors x("nonfinite_flag", "xs", xs);
    wavg_ext::prepare_flag_inputs(x.list());
  });
  m.def("check_compensated", [](const std::string& op, pybind11::handle avgs,
                                pybind11::handle comps, pybind11::handle xs,
                                pybind11::handle scalar) {
    const wavg_ext::OpSpec& spec = wavg_ext::spec_by_name(op);
    wavg_ext::BorrowedTensors c(spec.name, "comps", comps);
    wavg_ext::with_python_args(spec, avgs, xs, scalar,
                               [&](at::TensorList a, at::TensorList x, const auto& s) {
                                 wavg_ext::prepare_compensated(spec, a, c.list(), x, s, false);
                               });
  });
  m.def("dots", &wavg_ext::dots_from_python);
  m.def("combine_", &wavg_ext::combine_from_python);
  m.def("project_", &wavg_ext::project_from_python);
  m.def("orthonormalize_", &wavg_ext::orthonormalize_from_python);
  m.def("basis_gram", &wavg_ext::basis_gram,
        "CPU: float64 [na, ny] inner products of basis rows [a_first, +na) and [y_first, +ny).");
  m.def("basis_mix_", &wavg_ext::basis_mix_,
        "CPU: rows [y_first, +ny) <- beta * themselves + m @ rows [a_first, +na), in place.");
  // The reference path validates the basis ops with the same checks as the kernels.
  m.def("check_dots", [](pybind11::handle basis, pybind11::handle xs, int64_t k) {
    wavg_ext::BorrowedTensors b("dots", "basis", basis), x("dots", "xs", xs);
    wavg_ext::plan_dots(b.list(), x.list(), k, false);
  });
  m.def("check_combine", [](pybind11::handle outs, pybind11::handle basis, const at::Tensor& coeffs,
                            double alpha, double beta) {
    wavg_ext::BorrowedTensors o("combine_", "outs", outs), b("combine_", "basis", basis);
    wavg_ext::plan_combine(o.list(), b.list(), coeffs, alpha, beta, false);
  });
  m.def("check_project", [](pybind11::handle grads, pybind11::handle basis, int64_t k) {
    wavg_ext::BorrowedTensors g("project_", "grads", grads), b("project_", "basis", basis);
    wavg_ext::plan_project(g.list(), b.list(), k, false);
  });
  m.def("check_orthonormalize", [](pybind11::handle basis, int64_t k, int64_t passes) {
    wavg_ext::BorrowedTensors b("orthonormalize_", "basis", basis);
    return wavg_ext::check_orthonormalize(b.list(), k, passes);
  });
  m.def("check_basis", [](const std::string& op, pybind11::handle basis) {
    wavg_ext::BorrowedTensors b(op.c_str(), "basis", basis);
    return wavg_ext::check_basis(op.c_str(), b.list());
  });
  m.def(
      "param_metadata",
      [](pybind11::handle params) {
        auto* md = new wavg_ext::ParamMetadata(params);
        return pybind11::capsule(md, "wavg_ext.ParamMetadata", [](PyObject* capsule) {
          delete static_cast<wavg_ext::ParamMetadata*>(
              PyCapsule_GetPointer(capsule, "wavg_ext.ParamMetadata"));
        });
      },
      "The TensorImpls, dtypes, devices and numels of a list of tensors, for changed_params "
      "(a capsule).",
      pybind11::arg("params"));
  m.def("changed_params", &wavg_ext::changed_params,
        "Positions where the objects of groups (param_groups' params lists, in order) differ "
        "from params or, with metadata, from its recorded dtype, device and numel; None when "
        "the count differs.",
        pybind11::arg("groups"), pybind11::arg("params"), pybind11::arg("metadata") = pybind11::none());
  m.def("parallel_threads_used", &wavg_ext::parallel_threads_used,
        "Distinct threads one at::parallel_for over get_num_threads() items ran on.");
  // The reference path validates with exactly the checks the kernels use.
  m.def(
      "check_args",
      [](const std::string& op, pybind11::handle outs, pybind11::handle ins,
         pybind11::handle scalar) {
        const wavg_ext::OpSpec& spec = wavg_ext::spec_by_name(op);
        wavg_ext::with_python_args(spec, outs, ins, scalar,
                                   [&](at::TensorList o, at::TensorList i, const auto& s) {
                                     wavg_ext::prepare_pairs(spec, o, i, s, false);
                                   });
      },
      pybind11::arg("op"), pybind11::arg("outs"), pybind11::arg("ins"), pybind11::arg("scalar"));
}
