// The emulator's own test kernels (wavg_ext._C._cuda_emulation_selftest(name)):
// small CUDA-style kernels, correct ones whose results tests check, and broken ones
// whose bug the emulator must report. Each returns what it observed as text: the
// results, or "error: <the emulator's message>".
#define WAVG_EXT_CUDA_EMULATION 1

#include <c10/util/Exception.h>

#include <functional>
#include <map>
#include <sstream>
#include <vector>

#include "../multi_tensor_apply.cuh"
#include "../platform.cuh"

namespace wavg_ext::emu {
namespace {

using cuda::KernelMemory;
using cuda::launch_kernel;
using cuda::load_global;
using cuda::SharedArray;
using cuda::store_global;

constexpr int kThreads = 256;

// Block sum with a shared tree; `barrier` false drops the __syncthreads of the tree.
__global__ void tree_sum_kernel(const double* in, double* out, bool barrier) {
  __shared__ SharedArray<double, kThreads> sums;
  sums[threadIdx.x] = load_global(in + blockIdx.x * blockDim.x + threadIdx.x);
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < static_cast<unsigned>(stride)) sums[threadIdx.x] += sums[threadIdx.x + stride];
    if (barrier) __syncthreads();
  }
  if (threadIdx.x == 0) store_global(out + blockIdx.x, static_cast<double>(sums[0]));
}

// Warp sums by shuffles, then the warps' sums through shared memory.
__global__ void shuffle_sum_kernel(const double* in, double* out) {
  __shared__ SharedArray<double, kThreads / 32> warp_sums;
  double v = load_global(in + threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    store_global(out, s);
  }
}

// Each lane records what every shuffle flavour hands it.
__global__ void shuffle_kinds_kernel(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int base = static_cast<int>(threadIdx.x) * 4;
  store_global(out + base + 0, __shfl_down_sync(0xffffffffu, lane, 3));
  store_global(out + base + 1, __shfl_up_sync(0xffffffffu, lane, 5));
  store_global(out + base + 2, __shfl_xor_sync(0xffffffffu, lane, 6));
  store_global(out + base + 3, __shfl_sync(0xffffffffu, lane, 7, 16));
}

__global__ void coordinates_kernel(int* out) {
  const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const unsigned i = block * blockDim.x * blockDim.y * blockDim.z + thread;
  store_global(out + i, static_cast<int>(block * 1000 + thread));
}

__global__ void write_same_word_kernel(int* out) {
  __shared__ SharedArray<int, 1> word;
  word[0] = static_cast<int>(threadIdx.x);  // every thread, no barrier: a race
  __syncthreads();
  if (threadIdx.x == 0) store_global(out, static_cast<int>(word[0]));
}

__global__ void uninitialized_read_kernel(int* out) {
  __shared__ SharedArray<int, kThreads> words;
  if (threadIdx.x == 0) store_global(out, static_cast<int>(words[5]));
}

__global__ void shared_index_kernel(int* out) {
  __shared__ SharedArray<int, kThreads> words;
  words[threadIdx.x + 1] = 1;  // the last thread writes past the array
  __syncthreads();
  if (threadIdx.x == 0) store_global(out, 0);
}

__global__ void global_past_end_kernel(const float* in, float* out) {
  // reads element n (one past the end) in the last thread
  store_global(out + threadIdx.x, load_global(in + threadIdx.x + 1));
}

__global__ void misaligned_vector_kernel(const float* in, float* out) {
  const uint4 v = load_global(reinterpret_cast<const uint4*>(in + 1));  // 4-byte aligned only
  if (threadIdx.x == 0) store_global(reinterpret_cast<uint4*>(out), v);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x >= 64) return;  // these threads never reach the barrier
  __syncthreads();
  if (threadIdx.x == 0) store_global(out, 1);
}

__global__ void partial_warp_shuffle_kernel(int* out) {
  // lanes 0-15 shuffle with a full mask while lanes 16-31 wait at a barrier
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  __syncthreads();
  store_global(out + threadIdx.x, v);
}

__global__ void empty_kernel() {}

std::string observed(const std::function<void()>& run) {
  try {
    run();
  } catch (const c10::Error& e) {
    return std::string("error: ") + e.what_without_backtrace();
  }
  return "ok";
}

template <typename T>
std::string join(const std::vector<T>& v) {
  std::ostringstream s;
  for (size_t i = 0; i < v.size(); ++i) s << (i ? "," : "") << v[i];
  return s.str();
}

