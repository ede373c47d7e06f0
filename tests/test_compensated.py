"""running_mean_compensated_, ema_compensated_ and nonfinite_flag: against float64 oracles on
fresh random data (every supported dtype pair, odd sizes, zero-numel tensors, strided inputs),
long runs where a plain average stagnates, the NaN gate, validation that changes nothing, the
reference path, opcheck."""

from __future__ import annotations

import pytest
import torch

import wavg_ext
from wavg_ext import ops

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
PAIRS = [(F32, F32), (F32, F16), (F32, BF16), (F16, F16), (BF16, BF16), (F64, F64), (F64, F32), (F64, BF16)]
SHAPES = [(1,), (7,), (0,), (33, 5), (4097,), (2, 3, 5), (70001,)]
OPS = [spec["name"] for spec in wavg_ext._C.op_specs() if spec["kind"] == "compensated"]  # the registry's


def pair_id(p):
    return f"{str(p[0])[6:]}-{str(p[1])[6:]}"


def eps(dtype):
    return torch.finfo(dtype).eps


def make(shapes, avg_dtype, x_dtype, device="cpu", seed=0):
    """avgs, comps (a remainder below a quarter ulp of avg, as after earlier updates), xs."""
    g = torch.Generator().manual_seed(seed)
    avgs, comps, xs = [], [], []
    for s in shapes:
        a = torch.randn(s, generator=g, dtype=F64)
        avg = a.to(avg_dtype)
        comp = (torch.rand(s, generator=g, dtype=F64) - 0.5) * 0.5 * eps(avg_dtype) * avg.to(F64).abs()
        comp = comp.to(avg_dtype) if avg_dtype != F64 else torch.zeros_like(avg)
        avgs.append(avg.to(device))
        comps.append(comp.to(device))
        xs.append((a + torch.randn(s, generator=g, dtype=F64)).to(x_dtype).to(device))
    return avgs, comps, xs


def value(avgs, comps):
    return [a.to(F64) + c.to(F64) for a, c in zip(avgs, comps)]


def oracle(op, avgs, comps, xs, scalar):
    """The float64 result, and the scale of its rounding errors (the inputs' magnitude)."""
    s = value(avgs, comps)
    x = [t.to(F64) for t in xs]
    scale = [torch.maximum(si.abs(), xi.abs()) for si, xi in zip(s, x)]
    if op == "running_mean_compensated_":
        if scalar == 0:
            return x, scale
        w = 1.0 / (scalar + 1.0)
    else:
        w = scalar
    return [si + w * (xi - si) for si, xi in zip(s, x)], scale


def assert_pair_matches(avgs, comps, expected, avg_dtype):
    """The pair's value is the float64 result up to the pair's precision (relative to the
    inputs' magnitude), and avg is the nearest value of its dtype (the remainder is below
    an ulp of it)."""
    expected, scale = expected
    e = eps(avg_dtype)
    tol_rel = 4 * e * e if avg_dtype != F64 else 4 * e
    for i, (a, c, v, m) in enumerate(zip(avgs, comps, expected, scale)):
        got = a.to(F64) + c.to(F64)
        err = (got - v).abs()
        bound = tol_rel * m + torch.finfo(avg_dtype).smallest_normal * e  # (+ a subnormal step of comp)
        assert bool((err <= bound).all()), f"[{i}] max err {err.max().item():.3g}"
        assert bool((c.to(F64).abs() <= e * a.to(F64).abs() + torch.finfo(avg_dtype).tiny).all()), f"[{i}] comp"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_against_float64_oracle(op, pair, kind):
    avgs, comps, xs = make(SHAPES, *pair)
    scalar = 3.0 if op == "running_mean_compensated_" else 0.3
    expected = oracle(op, avgs, comps, xs, scalar)
    arg = scalar if kind == "float" else torch.tensor(scalar, dtype=F64)
    getattr(ops, op)(avgs, comps, xs, arg)
    assert_pair_matches(avgs, comps, expected, pair[0])


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_count_zero_copies_x_and_its_remainder(pair):
    avgs, comps, xs = make(SHAPES, *pair)
    for a, c in zip(avgs, comps):  # garbage, even NaN, is overwritten
        a.fill_(float("nan"))
        c.fill_(float("inf"))
    ops.running_mean_compensated_(avgs, comps, xs, 0)
    for a, c, x in zip(avgs, comps, xs):
        assert torch.equal(a, x.to(F64).to(pair[0]))
        assert torch.equal(a.to(F64) + c.to(F64), x.to(F64)) or pair[0] == F64


