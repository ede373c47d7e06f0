"""pytest-benchmark suite over the cases of ``python -m wavg_ext.bench``.

One test per (device, case, method): the fused op, each pure-PyTorch baseline and the
bandwidth ceilings. Every test first checks that one call of its method gives the
right result (against a float64 computation), then benchmarks it. In CI,
``pytest benchmarks --benchmark-disable`` runs each body once, as a smoke test.
Timings are grouped per case; no test asserts anything about them.
"""

from __future__ import annotations

import gc

import pytest
import torch

from wavg_ext import build_info
from wavg_ext.bench import common
from wavg_ext.bench import ops as bench_ops

CUDA_OK = torch.cuda.is_available() and build_info()["cuda"]


def _params():
    params = []
    for case in bench_ops.all_cases():
        names = list(bench_ops.methods(case, [], [])) + list(common.ceilings(0, "cpu"))
        marks = [pytest.mark.slow] if case.shapes == "gpt2" else []
        params += [pytest.param(case, name, id=f"{case.id}-{name}", marks=marks) for name in names]
    return params


@pytest.fixture(scope="module")
def case_data():
    """Holds the data of one (case, device) at a time: the tests of a case run in a row."""
    cache = {}

    def get(case, device):
        if (case, device) not in cache:
            cache.clear()
            gc.collect()
            avgs, xs = bench_ops.make_tensors(case, device)
            cache[(case, device)] = (avgs, xs, {})  # {} : avg dtype -> expected result
        return cache[(case, device)]

    yield get
    cache.clear()


# device is the slowest-varying parameter, so the per-case cache is reused across methods.
@pytest.mark.parametrize("case, method", _params())
@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")])])
@torch.no_grad()
def test_bench(benchmark, case_data, device, case, method):
    benchmark.group = f"{case.id}-{device}"
    benchmark.extra_info["min_bytes"] = case.min_bytes()
    if method.startswith("ceiling"):
        m = common.ceilings(case.min_bytes(), device)[method]()
        m.run()
        torch.testing.assert_close(m.outs[0], torch.full_like(m.outs[0], common.CEILING_RESULT[method]))
    else:
        avgs0, xs, expected = case_data(case, device)
        m = bench_ops.methods(case, [a.clone() for a in avgs0], xs)[method]()
        m.run()
        dtype = m.outs[0].dtype
        if dtype not in expected:
            expected[dtype] = bench_ops.expected(case, avgs0, xs, dtype)
        torch.testing.assert_close(m.outs, expected[dtype], **bench_ops.tolerances(dtype))
    benchmark(m.run)
