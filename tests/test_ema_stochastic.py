"""ema_stochastic_: ema_ for bfloat16 averages, rounded stochastically. Every backend
(the CPU kernels of every ISA, the emulated CUDA kernels, CUDA when present) gives the
reference's bits for the same seed; the rounding lands on one of the two bfloat16
neighbours of the float32 result and is unbiased; an EMA whose steps are below half an
ulp keeps moving where round-to-nearest freezes."""

import pytest
import torch

from wavg_ext import _C, ops, testing
from wavg_ext.ops import reference

BF16, F32 = torch.bfloat16, torch.float32
# odd sizes, a vector tail, one bigger than a CPU work item and a CUDA chunk, empty ones
SHAPES = [(1,), (31,), (7, 33), (0,), (65536 + 77,), (3, 0), (129, 257)]
WEIGHTS = [0.5, 1e-3, 0.25, 1.0, 0.0, -0.5, 1.5]


def _lists(device, in_dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    avgs = [torch.randn(s, generator=g).to(BF16).to(device) for s in shapes]
    # weights near the averages, so that the update is a fraction of an ulp for many elements
    xs = [(a.float() + 0.01 * torch.randn(s, generator=g).to(device)).to(in_dtype) for a, s in zip(avgs, shapes)]
    return avgs, xs


def _bits(t):
    return t.view(torch.int16)


def _assert_same_bits(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype == BF16 and torch.equal(_bits(a), _bits(b)), f"pair {i}"


@pytest.mark.parametrize("in_dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_bits_equal_the_reference(device, in_dtype, weight):
    avgs, xs = _lists(device, in_dtype)
    want = [a.clone() for a in avgs]
    reference.ema_stochastic_(want, xs, weight, 12345)
    ops.ema_stochastic_(avgs, xs, weight, 12345)
    _assert_same_bits(avgs, want)


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63)])
def test_any_int64_seed(device, seed):
    avgs, xs = _lists(device, F32, shapes=[(1000,)])
    want = [a.clone() for a in avgs]
    reference.ema_stochastic_(want, xs, 0.1, seed)
    ops.ema_stochastic_(avgs, xs, 0.1, seed)
    _assert_same_bits(avgs, want)


@pytest.mark.parametrize("weight", [1e-3, 0.3])
def test_result_is_a_neighbour_of_the_float32_value(device, weight):
    avgs, xs = _lists(device, F32)
    exact = [torch.lerp(a.float(), x, weight) for a, x in zip(avgs, xs)]
    ops.ema_stochastic_(avgs, xs, weight, 5)
    for a, v in zip(avgs, exact):
        # the bfloat16 neighbours: truncation (toward 0) and one ulp further from 0
        toward_zero = (v.view(torch.int32) & -65536).view(F32)
        away = ((v.view(torch.int32) & -65536) + 65536).view(F32)
        away = torch.where(toward_zero == v, v, away)  # exact values stay
        got = a.float()
        assert bool(((got == toward_zero) | (got == away)).all())


def test_unbiased_over_elements_and_over_seeds(device):
    # v = 1 + 0.3 ulp: rounds up with probability 0.3, never to nearest-even's 1.0 only
    ulp = 2.0**-7
    n = 1 << 17
    x = torch.full((n,), 1.0 + 0.6 * ulp)
    avg = torch.ones(n, dtype=BF16)
    ops.ema_stochastic_([avg], [x], 0.5, 99)
    v = torch.lerp(torch.ones(1), x[:1], 0.5).item()
    up = (avg.float() > 1).double().mean().item()
    p = (v - 1.0) / ulp
    assert abs(up - p) < 5 * (p * (1 - p) / n) ** 0.5, (up, p)
    assert set(avg.float().unique().tolist()) == {1.0, 1.0 + ulp}
    # one element over many seeds
    ups = 0
    for seed in range(2000):
        a = torch.ones(1, dtype=BF16)
        ops.ema_stochastic_([a], [x[:1]], 0.5, seed)
        ups += int(a.item() > 1)
    assert abs(ups / 2000 - p) < 5 * (p * (1 - p) / 2000) ** 0.5


def test_a_slow_ema_keeps_moving_where_round_to_nearest_freezes(device):
    """decay 0.999 toward a target 5 ulps away: every step moves the average by ~0.005 ulp,
    so ema_ on a bfloat16 average never moves; the stochastic average follows the float64
    EMA to within its rounding noise."""
    ulp = 2.0**-7
    target = torch.full((4096,), 1.0 + 5 * ulp)
    plain = torch.ones(4096, dtype=BF16)
    sr = torch.ones(4096, dtype=BF16)
    ref = 1.0
    for step in range(1500):
        ops.ema_(([plain]), [target.to(BF16)], 1e-3)
        ops.ema_stochastic_([sr], [target], 1e-3, step)
        ref += 1e-3 * (1.0 + 5 * ulp - ref)
    assert bool((plain == 1).all())
    mean = sr.double().mean().item()
    assert abs(mean - ref) < 0.05 * (ref - 1.0), (mean, ref)  # ~3.9 ulps of ~3.9 moved


