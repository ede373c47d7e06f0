// The CPU engine of the basis ops: two kernels over a RowPlan (rows a and rows y of
// every tensor, see basis_args.h).
//
//   rows_dot:  out[i][j] = sum over tensors and elements of a_i * y_j    (na x ny)
//   rows_mix_: y_j <- beta * y_j + sum_i m[j][i] * a_i                    (in place)
//
// dots is rows_dot with y = xs (ny = 1), combine_ is rows_mix_ with y = outs; the
// Gram matrix and the triangular update of the batch orthonormalization are the
// same kernels on rows of one basis.
//
// Work is cut into units of at most kUnitElements elements of one tensor, fixed
// independently of the thread count; rows_dot writes one partial per unit and adds
// them in unit order, so results are the same bits for any number of threads.
// Inside a unit, blocks of elements small enough for the L2 cache are swept once
// per row tile, so every row is read from memory once per call.
//
// Precision: with one partner row (dots, project_, norms: memory-bound) products and
// sums are float64. Multi-row Gram blocks (the batch path: compute-bound) accumulate
// products in float32 vectors over runs of kRunElements elements and add each run's
// sum in float64: rounding errors stay at the size of one run's sum, not of the whole
// dot product. float64 tensors use float64 throughout. (Float32 runs in the one-partner
// dots of a bfloat16 basis were 10-15% faster, but their error exceeds twice that of a
// float64 dot rounded once, the ops' accuracy contract, on the default ISA: not kept.)
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(WAVG_EXT_CPU_AVX512_BF16)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels_cpu.h"
#include "pairwise_cpu.h"

namespace wavg_ext::cpu::CPU_CAPABILITY {

constexpr int64_t kUnitElements = 65536;
constexpr int64_t kRunElements = 512;
constexpr int64_t kCacheBytes = 384 * 1024;
// Below this much work (elements x rows) a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 18;

// Calls f(a_t{}, y_t{}) for the (basis, partner) dtype pairs the validation admits.
template <typename F>
void dispatch_rows(c10::ScalarType a, c10::ScalarType y, const F& f) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  if (a == ScalarType::Double && y == ScalarType::Double) return f(double{}, double{});
  if (a == ScalarType::Float) {
    if (y == ScalarType::Float) return f(float{}, float{});
    if (y == ScalarType::Half) return f(float{}, Half{});
    if (y == ScalarType::BFloat16) return f(float{}, BFloat16{});
  } else if (a == ScalarType::BFloat16) {
    if (y == ScalarType::Float) return f(BFloat16{}, float{});
    if (y == ScalarType::Half) return f(BFloat16{}, Half{});
    if (y == ScalarType::BFloat16) return f(BFloat16{}, BFloat16{});
  }
  TORCH_CHECK(false, "wavg_ext: unsupported basis/partner dtypes ", a, " / ", y);  // validated
}

// Units of at most kUnitElements elements of one task, in task order (see cut_items).
inline void make_units(const RowPlan& plan, std::vector<WorkItem>& units, std::vector<int64_t>& starts) {
  cut_items(plan.tasks.size(), [&](size_t t) { return plan.tasks[t].numel; }, kUnitElements, units, starts);
}

// Elements per cache block when `rows` rows of a block must stay in the cache while
// the others stream through (a multiple of kRunElements). Long blocks keep the
// streamed rows long enough for the hardware prefetchers.
inline int64_t cache_block(int64_t rows, size_t elem_bytes) {
  const int64_t fit = kCacheBytes / (std::max<int64_t>(rows, 1) * static_cast<int64_t>(elem_bytes));
  return std::clamp<int64_t>(fit / kRunElements * kRunElements, kRunElements, kUnitElements);
}

template <typename T>
using opmath_of = at::opmath_type<T>;

