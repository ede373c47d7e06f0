// wavg_ext._C: the op schemas (the one place they are written), the Meta and
// Autograd registrations shared by all backends, and a small pybind11 module
// (build information, argument checks for the reference path).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>

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
  BorrowedTensors(const OpSpec& spec, const char* name, pybind11::handle seq) {
    PyObject* obj = seq.ptr();
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      throw pybind11::type_error(std::string(spec.name) + ": " + name +
                                 " must be a list or tuple of tensors, got " +
                                 Py_TYPE(obj)->tp_name);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    // Check every item before borrowing any: a throw with borrows in the vector
    // would let ~vector drop references it never took.
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        throw pybind11::type_error(std::string(spec.name) + ": " + name + "[" + std::to_string(i) +
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

// Reads (outs, ins, scalar) from Python for both Python entries, the kernels' fast
// path and the reference path's checks, and calls f(outs, ins, scalar) with the
// scalar as a tensor or a double.
template <typename F>
void with_python_args(const OpSpec& spec, pybind11::handle outs, pybind11::handle ins,
                      pybind11::handle scalar, const F& f) {
  BorrowedTensors o(spec, spec.out_name, outs);
  BorrowedTensors i(spec, spec.in_name, ins);
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

TORCH_LIBRARY_IMPL(wavg_ext, Meta, m) { WAVG_EXT_IMPL_ALL_OPS(validate_only); }

TORCH_LIBRARY_IMPL(wavg_ext, CompositeExplicitAutograd, m) { WAVG_EXT_IMPL_ALL_OPS(no_kernel); }

TORCH_LIBRARY_IMPL(wavg_ext, Autograd, m) { WAVG_EXT_IMPL_ALL_OPS(autograd_kernel); }

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
    info["cuda_version"] = WAVG_EXT_CUDA_VERSION;
    info["cuda_archs"] = WAVG_EXT_CUDA_ARCH_LIST;
    info["torch_version"] = WAVG_EXT_TORCH_VERSION;
    return info;
  });
  m.def("running_mean_", &wavg_ext::call_from_python<wavg_ext::kRunningMeanSpec>);
  m.def("ema_", &wavg_ext::call_from_python<wavg_ext::kEmaSpec>);
  m.def("accumulate_", &wavg_ext::call_from_python<wavg_ext::kAccumulateSpec>);
  m.def("scale_copy_", &wavg_ext::call_from_python<wavg_ext::kScaleCopySpec>);
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
