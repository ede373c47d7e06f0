// accumulate_: sum <- sum + alpha * x on CUDA.
#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

template <typename T>
struct AxpyFn {
  T alpha;
  __device__ __forceinline__ T operator()(T s, T x) const { return fma_op(alpha, x, s); }
};

struct AccumulateOp {
  static constexpr bool kReadsOut = spec::accumulate.reads_out;  // the registry's
  template <typename T>
  __device__ static AxpyFn<T> bind(double alpha) {
    return {static_cast<T>(alpha)};
  }
};

}  // namespace

void accumulate_cuda(PairPlan& plan) { launch_pairs<AccumulateOp>(plan); }

}  // namespace wavg_ext::cuda
