// dots(basis, xs, k): the k inner products <row i, x> over all tensors, on CPU.
#include <torch/library.h>

#include "../basis_composite.h"
#include "../cuda/emulation/routing.h"
#include "rows_cpu.h"

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) {
  m.impl("dots", WAVG_EXT_CPU_OR_EMULATED((&wavg_ext::dots_impl<wavg_ext::cpu::CpuRows>),
                                    ((&wavg_ext::dots_impl<wavg_ext::cuda::CudaRows>))));
}
