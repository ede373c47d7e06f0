// _C.CallPlan: one pair or compensated op over lists that stay the same from call to call
// (an optimizer wrapper's averages and parameters), validated once (wavg_ext.ops.Plan).
//
// A call through the op validates every pair again (list lengths, devices, shapes, dtype
// rule, overlap: ~40 ns a pair) and plans the layout; on 2000 small tensors that costs as
// much as the arithmetic. A CallPlan keeps the tensors and the validated PairPlan, and
// before each call re-checks only what can change under the same tensor objects without
// the plan seeing it: each tensor's data pointer, dtype, device, sizes and strides
// (`p.data = ...`, `module.to(...)`, a storage swap). When anything changed it validates
// and plans again from scratch, raising exactly what the op raises, before any write.
// Plans that need temporaries (mismatched layouts) and devices other than the CPU run
// through the op itself each call, with the same results.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/kernel_table.h"
#include "op_entries.h"
#include "pair_args.h"

namespace wavg_ext {
namespace {

class CallPlan {
 public:
  CallPlan(const std::string& op, const std::vector<std::vector<at::Tensor>>& lists)
      : spec_(&spec_by_name(op)) {
    const size_t want = spec_->compensated ? 3 : 2;
    TORCH_CHECK_VALUE(lists.size() == want, "Plan: ", spec_->name, " takes ", want, " tensor lists, got ",
                      lists.size());
    outs_ = lists[0];
    if (spec_->compensated) {
      comps_ = lists[1];
      ins_ = lists[2];
    } else {
      ins_ = lists[1];
    }
    rebuild();
  }

  // Re-validates when a tensor changed under the plan (raises what the op raises);
  // returns whether it did.
  bool check() {
    if (unchanged()) return false;
    rebuild();
    return true;
  }

  void run(pybind11::handle scalar) {
    check();
    if (THPVariable_Check(scalar.ptr())) {
      const at::Tensor& t = THPVariable_Unpack(scalar.ptr());
      if (!reusable_) return call_op(t);
      run_planned(make_scalar(*spec_, t, outs_));
      return;
    }
    double value;
    try {
      value = scalar.cast<double>();
    } catch (const pybind11::cast_error&) {
      throw pybind11::type_error(std::string(spec_->name) + ": " + spec_->scalar_name +
                                 " must be a number or a one-element tensor, got " +
                                 Py_TYPE(scalar.ptr())->tp_name);
    }
    if (!reusable_) return call_op(value);
    run_planned(make_scalar(*spec_, value));
  }

 private:
  // What the plan relies on for one tensor: its TensorImpl (the plan holds the tensor) and
  // what the kernels use of it, compared from the impl directly (a few ns a tensor).
  struct Signature {
    const c10::TensorImpl* impl;
    const void* data;
    caffe2::TypeMeta dtype;
    c10::Device device;
    int64_t dim;
    size_t dims_at;  // sizes then strides at dims_[dims_at, dims_at + 2 * dim)
  };

  template <typename F>
  void for_each_tensor(const F& f) const {
    for (const at::Tensor& t : outs_) f(t);
    for (const at::Tensor& t : comps_) f(t);
    for (const at::Tensor& t : ins_) f(t);
  }

  static const void* data_of(const c10::TensorImpl* impl) {
    return static_cast<const char*>(impl->unsafe_storage().data()) +
           impl->storage_offset() * static_cast<int64_t>(impl->dtype().itemsize());
  }

  bool unchanged() const {
    if (!valid_) return false;  // the last validation failed: validate again
    const int64_t* dims = dims_.data();
    const size_t n = signatures_.size();
    for (size_t i = 0; i < n; ++i) {
      // Cold (after a training step streamed the caches) each TensorImpl and StorageImpl
      // read is a miss: ask for the impls kAhead tensors ahead, and for the storages of
      // those half as far ahead (their impls have arrived by then), so the misses overlap.
      if (i + kAhead < n) {
        const char* ahead = reinterpret_cast<const char*>(signatures_[i + kAhead].impl);
        for (int line = 0; line < 4; ++line) __builtin_prefetch(ahead + 64 * line);
      }
      if (i + kAhead / 2 < n) {
        __builtin_prefetch(signatures_[i + kAhead / 2].impl->unsafe_storage().unsafeGetStorageImpl());
      }
      const Signature& s = signatures_[i];
      const c10::TensorImpl* impl = s.impl;
      if (data_of(impl) != s.data || impl->dtype() != s.dtype || impl->unsafe_storage().device() != s.device ||
          impl->dim() != s.dim) {
        return false;
      }
      const auto sizes = impl->sizes(), strides = impl->strides();
      const int64_t* d = dims + s.dims_at;
      for (int64_t k = 0; k < s.dim; ++k) {
        if (sizes[k] != d[k] || strides[k] != d[s.dim + k]) return false;
      }
    }
    return true;
  }

