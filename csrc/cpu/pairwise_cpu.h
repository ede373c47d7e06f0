// The CPU engine of the elementwise pair ops: one flat work list of
// (pair, element range) items over all tensors, split evenly by element count
// across at::parallel_for threads, each item run with at::vec::Vectorized in the
// pair's opmath type (float for float32/float16/bfloat16, double for float64).
// Reduced-precision values are converted to float in registers.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dtype_pairs.h"
#include "../pair_args.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

// Moves 2 * Vectorized<opmath>::size() elements of T between memory and two
// opmath vectors (one Vectorized<T> for the 16-bit types into float; through a
// small buffer, converted element by element, for narrower types into double).
template <typename T, typename opmath_t = at::opmath_type<T>>
struct VecIO {
  using Vec = at::vec::Vectorized<opmath_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const T* p, Vec& lo, Vec& hi) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + Vec::size());
    } else if constexpr (std::is_same_v<opmath_t, float>) {
      auto both = at::vec::Vectorized<T>::loadu(p);
      std::tie(lo, hi) = at::vec::convert_to_float<T>(both);
    } else {
      alignas(64) opmath_t buf[kStep];
      for (int64_t i = 0; i < kStep; ++i) buf[i] = static_cast<opmath_t>(static_cast<float>(p[i]));
      lo = Vec::loadu(buf);
      hi = Vec::loadu(buf + Vec::size());
    }
  }
  static void store(T* p, const Vec& lo, const Vec& hi) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      lo.store(p);
      hi.store(p + Vec::size());
    } else if constexpr (std::is_same_v<opmath_t, float>) {
      at::vec::convert_from_float<T>(lo, hi).store(p);
    } else {
      // double -> T as torch's casts do it (16-bit types through float).
      alignas(64) opmath_t buf[kStep];
      lo.store(buf);
      hi.store(buf + Vec::size());
      for (int64_t i = 0; i < kStep; ++i) p[i] = static_cast<T>(buf[i]);
    }
  }
};

// Runs op on n elements. The tail goes through the same vector code via a small
// buffer, so every element gets identical arithmetic wherever it sits.
template <typename out_t, typename in_t, bool kReadsOut, typename Op>
void run_range(out_t* out, const in_t* in, int64_t n, const Op& op) {
  using opmath_t = pair_opmath_t<out_t, in_t>;
  using OutIO = VecIO<out_t, opmath_t>;
  using InIO = VecIO<in_t, opmath_t>;
  using Vec = typename OutIO::Vec;
  constexpr int64_t kStep = OutIO::kStep;
  Vec a0, a1, x0, x1;
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    InIO::load(in + i, x0, x1);
    if constexpr (kReadsOut) OutIO::load(out + i, a0, a1);
    OutIO::store(out + i, op(a0, x0), op(a1, x1));
  }
  if (i < n) {
    const int64_t rest = n - i;
    alignas(64) out_t obuf[kStep] = {};
    alignas(64) in_t ibuf[kStep] = {};
    std::memcpy(ibuf, in + i, rest * sizeof(in_t));
    if constexpr (kReadsOut) std::memcpy(obuf, out + i, rest * sizeof(out_t));
    InIO::load(ibuf, x0, x1);
    if constexpr (kReadsOut) OutIO::load(obuf, a0, a1);
    OutIO::store(obuf, op(a0, x0), op(a1, x1));
    std::memcpy(out + i, obuf, rest * sizeof(out_t));
  }
}

// Runs block(a, b, x) on n elements of two written arrays a, b and a read one x, kStep at
// a time; the tail goes through small zeroed buffers, so every element gets identical
// arithmetic wherever it sits (the three-list kernels: compensated ops, window_push_).
template <int64_t kStep, typename A, typename B, typename X, typename Block>
void run_blocks3(A* a, B* b, const X* x, int64_t n, const Block& block) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) block(a + i, b + i, x + i);
  if (i < n) {
    const int64_t rest = n - i;
    alignas(64) A abuf[kStep] = {};
    alignas(64) B bbuf[kStep] = {};
    alignas(64) X xbuf[kStep] = {};
    std::memcpy(abuf, a + i, rest * sizeof(A));
    std::memcpy(bbuf, b + i, rest * sizeof(B));
    std::memcpy(xbuf, x + i, rest * sizeof(X));
    block(abuf, bbuf, xbuf);
    std::memcpy(a + i, abuf, rest * sizeof(A));
    std::memcpy(b + i, bbuf, rest * sizeof(B));
  }
}

// Elements per work item: large enough to amortize the per-item dispatch, small
// enough that splitting items between threads balances well.
constexpr int64_t kItemElements = 32768;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelElements = 65536;


