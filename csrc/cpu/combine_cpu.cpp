// combine_(outs, basis, coeffs, alpha, beta): out <- beta*out + alpha*sum_i c_i*row_i, on CPU.
#include <torch/library.h>

#include "../basis_composite.h"
#include "../cuda/emulation/routing.h"
#include "rows_cpu.h"

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("combine_", WAVG_EXT_CPU_OR_EMULATED((&wavg_ext::combine_impl<wavg_ext::cpu::CpuRows>),
                                    ((&wavg_ext::combine_impl<wavg_ext::cuda::CudaRows>))));
}
