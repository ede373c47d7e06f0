// Parameter tracking for the averaging wrappers (wavg_ext.ops.param_metadata and
// changed_params): which parameters changed identity, dtype, device or size since the
// wrapper last read them, checked before every step in a few ns a parameter.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <vector>

namespace wavg_ext {
namespace {

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

// Whether a module tree still holds what wavg_ext._module_tree.TreeSnapshot recorded:
// for root and then each of modules, its _modules, _parameters and _buffers are the
// recorded dict objects (dicts, three a module), of the recorded lengths, holding the
// recorded keys (equal strings) and values (the same objects) in order. Identity and
// string comparisons only: no Python code runs while a dict is iterated. The lengths
// matter: an object moved from the end of one dict to the start of the next (a parameter
// made a buffer) leaves the entries in the same order.
bool tree_unchanged(pybind11::handle root, pybind11::handle modules, pybind11::handle dicts,
                    pybind11::handle lengths, pybind11::handle keys, pybind11::handle values) {
  static PyObject* const kNames[3] = {PyUnicode_InternFromString("_modules"),
                                      PyUnicode_InternFromString("_parameters"),
                                      PyUnicode_InternFromString("_buffers")};
  for (auto h : {modules, dicts, lengths, keys, values}) {
    TORCH_CHECK_TYPE(PyList_Check(h.ptr()), "tree_unchanged: expected lists");
  }
  const Py_ssize_t nmodules = PyList_GET_SIZE(modules.ptr());
  const Py_ssize_t nkeys = PyList_GET_SIZE(keys.ptr());
  TORCH_CHECK_VALUE(PyList_GET_SIZE(dicts.ptr()) == 3 * (nmodules + 1) &&
                        PyList_GET_SIZE(lengths.ptr()) == 3 * (nmodules + 1) &&
                        PyList_GET_SIZE(values.ptr()) == nkeys,
                    "tree_unchanged: the snapshot's lists do not correspond");
  PyObject** want_dicts = PySequence_Fast_ITEMS(dicts.ptr());
  PyObject** want_lengths = PySequence_Fast_ITEMS(lengths.ptr());
  PyObject** want_keys = PySequence_Fast_ITEMS(keys.ptr());
  PyObject** want_values = PySequence_Fast_ITEMS(values.ptr());
  Py_ssize_t d = 0, k = 0;
  for (Py_ssize_t i = -1; i < nmodules; ++i) {
    PyObject* module = i < 0 ? root.ptr() : PyList_GET_ITEM(modules.ptr(), i);
    for (PyObject* name : kNames) {
      PyObject* now = PyObject_GetAttr(module, name);  // new reference
      if (now == nullptr) {
        PyErr_Clear();
        return false;
      }
      const bool same = now == want_dicts[d];
      Py_DECREF(now);  // (the snapshot holds the recorded dict)
      if (!same || !PyDict_Check(now)) return false;
      const Py_ssize_t length = PyLong_AsSsize_t(want_lengths[d]);
      if (length < 0 || PyDict_GET_SIZE(now) != length || k + length > nkeys) {
        PyErr_Clear();
        return false;
      }
      Py_ssize_t pos = 0;
      PyObject *key, *value;  // borrowed
      while (PyDict_Next(now, &pos, &key, &value)) {
        if (value != want_values[k]) return false;
        if (key != want_keys[k] && !(PyUnicode_Check(key) && PyUnicode_Check(want_keys[k]) &&
                                     PyUnicode_Compare(key, want_keys[k]) == 0)) {
          PyErr_Clear();
          return false;
        }
        ++k;
      }
      ++d;
    }
  }
  return k == nkeys;
}

}  // namespace

void bind_param_tracking(pybind11::module& m) {
  m.def("tree_unchanged", &tree_unchanged,
        "Whether root and modules still hold the recorded _modules/_parameters/_buffers dicts, "
        "lengths, keys and values (wavg_ext._module_tree.TreeSnapshot).",
        pybind11::arg("root"), pybind11::arg("modules"), pybind11::arg("dicts"), pybind11::arg("lengths"),
        pybind11::arg("keys"), pybind11::arg("values"));
  m.def(
      "param_metadata",
      [](pybind11::handle params) {
        auto* md = new ParamMetadata(params);
        return pybind11::capsule(md, "wavg_ext.ParamMetadata", [](PyObject* capsule) {
          delete static_cast<ParamMetadata*>(PyCapsule_GetPointer(capsule, "wavg_ext.ParamMetadata"));
        });
      },
      "The TensorImpls, dtypes, devices and numels of a list of tensors, for changed_params "
      "(a capsule).",
      pybind11::arg("params"));
  m.def("changed_params", &changed_params,
        "Positions where the objects of groups (param_groups' params lists, in order) differ "
        "from params or, with metadata, from its recorded dtype, device and numel; None when "
        "the count differs.",
        pybind11::arg("groups"), pybind11::arg("params"), pybind11::arg("metadata") = pybind11::none());
}

}  // namespace wavg_ext
