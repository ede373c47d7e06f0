"""running_mean_: avg <- avg + (x - avg) / (count + 1); count 0 copies x."""

import pytest
import torch

OP = "running_mean_"
COUNTS = [0, 1, 2, 7, 2.5, 1e6]


@pytest.mark.parametrize("kind", ["py", "tensor"])
@pytest.mark.parametrize("count", COUNTS)
def test_matches_float64_oracle(h, device, dtypes, count, kind):
    h.scenario_oracle(OP, device, dtypes, count, kind)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 2.5, 1e6, 2**31])
def test_float32_is_lerp_with_weight_rounded_once(h, device, count):
    """count c > 0 is lerp with weight float32(1 / (c + 1)), 1/(c+1) computed in float64."""
    weight = torch.tensor(1.0 / (count + 1.0), dtype=torch.float64).float().item()
    h.assert_float32_is_foreach_lerp(OP, device, count, weight)


@pytest.mark.parametrize("kind", ["py", "tensor"])
@pytest.mark.parametrize("out_layout", ["offset1", "strided", "channels_last"])
def test_count_zero_overwrites_nan_outputs(h, device, dtypes, kind, out_layout):
    h.scenario_poisoned_outputs(OP, device, dtypes, 0, kind, out_layout)


@pytest.mark.parametrize("kind", ["py", "tensor"])
def test_count_zero_copies_over_inf_and_nan(h, device, dtypes, kind):
    avgs, xs = h.make_lists([(5,), (4097,)], dtypes, device)
    for a, v in zip(avgs, (float("inf"), float("-inf"))):
        a[::2] = v
        a[1::2] = float("nan")
    h.call(OP, avgs, xs, h.scalar_as(0, kind, device))
    h.assert_all_bits_equal(avgs, [x.to(a.dtype) for a, x in zip(avgs, xs)], "count=0")


def test_mean_of_many_samples(h, device):
    """The intended use (SWA): running_mean_ over N samples gives their mean."""
    avgs, _ = h.make_lists([(1000,), (3, 7)], (h.F32, h.F32), device)
    samples = []
    for n in range(20):
        xs = [h.rand(a.shape, h.F32, device) for a in avgs]
        samples.append(xs)
        h.call(OP, avgs, xs, n)
    for i, a in enumerate(avgs):
        mean = torch.stack([s[i].double() for s in samples]).mean(0)
        torch.testing.assert_close(a.double(), mean, rtol=0, atol=1e-6)
