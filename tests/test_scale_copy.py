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
