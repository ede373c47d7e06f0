// scale_copy_: dst <- scale * src (cast to dst's dtype) on CUDA; dst is not read.
#include "ops_cuda.h"
#include "pairwise.cuh"

namespace wavg_ext::cuda {
namespace {

template <typename T>
struct ScaleFn {
  T scale;
  __device__ __forceinline__ T operator()(T, T x) const { return scale * x; }
};

struct ScaleCopyOp {
  static constexpr bool kReadsOut = spec::scale_copy.reads_out;  // the registry's
  template <typename T>
  __device__ static ScaleFn<T> bind(double scale) {
    return {static_cast<T>(scale)};
  }
};

}  // namespace

void scale_copy_cuda(PairPlan& plan) { launch_pairs<ScaleCopyOp>(plan); }

}  // namespace wavg_ext::cuda
