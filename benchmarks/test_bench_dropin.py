"""pytest-benchmark suite over ``python -m wavg_ext.bench --suite dropin``.

One test per (device, case, class) on the first 40 ResNet-50 shapes: each first checks that
wavg_ext's AveragedModel and torch's agree after an update of moved weights, then
benchmarks its class's update_parameters. With ``--benchmark-disable`` (CI) each body runs
once, as a smoke test. No test asserts anything about timings.
"""

from __future__ import annotations

import pytest
import torch

from wavg_ext import build_info
from wavg_ext.bench import dropin

CUDA_OK = torch.cuda.is_available() and build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")])]
CASES = [c for c in dropin.all_cases(quick=True)]


@pytest.mark.parametrize("which", ["torch", "wavg_ext"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_dropin_update(benchmark, device, case, which):
    benchmark.group = f"{case.id}-{device}"
    holder, theirs, ours = dropin.models(case, torch.device(device), limit=40)
    with torch.no_grad():
        for p in holder.parameters():
            p.add_(1.0)  # every weight moves by one: the average moves by 1/2 (SWA) or 1e-3 (EMA)
    theirs.update_parameters(holder)
    ours.update_parameters(holder)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[case.dtype]
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 2
    model = ours if which == "wavg_ext" else theirs
    benchmark(model.update_parameters, holder)
