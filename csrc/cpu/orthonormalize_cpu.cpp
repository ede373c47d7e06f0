// orthonormalize_(basis, k, passes): Gram-Schmidt (CGS2 by default) of row k, on CPU.
#include <torch/library.h>

#include "../basis_composite.h"
#include "../cuda/emulation/routing.h"
#include "rows_cpu.h"

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("orthonormalize_", WAVG_EXT_CPU_OR_EMULATED((&wavg_ext::orthonormalize_impl<wavg_ext::cpu::CpuRows>),
                                    ((&wavg_ext::orthonormalize_impl<wavg_ext::cuda::CudaRows>))));
}
