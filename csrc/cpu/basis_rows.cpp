// The batch orthonormalization's two CPU building blocks, for Python
// (wavg_ext.ops.orthonormalize_many_): the row engine's kernels (rows_cpu.cpp, the
// selected ISA's) on rows of one validated basis.
#include <ATen/ops/zeros.h>

#include <cmath>

#include "../python_args.h"
#include "../basis_args.h"
#include "kernel_table.h"

namespace wavg_ext::cpu {
namespace {

// The batch orthonormalization's two CPU building blocks (wavg_ext.ops.orthonormalize_many_):
// the Gram block <rows a, rows y> and the row update y <- beta*y + m @ a, on rows of
// one validated basis.
void check_row_range(const char* op, const char* what, int64_t first, int64_t count,
                     int64_t capacity) {
  TORCH_CHECK_VALUE(first >= 0 && count >= 0 && first + count <= capacity, op, ": ", what,
                    " rows [", first, ", ", first + count, ") are outside the basis (capacity ",
                    capacity, ")");
}
// Validates a CPU basis and the two row ranges; plans rows a and rows y.
RowPlan plan_cpu_rows(const char* op, at::TensorList basis, int64_t a_first, int64_t na,
                      int64_t y_first, int64_t ny) {
  for (size_t i = 0; i < basis.size(); ++i) {
    TORCH_CHECK_VALUE(basis[i].device().is_cpu(), op, ": basis[", i,
                      "] is not on the CPU (this entry is the CPU kernel)");
  }
  const int64_t capacity = check_basis(op, basis);
  check_row_range(op, "a", a_first, na, capacity);
  check_row_range(op, "y", y_first, ny, capacity);
  return plan_basis_rows(basis, a_first, na, y_first, ny);
}
at::Tensor basis_gram(pybind11::handle basis_py, int64_t a_first, int64_t na, int64_t y_first,
                      int64_t ny) {
  const char* op = "basis_gram";
  BorrowedTensors b(op, "basis", basis_py);
  const RowPlan plan = plan_cpu_rows(op, b.list(), a_first, na, y_first, ny);
  at::Tensor out = at::zeros({na, ny}, at::TensorOptions().dtype(at::kDouble));
  kernels().rows_dot(plan, a_first == y_first && na == ny, out.data_ptr<double>());
  return out;
}
void basis_mix_(pybind11::handle basis_py, int64_t y_first, int64_t ny, int64_t a_first,
                int64_t na, const at::Tensor& m, double beta) {
  const char* op = "basis_mix_";
  BorrowedTensors b(op, "basis", basis_py);
  const RowPlan plan = plan_cpu_rows(op, b.list(), a_first, na, y_first, ny);
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == ny && m.size(1) == na, op, ": m must have shape [",
                    ny, ", ", na, "], got ", m.sizes());
  TORCH_CHECK_VALUE(std::isfinite(beta), op, ": beta must be finite, got ", beta);
  const std::vector<double> coef = host_coefficients(m.reshape({-1}));
  const bool alias = y_first < a_first + na && a_first < y_first + ny;
  kernels().rows_mix(plan, coef.data(), beta, alias);
  for (const at::Tensor& t : b.list()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

void bind_basis_rows(pybind11::module& m) {
  m.def("basis_gram", &basis_gram,
        "CPU: float64 [na, ny] inner products of basis rows [a_first, +na) and [y_first, +ny).");
  m.def("basis_mix_", &basis_mix_,
        "CPU: rows [y_first, +ny) <- beta * themselves + m @ rows [a_first, +na), in place.");
}

}  // namespace wavg_ext::cpu
