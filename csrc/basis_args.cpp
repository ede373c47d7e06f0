#include "basis_args.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace wavg_ext {

namespace {

using c10::ScalarType;

bool is_basis_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Double;
}

// float32/bfloat16 bases pair with float32/float16/bfloat16 tensors (arithmetic in
// float32); a float64 basis pairs with float64 tensors (arithmetic in float64).
bool partner_allowed(ScalarType basis, ScalarType x) {
  if (basis == ScalarType::Double) return x == ScalarType::Double;
  return x != ScalarType::Double;
}

int64_t row_numel(const at::Tensor& b) { return b.size(0) == 0 ? 0 : b.numel() / b.size(0); }

// What one call's lists are called and how the partner list is used.
struct BasisCall {
  const char* op;
  const char* basis_name;
  const char* x_name;  // nullptr: no partner list
  bool x_is_out;       // the partner list is written
  bool x_is_read;      // ... and read (project_, combine_ with beta != 0)
  bool basis_is_out;   // orthonormalize_
};

// Validates the basis (and the partner list, when the call has one) and returns the
// capacity (0 for empty lists). With a plan, records every non-empty tensor's task
// (rows [0, k) of the basis against its partner), through temporaries where the
// partner's layout differs from the basis rows'.
int64_t validate(const BasisCall& call, at::TensorList basis, at::TensorList xs, int64_t k,
                 RowPlan* plan) {
  const bool paired = call.x_name != nullptr;
  if (paired) {
    TORCH_CHECK_VALUE(basis.size() == xs.size(), call.op, ": ", call.basis_name, " has ",
                      basis.size(), " tensors but ", call.x_name, " has ", xs.size());
  }
  TORCH_CHECK_VALUE(basis.size() < (size_t{1} << 31), call.op, ": too many tensors");
  if (basis.empty()) return 0;
  check_tensor(call.op, call.basis_name, 0, basis[0]);
  const c10::Device device = basis[0].device();
  TORCH_CHECK_VALUE(basis[0].dim() >= 1, call.op, ": ", call.basis_name,
                    "[0] is 0-dimensional; a basis tensor has shape [capacity, *param.shape]");
  const int64_t capacity = basis[0].size(0);
  const bool with_memory = device.type() != c10::DeviceType::Meta;
  std::vector<Span> spans;
  if (with_memory) spans.reserve((paired ? 2 : 1) * basis.size());
  if (plan) {
    plan->device = device;
    plan->tasks.reserve(basis.size());
  }
  for (size_t i = 0; i < basis.size(); ++i) {
    const at::Tensor& b = basis[i];
    check_tensor(call.op, call.basis_name, i, b);
    TORCH_CHECK_TYPE(is_basis_dtype(b.scalar_type()), call.op, ": ", call.basis_name, "[", i,
                     "] has dtype ", b.scalar_type(),
                     "; a basis is float32, bfloat16 or float64");
    TORCH_CHECK_VALUE(b.device() == device, call.op, ": ", call.basis_name, "[", i, "] is on ",
                      b.device(), " but ", call.basis_name, "[0] is on ", device,
                      "; all tensors of one call must be on one device");
    TORCH_CHECK_VALUE(b.dim() >= 1 && b.size(0) == capacity, call.op, ": ", call.basis_name, "[",
                      i, "] has shape ", b.sizes(), " but ", call.basis_name,
                      "[0] has capacity ", capacity,
                      "; every basis tensor has shape [capacity, *param.shape] with one capacity");
    const int64_t n = row_numel(b);
    const bool rows_ok = b.numel() == 0 || (b.is_non_overlapping_and_dense() &&
                                            (b.size(0) == 1 || b.stride(0) == n));
    TORCH_CHECK_VALUE(rows_ok, call.op, ": ", call.basis_name, "[", i, "] (shape ", b.sizes(),
                      ", strides ", b.strides(),
                      ") must store its rows as consecutive dense blocks (stride(0) == numel of "
                      "a row); make bases with wavg_ext.ops.new_basis");
    void* b_data = nullptr;
    if (with_memory && b.numel() > 0) {
      b_data = call.basis_is_out ? b.data_ptr() : const_cast<void*>(b.const_data_ptr());
      spans.push_back(span_of(b, b_data, true, call.basis_is_out, i, call.basis_name));
    }
    if (!paired) continue;
    const at::Tensor& x = xs[i];
    check_tensor(call.op, call.x_name, i, x);
    TORCH_CHECK_VALUE(x.device() == device, call.op, ": ", call.x_name, "[", i, "] is on ",
                      x.device(), " but ", call.basis_name, "[0] is on ", device,
                      "; all tensors of one call must be on one device");
    TORCH_CHECK_VALUE(x.sizes() == b.sizes().slice(1), call.op, ": ", call.x_name, "[", i,
                      "] has shape ", x.sizes(), " but ", call.basis_name, "[", i,
                      "] has shape ", b.sizes(), " (rows of shape ", b.sizes().slice(1), ")");
    TORCH_CHECK_TYPE(partner_allowed(b.scalar_type(), x.scalar_type()), call.op, ": ",
                     call.basis_name, "[", i, "] is ", b.scalar_type(), " but ", call.x_name, "[",
                     i, "] is ", x.scalar_type(),
                     ": a float32/bfloat16 basis goes with float32, float16 or bfloat16 tensors, "
                     "a float64 basis with float64 tensors");
    if (!with_memory || x.numel() == 0) continue;
    const bool x_dense = x.is_non_overlapping_and_dense();
    void* x_data = call.x_is_out ? x.data_ptr() : const_cast<void*>(x.const_data_ptr());
    if (call.x_is_out) {
      TORCH_CHECK_VALUE(x_dense || at::has_internal_overlap(x) != at::MemOverlap::Yes, call.op,
                        ": ", call.x_name, "[", i,
                        "] has internally overlapping memory (e.g. an expanded tensor) and "
                        "cannot be written in place");
    }
    spans.push_back(span_of(x, x_data, x_dense, call.x_is_out, i, call.x_name));
    if (!plan) continue;
    RowBlock a{b_data, n, b.scalar_type()};
    if (x_dense && same_element_order(x.sizes(), x.strides(), b.strides().slice(1))) {
      plan->tasks.push_back({a, {x_data, n, x.scalar_type()}, n});
      continue;
    }
    // Another element order than the basis rows: work on a copy laid out like a row.
    at::Tensor work = at::empty_strided(x.sizes(), b.strides().slice(1), x.options());
    if (!call.x_is_out || call.x_is_read) work.copy_(x);
    if (call.x_is_out) {
      plan->writebacks.emplace_back(x, work);
    } else {
      plan->temporaries.push_back(work);
    }
    plan->tasks.push_back({a, {work.data_ptr(), n, x.scalar_type()}, n});
  }
  if (with_memory) check_no_overlap(call.op, spans);
  if (plan) plan->na = k;
  return capacity;
}

