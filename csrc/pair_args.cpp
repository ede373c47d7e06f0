#include "pair_args.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include "cuda/emulation/routing.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>

namespace wavg_ext {

const OpSpec& spec_by_name(const std::string& name) {
  for (const OpSpec* s : kPairOpSpecs) {
    if (name == s->name) return *s;
  }
  TORCH_CHECK_VALUE(false, "wavg_ext: unknown op '", name, "'");
}

// Averages are the input's dtype, float32 for float16/bfloat16 inputs, or float64
// for any input (a float64 average does not stagnate where a float32 one would);
// assignments go either way between those.
bool pair_allowed(PairRule rule, c10::ScalarType out, c10::ScalarType in) {
  using c10::ScalarType;
  if (out == in || out == ScalarType::Double) return true;
  if (out == ScalarType::Float && is_reduced_dtype(in)) return true;
  return rule == PairRule::kCast && (in == ScalarType::Double ||
                                     (is_reduced_dtype(out) && in == ScalarType::Float));
}

namespace {

using c10::ScalarType;

std::string pair_rule_text(PairRule rule) {
  return rule == PairRule::kAverage
             ? "it must be float64, float32 (for a float16/bfloat16 input) or the same dtype "
               "as its input"
             : "the two must have the same dtype, or one must be float64, or one float32 and "
               "the other float16/bfloat16";
}

// Validates the lists. With a plan, it also records each non-empty pair that is
// dense with the same layout on both sides as a view (the usual case, done in the
// same pass) and returns the indices of the other pairs for plan_slow_pairs().
// `aux` (the compensated ops' comps or window_push_'s slots, named aux_name, checked
// against outs before) joins the overlap check as outputs, and each planned pair gets its
// aux pointer.
std::vector<size_t> validate_lists(const OpSpec& spec, at::TensorList outs, at::TensorList ins,
                                   PairPlan* plan, at::TensorList aux = {},
                                   const char* aux_name = "comps") {
  TORCH_CHECK_VALUE(outs.size() == ins.size(), spec.name, ": ", spec.out_name, " has ",
                    outs.size(), " tensors but ", spec.in_name, " has ", ins.size());
  TORCH_CHECK_VALUE(outs.size() < (size_t{1} << 31), spec.name, ": too many tensors");
  std::vector<size_t> slow;
  if (outs.empty()) return slow;
  check_tensor(spec.name, spec.out_name, 0, outs[0]);
  const c10::Device device = outs[0].device();
  if (plan) {
    plan->device = device;
    plan->pairs.reserve(outs.size());
  }
  // Meta tensors (torch.compile tracing) have no addresses to compare.
  const bool with_memory = device.type() != c10::DeviceType::Meta;
  std::vector<Span> spans;
  if (with_memory) spans.reserve(2 * outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& out = outs[i];
    const at::Tensor& in = ins[i];
    check_tensor(spec.name, spec.out_name, i, out);
    check_tensor(spec.name, spec.in_name, i, in);
    TORCH_CHECK_VALUE(out.device() == device, spec.name, ": ", spec.out_name, "[", i, "] is on ",
                      out.device(), " but ", spec.out_name, "[0] is on ", device,
                      "; all tensors of one call must be on one device");
    TORCH_CHECK_VALUE(in.device() == device, spec.name, ": ", spec.in_name, "[", i, "] is on ",
                      in.device(), " but ", spec.out_name, "[0] is on ", device,
                      "; all tensors of one call must be on one device");
    TORCH_CHECK_VALUE(out.sizes() == in.sizes(), spec.name, ": ", spec.out_name, "[", i,
                      "] has shape ", out.sizes(), " but ", spec.in_name, "[", i, "] has shape ",
                      in.sizes());
    TORCH_CHECK_TYPE(pair_allowed(spec.pair_rule, out.scalar_type(), in.scalar_type()),
                     spec.name, ": ", spec.out_name, "[", i, "] is ", out.scalar_type(), " but ",
                     spec.in_name, "[", i, "] is ", in.scalar_type(), ": ",
                     pair_rule_text(spec.pair_rule));
    if (!with_memory || out.numel() == 0) continue;
    const bool out_dense = out.is_non_overlapping_and_dense();
    TORCH_CHECK_VALUE(out_dense || at::has_internal_overlap(out) != at::MemOverlap::Yes,
                      spec.name, ": ", spec.out_name, "[", i,
                      "] has internally overlapping memory (e.g. an expanded tensor) and "
                      "cannot be written in place");
    const bool in_dense = in.is_non_overlapping_and_dense();
    void* out_data = out.data_ptr();  // mutable: un-shares copy-on-write storage
    const void* in_data = in.const_data_ptr();
    spans.push_back(span_of(out, out_data, out_dense, true, i, spec.out_name));
    spans.push_back(span_of(in, in_data, in_dense, false, i, spec.in_name));
    void* aux_data = nullptr;
    if (!aux.empty()) {
      aux_data = aux[i].data_ptr();
      spans.push_back(span_of(aux[i], aux_data, true, true, i, aux_name));
    }
    if (!plan) continue;
    if (out_dense && in_dense && same_layout(out, in)) {
      plan->pairs.push_back(
          {out_data, in_data, out.numel(), out.scalar_type(), in.scalar_type(), aux_data,
           static_cast<int64_t>(i)});
    } else {
      slow.push_back(i);
    }
  }
  if (with_memory) check_no_overlap(spec.name, spans);
  return slow;
}

void check_scalar_value(const OpSpec& spec, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), spec.name, ": ", spec.scalar_name, " must be finite, got ",
                    v);
  if (spec.scalar_rule == ScalarRule::kFiniteNonNegative) {
    TORCH_CHECK_VALUE(v >= 0, spec.name, ": ", spec.scalar_name, " must be >= 0, got ", v);
  }
}

