"""accumulate_: sum <- sum + alpha * x (a fused multiply-add in opmath)."""

import pytest
import torch

import wavg_ext
from wavg_ext import ops

OP = "accumulate_"
ALPHAS = [1.0, -0.5, 0.3, 0.0, 1e-3, 100.0]


@pytest.mark.parametrize("kind", ["py", "tensor"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_float64_oracle(h, device, dtypes, alpha, kind):
    h.scenario_oracle(OP, device, dtypes, alpha, kind)


F32_OPMATH_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16),
                    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                    (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("alpha", [1.0, -0.5, 0.3, 1e-3])
@pytest.mark.parametrize("pair", F32_OPMATH_PAIRS, ids=lambda p: f"{str(p[0])[6:]}<-{str(p[1])[6:]}")
def test_is_one_fused_multiply_add_in_float32(h, device, pair, alpha):
    """For float32-opmath pairs: round(fma(float32(alpha), x, sum)) to sum's dtype. The
    float64 sum of float32 operands is exact in all but negligibly rare cases. (float64
    FMA cannot be emulated this way; the oracle test covers it.) The CPU kernels of the
    baseline ISA (no FMA instruction) round the product to float32 first."""
    sums, xs = h.make_lists(h.SIZES, pair, device)
    if device == "cpu" and wavg_ext.build_info()["cpu_capability"] == "default":
        a32 = torch.tensor(alpha, dtype=torch.float32)
        expected = [(s.float() + a32 * x.float()).to(s.dtype) for s, x in zip(sums, xs)]
    else:
        a32 = torch.tensor(alpha, dtype=torch.float32).double()
        expected = [(s.double() + a32 * x.double()).float().to(s.dtype) for s, x in zip(sums, xs)]
    h.call(OP, sums, xs, alpha)
    h.assert_all_bits_equal(sums, expected, "accumulate_ vs fma")


def test_default_alpha_is_one(h, device, dtypes):
    sums, xs = h.make_lists(h.SIZES, dtypes, device)
    expected = h.clones(sums)
    h.call(OP, expected, xs, 1.0)
    torch.ops.wavg_ext.accumulate_(sums, xs)  # schema default
    h.assert_all_bits_equal(sums, expected, "torch.ops default alpha")
    sums2 = h.clones(sums)
    getattr(ops, OP)(sums, xs)
    h.call(OP, sums2, xs, 1.0)
    h.assert_all_bits_equal(sums, sums2, "ops default alpha")
