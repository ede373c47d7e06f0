// The basis ops written once over a backend's two row kernels, so the CPU and the
// CUDA builds run the same algorithms. A Backend provides
//   static at::Tensor dot(const RowPlan&, bool symmetric);   // float64 [na * ny], plan's device
//   static void mix(const RowPlan&, const at::Tensor& m, double alpha, double beta, bool alias);
// with the semantics of rows_dot / rows_mix_ in cpu/rows_cpu.cpp (m: float64 [ny * na],
// scaled by alpha).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>

#include "basis_args.h"

namespace wavg_ext {

template <typename Backend>
at::Tensor dots_impl(at::TensorList basis, at::TensorList xs, int64_t k) {
  RowPlan plan = plan_dots(basis, xs, k);
  at::Tensor c = Backend::dot(plan, /*symmetric=*/false);
  plan.finish();
  return c.to(basis_result_dtype(basis));
}

template <typename Backend>
void combine_impl(at::TensorList outs, at::TensorList basis, const at::Tensor& coeffs,
                  double alpha, double beta) {
  RowPlan plan = plan_combine(outs, basis, coeffs, alpha, beta);
  if (!plan.tasks.empty()) Backend::mix(plan, coeffs, alpha, beta, /*alias=*/false);
  plan.finish();
}

// g <- P P^T g: the k dots, then their combination (two passes over the rows).
template <typename Backend>
void project_impl(at::TensorList grads, at::TensorList basis, int64_t k) {
  RowPlan plan = plan_project(grads, basis, k);
  if (!plan.tasks.empty()) {
    const at::Tensor c = Backend::dot(plan, /*symmetric=*/false);
    Backend::mix(plan, c, 1.0, 0.0, /*alias=*/false);
  }
  plan.finish();
}

// Classical Gram-Schmidt of row k against rows < k, `passes` times (2: CGS2, which
// keeps the rows orthogonal to working precision), then normalization. Returns the
// norm before normalizing (float32, 0-dim, on the basis' device); a row whose norm
// is exactly 0 is left as zeros rather than divided by 0.
template <typename Backend>
at::Tensor orthonormalize_impl(at::TensorList basis, int64_t k, int64_t passes) {
  check_orthonormalize(basis, k, passes);
  if (k > 0) {
    const RowPlan against = plan_basis_rows(basis, 0, k, k, 1);
    for (int64_t p = 0; p < passes && !against.tasks.empty(); ++p) {
      const at::Tensor c = Backend::dot(against, /*symmetric=*/false);
      Backend::mix(against, c, -1.0, 1.0, /*alias=*/false);
    }
  }
  const RowPlan row = plan_basis_rows(basis, k, 1, k, 1);
  const at::Tensor norm = Backend::dot(row, /*symmetric=*/true).sqrt();
  if (!row.tasks.empty()) {
    // 1/norm on the device (no host sync); 0 for a zero row.
    const at::Tensor inv = at::where(at::gt(norm, 0), at::reciprocal(norm), at::zeros_like(norm));
    Backend::mix(row, inv, 1.0, 0.0, /*alias=*/true);
  }
  return norm.reshape({}).to(basis_result_dtype(basis));
}

}  // namespace wavg_ext
