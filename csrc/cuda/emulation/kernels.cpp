// The emulated build of the CUDA sources: the same kernels, functors, launcher
// and host code that nvcc compiles, compiled here as host C++ against the
// emulation layer (emulation.h, through platform.cuh). One translation unit, so
// the CPU build pays for the ATen headers once. register_cuda.cpp is not part of
// it: the emulated entries are reached from the CPU key (routing.h).
#define WAVG_EXT_CUDA_EMULATION 1

#include "../accumulate.cu"
#include "../basis_ops_cuda.cpp"
#include "../combine.cu"
#include "../compensated.cu"
#include "../dots.cu"
#include "../ema.cu"
#include "../running_mean.cu"
#include "../scale_copy.cu"
