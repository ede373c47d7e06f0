"""scale_copy_: dst <- scale * src cast to dst's dtype; dst is never read."""

import pytest
import torch

from wavg_ext import ops

OP = "scale_copy_"
SCALES = [1.0, 1.5, 0.3, -2.0, 0.0, 1e-3]


@pytest.mark.parametrize("kind", ["py", "tensor"])
@pytest.mark.parametrize("scale", SCALES)
def test_matches_float64_oracle(h, device, dtypes, scale, kind):
    h.scenario_oracle(OP, device, dtypes, scale, kind)


@pytest.mark.parametrize("kind", ["py", "tensor"])
@pytest.mark.parametrize("out_layout", ["offset1", "strided", "channels_last"])
@pytest.mark.parametrize("scale", [1.0, -0.3])
def test_overwrites_nan_outputs(h, device, dtypes, scale, kind, out_layout):
    h.scenario_poisoned_outputs(OP, device, dtypes, scale, kind, out_layout)


@pytest.mark.parametrize("scale", [1.0, 0.3, 3.0])
def test_rounds_like_torch_casts_over_a_wide_range(h, device, dtypes, scale):
    """scale * src in opmath, rounded once to dst's dtype, as torch does it: including
    overflow to inf and subnormal results of float16/bfloat16."""
    src = (torch.randn(8193, dtype=torch.float64) * 2.0 ** torch.randint(-40, 40, (8193,)))
    src = src.to(dtypes[1]).to(device)
    dst = torch.empty(8193, dtype=dtypes[0], device=device)
    m = h.F64 if h.F64 in dtypes else h.F32
    h.call(OP, [dst], [src], scale)
    h.assert_bits_equal(dst, (src.to(m) * scale).to(dtypes[0]), "scale_copy_ vs torch")


def test_default_scale_is_a_plain_cast(h, device, dtypes):
    dsts, srcs = h.make_lists(h.SIZES, dtypes, device)
    getattr(ops, OP)(dsts, srcs)
    h.assert_all_bits_equal(dsts, [s.to(d.dtype) for d, s in zip(dsts, srcs)], "ops default")
    dsts = [torch.full_like(d, float("nan")) for d in dsts]
    torch.ops.wavg_ext.scale_copy_(dsts, srcs)
    h.assert_all_bits_equal(dsts, [s.to(d.dtype) for d, s in zip(dsts, srcs)], "torch.ops default")


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