def test_float32_ema_at_decay_099999_tracks_float64():
    # avg 1, x = 1 + 2^-10: a plain float32 EMA never moves (each update ~1e-8 < half an ulp).
    n = 3000
    avg, comp = torch.ones(1000), torch.zeros(1000)
    plain = torch.ones(1000)
    x = torch.full((1000,), 1.0 + 2.0 ** -10)
    w = 1.0 - 0.99999
    ref = torch.ones(1000, dtype=F64)
    for _ in range(n):
        ops.ema_compensated_([avg], [comp], [x], w)
        ops.ema_([plain], [x], w)
        ref += w * (x.to(F64) - ref)
    assert torch.equal(plain, torch.ones(1000))
    got = avg.to(F64) + comp.to(F64)
    assert (got - ref).abs().max().item() <= 4 * eps(F32) ** 2 * n  # float64-class, not float32-class
    assert (avg.to(F64) - ref).abs().max().item() <= 0.5 * eps(F32)  # avg is the nearest float32


def test_float32_running_mean_after_ten_million_samples_tracks_float64():
    # Counts from 10^7: w = 1/(n+1) ~ 1e-7, the regime where a float32 mean ignores new samples.
    g = torch.Generator().manual_seed(0)
    avg = torch.full((4096,), 3.0)
    comp = torch.zeros(4096)
    plain = avg.clone()
    ref = avg.to(F64)
    start = 10**7
    for k in range(2000):
        x = (3.0 + torch.rand(4096, generator=g)).to(F32)
        ops.running_mean_compensated_([avg], [comp], [x], start + k)
        ops.running_mean_([plain], [x], start + k)
        ref += (x.to(F64) - ref) / (start + k + 1)
    drift = ref - 3.0  # ~1e-4: the samples' mean is 3.5
    got = avg.to(F64) + comp.to(F64)
    assert (got - ref).abs().max().item() < 1e-12
    assert ((avg.to(F64) - ref).abs() <= 0.5 * eps(F32) * 4).all()  # within half an ulp at 3..4
    assert (plain.to(F64) - ref).abs().max().item() > 0.1 * drift.abs().min().item()  # plain lags