#if defined(WAVG_EXT_CPU_AVX512_BF16)
// dot_tile (the Gram blocks) of two bfloat16 rows with AVX512-BF16's vdpbf16ps: 32 products per
// instruction straight from the stored bits, no widening. A bfloat16 x bfloat16 product
// is exact in float32 (8 + 8 significand bits), and the instruction adds the two
// products of a lane pair to the accumulator one after the other, each rounded to
// nearest even: float32 runs as in dot_tile. It treats denormal inputs as zero and
// flushes denormal results: only products below ~1e-38 are lost, far beneath the
// rounding of any run sum of a basis row.
template <int MI, int MJ>
void dot_tile_dpbf16(const c10::BFloat16* const* a, const c10::BFloat16* const* y, int64_t n,
                     double (*acc)[2]) {
  constexpr int64_t kStep = 32;
  int64_t e = 0;
  while (e < n) {
    const int64_t run_end = std::min(n, e + kRunElements);
    __m512 facc[MI][MJ];
    for (int mi = 0; mi < MI; ++mi)
      for (int mj = 0; mj < MJ; ++mj) facc[mi][mj] = _mm512_setzero_ps();
    for (; e + kStep <= run_end; e += kStep) {
      __m512bh av[MI];
      for (int mi = 0; mi < MI; ++mi) av[mi] = (__m512bh)_mm512_loadu_si512(a[mi] + e);
      for (int mj = 0; mj < MJ; ++mj) {
        const __m512bh yv = (__m512bh)_mm512_loadu_si512(y[mj] + e);
        for (int mi = 0; mi < MI; ++mi) facc[mi][mj] = _mm512_dpbf16_ps(facc[mi][mj], av[mi], yv);
      }
    }
    float tail[MI][MJ] = {};
    for (; e < run_end; ++e) {  // the last few elements of a tensor
      for (int mi = 0; mi < MI; ++mi)
        for (int mj = 0; mj < MJ; ++mj)
          tail[mi][mj] = std::fma(static_cast<float>(a[mi][e]), static_cast<float>(y[mj][e]), tail[mi][mj]);
    }
    for (int mi = 0; mi < MI; ++mi)
      for (int mj = 0; mj < MJ; ++mj)
        acc[mi][mj] += static_cast<double>(_mm512_reduce_add_ps(facc[mi][mj])) + static_cast<double>(tail[mi][mj]);
  }
}
#endif

// acc[mi][mj] += sum over e in [0, n) of a[mi][e] * y[mj][e], in float32 runs (see top).
// The Gram blocks of the batch path (compute-bound: every loaded row feeds a tile).
template <typename a_t, typename y_t, int MI, int MJ>
void dot_tile(const a_t* const* a, const y_t* const* y, int64_t n, double (*acc)[2]) {
#if defined(WAVG_EXT_CPU_AVX512_BF16)
  if constexpr (std::is_same_v<a_t, c10::BFloat16> && std::is_same_v<y_t, c10::BFloat16>) {
    return dot_tile_dpbf16<MI, MJ>(a, y, n, acc);
  }
#endif
  using opmath_t = opmath_of<a_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kStep = VecIO<a_t>::kStep;
  static_assert(VecIO<y_t>::kStep == kStep, "a and y share an opmath type");
  int64_t e = 0;
  while (e < n) {
    const int64_t run_end = std::min(n, e + kRunElements);
    Vec facc[MI][MJ];
    for (int mi = 0; mi < MI; ++mi)
      for (int mj = 0; mj < MJ; ++mj) facc[mi][mj] = Vec(opmath_t(0));
    for (; e + kStep <= run_end; e += kStep) {
      Vec alo[MI], ahi[MI];
      for (int mi = 0; mi < MI; ++mi) VecIO<a_t>::load(a[mi] + e, alo[mi], ahi[mi]);
      for (int mj = 0; mj < MJ; ++mj) {
        Vec ylo, yhi;
        VecIO<y_t>::load(y[mj] + e, ylo, yhi);
        for (int mi = 0; mi < MI; ++mi) {
          facc[mi][mj] = at::vec::fmadd(alo[mi], ylo, facc[mi][mj]);
          facc[mi][mj] = at::vec::fmadd(ahi[mi], yhi, facc[mi][mj]);
        }
      }
    }
    opmath_t tail[MI][MJ] = {};
    for (; e < run_end; ++e) {  // the last few elements of a tensor
      for (int mi = 0; mi < MI; ++mi)
        for (int mj = 0; mj < MJ; ++mj)
          tail[mi][mj] = std::fma(static_cast<opmath_t>(a[mi][e]), static_cast<opmath_t>(y[mj][e]),
                                  tail[mi][mj]);
    }
    for (int mi = 0; mi < MI; ++mi) {
      for (int mj = 0; mj < MJ; ++mj) {
        const opmath_t run = at::vec::vec_reduce_all<opmath_t>(
            [](const Vec& x, const Vec& z) { return x + z; }, facc[mi][mj]);
        acc[mi][mj] += static_cast<double>(run) + static_cast<double>(tail[mi][mj]);
      }
    }
  }
}