std::string tree_sum(bool barrier) {
  std::vector<double> in(2 * kThreads), out(2, -1.0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<double>(i % 97) + 0.25;
  KernelMemory memory;
  memory.add(in.data(), static_cast<int64_t>(in.size() * sizeof(double)));
  memory.add(out.data(), static_cast<int64_t>(out.size() * sizeof(double)));
  const std::string r = observed([&] {
    launch_kernel("tree_sum", tree_sum_kernel, dim3(2), dim3(kThreads), nullptr, in.data(),
                  out.data(), barrier);
  });
  return r == "ok" ? "sums " + join(out) : r;
}

std::string with_int_buffer(size_t n, const std::function<void(int*)>& launch, bool print) {
  std::vector<int> out(n, -1);
  KernelMemory memory;
  memory.add(out.data(), static_cast<int64_t>(n * sizeof(int)));
  const std::string r = observed([&] { launch(out.data()); });
  return r == "ok" && print ? join(out) : r;
}

const std::map<std::string, std::function<std::string()>>& tests() {
  static const std::map<std::string, std::function<std::string()>> all = {
      {"tree_sum", [] { return tree_sum(true); }},
      {"tree_sum_missing_barrier", [] { return tree_sum(false); }},
      {"shuffle_sum",
       [] {
         std::vector<double> in(kThreads), out(1, -1.0);
         for (int i = 0; i < kThreads; ++i) in[i] = i * 0.5;
         KernelMemory memory;
         memory.add(in.data(), kThreads * sizeof(double));
         memory.add(out.data(), sizeof(double));
         const std::string r = observed([&] {
           launch_kernel("shuffle_sum", shuffle_sum_kernel, dim3(1), dim3(kThreads), nullptr,
                         in.data(), out.data());
         });
         return r == "ok" ? "sum " + join(out) : r;
       }},
      {"shuffle_kinds",
       [] {
         return with_int_buffer(32 * 4, [](int* out) {
           launch_kernel("shuffle_kinds", shuffle_kinds_kernel, dim3(1), dim3(32), nullptr, out);
         }, true);
       }},
      {"coordinates",
       [] {
         return with_int_buffer(2 * 3 * 2 * 4 * 2 * 3, [](int* out) {
           launch_kernel("coordinates", coordinates_kernel, dim3(2, 3, 2), dim3(4, 2, 3), nullptr,
                         out);
         }, true);
       }},
      {"shared_race",
       [] {
         return with_int_buffer(1, [](int* out) {
           launch_kernel("shared_race", write_same_word_kernel, dim3(1), dim3(64), nullptr, out);
         }, true);
       }},
      {"shared_uninitialized",
       [] {
         return with_int_buffer(1, [](int* out) {
           launch_kernel("shared_uninitialized", uninitialized_read_kernel, dim3(1), dim3(32),
                         nullptr, out);
         }, true);
       }},
      {"shared_index",
       [] {
         return with_int_buffer(1, [](int* out) {
           launch_kernel("shared_index", shared_index_kernel, dim3(1), dim3(kThreads), nullptr, out);
         }, true);
       }},
      {"global_past_end",
       [] {
         std::vector<float> in(64, 1.0f), out(64, 0.0f);
         KernelMemory memory;
         memory.add(in.data(), 64 * sizeof(float));
         memory.add(out.data(), 64 * sizeof(float));
         return observed([&] {
           launch_kernel("global_past_end", global_past_end_kernel, dim3(1), dim3(64), nullptr,
                         in.data(), out.data());
         });
       }},
      {"misaligned_vector",
       [] {
         alignas(16) static float in[16], out[8];
         KernelMemory memory;
         memory.add(in, sizeof in);
         memory.add(out, sizeof out);
         return observed([&] {
           launch_kernel("misaligned_vector", misaligned_vector_kernel, dim3(1), dim3(32), nullptr,
                         in, out);
         });
       }},
      {"divergent_barrier",
       [] {
         return with_int_buffer(1, [](int* out) {
           launch_kernel("divergent_barrier", divergent_barrier_kernel, dim3(1), dim3(128), nullptr,
                         out);
         }, true);
       }},
      {"partial_warp_shuffle",
       [] {
         return with_int_buffer(32, [](int* out) {
           launch_kernel("partial_warp_shuffle", partial_warp_shuffle_kernel, dim3(1), dim3(32),
                         nullptr, out);
         }, true);
       }},
      {"block_too_large",
       [] {
         return observed([] { launch_kernel("block_too_large", empty_kernel, dim3(1), dim3(1025), nullptr); });
       }},
      {"block_1024",
       [] {
         return observed([] { launch_kernel("block_1024", empty_kernel, dim3(2), dim3(32, 32), nullptr); });
       }},
      {"grid_y_too_large",
       [] {
         return observed([] { launch_kernel("grid_y", empty_kernel, dim3(1, 65536), dim3(1), nullptr); });
       }},
      {"param_space",
       [] {
         std::ostringstream s;
         s << "param_bytes " << cuda::kParamBytes << " max_tensors "
           << cuda::TensorListMetadata<1>::kMaxTensors << "," << cuda::TensorListMetadata<2>::kMaxTensors
           << "," << cuda::TensorListMetadata<3>::kMaxTensors << " metadata_bytes "
           << sizeof(cuda::TensorListMetadata<1>) << "," << sizeof(cuda::TensorListMetadata<2>) << ","
           << sizeof(cuda::TensorListMetadata<3>);
         return s.str();
       }},
  };
  return all;
}

}  // namespace

std::string selftest(const std::string& name) {
  const auto& all = tests();
  const auto it = all.find(name);
  if (it == all.end()) {
    std::string names;
    for (const auto& [n, f] : all) names += " " + n;
    TORCH_CHECK_VALUE(false, "no emulator self-test named '", name, "'; there are:", names);
  }
  return it->second();
}

}  // namespace wavg_ext::emu
