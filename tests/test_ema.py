"""ema_: avg <- avg + weight * (x - avg), torch.lerp semantics."""

import pytest
import torch

OP = "ema_"
WEIGHTS = [0.1, 0.5, 0.999, 1.0, 0.0, -0.25, 1.5]


@pytest.mark.parametrize("kind", ["py", "tensor"])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_matches_float64_oracle(h, device, dtypes, weight, kind):
    h.scenario_oracle(OP, device, dtypes, weight, kind)


@pytest.mark.parametrize("weight", [0.1, 0.5, 0.999, -0.25, 1.5])
def test_float32_bit_identical_to_foreach_lerp(h, device, weight):
    h.assert_float32_is_foreach_lerp(OP, device, weight, weight)


@pytest.mark.parametrize("weight, which", [(0.0, "avg"), (1.0, "x")])
def test_weight_zero_keeps_avg_and_one_copies_x(h, device, dtypes, weight, which):
    avgs, xs = h.make_lists(h.SIZES, dtypes, device)
    expected = h.clones(avgs) if which == "avg" else [x.to(a.dtype) for a, x in zip(avgs, xs)]
    h.call(OP, avgs, xs, weight)
    h.assert_all_bits_equal(avgs, expected, f"ema_ weight={weight}")


def test_repeated_steps_track_float64_ema(h, device, dtypes):
    """An EMA over many steps at low precision stays as close to a float64 EMA as
    torch.lerp at the same dtype does."""
    avgs, _ = h.make_lists([(1000,)], dtypes, device)
    ref, plain = [avgs[0].double()], h.clones(avgs)
    for _ in range(50):
        xs = [h.rand((1000,), dtypes[1], device)]
        h.call(OP, avgs, xs, 0.1)
        torch.lerp(ref[0], xs[0].double(), 0.1, out=ref[0])
        plain[0].copy_(torch.lerp(plain[0].float() if dtypes[0] != h.F64 else plain[0],
                                  xs[0].to(h.F64 if dtypes[0] == h.F64 else h.F32), 0.1))
    err = (avgs[0].double() - ref[0]).abs().max()
    err_plain = (plain[0].double() - ref[0]).abs().max()
    assert err <= 2 * err_plain