using DVec = at::vec::Vectorized<double>;

// The float vector v as two double vectors (its lower and upper halves).
inline void widen(const at::vec::Vectorized<float>& v, DVec& lo, DVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  lo = DVec(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  hi = DVec(_mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  lo = DVec(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
  hi = DVec(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#else
  static_assert(at::vec::Vectorized<float>::size() == 2 * DVec::size(), "float/double lanes");
  alignas(64) float f[at::vec::Vectorized<float>::size()];
  alignas(64) double d[at::vec::Vectorized<float>::size()];
  v.store(f);
  for (int i = 0; i < at::vec::Vectorized<float>::size(); ++i) d[i] = f[i];
  lo = DVec::loadu(d);
  hi = DVec::loadu(d + DVec::size());
#endif
}

// acc[mi][0] += sum over e of a[mi][e] * y[e] with every product and sum in float64:
// the dots of one partner (dots, project_, norms) are memory-bound, so the widening
// costs little and the result is as accurate as a float64 dot of the float32 data.
template <typename a_t, typename y_t, int MI>
void dot_tile_wide(const a_t* const* a, const y_t* y, int64_t n, double (*acc)[2]) {
  using opmath_t = opmath_of<a_t>;
  constexpr int64_t kStep = VecIO<a_t>::kStep;
  DVec dacc[MI][2];  // two accumulators per row: shorter FMA dependency chains
  for (int mi = 0; mi < MI; ++mi) dacc[mi][0] = dacc[mi][1] = DVec(0.0);
  int64_t e = 0;
  for (; e + kStep <= n; e += kStep) {
    DVec y4[4];
    if constexpr (std::is_same_v<opmath_t, double>) {
      VecIO<y_t>::load(y + e, y4[0], y4[1]);
    } else {
      at::vec::Vectorized<float> ylo, yhi;
      VecIO<y_t>::load(y + e, ylo, yhi);
      widen(ylo, y4[0], y4[1]);
      widen(yhi, y4[2], y4[3]);
    }
    for (int mi = 0; mi < MI; ++mi) {
      if constexpr (std::is_same_v<opmath_t, double>) {
        DVec alo, ahi;
        VecIO<a_t>::load(a[mi] + e, alo, ahi);
        dacc[mi][0] = at::vec::fmadd(alo, y4[0], dacc[mi][0]);
        dacc[mi][1] = at::vec::fmadd(ahi, y4[1], dacc[mi][1]);
      } else {
        at::vec::Vectorized<float> alo, ahi;
        VecIO<a_t>::load(a[mi] + e, alo, ahi);
        DVec a4[4];
        widen(alo, a4[0], a4[1]);
        widen(ahi, a4[2], a4[3]);
        dacc[mi][0] = at::vec::fmadd(a4[0], y4[0], dacc[mi][0]);
        dacc[mi][1] = at::vec::fmadd(a4[1], y4[1], dacc[mi][1]);
        dacc[mi][0] = at::vec::fmadd(a4[2], y4[2], dacc[mi][0]);
        dacc[mi][1] = at::vec::fmadd(a4[3], y4[3], dacc[mi][1]);
      }
    }
  }
  for (int mi = 0; mi < MI; ++mi) {
    double t = 0.0;
    for (int64_t i = e; i < n; ++i)
      t = std::fma(static_cast<double>(static_cast<opmath_t>(a[mi][i])),
                   static_cast<double>(static_cast<opmath_t>(y[i])), t);
    acc[mi][0] += at::vec::vec_reduce_all<double>([](const DVec& x, const DVec& z) { return x + z; },
                                                  dacc[mi][0] + dacc[mi][1]) + t;
  }
}

template <typename a_t, typename y_t, int MI>
void dot_tile_mj(int mj, const a_t* const* a, const y_t* const* y, int64_t n, double (*acc)[2]) {
  if (mj == 2) return dot_tile<a_t, y_t, MI, 2>(a, y, n, acc);
  return dot_tile<a_t, y_t, MI, 1>(a, y, n, acc);
}

// One tile of up to 4 x 2 rows; one partner row (wide) goes through dot_tile_wide.
template <typename a_t, typename y_t>
void dot_tile_any(int mi, int mj, bool wide, const a_t* const* a, const y_t* const* y, int64_t n,
                  double (*acc)[2]) {
  if (wide) {
    switch (mi) {
      case 4: return dot_tile_wide<a_t, y_t, 4>(a, y[0], n, acc);
      case 3: return dot_tile_wide<a_t, y_t, 3>(a, y[0], n, acc);
      case 2: return dot_tile_wide<a_t, y_t, 2>(a, y[0], n, acc);
      default: return dot_tile_wide<a_t, y_t, 1>(a, y[0], n, acc);
    }
  }
  switch (mi) {
    case 4: return dot_tile_mj<a_t, y_t, 4>(mj, a, y, n, acc);
    case 3: return dot_tile_mj<a_t, y_t, 3>(mj, a, y, n, acc);
    case 2: return dot_tile_mj<a_t, y_t, 2>(mj, a, y, n, acc);
    default: return dot_tile_mj<a_t, y_t, 1>(mj, a, y, n, acc);
  }
}

// out[i * ny + j] = <a_i, y_j> summed over all tasks (na x ny, float64). symmetric:
// a and y are the same rows; only i <= j is computed and then mirrored.
void rows_dot(const RowPlan& plan, bool symmetric, double* out) {
  const int64_t na = plan.na, ny = plan.ny;
  std::fill(out, out + na * ny, 0.0);
  if (na == 0 || ny == 0) return;
  std::vector<WorkItem> units;
  std::vector<int64_t> starts;
  make_units(plan, units, starts);
  std::vector<double> partials(units.size() * na * ny, 0.0);
  // Kept in cache: the block's y rows (re-read by every tile of a rows) and one tile of
  // a rows (re-read by every tile of y rows). The other a rows stream. With one y row
  // (dots, project_) no a row is re-read: the block is the whole unit (the y row of a
  // unit, at most 512 KB, stays in L2), so each a row streams in runs as long as a
  // unit, which the hardware prefetchers follow better: 10-25% faster than 38 KB runs
  // (bf16 and fp32 bases, k = 40, ResNet-50 shapes, one and two threads).
  const int64_t block = ny == 1 ? kUnitElements : cache_block(ny + std::min<int64_t>(na, 4), 4);

  for_items(starts, na + ny, kMinParallelWork, [&](int64_t first, int64_t last) {
    std::vector<const void*> arow(na), yrow(ny);
    for (int64_t u = first; u < last; ++u) {
      const WorkItem& unit = units[u];
      const RowTask& task = plan.tasks[unit.index];
      double* part = partials.data() + u * na * ny;
      dispatch_rows(task.a.dtype, task.y.dtype, [&](auto a0, auto y0) {
        using a_t = decltype(a0);
        using y_t = decltype(y0);
        const a_t* abase = static_cast<const a_t*>(task.a.data);
        const y_t* ybase = static_cast<const y_t*>(task.y.data);
        for (int64_t b = unit.begin; b < unit.end; b += block) {
          const int64_t n = std::min(unit.end, b + block) - b;
          for (int64_t i0 = 0; i0 < na; i0 += 4) {
            const int mi = static_cast<int>(std::min<int64_t>(4, na - i0));
            const a_t* ap[4];
            for (int r = 0; r < mi; ++r) ap[r] = abase + (i0 + r) * task.a.row_stride + b;
            for (int64_t j0 = symmetric ? (i0 / 2) * 2 : 0; j0 < ny; j0 += 2) {
              const int mj = static_cast<int>(std::min<int64_t>(2, ny - j0));
              const y_t* yp[2];
              for (int r = 0; r < mj; ++r) yp[r] = ybase + (j0 + r) * task.y.row_stride + b;
              double acc[4][2] = {};
              dot_tile_any<a_t, y_t>(mi, mj, ny == 1, ap, yp, n, acc);
              for (int r = 0; r < mi; ++r)
                for (int s = 0; s < mj; ++s) part[(i0 + r) * ny + j0 + s] += acc[r][s];
            }
          }
        }
      });
    }
  });
  for (size_t u = 0; u < units.size(); ++u) {
    const double* part = partials.data() + u * na * ny;
    for (int64_t p = 0; p < na * ny; ++p) out[p] += part[p];
  }
  if (symmetric) {
    for (int64_t i = 0; i < na; ++i)
      for (int64_t j = 0; j < i; ++j) out[i * ny + j] = out[j * ny + i];
  }
}

// sums[mj][e] += sum_{r < mi} coef[mj][r] * a[r][e] for e < n: MJ output rows share
// every load of the (up to 4) a rows. Vector body, scalar tail with the same FMAs.
template <typename a_t, int MJ>
void mix_tile(const a_t* const* a, int64_t mi, const opmath_of<a_t> (*coef)[4],
              opmath_of<a_t>* const* sums, int64_t n) {
  using opmath_t = opmath_of<a_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kStep = VecIO<a_t>::kStep;
  int64_t e = 0;
  for (; e + kStep <= n; e += kStep) {
    Vec lo[MJ], hi[MJ];
    for (int mj = 0; mj < MJ; ++mj) {
      lo[mj] = Vec::loadu(sums[mj] + e);
      hi[mj] = Vec::loadu(sums[mj] + e + Vec::size());
    }
    for (int64_t r = 0; r < mi; ++r) {
      Vec alo, ahi;
      VecIO<a_t>::load(a[r] + e, alo, ahi);
      for (int mj = 0; mj < MJ; ++mj) {
        const Vec c(coef[mj][r]);
        lo[mj] = at::vec::fmadd(c, alo, lo[mj]);
        hi[mj] = at::vec::fmadd(c, ahi, hi[mj]);
      }
    }
    for (int mj = 0; mj < MJ; ++mj) {
      lo[mj].store(sums[mj] + e);
      hi[mj].store(sums[mj] + e + Vec::size());
    }
  }
  for (; e < n; ++e) {
    for (int mj = 0; mj < MJ; ++mj) {
      opmath_t v = sums[mj][e];
      for (int64_t r = 0; r < mi; ++r) v = std::fma(coef[mj][r], static_cast<opmath_t>(a[r][e]), v);
      sums[mj][e] = v;
    }
  }
}

// y_j <- beta * y_j + sum_i m[j * na + i] * a_i for every task (j < ny, i < na).
// The output rows of a cache block are accumulated in float buffers, four output rows
// and four a rows at a time (every a load feeds four rows; few memory streams at a
// time), skipping coefficients that are zero at the ends of a row (triangular m).
// y_aliases_a: the y rows are (some of) the a rows themselves, so a block's new
// values are written only once every output row of the block is computed.
void rows_mix_(const RowPlan& plan, const double* m, double beta, bool y_aliases_a) {
  const int64_t na = plan.na, ny = plan.ny;
  if (ny == 0) return;
  std::vector<WorkItem> units;
  std::vector<int64_t> starts;
  make_units(plan, units, starts);
  // Kept in cache: the sums of the block's output rows, and all a rows when more than one
  // output row sweeps them. With one output row (combine_) the a rows stream.
  const int64_t block = cache_block(ny == 1 ? 1 + 4 : na + ny, 4);
  // Nonzero coefficient range [first, last) of each output row.
  std::vector<int64_t> first_nz(ny, 0), last_nz(ny, 0);
  for (int64_t j = 0; j < ny; ++j) {
    int64_t lo = 0, hi = na;
    while (lo < hi && m[j * na + lo] == 0.0) ++lo;
    while (hi > lo && m[j * na + hi - 1] == 0.0) --hi;
    first_nz[j] = lo;
    last_nz[j] = hi;
  }

  for_items(starts, na + ny, kMinParallelWork, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) {
      const WorkItem& unit = units[u];
      const RowTask& task = plan.tasks[unit.index];
      dispatch_rows(task.a.dtype, task.y.dtype, [&](auto a0, auto y0) {
        using a_t = decltype(a0);
        using y_t = decltype(y0);
        using opmath_t = opmath_of<a_t>;
        using Vec = at::vec::Vectorized<opmath_t>;
        constexpr int64_t kStep = VecIO<a_t>::kStep;
        const opmath_t beta_o = static_cast<opmath_t>(beta);
        const a_t* abase = static_cast<const a_t*>(task.a.data);
        y_t* ybase = static_cast<y_t*>(task.y.data);
        std::vector<opmath_t> sums((y_aliases_a ? ny : 4) * block);
        auto write_row = [&](int64_t j, int64_t b, int64_t n, const opmath_t* src) {
          y_t* yj = ybase + j * task.y.row_stride + b;
          int64_t e = 0;
          for (; e + kStep <= n; e += kStep) {
            VecIO<y_t>::store(yj + e, Vec::loadu(src + e), Vec::loadu(src + e + Vec::size()));
          }
          for (; e < n; ++e) yj[e] = static_cast<y_t>(src[e]);
        };
        for (int64_t b = unit.begin; b < unit.end; b += block) {
          const int64_t n = std::min(unit.end, b + block) - b;
          for (int64_t j0 = 0; j0 < ny; j0 += 4) {
            const int mj = static_cast<int>(std::min<int64_t>(4, ny - j0));
            opmath_t* acc[4];
            for (int s = 0; s < mj; ++s) {
              acc[s] = sums.data() + (y_aliases_a ? (j0 + s) : s) * block;
              const y_t* yj = ybase + (j0 + s) * task.y.row_stride + b;
              for (int64_t e = 0; e < n; ++e) {
                acc[s][e] = beta != 0.0 ? static_cast<opmath_t>(yj[e]) * beta_o : opmath_t(0);
              }
            }
            int64_t i_lo = na, i_hi = 0;
            for (int s = 0; s < mj; ++s) {
              i_lo = std::min(i_lo, first_nz[j0 + s]);
              i_hi = std::max(i_hi, last_nz[j0 + s]);
            }
            for (int64_t i0 = i_lo; i0 < i_hi; i0 += 4) {
              const int64_t mi = std::min<int64_t>(4, i_hi - i0);
              const a_t* ap[4];
              opmath_t coef[4][4] = {};
              for (int64_t r = 0; r < mi; ++r) {
                ap[r] = abase + (i0 + r) * task.a.row_stride + b;
                for (int s = 0; s < mj; ++s) coef[s][r] = static_cast<opmath_t>(m[(j0 + s) * na + i0 + r]);
              }
              switch (mj) {
                case 4: mix_tile<a_t, 4>(ap, mi, coef, acc, n); break;
                case 3: mix_tile<a_t, 3>(ap, mi, coef, acc, n); break;
                case 2: mix_tile<a_t, 2>(ap, mi, coef, acc, n); break;
                default: mix_tile<a_t, 1>(ap, mi, coef, acc, n); break;
              }
            }
            if (!y_aliases_a) {
              for (int s = 0; s < mj; ++s) write_row(j0 + s, b, n, acc[s]);
            }
          }
          if (y_aliases_a) {
            for (int64_t j = 0; j < ny; ++j) write_row(j, b, n, sums.data() + j * block);
          }
        }
      });
    }
  });
}

}  // namespace wavg_ext::cpu::CPU_CAPABILITY
