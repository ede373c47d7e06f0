// running_mean_: avg <- avg + (x - avg) / (count + 1) on CUDA; count 0 copies.
#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

struct RunningMeanOp {
  static constexpr bool kReadsOut = spec::running_mean.reads_out;  // the registry's
  // count may come from a device tensor, so the count-0 copy is decided here,
  // once per block, not on the host. 1/(count+1) is rounded once, from double,
  // exactly as on the CPU.
  template <typename T>
  __device__ static LerpFn<T> bind(double count) {
    return make_lerp<T>(1.0 / (count + 1.0), /*copy=*/count == 0.0);
  }
};

}  // namespace

void running_mean_cuda(PairPlan& plan) { launch_pairs<RunningMeanOp>(plan); }

}  // namespace wavg_ext::cuda
