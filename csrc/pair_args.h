// Validation and layout planning shared by every backend (CPU, CUDA, Meta and the
// Python reference path), so that all of them accept and reject exactly the same
// calls and nothing is modified before every check has passed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "op_registry.h"
#include "tensor_checks.h"

namespace wavg_ext {

// Which (out dtype, in dtype) pairs an op accepts.
enum class PairRule {
  kAverage,  // out is in's dtype, float32 for float16/bfloat16 in, or float64: averages / sums
  kCast,     // same dtype, float64 <-> any, or float32 <-> float16/bfloat16: assignments
};

// What an op requires of its scalar argument when it is known on the host.
enum class ScalarRule {
  kFinite,             // any finite value
  kFiniteNonNegative,  // a sample count
};

struct OpSpec {
  const char* name;            // "ema_"
  const char* out_name;        // "avgs"
  const char* in_name;         // "xs"
  const char* scalar_name;     // "weight"
  const char* scalar_default;  // "1.0", or "" when the scalar has no default
  PairRule pair_rule;
  ScalarRule scalar_rule;
  bool reads_out;    // false for scale_copy_: out is only written
  bool compensated;  // (avgs, comps, xs, scalar) instead of (outs, ins, scalar)
};

// The OpSpec of every op of op_registry.h, by id: spec::ema, spec::ema_compensated, ...
// (the compensated ops: see compensated_cpu.cpp).
namespace spec {
#define WAVG_EXT_PAIR_SPEC(id, out, in, scalar, dflt, pair_rule, scalar_rule, reads_out)  \
  inline constexpr OpSpec id{#id "_", out, in, scalar, dflt, PairRule::pair_rule,          \
                             ScalarRule::scalar_rule, reads_out, false};
#define WAVG_EXT_COMPENSATED_SPEC(id, out, in, scalar, dflt, pair_rule, scalar_rule, reads_out) \
  inline constexpr OpSpec id{#id "_", out, in, scalar, dflt, PairRule::pair_rule,                \
                             ScalarRule::scalar_rule, reads_out, true};
WAVG_EXT_PAIR_OPS(WAVG_EXT_PAIR_SPEC)
WAVG_EXT_COMPENSATED_OPS(WAVG_EXT_COMPENSATED_SPEC)
#undef WAVG_EXT_PAIR_SPEC
#undef WAVG_EXT_COMPENSATED_SPEC
}  // namespace spec

// Every pair and compensated op's spec, in registry order.
inline constexpr const OpSpec* kPairOpSpecs[] = {
#define WAVG_EXT_SPEC_PTR(id, ...) &spec::id,
    WAVG_EXT_ALL_PAIR_OPS(WAVG_EXT_SPEC_PTR)
#undef WAVG_EXT_SPEC_PTR
};
const OpSpec& spec_by_name(const std::string& name);

// The op's scalar: a host value, or (CUDA only) a pointer to a one-element device
// tensor that the kernel reads, so that no host sync is needed. A one-element
// tensor holding NaN gates the update off: the outputs are left untouched (on the
// host `skip`; on a device the kernel sees the NaN and returns). This is how an
// update is made conditional on a device-side flag without a host sync
// (skip_nonfinite in the wrappers).
struct ScalarArg {
  double value = 0.0;
  bool skip = false;
  const void* device_ptr = nullptr;
  c10::ScalarType device_dtype = c10::ScalarType::Float;
  bool on_device() const { return device_ptr != nullptr; }
};

// One pair as a kernel sees it: two flat arrays of numel elements in the same
// order. Raw pointers, not tensors: a call over thousands of tensors must not pay
// refcount traffic (the caller's tensors outlive the call).
struct PairView {
  void* out;
  const void* in;
  int64_t numel;
  c10::ScalarType out_dtype;
  c10::ScalarType in_dtype;
  void* aux = nullptr;  // compensated ops: the compensation, laid out like out
  int64_t index = 0;    // the pair's position in the caller's lists (plans reorder pairs)
};

// A slice [begin, end) of the elements of array `index` (a pair, a tensor's rows): the
// CPU kernels' unit of work (cpu/pairwise_cpu.h).
struct WorkItem {
  int64_t index, begin, end;
};

// The work of one call: the non-empty pairs, each dense with the same memory
// layout on both sides. Pairs passed in other layouts run on temporaries that
// finish() copies back into the user's tensors.
struct PairPlan : PlanTemporaries {
  std::vector<PairView> pairs;
  c10::Device device = c10::Device(c10::kCPU);
  ScalarArg scalar;
  // The CPU kernels' cut of the pairs into work items, made by the first kernel that runs
  // the plan and kept for the next (a plan reused across calls: call_plan.cpp).
  mutable std::vector<WorkItem> work_items;
  mutable std::vector<int64_t> work_starts;
};

// Validates everything (list lengths, devices, shapes, dtypes, overlap, the scalar)
// and raises ValueError/TypeError naming the list and index before touching data.
// With plan_layout=false (Meta/reference path) it only validates.
PairPlan prepare_pairs(const OpSpec& spec, at::TensorList outs, at::TensorList ins,
                       double scalar, bool plan_layout = true);
PairPlan prepare_pairs(const OpSpec& spec, at::TensorList outs, at::TensorList ins,
                       const at::Tensor& scalar, bool plan_layout = true);

// The scalar of a call alone, checked as prepare_pairs checks it (for a plan reused
// across calls: csrc/call_plan.cpp).
ScalarArg make_scalar(const OpSpec& spec, double scalar);
ScalarArg make_scalar(const OpSpec& spec, const at::Tensor& scalar, at::TensorList outs);

// The compensated ops: prepare_pairs for (avgs, xs), and comps checked against avgs
// (same dtype, shape, device and strides; both dense) and for overlap with
// everything; each planned pair gets its compensation as `aux`.
PairPlan prepare_compensated(const OpSpec& spec, at::TensorList avgs, at::TensorList comps,
                             at::TensorList xs, double scalar, bool plan_layout = true);
PairPlan prepare_compensated(const OpSpec& spec, at::TensorList avgs, at::TensorList comps,
                             at::TensorList xs, const at::Tensor& scalar, bool plan_layout = true);

// ema_stochastic_ (basis_ops.h: an op with its own signature, not a registry pair op):
// ema_'s lists and weight, with bfloat16 averages of float32 or bfloat16 weights.
namespace spec {
inline constexpr OpSpec ema_stochastic{"ema_stochastic_", "avgs", "xs", "weight", "",
                                       PairRule::kCast, ScalarRule::kFinite, true, false};
}
PairPlan prepare_ema_stochastic(at::TensorList avgs, at::TensorList xs, double weight,
                                bool plan_layout = true);

// ema_many_ (basis_ops.h): P exponential averages of the same weights from one read of
// them. avgs holds P * len(xs) tensors, profile after profile (avgs[p][i] = the flat
// avgs[p * len(xs) + i], the average of xs[i] in profile p), weights one EMA weight per
// profile. Each profile is validated as ema_ validates its lists (named avgs[p]), and no
// average may share memory with another profile's.
namespace spec {
inline constexpr OpSpec ema_many{"ema_many_", "avgs", "xs", "weights", "",
                                 PairRule::kAverage, ScalarRule::kFinite, true, false};
}

// The work of one ema_many_ call. `fused` holds the pairs whose P averages all have
// their weight's layout and one dtype, the usual case: each is run from one read of x,
// outs[k * profiles + p] being profile p's average of fused.pairs[k] (fused.pairs[k].out
// is profile 0's). The other pairs (some average needs a temporary, or the profiles'
// dtypes differ) run as ema_ per profile: separate[p].
struct ManyPlan : PlanTemporaries {
  int64_t profiles = 0;
  std::vector<double> weights;
  PairPlan fused;
  std::vector<void*> outs;
  std::vector<PairPlan> separate;
};

ManyPlan prepare_ema_many(at::TensorList avgs, at::TensorList xs, at::ArrayRef<double> weights,
                          bool plan_layout = true);

// window_push_ (basis_ops.h): sum <- sum + (x - slot), then slot <- x, for a sum of the
// last k samples kept beside a ring of them (LAWA). sums pair with xs as ema_'s averages
// do; a slot has its x's dtype and its sum's shape, device and strides (both dense).
// Each planned pair gets its slot as `aux`.
namespace spec {
inline constexpr OpSpec window_push{"window_push_", "sums", "xs", "", "", PairRule::kAverage,
                                    ScalarRule::kFinite, true, false};
}
PairPlan prepare_window_push(at::TensorList sums, at::TensorList slots, at::TensorList xs,
                             bool plan_layout = true);

// nonfinite_flag's input: tensors of supported dtypes on one device. Returns the
// (tensor, contiguous copy or itself) list to scan.
std::vector<at::Tensor> prepare_flag_inputs(at::TensorList xs);

// The two overloads every op registers (scalar as a float, or as a tensor), built
// from the op's spec and a backend's runner: validate and plan, then run.
template <const OpSpec& kSpec, void (*kRun)(PairPlan&)>
void entry_float(at::TensorList outs, at::TensorList ins, double scalar) {
  PairPlan plan = prepare_pairs(kSpec, outs, ins, scalar);
  kRun(plan);
  plan.finish();
}

template <const OpSpec& kSpec, void (*kRun)(PairPlan&)>
void entry_tensor(at::TensorList outs, at::TensorList ins, const at::Tensor& scalar) {
  PairPlan plan = prepare_pairs(kSpec, outs, ins, scalar);
  kRun(plan);
  plan.finish();
}

template <const OpSpec& kSpec, void (*kRun)(PairPlan&)>
void entry_compensated_float(at::TensorList avgs, at::TensorList comps, at::TensorList xs,
                             double scalar) {
  PairPlan plan = prepare_compensated(kSpec, avgs, comps, xs, scalar);
  kRun(plan);
  plan.finish();
}

template <const OpSpec& kSpec, void (*kRun)(PairPlan&)>
void entry_compensated_tensor(at::TensorList avgs, at::TensorList comps, at::TensorList xs,
                              const at::Tensor& scalar) {
  PairPlan plan = prepare_compensated(kSpec, avgs, comps, xs, scalar);
  kRun(plan);
  plan.finish();
}

}  // namespace wavg_ext