ScalarArg scalar_from_tensor(const OpSpec& spec, const at::Tensor& t, at::TensorList outs) {
  TORCH_CHECK_TYPE(t.defined(), spec.name, ": ", spec.scalar_name, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.numel() == 1, spec.name, ": ", spec.scalar_name,
                    " must be a one-element tensor, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == ScalarType::Float || dt == ScalarType::Double || dt == ScalarType::Long ||
                       dt == ScalarType::Int,
                   spec.name, ": ", spec.scalar_name,
                   " tensor must be float32, float64, int64 or int32, got ", dt);
  ScalarArg s;
  // Under the CUDA emulation the CPU is the device: a CPU scalar is read by the kernel.
  const bool emulated = t.device().is_cpu() && cuda_emulation_on();
  if (t.device().is_cpu() && !emulated) {
    s.value = t.item<double>();  // a host read, no device sync
    s.skip = std::isnan(s.value);  // the gate: leave the outputs untouched
    if (!s.skip) check_scalar_value(spec, s.value);
    return s;
  }
  const bool same_device = !outs.empty() && t.device() == outs[0].device();
  TORCH_CHECK_VALUE(same_device || outs.empty(), spec.name, ": ", spec.scalar_name, " is on ",
                    t.device(), " but the tensors are on ",
                    outs.empty() ? c10::Device(c10::kCPU) : outs[0].device(),
                    "; pass it on the CPU or on the tensors' device");
  if (t.device().is_cuda() || emulated) {
    // Read by the kernel: not range-checked here, that would need a host sync.
    s.device_ptr = t.data_ptr();
    s.device_dtype = dt;
  }
  return s;
}


// Kernels see each pair as two flat arrays in the same element order. Pairs that
// are not both dense with the same strides run on temporaries instead.
void plan_slow_pairs(const OpSpec& spec, at::TensorList outs, at::TensorList ins,
                     const std::vector<size_t>& slow, PairPlan& plan, at::TensorList aux = {}) {
  for (size_t i : slow) {
    const at::Tensor& out = outs[i];
    const at::Tensor& in = ins[i];
    at::Tensor out_work = out;
    if (!out.is_non_overlapping_and_dense()) {
      out_work = spec.reads_out ? out.contiguous() : at::empty(out.sizes(), out.options());
      plan.writebacks.emplace_back(out, out_work);
    }
    at::Tensor in_work = in;
    if (!in.is_non_overlapping_and_dense() || !same_layout(out_work, in)) {
      in_work = at::empty_strided(out_work.sizes(), out_work.strides(), in.options());
      in_work.copy_(in);
      plan.temporaries.push_back(in_work);
    }
    // (with aux, outs are dense: check_comps / check_slots require it, so out_work is out)
    plan.pairs.push_back({out_work.data_ptr(), in_work.const_data_ptr(), out.numel(),
                          out.scalar_type(), in.scalar_type(),
                          aux.empty() ? nullptr : aux[i].data_ptr(), static_cast<int64_t>(i)});
  }
}

