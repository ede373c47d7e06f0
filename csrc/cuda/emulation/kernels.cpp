// The emulated build of the CUDA sources: the same kernels, functors, launcher
// and host code that nvcc compiles, compiled here as host C++ against the
// emulation layer (emulation.h, through platform.cuh). One translation unit, so
// the CPU build pays for the ATen headers once. register_cuda.cpp is not part of
// it: the emulated entries are reached from the CPU key (routing.h).
#define WAVG_EXT_CUDA_EMULATION 1

// Every CUDA source but register_cuda.cpp, listed by setup.py / CMakeLists.txt from
// csrc/cuda/*.cu and csrc/cuda/*.cpp (a new kernel file needs no line here).
#include "wavg_ext_cuda_unity.inc"
