// dots(basis, xs, k): the k inner products <row i, x> over all tensors, on CPU.
#include <torch/library.h>

#include "../basis_composite.h"
#include "rows_cpu.h"

TORCH_LIBRARY_IMPL(wavg_ext, CPU, m) { m.impl("dots", &wavg_ext::dots_impl<wavg_ext::cpu::CpuRows>); }
