"""pytest-benchmark suite over ``python -m wavg_ext.bench --suite trust``.

One test per (device, method) on 300 of the many_small shapes. Each test first checks what
one call of its method leaves (float64 computation of its own semantics), then benchmarks
the call. With ``--benchmark-disable`` (CI) each body runs once, as a smoke test. No test
asserts anything about timings.
"""

from __future__ import annotations

import pytest
import torch

from wavg_ext import build_info
from wavg_ext.bench import common
from wavg_ext.bench import trust as bench_trust

CUDA_OK = torch.cuda.is_available() and build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")])]
BAD = 7  # the parameter holding one NaN


@pytest.mark.parametrize("finite", [True, False], ids=["finite", "one_nan"])
@pytest.mark.parametrize("method", list(bench_trust.STREAMS))
@pytest.mark.parametrize("device", DEVICES)
def test_trust_method(benchmark, device, method, finite):
    benchmark.group = f"trust-many_small-{device}"
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device=device))
              for s in common.SHAPE_SETS["many_small"]()[:300]]
    if not finite:
        params[BAD].data[3] = float("nan")
    call, result = bench_trust.methods(params)[method]
    call()
    x = [p.detach().double() for p in params]
    w = bench_trust.WEIGHT
    got = result()
    if method == "nonfinite_flag":
        assert got.dtype == torch.int32 and int(got) == (not finite)
    elif method == "follow_check":
        assert all(a is b for a, b in zip(got, params))  # nothing changed: same parameters, no error
    elif method == "sgd":  # one step with momentum: the buffers hold the gradients
        assert all(torch.equal(b, torch.full_like(b, 1e-3)) for b in got)
    elif method in ("wrapper_step", "wrapper_step_unchecked"):  # position 0 copied, then an EMA update
        keep = [i for i in range(len(x)) if finite or i != BAD]  # (the weights moved by ~1e-12)
        assert all((got[i].double() - x[i]).abs().max().item() <= 1e-6 for i in keep)
    elif method == "gated_ema_" and not finite:
        assert all(bool((a == 0).all()) for a in got)  # skipped: the averages are untouched
    else:
        keep = [i for i in range(len(x)) if finite or i != BAD]
        tol = {"ema_": 1e-7, "gated_ema_": 1e-7, "ema_f64_avg": 1e-15, "ema_compensated_": 1e-15,
               "ema_stochastic_bf16_avg": w * 2**-7}[method]  # (one bfloat16 ulp of w * x)
        for i in keep:  # from zeros, one EMA update gives w * x
            assert (got[i].double() - w * x[i]).abs().max().item() <= tol * x[i].abs().max().item(), i
    benchmark(call)
