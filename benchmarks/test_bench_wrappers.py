"""pytest-benchmark suite over the wrapper cases of ``python -m wavg_ext.bench --suite wrappers``.

One test per (device, case, method). Each test first checks that one step of its method
leaves the averages it should (float64 computation of that method's own semantics), then
benchmarks the step. With ``--benchmark-disable`` (CI) each body runs once, as a smoke
test. No test asserts anything about timings.
"""

from __future__ import annotations

import pytest
import torch

from wavg_ext import build_info
from wavg_ext.bench import wrappers as bw

CUDA_OK = torch.cuda.is_available() and build_info()["cuda"]
METHODS = ["sgd", "wavg_ext", "averaged_model", "foreach_lerp", "loop", "wavg_ext_op_only"]


def _expected(case, method, p0, p1):
    """Averages after one call of `method`, from the weights before (p0) and after (p1)."""
    w = 1.0 - bw.EMA_DECAY if case.method == "EMA" else 0.5
    if method == "averaged_model":  # its first update_parameters copies
        return [b.to(case.avg_dtype) for b in p1]
    if method == "wavg_ext_op_only":  # no base step: averages of p0 with p0
        return [a.to(case.avg_dtype) for a in p0]
    # wavg_ext samples position 0 (p0) and then p1; the hand-written ones start from p0 as one sample
    return [(a + w * (b - a)).to(case.avg_dtype) for a, b in zip(p0, p1)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", bw.all_cases(quick=True), ids=lambda c: c.id)
@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")])])
def test_wrapper_step(benchmark, device, case, method):
    benchmark.group = f"{case.id}-{device}"
    setup = bw.Setup(case, torch.device(device))
    step, averages = setup.methods([method])[method]
    p0 = [p.detach().double() for p in setup.params]
    step()
    p1 = [p.detach().double() for p in setup.params]
    if method != "wavg_ext_op_only":
        assert any(not torch.equal(a, b) for a, b in zip(p0, p1)), "the base step did not run"
    if method != "sgd":
        got = averages()
        assert len(got) == len(p0) and all(g.dtype == case.avg_dtype for g in got)
        torch.testing.assert_close(got, _expected(case, method, p0, p1), rtol=1e-5, atol=1e-6)
    benchmark(step)
