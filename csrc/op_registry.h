// The op registry: every list op of wavg_ext in one table. Schemas, OpSpecs, the
// Meta/Autograd/fallback registrations, each backend's kernel registration and
// kernel table, the Python fast path, the reference path's checks and
// wavg_ext._C.op_specs() (which wavg_ext.ops, the reference path and the tests read)
// are all generated from these lists.
//
// Adding a pair op `foo_` (out <- f(out, in, scalar) element-wise) takes five places:
//   1. a line here,
//   2. its CPU math: csrc/cpu/foo_cpu.cpp defines cpu::<ISA>::foo_cpu(PairPlan&),
//   3. its CUDA math: csrc/cuda/foo.cu defines cuda::foo_cuda(PairPlan&),
//   4. its reference: wavg_ext/ops/reference.py defines foo_ (the docstring is the op's),
//   5. its test file: tests/test_foo.py.
// A basis op is one traits struct in basis_ops.h (its CPU and CUDA math is written
// once over the row backends in basis_composite.h), its reference and its test.
//
// Light on purpose (no includes): the CUDA sources and the per-ISA CPU sources
// include it too.
#pragma once

// Pair ops: out <- f(out, in, scalar) for every (out, in) pair of two tensor lists.
// X(id, out list, in list, scalar, scalar default ("" for none), PairRule, ScalarRule,
//   reads_out)
// The op's name is id with a trailing underscore (in-place), e.g. ema -> "ema_".
#define WAVG_EXT_PAIR_OPS(X)                                                              \
  X(running_mean, "avgs", "xs", "count", "", kAverage, kFiniteNonNegative, true)           \
  X(ema, "avgs", "xs", "weight", "", kAverage, kFinite, true)                              \
  X(accumulate, "sums", "xs", "alpha", "1.0", kAverage, kFinite, true)                     \
  X(scale_copy, "dsts", "srcs", "scale", "1.0", kCast, kFinite, false)

// Compensated pair ops: (avgs, comps, xs, scalar), the average's value is avg + comp
// (see cpu/compensated_cpu.cpp). Same columns; the comps list sits between the two.
#define WAVG_EXT_COMPENSATED_OPS(X)                                                       \
  X(running_mean_compensated, "avgs", "xs", "count", "", kAverage, kFiniteNonNegative, true) \
  X(ema_compensated, "avgs", "xs", "weight", "", kAverage, kFinite, true)

// Both kinds, for what is the same for them (OpSpecs, names).
#define WAVG_EXT_ALL_PAIR_OPS(X) WAVG_EXT_PAIR_OPS(X) WAVG_EXT_COMPENSATED_OPS(X)