@pytest.mark.parametrize("op", OPS)
def test_nan_tensor_scalar_leaves_everything_untouched(op):
    avgs, comps, xs = make(SHAPES, F32, BF16)
    before = [t.clone() for t in avgs + comps]
    getattr(ops, op)(avgs, comps, xs, torch.tensor(float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(avgs + comps, before))


def test_strided_and_channels_last_inputs():
    avg = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    comp = torch.zeros_like(avg)
    x = torch.randn(2, 3, 4, 10)[..., ::2]  # strided input: a temporary in avg's layout
    expected = oracle("ema_compensated_", [avg], [comp], [x], 0.25)
    ops.ema_compensated_([avg], [comp], [x], 0.25)
    assert_pair_matches([avg], [comp], expected, F32)


@pytest.mark.parametrize("case", ["comp dtype", "comp shape", "comp layout", "comp overlaps avg", "comp is x",
                                  "lengths", "bad pair", "comp not a tensor", "negative count"])
def test_bad_input_raises_and_changes_nothing(case):
    avgs, comps, xs = make([(5,), (6,), (7,)], F32, F32)
    scalar = 2.0
    if case == "comp dtype":
        comps[1] = comps[1].double()
    elif case == "comp shape":
        comps[2] = torch.zeros(8)
    elif case == "comp layout":
        avgs[0] = torch.randn(4, 6)
        comps[0] = torch.zeros(6, 4).t()
        xs[0] = torch.randn(4, 6)
    elif case == "comp overlaps avg":
        comps[1] = avgs[1]
    elif case == "comp is x":
        comps[2] = xs[2]
    elif case == "lengths":
        comps = comps[:2]
    elif case == "bad pair":
        xs[0] = xs[0].double()
    elif case == "comp not a tensor":
        comps[0] = [0.0] * 5
    elif case == "negative count":
        scalar = -1.0
    before = [t.clone() for t in avgs + [c for c in comps if isinstance(c, torch.Tensor)]]
    with pytest.raises((ValueError, TypeError)) as info:
        ops.running_mean_compensated_(avgs, comps, xs, scalar)
    after = avgs + [c for c in comps if isinstance(c, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    if case.startswith("comp") and case not in ("comp overlaps avg", "comp is x"):
        assert "comps[" in str(info.value) or "comps" in str(info.value)


@pytest.mark.parametrize("op", OPS)
def test_reference_path_agrees(op):
    avgs, comps, xs = make(SHAPES, F32, F16, seed=3)
    ref = ([a.clone() for a in avgs], [c.clone() for c in comps])
    scalar = 5.0 if op == "running_mean_compensated_" else 0.1
    getattr(ops, op)(avgs, comps, xs, scalar)
    previous = ops.force_reference(True)
    try:
        getattr(ops, op)(*ref[:1], ref[1], xs, scalar)
    finally:
        ops.force_reference(previous)
    for a, c, ra, rc in zip(avgs, comps, *ref):
        assert (a.to(F64) + c.to(F64) - ra.to(F64) - rc.to(F64)).abs().max().item() <= 1e-13 if a.numel() else True


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    avgs, comps, xs = make([(5,), (3, 4)], F32, BF16)
    scalar = 2.0 if op == "running_mean_compensated_" else 0.5
    packet = getattr(torch.ops.wavg_ext, op)
    torch.library.opcheck(packet.default, (avgs, comps, xs, scalar))
    torch.library.opcheck(packet.Tensor, (avgs, comps, xs, torch.tensor(scalar, dtype=F64)))
    torch.library.opcheck(torch.ops.wavg_ext.nonfinite_flag.default, (xs,))


# --------------------------------------------------------------------------- nonfinite_flag


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "vector body", "tail", "last tensor"])
def test_nonfinite_flag(dtype, bad, where):
    xs = [torch.randn(s, dtype=F64).to(dtype) for s in [(33,), (0,), (70001,), (3, 5)]]
    if bad is not None:
        t, i = {"first": (0, 0), "vector body": (2, 40000), "tail": (2, 70000), "last tensor": (3, 14)}[where]
        xs[t].view(-1)[i] = float(bad)
    flag = ops.nonfinite_flag(xs)
    assert flag.dtype == torch.int32 and flag.dim() == 0
    assert int(flag) == (bad is not None)
    previous = ops.force_reference(True)
    try:
        assert int(ops.nonfinite_flag(xs)) == int(flag)
    finally:
        ops.force_reference(previous)


def test_nonfinite_flag_edge_cases():
    assert int(ops.nonfinite_flag([])) == 0
    x = torch.randn(8, 6)[:, ::2].clone()
    y = torch.randn(8, 6)[:, ::2]  # strided
    y[3, 1] = float("nan")
    assert int(ops.nonfinite_flag([x])) == 0 and int(ops.nonfinite_flag([x, y])) == 1
    big = torch.full((3 * 65536 + 5,), 1e38)  # finite, huge: no overflow to a false alarm
    assert int(ops.nonfinite_flag([big])) == 0
    with pytest.raises(TypeError, match=r"xs\[1\]"):
        ops.nonfinite_flag([x, torch.zeros(3, dtype=torch.int64)])
