// ema_: avg <- avg + weight * (x - avg) on CUDA.
#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

struct EmaOp {
  static constexpr bool kReadsOut = spec::ema.reads_out;  // the registry's
  template <typename T>
  __device__ static LerpFn<T> bind(double weight) {
    return make_lerp<T>(weight, /*copy=*/false);
  }
};

}  // namespace

void ema_cuda(PairPlan& plan) { launch_pairs<EmaOp>(plan); }

}  // namespace wavg_ext::cuda
