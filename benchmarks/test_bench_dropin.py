"""pytest-benchmark suite over ``python -m wavg_ext.bench --suite dropin``.

One test per (device, case, class) on the first 40 ResNet-50 shapes: each first checks that
wavg_ext's AveragedModel and torch's agree after an update of moved weights, then
benchmarks its class's update_parameters; the same for ModelEMA.update and the model-EMA
updates of the other libraries (those installed), and ops.ema_many_ (two power-EMA profiles
from one read) next to two ema_ calls and ema-pytorch's PostHocEMA.update, and a LAWA window
sample (window_push_ + mean) next to torch loops and _foreach ops. With
``--benchmark-disable`` (CI) each body runs once, as a smoke test. No test asserts anything about timings.
"""

from __future__ import annotations

import pytest
import torch

from wavg_ext import build_info
from wavg_ext.bench import dropin

CUDA_OK = torch.cuda.is_available() and build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")])]
CASES = [c for c in dropin.all_cases(quick=True) if c.fn in ("swa", "ema")]
EMA_CASES = [c for c in dropin.all_cases(quick=True) if c.fn == "model_ema"]
POWER_CASES = [c for c in dropin.all_cases(quick=True) if c.fn == "power_ema"]


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


@pytest.mark.parametrize("case", EMA_CASES, ids=[c.id for c in EMA_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_model_ema_update(benchmark, device, case):
    benchmark.group = f"{case.id}-{device}"
    g = torch.Generator(device=device).manual_seed(0)
    holder = dropin.common.ParamHolder([torch.randn(s, generator=g, device=device).to(case.dtype)
                                        for s in dropin.common.SHAPE_SETS[case.shapes]()[:40]])
    for p in holder.parameters():
        p.requires_grad_(True)  # diffusers copies (does not average) parameters that need no grad
    start = [p.detach().clone() for p in holder.parameters()]
    methods = dropin.model_ema_methods(holder)  # each made and updated once: a copy of the weights
    assert "wavg_ext_model_ema" in methods and any(k.startswith("timm") for k in methods)
    with torch.no_grad():
        for p in holder.parameters():
            p.add_(1.0)
    for method in methods.values():
        method.run()
    # Ours (and timm's: same schedule without a step) moved from the start by exactly
    # (1 - decay), to rounding; the others' own schedules differ at their second update:
    # their averages lie between the start and the new weights.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[case.dtype]
    for name, method in methods.items():
        for a, s in zip(method.outs, start):
            if name == "wavg_ext_model_ema" or name.startswith("timm"):
                torch.testing.assert_close(a.float(), (s.double() + (1 - dropin.EMA_DECAY)).float(), rtol=tol,
                                           atol=tol, msg=name)
            else:
                moved = (a.double() - s.double())
                assert bool((moved >= -tol).all()) and bool((moved <= 1 + tol).all()), name
    benchmark(methods["wavg_ext_model_ema"].run)


@pytest.mark.parametrize("which", ["wavg_ext_ema_many_2_profiles", "wavg_ext_2x_ema_", "ema_pytorch_post_hoc"])
@pytest.mark.parametrize("case", POWER_CASES, ids=[c.id for c in POWER_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_power_ema_update(benchmark, device, case, which, tmp_path):
    benchmark.group = f"{case.id}-{device}"
    g = torch.Generator(device=device).manual_seed(0)
    holder = dropin.common.ParamHolder([torch.randn(s, generator=g, device=device).to(case.dtype)
                                        for s in dropin.common.SHAPE_SETS[case.shapes]()[:40]])
    methods = dropin.power_ema_methods(holder, str(tmp_path))  # each updated once from the weights
    if which not in methods:
        pytest.skip(f"{which}: ema-pytorch is not installed")
    with torch.no_grad():
        for p in holder.parameters():
            p.add_(1.0)
    fused, separate = methods["wavg_ext_ema_many_2_profiles"], methods["wavg_ext_2x_ema_"]
    before = [a.clone() for a in fused.outs]
    fused.run()  # (both update the same averages: the fused op's result is checked by the op tests;
    # here, that a second update moved profile 0 by its weight)
    w = 1.0 - dropin.power_ema_beta(dropin.sigma_rel_to_gamma(dropin.POWER_SIGMA_RELS[0]), 100, 1)
    for a, b, p in zip(fused.outs, before, holder.parameters()):
        torch.testing.assert_close(a.double(), torch.lerp(b.double(), p.double(), w), rtol=1e-5, atol=1e-5)
    assert separate.outs is fused.outs
    benchmark(methods[which].run)


LAWA_CASES = [c for c in dropin.all_cases(quick=True) if c.fn == "lawa"]


@pytest.mark.parametrize("which", ["wavg_ext_window_push_", "torch_loop", "torch_foreach"])
@pytest.mark.parametrize("case", LAWA_CASES, ids=[c.id for c in LAWA_CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_lawa_window_sample(benchmark, device, case, which):
    """The three ways agree (the mean of the samples so far), then one is benchmarked."""
    benchmark.group = f"{case.id}-{device}"
    g = torch.Generator(device=device).manual_seed(0)
    holder = dropin.common.ParamHolder([torch.randn(s, generator=g, device=device).to(case.dtype)
                                        for s in dropin.common.SHAPE_SETS[case.shapes]()[:40]])
    methods = dropin.lawa_methods(holder)  # each took the weights as its first sample
    first = [p.detach().double().clone() for p in holder.parameters()]
    with torch.no_grad():
        for p in holder.parameters():
            p.add_(1.0)
    for method in methods.values():
        method.run()  # the second sample: the mean of the two
    for name, method in methods.items():
        for a, p, f in zip(method.outs, holder.parameters(), first):
            torch.testing.assert_close(a.double(), (p.double() + f) / 2, rtol=1e-6, atol=1e-6, msg=name)
    benchmark(methods[which].run)
