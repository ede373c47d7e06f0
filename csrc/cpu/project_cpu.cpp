// project_(grads, basis, k): g <- P P^T g over the first k rows, on CPU.
#include <torch/library.h>

#include "../basis_composite.h"
#include "../cuda/emulation/routing.h"
#include "rows_cpu.h"

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("project_", WAVG_EXT_CPU_OR_EMULATED((&wavg_ext::project_impl<wavg_ext::cpu::CpuRows>),
                                    ((&wavg_ext::project_impl<wavg_ext::cuda::CudaRows>))));
}
