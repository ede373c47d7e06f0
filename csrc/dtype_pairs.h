// The (out dtype, in dtype) pairs of the averaging ops as C++ types, for every
// backend (CPU engine, CUDA launchers). pair_args.cpp's pair_allowed() decides which
// pairs a call may have; this maps the admitted ones to types. Light headers only:
// it compiles under nvcc against torch's CPU wheel too.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace wavg_ext {

// Calls f(out_t{}, in_t{}) for an admitted dtype pair.
template <typename F>
void dispatch_pair(c10::ScalarType out, c10::ScalarType in, const F& f) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  if (out == in) {
    switch (out) {
      case ScalarType::Float: return f(float{}, float{});
      case ScalarType::Double: return f(double{}, double{});
      case ScalarType::Half: return f(Half{}, Half{});
      case ScalarType::BFloat16: return f(BFloat16{}, BFloat16{});
      default: break;
    }
  } else if (out == ScalarType::Float) {
    if (in == ScalarType::Half) return f(float{}, Half{});
    if (in == ScalarType::BFloat16) return f(float{}, BFloat16{});
    if (in == ScalarType::Double) return f(float{}, double{});
  } else if (out == ScalarType::Double) {  // float64 averages of narrower tensors
    if (in == ScalarType::Float) return f(double{}, float{});
    if (in == ScalarType::Half) return f(double{}, Half{});
    if (in == ScalarType::BFloat16) return f(double{}, BFloat16{});
  }
  if (in == ScalarType::Float) {
    if (out == ScalarType::Half) return f(Half{}, float{});
    if (out == ScalarType::BFloat16) return f(BFloat16{}, float{});
  } else if (in == ScalarType::Double) {  // assigning float64 averages
    if (out == ScalarType::Half) return f(Half{}, double{});
    if (out == ScalarType::BFloat16) return f(BFloat16{}, double{});
  }
  TORCH_CHECK(false, "wavg_ext: unsupported dtype pair ", out, " / ", in);  // validated earlier
}

// Whether (out_t, in_t) can be an average of in_t (PairRule::kAverage): the pairs a
// read-modify-write op gets. The other admitted pairs only assign (PairRule::kCast), so
// a CUDA launcher need not compile a read-modify-write kernel for them.
template <typename out_t, typename in_t>
inline constexpr bool kAveragePair =
    std::is_same_v<out_t, in_t> || std::is_same_v<out_t, double> ||
    (std::is_same_v<out_t, float> &&
     (std::is_same_v<in_t, c10::Half> || std::is_same_v<in_t, c10::BFloat16>));

// The arithmetic type of a pair: double when either side is float64 (a float64
// average of float32/bfloat16 weights, or assigning one), float otherwise.
template <typename A, typename B>
using pair_opmath_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>,
                                         double, float>;

}  // namespace wavg_ext