void check_k(const char* op, int64_t k, int64_t capacity, bool empty) {
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1 (the number of basis rows to use), got ", k);
  TORCH_CHECK_VALUE(empty || k <= capacity, op, ": k=", k, " exceeds the basis capacity ",
                    capacity);
}

// dots and project_: rows [0, k) of the basis against a partner list, k in [1, capacity].
RowPlan plan_first_rows(const BasisCall& call, at::TensorList basis, at::TensorList xs, int64_t k,
                        bool plan_layout) {
  RowPlan plan;
  const int64_t capacity = validate(call, basis, xs, k, plan_layout ? &plan : nullptr);
  check_k(call.op, k, capacity, basis.empty());
  plan.na = k;
  return plan;
}

}  // namespace

RowPlan plan_dots(at::TensorList basis, at::TensorList xs, int64_t k, bool plan_layout) {
  return plan_first_rows({"dots", "basis", "xs", false, false, false}, basis, xs, k, plan_layout);
}

RowPlan plan_combine(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                     double alpha, double beta, bool plan_layout) {
  const char* op = "combine_";
  TORCH_CHECK_TYPE(coeffs.defined(), op, ": coeffs is an undefined tensor");
  TORCH_CHECK_VALUE(coeffs.dim() == 1, op, ": coeffs must be a 1-D tensor of k coefficients, got "
                    "shape ", coeffs.sizes());
  TORCH_CHECK_TYPE(coeffs.scalar_type() == ScalarType::Float ||
                       coeffs.scalar_type() == ScalarType::Double,
                   op, ": coeffs must be float32 or float64, got ", coeffs.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(beta), op, ": beta must be finite, got ", beta);
  if (!basis.empty()) {
    const c10::Device device = basis[0].device();
    TORCH_CHECK_VALUE(coeffs.device().is_cpu() || coeffs.device() == device, op,
                      ": coeffs is on ", coeffs.device(), " but the basis is on ", device,
                      "; pass it on the CPU or on the basis' device");
  }
  RowPlan plan;
  const BasisCall call{op, "basis", "outs", true, beta != 0.0, false};
  const int64_t k = coeffs.numel();
  const int64_t capacity = validate(call, basis, outs, k, plan_layout ? &plan : nullptr);
  TORCH_CHECK_VALUE(k >= 1, op, ": coeffs is empty; it needs k >= 1 coefficients");
  TORCH_CHECK_VALUE(basis.empty() || k <= capacity, op, ": coeffs has ", k,
                    " coefficients but the basis capacity is ", capacity);
  plan.na = k;
  return plan;
}