void set_scalar(const OpSpec& spec, double scalar, at::TensorList, PairPlan& plan) {
  check_scalar_value(spec, scalar);
  plan.scalar.value = scalar;
}

void set_scalar(const OpSpec& spec, const at::Tensor& scalar, at::TensorList outs, PairPlan& plan) {
  plan.scalar = scalar_from_tensor(spec, scalar, outs);
}

template <typename Scalar>
PairPlan prepare_impl(const OpSpec& spec, at::TensorList outs, at::TensorList ins, const Scalar& scalar,
                      bool layout, at::TensorList aux, const char* aux_name = "comps") {
  PairPlan plan;
  const auto slow = validate_lists(spec, outs, ins, layout ? &plan : nullptr, aux, aux_name);
  set_scalar(spec, scalar, outs, plan);
  if (plan.scalar.skip) {
    plan.pairs.clear();  // validated, nothing to do
    return plan;
  }
  if (layout) plan_slow_pairs(spec, outs, ins, slow, plan, aux);
  return plan;
}

}  // namespace

ScalarArg make_scalar(const OpSpec& spec, double scalar) {
  PairPlan plan;
  set_scalar(spec, scalar, {}, plan);
  return plan.scalar;
}

ScalarArg make_scalar(const OpSpec& spec, const at::Tensor& scalar, at::TensorList outs) {
  return scalar_from_tensor(spec, scalar, outs);
}

PairPlan prepare_pairs(const OpSpec& spec, at::TensorList outs, at::TensorList ins, double scalar,
                       bool layout) {
  return prepare_impl(spec, outs, ins, scalar, layout, {});
}

PairPlan prepare_pairs(const OpSpec& spec, at::TensorList outs, at::TensorList ins,
                       const at::Tensor& scalar, bool layout) {
  return prepare_impl(spec, outs, ins, scalar, layout, {});
}

namespace {

// A list written beside the outputs (the compensated ops' comps, window_push_'s slots),
// checked before prepare_pairs looks at (outs, ins): the same count, shape, device and
// strides as the outputs, both dense (the outputs must not need a temporary: the aux list
// is updated in place beside them); check_dtype(i) holds the list's own dtype rule.
template <typename CheckDtype>
void check_aux(const OpSpec& spec, at::TensorList outs, at::TensorList aux, const char* aux_name,
               const char* like, const CheckDtype& check_dtype) {
  TORCH_CHECK_VALUE(aux.size() == outs.size(), spec.name, ": ", aux_name, " has ", aux.size(),
                    " tensors but ", spec.out_name, " has ", outs.size());
  for (size_t i = 0; i < aux.size(); ++i) {
    const at::Tensor& a = outs[i];
    const at::Tensor& c = aux[i];
    check_tensor(spec.name, spec.out_name, i, a);
    check_tensor(spec.name, aux_name, i, c);
    check_dtype(i);
    TORCH_CHECK_VALUE(c.sizes() == a.sizes(), spec.name, ": ", aux_name, "[", i, "] has shape ", c.sizes(),
                      " but ", spec.out_name, "[", i, "] has shape ", a.sizes());
    TORCH_CHECK_VALUE(c.device() == a.device(), spec.name, ": ", aux_name, "[", i, "] is on ", c.device(),
                      " but ", spec.out_name, "[", i, "] is on ", a.device());
    // Meta tensors (torch.compile tracing, maybe with symbolic sizes) have no layout to check.
    if (a.device().type() == c10::DeviceType::Meta || a.numel() == 0) continue;
    TORCH_CHECK_VALUE(a.is_non_overlapping_and_dense() && c.is_non_overlapping_and_dense() &&
                          a.strides() == c.strides(),
                      spec.name, ": ", spec.out_name, "[", i, "] and ", aux_name, "[", i,
                      "] must be dense with the same strides (e.g. ", aux_name, "[i] = ", like, ")");
  }
}

// comps against avgs: a compensation has its average's dtype.
void check_comps(const OpSpec& spec, at::TensorList avgs, at::TensorList comps) {
  check_aux(spec, avgs, comps, "comps", "torch.zeros_like(avgs[i])", [&](size_t i) {
    TORCH_CHECK_TYPE(comps[i].scalar_type() == avgs[i].scalar_type(), spec.name, ": comps[", i, "] is ",
                     comps[i].scalar_type(), " but avgs[", i, "] is ", avgs[i].scalar_type(),
                     "; a compensation has its average's dtype");
  });
}

template <typename Scalar>
PairPlan prepare_compensated_impl(const OpSpec& spec, at::TensorList avgs, at::TensorList comps,
                                  at::TensorList xs, const Scalar& scalar, bool layout) {
  check_comps(spec, avgs, comps);
  return prepare_impl(spec, avgs, xs, scalar, layout, comps);
}

}  // namespace

