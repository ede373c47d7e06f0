// The backend-independent kernels of every op, generated from the registry: Meta
// (validate, compute nothing), the fallback for backends without kernels (validate,
// then refuse clearly), Autograd (below autograd, version counters bumped), and the
// typed dispatcher handles the Python entries call. Pair ops are templates over their
// OpSpec (op_registry.h), the other ops over their traits (basis_ops.h).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <string>
#include <type_traits>

#include "basis_ops.h"
#include "pair_args.h"

namespace wavg_ext {

inline void bump_versions(at::TensorList ts) {
  for (const at::Tensor& t : ts) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}

inline void check_not_inference(const char* op, const char* list, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(!ts[i].defined() || !ts[i].is_inference(), op, ": ", list, "[", i,
                "] is an inference tensor; update it inside torch.inference_mode()");
  }
}

[[noreturn]] inline void no_kernel_for(const char* op, const at::Tensor& t) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": no wavg_ext kernel for tensors on ", t.device(),
                              " in this build; call wavg_ext.ops.", op,
                              " (it falls back to the reference implementation)");
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("wavg_ext::") + name).c_str(), overload)
      .template typed<Sig>();
}

// ---- pair and compensated ops: (outs, ins, scalar) / (avgs, comps, xs, scalar) ------
// Each op has two overloads: the scalar as a float, or as a one-element tensor (read on
// the device by CUDA kernels: no host sync, CUDA-graph capturable).

template <const OpSpec& kSpec, typename Scalar>
struct PairEntries {
  using Signature = void(at::TensorList, at::TensorList, Scalar);
  static const c10::TypedOperatorHandle<Signature>& op() {
    static const auto h = find_op<Signature>(kSpec.name, std::is_same_v<Scalar, double> ? "" : "Tensor");
    return h;
  }
  static void meta(at::TensorList outs, at::TensorList ins, Scalar scalar) {
    prepare_pairs(kSpec, outs, ins, scalar, /*plan_layout=*/false);
  }
  // Any other backend, and calls with no tensor at all (empty lists and a float scalar).
  static void fallback(at::TensorList outs, at::TensorList ins, Scalar scalar) {
    prepare_pairs(kSpec, outs, ins, scalar, /*plan_layout=*/false);
    if (!outs.empty()) no_kernel_for(kSpec.name, outs[0]);
  }
  // Averaging is not differentiable and must not join the autograd graph even when xs
  // require grad (they are parameters). Like an in-place op under no_grad: run the
  // backend kernel below autograd, then bump the outputs' version counters so autograd
  // still notices if a saved tensor was modified.
  static void autograd(at::TensorList outs, at::TensorList ins, Scalar scalar) {
    check_not_inference(kSpec.name, kSpec.out_name, outs);
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op().call(outs, ins, scalar);
    }
    bump_versions(outs);
  }
};

template <const OpSpec& kSpec, typename Scalar>
struct CompensatedEntries {
  using Signature = void(at::TensorList, at::TensorList, at::TensorList, Scalar);
  static const c10::TypedOperatorHandle<Signature>& op() {
    static const auto h = find_op<Signature>(kSpec.name, std::is_same_v<Scalar, double> ? "" : "Tensor");
    return h;
  }
  static void meta(at::TensorList avgs, at::TensorList comps, at::TensorList xs, Scalar scalar) {
    prepare_compensated(kSpec, avgs, comps, xs, scalar, /*plan_layout=*/false);
  }
  static void fallback(at::TensorList avgs, at::TensorList comps, at::TensorList xs, Scalar scalar) {
    prepare_compensated(kSpec, avgs, comps, xs, scalar, /*plan_layout=*/false);
    if (!avgs.empty()) no_kernel_for(kSpec.name, avgs[0]);
  }
  static void autograd(at::TensorList avgs, at::TensorList comps, at::TensorList xs, Scalar scalar) {
    check_not_inference(kSpec.name, kSpec.out_name, avgs);
    check_not_inference(kSpec.name, "comps", comps);
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op().call(avgs, comps, xs, scalar);
    }
    bump_versions(avgs);
    bump_versions(comps);
  }
};

// ---- ops with their own signatures (basis_ops.h) --------------------------------

// Calls f(index among the lists, list) for every TensorList argument, in order.
template <typename F, typename... A>
void for_each_list(const F& f, const A&... args) {
  int i = 0;
  auto visit = [&](const auto& a) {
    if constexpr (std::is_same_v<std::decay_t<decltype(a)>, at::TensorList>) f(i++, a);
  };
  (visit(args), ...);
}

template <typename Op, typename Sig = typename Op::Signature>
struct BasisEntries;

template <typename Op, typename R, typename... Args>
struct BasisEntries<Op, R(Args...)> {
  static const c10::TypedOperatorHandle<R(Args...)>& op() {
    static const auto h = find_op<R(Args...)>(Op::kName, "");
    return h;
  }
  // The first tensor of the list that decides the device (undefined when it is empty).
  static at::Tensor device_tensor(const Args&... args) {
    at::Tensor t;
    for_each_list([&](int i, at::TensorList l) {
      if (i == Op::kDeviceList && !l.empty()) t = l[0];
    }, args...);
    return t;
  }
  static R meta(Args... args) {
    Op::check(args...);
    if constexpr (!std::is_void_v<R>) return Op::result(c10::Device(c10::kMeta), args...);
  }
  // No tensors at all (empty lists): validate and return the empty result. Tensors on a
  // backend without kernels: refuse clearly (wavg_ext.ops routes them to the reference).
  static R fallback(Args... args) {
    Op::check(args...);
    const at::Tensor t = device_tensor(args...);
    if (t.defined()) no_kernel_for(Op::kName, t);
    if constexpr (!std::is_void_v<R>) return Op::result(c10::Device(c10::kCPU), args...);
  }
  // Below autograd, like the pair ops: never recorded, written lists' versions bumped.
  static R autograd(Args... args) {
    for_each_list([](int i, at::TensorList l) {
      if (Op::kWritten & (1u << i)) check_not_inference(Op::kName, Op::kLists[i], l);
    }, args...);
    auto bump = [&] {
      for_each_list([](int i, at::TensorList l) {
        if (Op::kWritten & (1u << i)) bump_versions(l);
      }, args...);
    };
    if constexpr (std::is_void_v<R>) {
      {
        at::AutoDispatchBelowADInplaceOrView guard;
        op().call(args...);
      }
      bump();
    } else {
      R result;
      {
        at::AutoDispatchBelowADInplaceOrView guard;
        result = op().call(args...);
      }
      bump();
      return result;
    }
  }
};

}  // namespace wavg_ext