RowPlan plan_project(at::TensorList grads, at::TensorList basis, int64_t k, bool plan_layout) {
  return plan_first_rows({"project_", "basis", "grads", true, true, false}, basis, grads, k,
                         plan_layout);
}

int64_t check_basis(const char* op, at::TensorList basis) {
  const BasisCall call{op, "basis", nullptr, false, false, true};
  return validate(call, basis, {}, 0, nullptr);
}

int64_t check_orthonormalize(at::TensorList basis, int64_t k, int64_t passes) {
  const char* op = "orthonormalize_";
  const int64_t capacity = check_basis(op, basis);
  TORCH_CHECK_VALUE(passes >= 1 && passes <= 4, op,
                    ": passes must be 1 (classical Gram-Schmidt) to 4, got ", passes);
  TORCH_CHECK_VALUE(k >= 0, op, ": k (the row to orthonormalize) must be >= 0, got ", k);
  TORCH_CHECK_VALUE(basis.empty() || k < capacity, op, ": row k=", k,
                    " is outside the basis (capacity ", capacity, ")");
  return capacity;
}

RowPlan plan_basis_rows(at::TensorList basis, int64_t a_first, int64_t na, int64_t y_first,
                        int64_t ny) {
  RowPlan plan;
  plan.na = na;
  plan.ny = ny;
  if (basis.empty()) return plan;
  plan.device = basis[0].device();
  plan.tasks.reserve(basis.size());
  for (const at::Tensor& b : basis) {
    const int64_t n = row_numel(b);
    if (n == 0) continue;
    char* base = static_cast<char*>(b.data_ptr());
    const int64_t row_bytes = n * static_cast<int64_t>(b.element_size());
    plan.tasks.push_back({{base + a_first * row_bytes, n, b.scalar_type()},
                          {base + y_first * row_bytes, n, b.scalar_type()},
                          n});
  }
  return plan;
}

c10::ScalarType basis_result_dtype(at::TensorList basis) {
  for (const at::Tensor& b : basis) {
    if (b.scalar_type() == ScalarType::Double) return ScalarType::Double;
  }
  return ScalarType::Float;
}

std::vector<double> host_coefficients(const at::Tensor& coeffs) {
  const at::Tensor c = coeffs.to(c10::kCPU, ScalarType::Double).contiguous();
  const double* p = c.const_data_ptr<double>();
  return std::vector<double>(p, p + c.numel());
}

}  // namespace wavg_ext
