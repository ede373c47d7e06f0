// running_mean_compensated_ / ema_compensated_ on CPU, and nonfinite_flag.
//
// A compensated average is the pair (avg, comp) of avg's dtype T whose value is
// avg + comp. Each update runs in float64: s = avg + comp (exact: comp is below
// half an ulp of avg), v = s + w * (x - s) (v = x for running_mean_'s count 0),
// then avg = T(v), the nearest T, and comp = T(v - avg). A float32 pair carries
// about 48 bits, so an average whose per-update change is far below float32's ulp
// (EMA decay 0.99999, 10^7 SWA samples) keeps moving where a plain one stagnates.
#include <ATen/ops/scalar_tensor.h>

#include <atomic>
#include <cmath>

#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {
namespace {

template <typename T, typename in_t>
void compensated_range(T* avg, T* comp, const in_t* x, int64_t n, double w, bool copy) {
  using IO = VecIO<T, double>;
  using XIO = VecIO<in_t, double>;
  using Vec = at::vec::Vectorized<double>;
  constexpr int64_t kStep = IO::kStep;
  const Vec wv(w);
  auto block = [&](T* a, T* c, const in_t* xp) {
    Vec a0, a1, c0, c1, x0, x1, v0, v1;
    XIO::load(xp, x0, x1);
    if (copy) {
      v0 = x0;
      v1 = x1;
    } else {
      IO::load(a, a0, a1);
      IO::load(c, c0, c1);
      const Vec s0 = a0 + c0, s1 = a1 + c1;
      v0 = at::vec::fmadd(wv, x0 - s0, s0);
      v1 = at::vec::fmadd(wv, x1 - s1, s1);
    }
    IO::store(a, v0, v1);
    IO::load(a, a0, a1);  // the rounded average, back in float64
    IO::store(c, v0 - a0, v1 - a1);
  };
  run_blocks3<kStep>(avg, comp, x, n, block);
}

void apply_compensated(const PairPlan& plan, double w, bool copy) {
  for_pair_items(plan, [&](const PairView& pair, int64_t begin, int64_t end) {
    dispatch_pair(pair.out_dtype, pair.in_dtype, [&](auto o, auto x) {
      using out_t = decltype(o);
      using in_t = decltype(x);
      compensated_range(static_cast<out_t*>(pair.out) + begin, static_cast<out_t*>(pair.aux) + begin,
                        static_cast<const in_t*>(pair.in) + begin, end - begin, w, copy);
    });
  });
}

}  // namespace

void running_mean_compensated_cpu(PairPlan& plan) {
  const double count = plan.scalar.value;
  apply_compensated(plan, 1.0 / (count + 1.0), count == 0.0);
}

void ema_compensated_cpu(PairPlan& plan) { apply_compensated(plan, plan.scalar.value, false); }

namespace {

// Whether any of n elements is NaN or +-inf: x * 0 is NaN exactly for those, and a
// NaN lane survives the sum.
template <typename T>
bool any_nonfinite(const T* p, int64_t n) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  using opmath_t = at::opmath_type<T>;
  const Vec zero(opmath_t(0));
  Vec acc(opmath_t(0)), x0, x1;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    IO::load(p + i, x0, x1);
    acc = acc + x0 * zero + x1 * zero;
  }
  alignas(64) opmath_t lanes[Vec::size()];
  acc.store(lanes);
  for (int64_t l = 0; l < Vec::size(); ++l) {
    if (lanes[l] != lanes[l]) return true;
  }
  for (; i < n; ++i) {
    if (!std::isfinite(static_cast<opmath_t>(p[i]))) return true;
  }
  return false;
}

}  // namespace

at::Tensor nonfinite_flag_cpu(at::TensorList xs) {
  const std::vector<at::Tensor> ts = prepare_flag_inputs(xs);
  std::vector<WorkItem> items;
  std::vector<int64_t> starts;
  cut_items(ts.size(), [&](size_t t) { return ts[t].numel(); }, kItemElements, items, starts);
  std::atomic<bool> found{false};  // only ever set to true: the result does not depend on order
  for_items(starts, 1, kMinParallelElements, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last && !found.load(std::memory_order_relaxed); ++k) {
      const WorkItem& it = items[k];
      const at::Tensor& t = ts[it.index];
      bool bad = false;
      switch (t.scalar_type()) {
        case c10::ScalarType::Float:
          bad = any_nonfinite(t.const_data_ptr<float>() + it.begin, it.end - it.begin);
          break;
        case c10::ScalarType::Double:
          bad = any_nonfinite(t.const_data_ptr<double>() + it.begin, it.end - it.begin);
          break;
        case c10::ScalarType::Half:
          bad = any_nonfinite(t.const_data_ptr<c10::Half>() + it.begin, it.end - it.begin);
          break;
        case c10::ScalarType::BFloat16:
          bad = any_nonfinite(t.const_data_ptr<c10::BFloat16>() + it.begin, it.end - it.begin);
          break;
        default:
          TORCH_CHECK(false, "nonfinite_flag: unsupported dtype ", t.scalar_type());  // validated
      }
      if (bad) found.store(true, std::memory_order_relaxed);
    }
  });
  return at::scalar_tensor(found.load() ? 1 : 0, at::TensorOptions().dtype(at::kInt));
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