// Cuts `count` arrays of numel(i) elements into items of at most `item_elements`,
// in order; starts[k] = elements before item k, starts.back() = all elements. The cut
// does not depend on the thread count, so per-item results can be combined in item
// order into the same bits for any number of threads.
template <typename Numel>
void cut_items(size_t count, const Numel& numel, int64_t item_elements, std::vector<WorkItem>& items,
               std::vector<int64_t>& starts) {
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = numel(i);
    for (int64_t b = 0; b < n; b += item_elements) {
      items.push_back({static_cast<int64_t>(i), b, std::min(n, b + item_elements)});
      starts.push_back(total);
      total += items.back().end - b;
    }
  }
  starts.push_back(total);
}

// Runs body(first_item, last_item) over all items, on up to one thread per
// min_thread_elements elements (each element weighing `weight`), thread t taking the
// items that start in its equal share of the elements: equal bytes per thread.
template <typename Body>
void for_items(const std::vector<int64_t>& starts, int64_t weight, int64_t min_thread_elements,
               const Body& body) {
  const int64_t nitems = static_cast<int64_t>(starts.size()) - 1;
  if (nitems <= 0) return;
  const int64_t total = starts.back();
  const int64_t work = total * weight;
  const int64_t nthreads = std::min<int64_t>(
      {at::get_num_threads(), (work + min_thread_elements - 1) / min_thread_elements, nitems});
  if (nthreads <= 1 || at::in_parallel_region()) {
    body(0, nitems);
    return;
  }
  auto first_item_at = [&](int64_t t) {
    const int64_t start = total / nthreads * t + std::min(t, total % nthreads);
    return static_cast<int64_t>(std::lower_bound(starts.begin(), starts.end() - 1, start) -
                                starts.begin());
  };
  at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) body(first_item_at(t), first_item_at(t + 1));
  });
}

// Runs f(pair, begin, end) over every pair of the plan, cut into work items of equal
// bytes per thread (the elements [begin, end) of the pair).
template <typename F>
void for_pair_items(const PairPlan& plan, const F& f) {
  if (plan.work_starts.empty()) {
    cut_items(plan.pairs.size(), [&](size_t p) { return plan.pairs[p].numel; }, kItemElements,
              plan.work_items, plan.work_starts);
  }
  const std::vector<WorkItem>& items = plan.work_items;
  const std::vector<int64_t>& starts = plan.work_starts;
  for_items(starts, 1, kMinParallelElements, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      f(plan.pairs[items[k].index], items[k].begin, items[k].end);
    }
  });
}

// Applies op to every pair of the plan: op.template bind<opmath_t>() gives a
// callable Vec(Vec out, Vec in) for each opmath type.
template <bool kReadsOut, typename Op>
void apply_pairs(const PairPlan& plan, const Op& op) {
  for_pair_items(plan, [&](const PairView& pair, int64_t begin, int64_t end) {
    dispatch_pair(pair.out_dtype, pair.in_dtype, [&](auto o, auto x) {
      using out_t = decltype(o);
      using in_t = decltype(x);
      using opmath_t = pair_opmath_t<out_t, in_t>;
      run_range<out_t, in_t, kReadsOut>(static_cast<out_t*>(pair.out) + begin,
                                        static_cast<const in_t*>(pair.in) + begin, end - begin,
                                        op.template bind<opmath_t>());
    });
  });
}

// out <- lerp(out, in, w), torch.lerp's formula (ATen's vectorized lerp_vec), so the
// result is bit-identical to torch.lerp / torch._foreach_lerp_ for float32.
struct LerpOp {
  double weight;
  template <typename T>
  auto bind() const {
    using Vec = at::vec::Vectorized<T>;
    const T w = static_cast<T>(weight);
    const bool small = std::abs(w) < T(0.5);
    const Vec coeff(small ? w : w - T(1));
    return [coeff, small](const Vec& a, const Vec& x) {
      return at::vec::fmadd(coeff, x - a, small ? a : x);
    };
  }
};

// out <- scale * in (out is not read).
struct ScaleOp {
  double scale;
  template <typename T>
  auto bind() const {
    using Vec = at::vec::Vectorized<T>;
    const Vec s(static_cast<T>(scale));
    return [s](const Vec&, const Vec& x) { return s * x; };
  }
};

// out <- out + alpha * in.
struct AxpyOp {
  double alpha;
  template <typename T>
  auto bind() const {
    using Vec = at::vec::Vectorized<T>;
    const Vec s(static_cast<T>(alpha));
    return [s](const Vec& a, const Vec& x) { return at::vec::fmadd(s, x, a); };
  }
};

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
