// Reading op arguments from Python without the cost of torch.ops' conversions: the
// tensor lists are borrowed, the scalar is a number or a one-element tensor.
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "pair_args.h"

namespace wavg_ext {

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
  // Moved (into a tuple of arguments): the source gives up its borrows.
  BorrowedTensors(BorrowedTensors&& other) noexcept : tensors_(std::move(other.tensors_)) {
    other.tensors_.clear();
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

}  // namespace wavg_ext
