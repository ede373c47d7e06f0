#include "tensor_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace wavg_ext {

bool is_supported_dtype(c10::ScalarType t) {
  using c10::ScalarType;
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 ||
         t == ScalarType::Double;
}

bool is_reduced_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

void check_tensor(const char* op, const char* list, size_t i, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", list, "[", i, "] is an undefined tensor");
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, op, ": ", list, "[", i, "] has layout ",
                   t.layout(), "; only strided (dense) tensors are supported");
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": ", list, "[", i, "] has dtype ",
                   t.scalar_type(), "; supported dtypes are float32, float16, bfloat16 and float64");
}

Span span_of(const at::Tensor& t, const void* data, bool dense, bool is_out, size_t index,
             const char* list) {
  int64_t extent = t.numel();  // elements spanned: numel for dense tensors
  if (!dense) {
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    extent = 1;
    for (size_t d = 0; d < sizes.size(); ++d) extent += (sizes[d] - 1) * strides[d];
  }
  auto base = reinterpret_cast<uintptr_t>(data);
  return {base, base + static_cast<uintptr_t>(extent * t.element_size()), is_out,
          static_cast<uint32_t>(index), list};
}

namespace {

// a and b are elements of one spans vector. Two outputs are named in a fixed order, lower
// index first and, at one index, the one pushed first: the sweep's order among equal starts
// depends on the cached sort order, and the message must not.
[[noreturn]] void overlap_error(const char* op, const Span& a, const Span& b) {
  if (a.is_out && b.is_out) {
    const bool a_first = a.index < b.index || (a.index == b.index && &a < &b);
    const Span& first = a_first ? a : b;
    const Span& second = a_first ? b : a;
    TORCH_CHECK_VALUE(false, op, ": ", first.list, "[", first.index, "] and ", second.list, "[",
                      second.index, "] share memory; every output must be a separate tensor");
  }
  const Span& in = a.is_out ? b : a;
  const Span& out = a.is_out ? a : b;
  TORCH_CHECK_VALUE(false, op, ": ", in.list, "[", in.index, "] shares memory with ", out.list,
                    "[", out.index, "]; an input may not overlap an output");
}

}  // namespace

// Sort the spans by start and sweep, tracking the furthest end seen. The sort
// order is cached per thread: a training loop passes the same tensors every
// step, so the cached order is usually still sorted and the check stays linear.
void check_no_overlap(const char* op, const std::vector<Span>& spans) {
  thread_local std::vector<uint32_t> order;
  auto sorted = [&] {
    if (order.size() != spans.size()) return false;
    for (size_t k = 1; k < order.size(); ++k) {
      if (spans[order[k - 1]].lo > spans[order[k]].lo) return false;
    }
    return true;
  };
  if (!sorted()) {
    order.resize(spans.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<uint32_t>(k);
    std::sort(order.begin(), order.end(),
              [&](uint32_t a, uint32_t b) { return spans[a].lo < spans[b].lo; });
  }
  const Span* furthest_any = nullptr;  // the span reaching furthest so far
  const Span* furthest_out = nullptr;  // the output span reaching furthest so far
  for (uint32_t k : order) {
    const Span& s = spans[k];
    if (s.is_out && furthest_any && s.lo < furthest_any->hi) overlap_error(op, s, *furthest_any);
    if (!s.is_out && furthest_out && s.lo < furthest_out->hi) overlap_error(op, s, *furthest_out);
    if (!furthest_any || s.hi > furthest_any->hi) furthest_any = &s;
    if (s.is_out && (!furthest_out || s.hi > furthest_out->hi)) furthest_out = &s;
  }
}

bool same_element_order(at::IntArrayRef sizes, at::IntArrayRef sa, at::IntArrayRef sb) {
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  return same_element_order(a.sizes(), a.strides(), b.strides());
}

void PlanTemporaries::finish() {
  for (auto& [dst, tmp] : writebacks) dst.copy_(tmp);
  writebacks.clear();
  temporaries.clear();
}

}  // namespace wavg_ext
