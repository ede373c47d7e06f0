// wavg_ext._C: the Python entries of every op (the fast path: borrowed lists straight
// to the dispatcher) and the reference path's checks, generated from the op registry;
// _C.op_specs() (the registry as Python reads it); build information; test hooks.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include "cpu/kernel_table.h"
#include "cuda/emulation/control.h"
#include "op_entries.h"
#include "python_args.h"

// Written by setup.py / CMakeLists.txt: WAVG_EXT_VERSION, WAVG_EXT_CUDA_MODULE_BUILT (0/1),
// WAVG_EXT_CUDA_NOTE, WAVG_EXT_CUDA_ARCH_LIST, WAVG_EXT_CUDA_VERSION, WAVG_EXT_TORCH_VERSION.
#include "wavg_ext_build_config.h"

// The torch this extension was compiled against, as a string wavg_ext/__init__.py finds in
// this file when importing it fails (another torch's libraries lack symbols it needs), so
// that the error can name both versions.
extern "C" __attribute__((used, visibility("default"))) const char wavg_ext_built_for_torch[] =
    "wavg_ext built for torch " WAVG_EXT_TORCH_VERSION ";";

namespace wavg_ext {

void bind_param_tracking(pybind11::module& m);
void bind_call_plan(pybind11::module& m);
namespace cpu {
void bind_basis_rows(pybind11::module& m);
}

namespace {

// ---- pair and compensated ops ----------------------------------------------------

// ops.ema_(avgs, xs, w) -> _C.ema_(...) -> the dispatcher, with the scalar's overload.
template <const OpSpec& kSpec>
void pair_from_python(pybind11::handle outs, pybind11::handle ins, pybind11::handle scalar) {
  with_python_args(kSpec, outs, ins, scalar, [](at::TensorList o, at::TensorList i, const auto& s) {
    using S = std::conditional_t<std::is_same_v<std::decay_t<decltype(s)>, double>, double,
                                 const at::Tensor&>;
    PairEntries<kSpec, S>::op().call(o, i, s);
  });
}

template <const OpSpec& kSpec>
void compensated_from_python(pybind11::handle avgs, pybind11::handle comps, pybind11::handle xs,
                             pybind11::handle scalar) {
  BorrowedTensors c(kSpec.name, "comps", comps);
  with_python_args(kSpec, avgs, xs, scalar, [&](at::TensorList a, at::TensorList x, const auto& s) {
    using S = std::conditional_t<std::is_same_v<std::decay_t<decltype(s)>, double>, double,
                                 const at::Tensor&>;
    CompensatedEntries<kSpec, S>::op().call(a, c.list(), x, s);
  });
}

// ---- ops with their own signatures: TensorList arguments arrive as Python lists -----

template <typename A>
struct PyArg {  // any other argument: pybind11 converts it
  using type = A;
  A value;
  PyArg(const char*, const char* const*, int&, A v) : value(v) {}
  A get() const { return value; }
};
template <>
struct PyArg<at::TensorList> {
  using type = pybind11::handle;
  BorrowedTensors tensors;
  PyArg(const char* op, const char* const* names, int& list, pybind11::handle h)
      : tensors(op, names[list++], h) {}
  at::TensorList get() const { return tensors.list(); }
};

template <>
struct PyArg<at::ArrayRef<double>> {  // float[]: a list or tuple of numbers
  using type = pybind11::handle;
  std::vector<double> values;
  PyArg(const char* op, const char* const*, int&, pybind11::handle h) {
    PyObject* obj = h.ptr();
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      throw pybind11::type_error(std::string(op) + ": weights must be a list or tuple of numbers, got " +
                                 Py_TYPE(obj)->tp_name);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    values.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      // Numbers (numpy's too); not bools, and not tensors (reading one would sync a device).
      bool number = !PyBool_Check(items[i]) && !THPVariable_Check(items[i]);
      const double v = number ? PyFloat_AsDouble(items[i]) : 0.0;
      if (number && v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        number = false;
      }
      if (!number) {
        throw pybind11::type_error(std::string(op) + ": weights[" + std::to_string(i) + "] is a " +
                                   Py_TYPE(items[i])->tp_name + ", not a number");
      }
      values.push_back(v);
    }
  }
  at::ArrayRef<double> get() const { return values; }
};

template <typename Op, typename Sig = typename Op::Signature>
struct BasisPython;

template <typename Op, typename R, typename... Args>
struct BasisPython<Op, R(Args...)> {
  // The lists' borrows, in argument order (a braced list is evaluated left to right).
  using Held = std::tuple<PyArg<Args>...>;
  static Held hold(typename PyArg<Args>::type... py) {
    int list = 0;
    return Held{PyArg<Args>(Op::kName, Op::kLists, list, py)...};
  }
  static R call(typename PyArg<Args>::type... py) {
    const Held held = hold(py...);
    return std::apply([](const auto&... a) { return BasisEntries<Op>::op().call(a.get()...); }, held);
  }
  static void check(typename PyArg<Args>::type... py) {
    const Held held = hold(py...);
    std::apply([](const auto&... a) { Op::check(a.get()...); }, held);
  }
};

// "combine_" -> "check_combine"
std::string check_name(const char* op) {
  std::string name = op;
  if (!name.empty() && name.back() == '_') name.pop_back();
  return "check_" + name;
}

// The registry as Python reads it (wavg_ext.ops, the reference path, the tests).
pybind11::list op_specs() {
  pybind11::list specs;
  for (const OpSpec* s : kPairOpSpecs) {
    pybind11::dict d;
    d["name"] = s->name;
    d["kind"] = s->compensated ? "compensated" : "pair";
    pybind11::list lists;
    lists.append(s->out_name);
    if (s->compensated) lists.append("comps");
    lists.append(s->in_name);
    d["lists"] = lists;
    pybind11::list written;
    written.append(s->out_name);
    if (s->compensated) written.append("comps");
    d["written"] = written;
    d["device_list"] = s->out_name;
    d["scalar"] = s->scalar_name;
    d["pair_rule"] = s->pair_rule == PairRule::kAverage ? "average" : "cast";
    d["scalar_rule"] = s->scalar_rule == ScalarRule::kFinite ? "finite" : "finite_nonnegative";
    d["reads_out"] = s->reads_out;
    specs.append(d);
  }
  BasisOps::for_each([&](auto* op) {
    using Op = std::remove_pointer_t<decltype(op)>;
    pybind11::dict d;
    d["name"] = Op::kName;
    d["kind"] = Op::kKind;
    pybind11::list lists, written;
    for (size_t i = 0; i < std::size(Op::kLists); ++i) {
      lists.append(Op::kLists[i]);
      if (Op::kWritten & (1u << i)) written.append(Op::kLists[i]);
    }
    d["lists"] = lists;
    d["written"] = written;
    d["device_list"] = Op::kLists[Op::kDeviceList];
    d["scalar"] = pybind11::none();
    d["pair_rule"] = pybind11::none();
    d["scalar_rule"] = pybind11::none();
    d["reads_out"] = pybind11::none();
    specs.append(d);
  });
  return specs;
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

PYBIND11_MODULE(_C, m) {
  m.doc() = "wavg_ext compiled kernels (ops are registered as torch.ops.wavg_ext.*)";

  // The CPU kernels' ISA, from WAVG_EXT_CPU_CAPABILITY, read at import.
  const std::string isa_warning = wavg_ext::cpu::select_capability_from_environment();
  if (!isa_warning.empty() && PyErr_WarnEx(PyExc_RuntimeWarning, isa_warning.c_str(), 1) != 0) {
    throw pybind11::error_already_set();
  }

  m.def("build_info", []() {
    pybind11::dict info;
    info["cpu"] = true;
    info["cpu_capability"] = wavg_ext::cpu::selected_capability();
    info["cpu_capabilities"] = wavg_ext::cpu::compiled_capabilities();
    info["openmp"] = wavg_ext::openmp_enabled();
    // Whether this build made the CUDA kernels' module (_C_cuda), and how or why not;
    // wavg_ext/__init__.py adds whether it is loaded.
    info["cuda_built"] = static_cast<bool>(WAVG_EXT_CUDA_MODULE_BUILT);
    info["cuda_build_note"] = WAVG_EXT_CUDA_NOTE;
#ifdef WAVG_EXT_CUDA_EMULATION_BUILT
    info["cuda_emulation"] = true;
#else
    info["cuda_emulation"] = false;
#endif
    info["cuda_version"] = WAVG_EXT_CUDA_VERSION;
    info["cuda_archs"] = WAVG_EXT_CUDA_ARCH_LIST;
    info["torch_version"] = WAVG_EXT_TORCH_VERSION;
    info["version"] = WAVG_EXT_VERSION;
    return info;
  });
  m.def("_supported_cpu_capabilities", &wavg_ext::cpu::supported_capabilities,
        "The compiled ISAs of the CPU kernels this CPU supports, lowest first.");
  m.def("_set_cpu_capability", &wavg_ext::cpu::select_capability, pybind11::arg("name"),
        "Selects the CPU kernels' ISA for every call that starts after it (process-wide); "
        "returns the previous one.");
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

  // Every op's Python entry and, for the reference path, its checks.
  m.def("op_specs", &wavg_ext::op_specs, "The op registry: one dict per op.");
#define WAVG_EXT_BIND_PAIR(id, ...) m.def(#id "_", &wavg_ext::pair_from_python<wavg_ext::spec::id>);
  WAVG_EXT_PAIR_OPS(WAVG_EXT_BIND_PAIR)
#undef WAVG_EXT_BIND_PAIR
#define WAVG_EXT_BIND_COMPENSATED(id, ...) \
  m.def(#id "_", &wavg_ext::compensated_from_python<wavg_ext::spec::id>);
  WAVG_EXT_COMPENSATED_OPS(WAVG_EXT_BIND_COMPENSATED)
#undef WAVG_EXT_BIND_COMPENSATED
  wavg_ext::BasisOps::for_each([&](auto* op) {
    using Op = std::remove_pointer_t<decltype(op)>;
    m.def(Op::kName, &wavg_ext::BasisPython<Op>::call);
    m.def(wavg_ext::check_name(Op::kName).c_str(), &wavg_ext::BasisPython<Op>::check);
  });
  // The reference path validates with exactly the checks the kernels use.
  m.def(
      "check_args",
      [](const std::string& op, pybind11::handle outs, pybind11::handle ins,
         pybind11::handle scalar) {
        const wavg_ext::OpSpec& spec = wavg_ext::spec_by_name(op);
        TORCH_CHECK_VALUE(!spec.compensated, "check_args: ", op, " is a compensated op (check_compensated)");
        wavg_ext::with_python_args(spec, outs, ins, scalar,
                                   [&](at::TensorList o, at::TensorList i, const auto& s) {
                                     wavg_ext::prepare_pairs(spec, o, i, s, false);
                                   });
      },
      pybind11::arg("op"), pybind11::arg("outs"), pybind11::arg("ins"), pybind11::arg("scalar"));
  m.def("check_compensated", [](const std::string& op, pybind11::handle avgs,
                                pybind11::handle comps, pybind11::handle xs,
                                pybind11::handle scalar) {
    const wavg_ext::OpSpec& spec = wavg_ext::spec_by_name(op);
    TORCH_CHECK_VALUE(spec.compensated, "check_compensated: ", op, " is not a compensated op (check_args)");
    wavg_ext::BorrowedTensors c(spec.name, "comps", comps);
    wavg_ext::with_python_args(spec, avgs, xs, scalar,
                               [&](at::TensorList a, at::TensorList x, const auto& s) {
                                 wavg_ext::prepare_compensated(spec, a, c.list(), x, s, false);
                               });
  });
  m.def("check_basis", [](const std::string& op, pybind11::handle basis) {
    wavg_ext::BorrowedTensors b(op.c_str(), "basis", basis);
    return wavg_ext::check_basis(op.c_str(), b.list());
  });

  wavg_ext::bind_param_tracking(m);
  wavg_ext::bind_call_plan(m);
  wavg_ext::cpu::bind_basis_rows(m);
  m.def("parallel_threads_used", &wavg_ext::parallel_threads_used,
        "Distinct threads one at::parallel_for over get_num_threads() items ran on.");
}
