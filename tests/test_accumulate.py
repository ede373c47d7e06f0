"""accumulate_: sum <- sum + alpha * x (a fused multiply-add in opmath)."""

import pytest
import torch

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
    FMA cannot be emulated this way; the oracle test covers it.)"""
    sums, xs = h.make_lists(h.SIZES, pair, device)
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


def test_zero_numel_tensors(h, device, zero_numel):
    h.scenario_zero_numel(OP, device, zero_numel)


@pytest.mark.parametrize("path", ["ops", "torch.ops", "reference"])
@pytest.mark.parametrize("kind", ["py", "tensor"])
def test_empty_lists_are_a_no_op(h, path, kind):
    h.scenario_empty_lists(OP, path, kind)


def test_3000_small_tensors(h, device):
    h.scenario_many_small(OP, device)


def test_tensor_larger_than_one_cuda_launch(h, device):
    h.scenario_big(OP, device)


def test_layouts_and_guards(h, device, dtypes, layouts):
    h.scenario_layouts(OP, device, dtypes, layouts)


def test_deterministic(h, device):
    h.scenario_determinism(OP, device)


@pytest.mark.parametrize("tensor_dtype", [torch.float32, torch.float64, torch.int64, torch.int32])
def test_python_and_tensor_scalar_agree(h, device, tensor_dtype):
    h.scenario_scalar_forms(OP, device, tensor_dtype)
