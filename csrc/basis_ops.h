// The ops with their own signatures (the basis ops of TWA, nonfinite_flag,
// ema_stochastic_, ema_many_ and window_push_), each
// one traits struct: the rest of the registry (schema, Meta/Autograd/fallback
// registrations, the kernels of every backend, the Python entries and checks, and
// _C.op_specs()) is generated from these by op_entries.h / registry.cpp.
//
// A traits struct provides
//   kName, kSchema                 the op's name and its full schema
//   kKind                          "basis" (TWA's basis ops), "reduction", "stochastic", "many" or "window"
//   Signature                      R(Args...), the C++ signature the schema maps to
//   kLists                         the names of its TensorList arguments, in order
//   kWritten                       which of those lists the op modifies (bitmask)
//   kDeviceList                    the list whose first tensor decides the device
//   check(Args...)                 every validation (raises before anything is modified)
//   result(device, Args...)        (R = Tensor) the result of a call without work, on device
//   run<Kernels>(Args...)          the kernel, over a backend's Kernels (register_kernels.h)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <cstdint>

#include "basis_args.h"
#include "basis_composite.h"
#include "pair_args.h"

namespace wavg_ext {

struct DotsOp {
  static constexpr const char* kKind = "basis";
  static constexpr const char* kName = "dots";
  static constexpr const char* kSchema = "dots(Tensor[] basis, Tensor[] xs, int k) -> Tensor";
  using Signature = at::Tensor(at::TensorList, at::TensorList, int64_t);
  static constexpr const char* kLists[] = {"basis", "xs"};
  static constexpr unsigned kWritten = 0;
  static constexpr int kDeviceList = 0;
  static void check(at::TensorList basis, at::TensorList xs, int64_t k) {
    plan_dots(basis, xs, k, /*plan_layout=*/false);
  }
  static at::Tensor result(c10::Device d, at::TensorList basis, at::TensorList, int64_t k) {
    return at::zeros({k}, at::TensorOptions().dtype(basis_result_dtype(basis)).device(d));
  }
  template <typename Kernels>
  static at::Tensor run(at::TensorList basis, at::TensorList xs, int64_t k) {
    return dots_impl<typename Kernels::Rows>(basis, xs, k);
  }
};

struct CombineOp {
  static constexpr const char* kKind = "basis";
  static constexpr const char* kName = "combine_";
  static constexpr const char* kSchema =
      "combine_(Tensor(a!)[] outs, Tensor[] basis, Tensor coeffs, float alpha=1.0, "
      "float beta=0.0) -> ()";
  using Signature = void(at::TensorList, at::TensorList, const at::Tensor&, double, double);
  static constexpr const char* kLists[] = {"outs", "basis"};
  static constexpr unsigned kWritten = 1u << 0;
  static constexpr int kDeviceList = 1;
  static void check(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                    double alpha, double beta) {
    plan_combine(outs, basis, coeffs, alpha, beta, /*plan_layout=*/false);
  }
  template <typename Kernels>
  static void run(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                  double alpha, double beta) {
    combine_impl<typename Kernels::Rows>(outs, basis, coeffs, alpha, beta);
  }
};

struct ProjectOp {
  static constexpr const char* kKind = "basis";
  static constexpr const char* kName = "project_";
  static constexpr const char* kSchema = "project_(Tensor(a!)[] grads, Tensor[] basis, int k) -> ()";
  using Signature = void(at::TensorList, at::TensorList, int64_t);
  static constexpr const char* kLists[] = {"grads", "basis"};
  static constexpr unsigned kWritten = 1u << 0;
  static constexpr int kDeviceList = 1;
  static void check(at::TensorList grads, at::TensorList basis, int64_t k) {
    plan_project(grads, basis, k, /*plan_layout=*/false);
  }
  template <typename Kernels>
  static void run(at::TensorList grads, at::TensorList basis, int64_t k) {
    project_impl<typename Kernels::Rows>(grads, basis, k);
  }
};

struct OrthonormalizeOp {
  static constexpr const char* kKind = "basis";
  static constexpr const char* kName = "orthonormalize_";
  static constexpr const char* kSchema =
      "orthonormalize_(Tensor(a!)[] basis, int k, int passes=2) -> Tensor";
  using Signature = at::Tensor(at::TensorList, int64_t, int64_t);
  static constexpr const char* kLists[] = {"basis"};
  static constexpr unsigned kWritten = 1u << 0;
  static constexpr int kDeviceList = 0;
  static void check(at::TensorList basis, int64_t k, int64_t passes) {
    check_orthonormalize(basis, k, passes);
  }
  static at::Tensor result(c10::Device d, at::TensorList basis, int64_t, int64_t) {
    return at::zeros({}, at::TensorOptions().dtype(basis_result_dtype(basis)).device(d));
  }
  template <typename Kernels>
  static at::Tensor run(at::TensorList basis, int64_t k, int64_t passes) {
    return orthonormalize_impl<typename Kernels::Rows>(basis, k, passes);
  }
};

// 0-dim int32 on the tensors' device: 1 when any element is NaN or +-inf (no host sync).
struct NonfiniteFlagOp {
  static constexpr const char* kKind = "reduction";
  static constexpr const char* kName = "nonfinite_flag";
  static constexpr const char* kSchema = "nonfinite_flag(Tensor[] xs) -> Tensor";
  using Signature = at::Tensor(at::TensorList);
  static constexpr const char* kLists[] = {"xs"};
  static constexpr unsigned kWritten = 0;
  static constexpr int kDeviceList = 0;
  static void check(at::TensorList xs) { prepare_flag_inputs(xs); }
  static at::Tensor result(c10::Device d, at::TensorList) {
    return at::zeros({}, at::TensorOptions().dtype(at::kInt).device(d));
  }
  template <typename Kernels>
  static at::Tensor run(at::TensorList xs) {
    return Kernels::nonfinite_flag(xs);
  }
};

// avg <- avg + weight * (x - avg) in float32, rounded to the bfloat16 average
// stochastically (stochastic_rounding.h): the random bits depend on seed, the pair's
// position and the element's only, so a call is reproducible; pass a new seed per update.
struct EmaStochasticOp {
  static constexpr const char* kKind = "stochastic";
  static constexpr const char* kName = "ema_stochastic_";
  static constexpr const char* kSchema =
      "ema_stochastic_(Tensor(a!)[] avgs, Tensor[] xs, float weight, int seed) -> ()";
  using Signature = void(at::TensorList, at::TensorList, double, int64_t);
  static constexpr const char* kLists[] = {"avgs", "xs"};
  static constexpr unsigned kWritten = 1u << 0;
  static constexpr int kDeviceList = 0;
  static void check(at::TensorList avgs, at::TensorList xs, double weight, int64_t) {
    prepare_ema_stochastic(avgs, xs, weight, /*plan_layout=*/false);
  }
  template <typename Kernels>
  static void run(at::TensorList avgs, at::TensorList xs, double weight, int64_t seed) {
    PairPlan plan = prepare_ema_stochastic(avgs, xs, weight);
    Kernels::ema_stochastic(plan, seed);
    plan.finish();
  }
};

// P exponential averages of the same weights in one pass: avgs[p][i] <- ema_(avgs[p][i],
// xs[i], weights[p]) with ema_'s arithmetic (the same bits as P ema_ calls), each x read
// once for all profiles (pair_args.h: prepare_ema_many).
struct EmaManyOp {
  static constexpr const char* kKind = "many";
  static constexpr const char* kName = "ema_many_";
  static constexpr const char* kSchema =
      "ema_many_(Tensor(a!)[] avgs, Tensor[] xs, float[] weights) -> ()";
  using Signature = void(at::TensorList, at::TensorList, at::ArrayRef<double>);
  static constexpr const char* kLists[] = {"avgs", "xs"};
  static constexpr unsigned kWritten = 1u << 0;
  static constexpr int kDeviceList = 0;
  static void check(at::TensorList avgs, at::TensorList xs, at::ArrayRef<double> weights) {
    prepare_ema_many(avgs, xs, weights, /*plan_layout=*/false);
  }
  template <typename Kernels>
  static void run(at::TensorList avgs, at::TensorList xs, at::ArrayRef<double> weights) {
    ManyPlan plan = prepare_ema_many(avgs, xs, weights);
    Kernels::ema_many(plan);
    plan.finish();
  }
};

// The sum of a sliding window of samples, one step: sum <- sum + (x - slot), slot <- x
// (pair_args.h: prepare_window_push). With slots as a ring of the last k samples (zeros
// while the window fills), sums stay the sum of the window for one read of each list.
struct WindowPushOp {
  static constexpr const char* kKind = "window";
  static constexpr const char* kName = "window_push_";
  static constexpr const char* kSchema =
      "window_push_(Tensor(a!)[] sums, Tensor(b!)[] slots, Tensor[] xs) -> ()";
  using Signature = void(at::TensorList, at::TensorList, at::TensorList);
  static constexpr const char* kLists[] = {"sums", "slots", "xs"};
  static constexpr unsigned kWritten = (1u << 0) | (1u << 1);
  static constexpr int kDeviceList = 0;
  static void check(at::TensorList sums, at::TensorList slots, at::TensorList xs) {
    prepare_window_push(sums, slots, xs, /*plan_layout=*/false);
  }
  template <typename Kernels>
  static void run(at::TensorList sums, at::TensorList slots, at::TensorList xs) {
    PairPlan plan = prepare_window_push(sums, slots, xs);
    Kernels::window_push(plan);
    plan.finish();
  }
};

// Every such op: BasisOps::for_each(f) calls f(static_cast<Op*>(nullptr)) for each, in order.
template <typename... Ops>
struct OpList {
  template <typename F>
  static void for_each(const F& f) {
    (f(static_cast<Ops*>(nullptr)), ...);
  }
};
using BasisOps =
    OpList<DotsOp, CombineOp, ProjectOp, OrthonormalizeOp, NonfiniteFlagOp, EmaStochasticOp,
           EmaManyOp, WindowPushOp>;

}  // namespace wavg_ext
