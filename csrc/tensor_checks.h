// Checks shared by the pairwise ops (pair_args) and the basis ops (basis_args):
// supported dtypes, the memory spans of tensors, the no-overlap rule between
// outputs and everything else, and "same element order" between two tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace wavg_ext {

// True for float32/float16/bfloat16/float64: the dtypes the kernels support.
bool is_supported_dtype(c10::ScalarType t);
bool is_reduced_dtype(c10::ScalarType t);  // float16 or bfloat16

// Raises TypeError unless t is a defined, strided tensor of a supported dtype.
void check_tensor(const char* op, const char* list, size_t i, const at::Tensor& t);

// [first byte, one past the last byte) that a tensor's elements can touch.
struct Span {
  uintptr_t lo, hi;
  bool is_out;
  uint32_t index;
  const char* list;  // the argument's name, for the error message
};

// The span of t (data = its data pointer); dense tensors span numel elements.
Span span_of(const at::Tensor& t, const void* data, bool dense, bool is_out, size_t index,
             const char* list);

// No output may overlap another output or any input (inputs may overlap each
// other); raises ValueError naming both. O(n log n), O(n) when the spans come in
// the same order as in the previous call on this thread (a training loop).
void check_no_overlap(const char* op, const std::vector<Span>& spans);

// Whether a and b (same sizes) store their elements in the same order; the
// second form compares strides sa and sb of tensors of the given sizes.
bool same_layout(const at::Tensor& a, const at::Tensor& b);
bool same_element_order(at::IntArrayRef sizes, at::IntArrayRef sa, at::IntArrayRef sb);

// What a plan keeps besides its kernels' work (PairPlan, RowPlan): inputs copied into
// the kernels' layout, alive until finish(), and outputs computed on temporaries that
// finish() copies back into the user's tensors.
struct PlanTemporaries {
  std::vector<at::Tensor> temporaries;
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks;  // (user's tensor, temporary)
  void finish();
};

}  // namespace wavg_ext