PairPlan prepare_compensated(const OpSpec& spec, at::TensorList avgs, at::TensorList comps,
                             at::TensorList xs, double scalar, bool layout) {
  return prepare_compensated_impl(spec, avgs, comps, xs, scalar, layout);
}

PairPlan prepare_compensated(const OpSpec& spec, at::TensorList avgs, at::TensorList comps,
                             at::TensorList xs, const at::Tensor& scalar, bool layout) {
  return prepare_compensated_impl(spec, avgs, comps, xs, scalar, layout);
}

PairPlan prepare_ema_stochastic(at::TensorList avgs, at::TensorList xs, double weight,
                                bool plan_layout) {
  const OpSpec& spec = spec::ema_stochastic;
  // Its own dtype rule first, so that a wrong dtype is named as such.
  for (size_t i = 0; i < std::min(avgs.size(), xs.size()); ++i) {
    if (!avgs[i].defined() || !xs[i].defined()) continue;  // (prepare_pairs names these)
    const ScalarType a = avgs[i].scalar_type(), x = xs[i].scalar_type();
    TORCH_CHECK_TYPE(a == ScalarType::BFloat16, spec.name, ": avgs[", i, "] is ", a,
                     "; stochastic rounding makes bfloat16 averages (use ema_ for other dtypes)");
    TORCH_CHECK_TYPE(x == ScalarType::BFloat16 || x == ScalarType::Float, spec.name, ": xs[", i,
                     "] is ", x, "; the weights of a bfloat16 average must be bfloat16 or float32");
  }
  return prepare_pairs(spec, avgs, xs, weight, plan_layout);
}

