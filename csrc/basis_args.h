// Validation and layout planning for the basis ops (dots, combine_, project_,
// orthonormalize_ and the batch orthonormalization), shared by every backend.
//
// A basis is a list with one tensor per parameter, of shape [capacity, *shape]:
// row i of every tensor together is one vector of the whole model. Its rows must
// be consecutive dense blocks (stride(0) == numel of a row), in any dense layout;
// wavg_ext.ops.new_basis makes rows laid out like the parameters.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <utility>
#include <vector>

#include "tensor_checks.h"

namespace wavg_ext {

// `rows` consecutive rows of one tensor, row r at data + r * row_stride elements.
struct RowBlock {
  void* data;
  int64_t row_stride;
  c10::ScalarType dtype;
};

// One tensor's share of a row operation: rows a (basis rows) and rows y (a
// partner list such as xs or grads, one row, or other rows of the same basis),
// each row numel elements in the same element order.
struct RowTask {
  RowBlock a;
  RowBlock y;
  int64_t numel;
};

// The work of one call: every non-empty tensor's task, with na rows on the a side
// and ny on the y side. Partners in another layout than the basis rows run on
// temporaries that finish() copies back into the user's tensors.
struct RowPlan : PlanTemporaries {
  std::vector<RowTask> tasks;
  int64_t na = 0;
  int64_t ny = 1;
  c10::Device device = c10::Device(c10::kCPU);
};

// dots(basis, xs, k): a = basis rows [0, k), y = xs.
RowPlan plan_dots(at::TensorList basis, at::TensorList xs, int64_t k, bool plan_layout = true);

// combine_(outs, basis, coeffs, alpha, beta): a = basis rows [0, k), y = outs (written),
// k = coeffs.numel(). Also validates coeffs, alpha and beta.
RowPlan plan_combine(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                     double alpha, double beta, bool plan_layout = true);

// project_(grads, basis, k): a = basis rows [0, k), y = grads (read, then written).
RowPlan plan_project(at::TensorList grads, at::TensorList basis, int64_t k,
                     bool plan_layout = true);

// Validates orthonormalize_(basis, k, passes); returns the capacity (0 for an empty list).
int64_t check_orthonormalize(at::TensorList basis, int64_t k, int64_t passes);

// Validates a basis on its own (the batch path): returns the capacity.
int64_t check_basis(const char* op, at::TensorList basis);

// Rows of an already validated basis: a = rows [a_first, a_first + na), y = rows
// [y_first, y_first + ny) of the same tensors. For the composite algorithms.
RowPlan plan_basis_rows(at::TensorList basis, int64_t a_first, int64_t na, int64_t y_first,
                        int64_t ny);

// dtype of dots' and orthonormalize_'s results: float64 if the basis has a float64
// tensor (float64 arithmetic), else float32.
c10::ScalarType basis_result_dtype(at::TensorList basis);

// The coefficients of combine_ as float64 values on the host (reads a device tensor).
std::vector<double> host_coefficients(const at::Tensor& coeffs);

}  // namespace wavg_ext
