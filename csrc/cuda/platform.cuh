// Everything the kernels and their host code take from the CUDA runtime, behind one
// seam: CUDA itself under nvcc, or the host emulation (emulation/emulation.h) when
// the same sources are compiled as C++ with WAVG_EXT_CUDA_EMULATION defined.
//
//   DeviceGuard, current_stream(device)   the c10 guard and stream calls
//   launch_kernel(name, kernel, grid, block, stream, args...)   instead of <<<...>>>
//   load_global(p) / store_global(p, v)   every global memory access of a kernel
//   SharedArray<T, N>                     every __shared__ array (racecheck)
//   KernelMemory                          the global memory one call's kernels may
//                                         touch (the emulator's memcheck; empty on CUDA)
//   kParamBytes                           the kernel-parameter space of this build
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <utility>

#ifdef WAVG_EXT_CUDA_EMULATION
#include "emulation/emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace wavg_ext::cuda {

#ifdef WAVG_EXT_CUDA_EMULATION

using DeviceGuard = emu::DeviceGuard;
using emu::current_stream;
using emu::KernelMemory;
using emu::load_global;
using emu::SharedArray;
using emu::store_global;
constexpr int kParamBytes = emu::kParamBytes;

template <typename... P, typename... A>
void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t,
                   A&&... args) {
  emu::launch(kernel, name, grid, block, std::forward<A>(args)...);
}

#else

using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream(c10::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}
struct KernelMemory {
  void add(const void*, int64_t) {}
};

#ifdef __CUDACC__
// CUDA 12.1 raised the kernel-parameter space from 4 KiB to 32764 bytes (Volta and newer).
#if __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1)
constexpr int kParamBytes = 32764;
#else
constexpr int kParamBytes = 4096;
#endif

template <typename... P, typename... A>
void launch_kernel(const char*, void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream,
                   A&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
__device__ __forceinline__ T load_global(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void store_global(T* p, const T& v) {
  *p = v;
}
template <typename T, int N>
struct SharedArray {
  T v[N];
  __device__ __forceinline__ T& operator[](int64_t i) { return v[i]; }
};
#endif  // __CUDACC__

#endif

}  // namespace wavg_ext::cuda