  void rebuild() {
    valid_ = false;
    reusable_ = false;
    signatures_.clear();
    dims_.clear();
    for (const at::Tensor& t : outs_) TORCH_CHECK_TYPE(t.defined(), spec_->name, ": undefined tensor");
    // As the op: its Autograd entry refuses to write an inference tensor, and it runs when
    // some argument is a normal tensor and inference mode is off (the mode may differ from
    // call to call: checked per call when it can matter).
    inference_out_ = false;
    normal_ = false;
    for (const at::Tensor& t : outs_) inference_out_ = inference_out_ || t.is_inference();
    for (const at::Tensor& t : comps_) inference_out_ = inference_out_ || t.is_inference();
    for_each_tensor([&](const at::Tensor& t) { normal_ = normal_ || (t.defined() && !t.is_inference()); });
    check_inference_outputs(through_autograd());
    // A valid scalar for either rule: the lists are what is checked here.
    plan_ = spec_->compensated ? prepare_compensated(*spec_, outs_, comps_, ins_, 0.0)
                               : prepare_pairs(*spec_, outs_, ins_, 0.0);
    for_each_tensor([&](const at::Tensor& t) {
      const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
      signatures_.push_back({impl, data_of(impl), impl->dtype(), impl->unsafe_storage().device(), impl->dim(), dims_.size()});
      dims_.insert(dims_.end(), t.sizes().begin(), t.sizes().end());
      dims_.insert(dims_.end(), t.strides().begin(), t.strides().end());
    });
    reusable_ = plan_.temporaries.empty() && plan_.writebacks.empty() && plan_.device.is_cpu();
    if (!reusable_) plan_ = PairPlan();
    valid_ = true;
  }

  // Whether a call of the op would pass its Autograd entry now (some argument a normal
  // tensor, inference mode off): that entry refuses inference outputs and bumps versions.
  bool through_autograd() const { return normal_ && !c10::InferenceMode::is_enabled(); }

  // The Autograd entry's refusal of inference outputs (autograd: whether it runs now).
  void check_inference_outputs(bool autograd) const {
    if (!autograd || !inference_out_) return;
    check_not_inference(spec_->name, spec_->out_name, outs_);
    check_not_inference(spec_->name, "comps", comps_);
  }

  void run_planned(const ScalarArg& scalar) {
    const bool autograd = through_autograd();
    check_inference_outputs(autograd);
    if (!scalar.skip) {  // (a NaN gate: validated, nothing to do)
      plan_.scalar = scalar;
      cpu::run_pair_kernel(*spec_, plan_);
    }
    if (autograd) {  // as the op's Autograd entry: autograd notices a saved tensor was modified
      bump_versions(outs_);
      bump_versions(comps_);
    }
  }

  template <typename Scalar>
  void call_op(const Scalar& scalar) {
    if (spec_->compensated) {
      find_op<void(at::TensorList, at::TensorList, at::TensorList, Scalar)>(
          spec_->name, std::is_same_v<Scalar, double> ? "" : "Tensor")
          .call(outs_, comps_, ins_, scalar);
    } else {
      find_op<void(at::TensorList, at::TensorList, Scalar)>(spec_->name,
                                                            std::is_same_v<Scalar, double> ? "" : "Tensor")
          .call(outs_, ins_, scalar);
    }
  }

  const OpSpec* spec_;
  std::vector<at::Tensor> outs_, comps_, ins_;
  std::vector<Signature> signatures_;
  std::vector<int64_t> dims_;
  static constexpr size_t kAhead = 16;
  PairPlan plan_;
  bool reusable_ = false;
  bool valid_ = false;
  bool inference_out_ = false;  // some output is an inference tensor
  bool normal_ = false;         // some tensor is not
};

}  // namespace

void bind_call_plan(pybind11::module& m) {
  pybind11::class_<CallPlan>(m, "CallPlan",
                             "A pair or compensated op over fixed tensor lists, validated once "
                             "(wavg_ext.ops.Plan).")
      .def(pybind11::init<const std::string&, const std::vector<std::vector<at::Tensor>>&>(),
           pybind11::arg("op"), pybind11::arg("lists"))
      .def("check", &CallPlan::check)
      .def("run", &CallPlan::run, pybind11::arg("scalar"));
}

}  // namespace wavg_ext