def test_deterministic_for_a_seed_and_different_across_seeds(device):
    avgs, xs = _lists(device, F32)
    runs = []
    for seed in (7, 7, 8):
        out = [a.clone() for a in avgs]
        ops.ema_stochastic_(out, xs, 1e-3, seed)
        runs.append(out)
    _assert_same_bits(runs[1], runs[0])
    assert any(not torch.equal(_bits(a), _bits(b)) for a, b in zip(runs[2], runs[0]))


def test_random_bits_follow_the_position_in_the_lists(device):
    """A pair's bits depend on its position, not on the other pairs: the same tensor at
    position 0 of two calls gets the same result; at another position, another."""
    avgs, xs = _lists(device, F32, shapes=[(5000,), (5000,)])
    alone = [avgs[0].clone()]
    ops.ema_stochastic_(alone, xs[:1], 1e-3, 3)
    both = [a.clone() for a in avgs]
    ops.ema_stochastic_(both, xs, 1e-3, 3)
    assert torch.equal(_bits(alone[0]), _bits(both[0]))
    swapped = [avgs[1].clone(), avgs[0].clone()]
    ops.ema_stochastic_(swapped, [xs[1], xs[0]], 1e-3, 3)
    assert not torch.equal(_bits(swapped[1]), _bits(both[0]))


def test_same_bits_for_any_thread_count_and_isa():
    avgs, xs = _lists("cpu", F32)
    want = [a.clone() for a in avgs]
    reference.ema_stochastic_(want, xs, 1e-3, 77)
    for isa in testing.supported_cpu_capabilities():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = [a.clone() for a in avgs]
            with testing.cpu_capability(isa):
                ops.ema_stochastic_(out, xs, 1e-3, 77)
            _assert_same_bits(out, want)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided", "offset"])
def test_layouts_follow_the_averages_memory_order(device, layout):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 5, 7, generator=g)

    def make(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return t.transpose(1, 3)
        if layout == "strided":
            return torch.stack([t, t])[0, :, :, ::2]  # not dense: runs on a contiguous copy
        return torch.cat([torch.zeros(1, dtype=t.dtype), t.flatten()])[1:].view(t.shape)

    avg = make(base.to(BF16))
    x = make(base + 0.01 * torch.randn(base.shape, generator=g))
    want = avg.clone()
    reference.ema_stochastic_([want], [x.contiguous()], 1e-3, 6)
    ops.ema_stochastic_([avg], [x.contiguous()], 1e-3, 6)
    assert torch.equal(_bits(avg.contiguous()), _bits(want.contiguous()))


def test_nan_and_inf_are_cast_like_round_to_nearest(device):
    avg = torch.tensor([0.0, 1.0, 2.0, float("inf"), -1.0, 3.0e38], dtype=BF16)
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0, 3.0e38, 3.3e38])
    v = torch.lerp(avg.float(), x, 0.25)  # nan, inf, -inf, nan, finite, finite
    ops.ema_stochastic_([avg], [x], 0.25, 1)
    got, cast = avg.float(), v.to(BF16).float()
    finite = torch.isfinite(v)
    assert torch.equal(torch.isnan(got), torch.isnan(cast))
    assert torch.equal(got[~finite & ~torch.isnan(v)], cast[~finite & ~torch.isnan(v)])
    assert bool(torch.isfinite(got[4:5]).all())


def test_parameters_and_autograd(device):
    """Weights that require grad (parameters) are read below autograd; the average's
    version counter is bumped."""
    p = torch.nn.Parameter(torch.randn(100))
    avg = p.detach().to(BF16).clone()
    version = avg._version
    ops.ema_stochastic_([avg], [p], 0.1, 0)
    assert avg._version > version and not avg.requires_grad


def test_opcheck():
    avgs = [torch.randn(7).to(BF16), torch.randn(3, 5).to(BF16)]
    xs = [torch.randn(7), torch.randn(3, 5).to(BF16)]
    torch.library.opcheck(torch.ops.wavg_ext.ema_stochastic_.default, (avgs, xs, 0.25, 11))


def test_bad_dtypes_are_refused_before_anything_changes():
    avg = torch.randn(5).to(BF16)
    before = avg.clone()
    with pytest.raises(TypeError, match=r"avgs\[0\] is Float; stochastic rounding makes bfloat16"):
        ops.ema_stochastic_([torch.randn(5)], [torch.randn(5)], 0.1, 0)
    with pytest.raises(TypeError, match=r"xs\[1\] is Double"):
        ops.ema_stochastic_([avg, avg[:2].clone()], [torch.randn(5), torch.randn(2, dtype=torch.float64)], 0.1, 0)
    with pytest.raises(ValueError, match="weight must be finite"):
        ops.ema_stochastic_([avg], [torch.randn(5)], float("inf"), 0)
    assert torch.equal(_bits(avg), _bits(before))


def test_in_the_registry():
    spec = {s["name"]: s for s in _C.op_specs()}["ema_stochastic_"]
    assert spec["lists"] == ["avgs", "xs"] and spec["written"] == ["avgs"]
