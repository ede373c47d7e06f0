"""pytest-benchmark suite over ``python -m wavg_ext.bench --suite threads``: the planned
``ema_`` on one and two threads around the CPU kernels' threshold (one thread below
2 * 65536 elements), for one tensor and for 512-element tensors."""

import pytest
import torch

from wavg_ext import ops
from wavg_ext.bench import threads as bench_threads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [c for c in bench_threads.all_cases(quick=True) if c.elements in (65536, 262144)],
                         ids=lambda c: c.id)
def test_threads(benchmark, case, threads):
    benchmark.group = f"threads-{case.layout}-{case.elements}"
    shapes = [(case.elements,)] if case.layout == "one" else [(512,)] * (case.elements // 512)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=g) for s in shapes]
    avgs = [torch.zeros_like(x) for x in xs]
    plan = ops.Plan("ema_", avgs, xs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan(0.5)  # from zeros: half of x, exactly
        assert all(torch.equal(a, x * 0.5) for a, x in zip(avgs, xs))
        benchmark(plan, 1e-3)
    finally:
        torch.set_num_threads(previous)