ManyPlan prepare_ema_many(at::TensorList avgs, at::TensorList xs, at::ArrayRef<double> weights,
                          bool plan_layout) {
  const OpSpec& spec = spec::ema_many;
  const size_t profiles = weights.size();
  TORCH_CHECK_VALUE(profiles > 0, spec.name, ": weights is empty; pass one EMA weight per profile");
  for (size_t p = 0; p < profiles; ++p) {
    TORCH_CHECK_VALUE(std::isfinite(weights[p]), spec.name, ": weights[", p, "] must be finite, got ",
                      weights[p]);
  }
  const size_t n = xs.size();
  TORCH_CHECK_VALUE(avgs.size() == profiles * n, spec.name, ": avgs has ", avgs.size(),
                    " tensors but there are ", profiles, " weights and ", n,
                    " tensors in xs: pass one average per tensor of xs for every profile (",
                    profiles * n, "), profile after profile");
  ManyPlan many;
  many.profiles = static_cast<int64_t>(profiles);
  many.weights.assign(weights.begin(), weights.end());
  // Each profile as ema_ checks it, its list named avgs[p] (names outlive the checks).
  std::vector<std::string> names(profiles);
  std::vector<OpSpec> specs(profiles, spec);
  std::vector<PairPlan> plans;
  plans.reserve(profiles);
  for (size_t p = 0; p < profiles; ++p) {
    names[p] = "avgs[" + std::to_string(p) + "]";
    specs[p].out_name = names[p].c_str();
    plans.push_back(prepare_pairs(specs[p], avgs.slice(p * n, n), xs, weights[p], plan_layout));
  }
  // ... and no two profiles' averages share memory (each profile's own were checked).
  if (profiles > 1 && n > 0 && avgs[0].device().type() != c10::DeviceType::Meta) {
    std::vector<Span> spans;
    spans.reserve(avgs.size());
    for (size_t p = 0; p < profiles; ++p) {
      for (size_t i = 0; i < n; ++i) {
        const at::Tensor& a = avgs[p * n + i];
        if (a.numel() == 0) continue;
        spans.push_back(span_of(a, a.const_data_ptr(), a.is_non_overlapping_and_dense(), true, i,
                                names[p].c_str()));
      }
    }
    check_no_overlap(spec.name, spans);
  }
  if (!plan_layout) return many;
  // Fuse pair i when every profile runs it on the same x (no temporary of it) with one
  // average dtype; positions[p][i]: where profile p's plan holds pair i.
  std::vector<std::vector<int64_t>> positions(profiles, std::vector<int64_t>(n, -1));
  for (size_t p = 0; p < profiles; ++p) {
    for (size_t k = 0; k < plans[p].pairs.size(); ++k) positions[p][plans[p].pairs[k].index] = k;
  }
  many.fused.device = plans[0].device;
  many.fused.scalar.value = weights[0];
  many.separate.resize(profiles);
  for (size_t p = 0; p < profiles; ++p) {
    many.separate[p].device = plans[p].device;
    many.separate[p].scalar = plans[p].scalar;
  }
  for (const PairView& first : plans[0].pairs) {
    bool fuse = true;
    for (size_t p = 1; p < profiles && fuse; ++p) {
      const PairView& v = plans[p].pairs[positions[p][first.index]];
      fuse = v.in == first.in && v.out_dtype == first.out_dtype;
    }
    if (fuse) {
      many.fused.pairs.push_back(first);
      for (size_t p = 0; p < profiles; ++p) {
        many.outs.push_back(plans[p].pairs[positions[p][first.index]].out);
      }
    } else {
      for (size_t p = 0; p < profiles; ++p) {
        many.separate[p].pairs.push_back(plans[p].pairs[positions[p][first.index]]);
      }
    }
  }
  // The plans' temporaries live, and their results are written back, with this plan.
  for (PairPlan& plan : plans) {
    for (at::Tensor& t : plan.temporaries) many.temporaries.push_back(std::move(t));
    for (auto& w : plan.writebacks) many.writebacks.push_back(std::move(w));
  }
  return many;
}

namespace {

// window_push_'s slots against its sums and xs: a slot holds a sample (xs' dtype) beside
// its sum.
void check_slots(at::TensorList sums, at::TensorList slots, at::TensorList xs) {
  check_aux(spec::window_push, sums, slots, "slots", "torch.zeros_like(sums[i], dtype=xs[i].dtype)",
            [&](size_t i) {
              if (i >= xs.size() || !xs[i].defined()) return;  // (prepare_pairs names these)
              TORCH_CHECK_TYPE(slots[i].scalar_type() == xs[i].scalar_type(), spec::window_push.name,
                               ": slots[", i, "] is ", slots[i].scalar_type(), " but xs[", i, "] is ",
                               xs[i].scalar_type(), "; a slot holds a sample in its own dtype");
            });
}

}  // namespace

PairPlan prepare_window_push(at::TensorList sums, at::TensorList slots, at::TensorList xs,
                             bool plan_layout) {
  check_slots(sums, slots, xs);
  return prepare_impl(spec::window_push, sums, xs, 1.0, plan_layout, slots, "slots");
}

std::vector<at::Tensor> prepare_flag_inputs(at::TensorList xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    check_tensor("nonfinite_flag", "xs", i, xs[i]);
    TORCH_CHECK_VALUE(xs[i].device() == xs[0].device(), "nonfinite_flag: xs[", i, "] is on ",
                      xs[i].device(), " but xs[0] is on ", xs[0].device(),
                      "; all tensors of one call must be on one device");
    out.push_back(xs[i].is_non_overlapping_and_dense() ? xs[i] : xs[i].contiguous());
  }
  return out;
}

}  // namespace wavg_ext
