"""combine_(outs, basis, coeffs, alpha, beta): out <- beta*out + alpha*sum_i c_i*basis_t[i]."""

import pytest
import torch

from wavg_ext import ops

OUT_DTYPES = {torch.float32: [torch.float32, torch.float16, torch.bfloat16],
              torch.bfloat16: [torch.float32, torch.bfloat16, torch.float16],
              torch.float64: [torch.float64]}


def _pairs(hb):
    return [(b, o) for b in hb.BASIS_DTYPES for o in OUT_DTYPES[b]]


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.75)])
@pytest.mark.parametrize("coeff_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("coeff_place", ["cpu", "device"])
def test_matches_float64_oracle(h, hb, device, alpha, beta, coeff_dtype, coeff_place):
    if coeff_place == "device" and device == "cpu":
        pytest.skip("same as coeff_place='cpu'")
    for bdt, odt in _pairs(hb):
        basis = hb.basis(hb.SHAPES, 4, bdt, device)
        outs = hb.tensors(hb.SHAPES, odt, device)
        coeffs = torch.tensor([0.5, -1.25, 2.0], dtype=coeff_dtype,
                              device=device if coeff_place == "device" else "cpu")
        outs0, basis0 = h.clones(outs), h.clones(basis)
        ops.combine_(outs, basis, coeffs, alpha, beta)
        h.assert_all_bits_equal(basis, basis0, "basis modified")
        oracle = [o.to(torch.float64, copy=True) for o in outs0]
        ops.reference.combine_(oracle, [b.double() for b in basis], coeffs.double(), alpha, beta)
        plain = h.clones(outs0)
        ops.reference.combine_(plain, basis, coeffs, alpha, beta)
        hb.assert_fused_error(f"combine_ {bdt}->{odt}", outs, oracle, plain, odt,
                              None if odt != torch.float64 else 1e-13)


def test_beta_zero_overwrites_nan_outputs_and_nothing_else(h, hb, device):
    """beta == 0 does not read the outputs (NaN-poisoned, misaligned views) and writes
    nothing around them."""
    shapes = [(4, 16, 33, 31), (1, 3, 1, 5), (70001,)]
    basis = hb.basis(shapes, 3, torch.float32, device)
    bases, outs = [], []
    for s in shapes:
        buf, view = h.guarded(s, torch.float32, device, fill=float("nan"), guard=37)
        view.fill_(float("nan"))
        bases.append(buf)
        outs.append(view)
    guards = [h.outside_view(b, o) for b, o in zip(bases, outs)]
    coeffs = torch.tensor([1.0, -2.0, 0.5])
    ops.combine_(outs, basis, coeffs, 1.5, 0.0)
    expected = [o.clone() for o in outs]
    ops.reference.combine_(expected, basis, coeffs, 1.5, 0.0)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert not o.isnan().any(), f"NaN left in outs[{i}]"
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    for i, (b, o, g) in enumerate(zip(bases, outs, guards)):
        h.assert_bits_equal(h.outside_view(b, o), g, f"guards around outs[{i}]")


@pytest.mark.parametrize("layout", ["channels_last", "strided", "transposed"])
def test_output_layouts(h, hb, device, layout):
    shape = (4, 6, 5, 3)
    basis = hb.basis([shape], 3, torch.float32, device)
    values = hb.tensors([shape], torch.float32, device)[0]
    base, out = h.embed(values, layout)
    guard = h.outside_view(base, out)
    expected = [values.clone()]
    coeffs = torch.tensor([0.25, -1.0, 3.0])
    ops.reference.combine_(expected, basis, coeffs, 1.0, 0.5)
    ops.combine_([out], basis, coeffs, 1.0, 0.5)
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
    h.assert_bits_equal(h.outside_view(base, out), guard, "guards")


def test_deterministic_across_threads(hb):
    shapes = [(200003,), (65536 * 2 + 3,)]
    basis = hb.basis(shapes, 5, torch.float32)
    outs = hb.tensors(shapes, torch.float32)
    coeffs = torch.randn(5)
    results = []
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        res = [o.clone() for o in outs]
        ops.combine_(res, basis, coeffs, 1.0, 0.5)
        results.append(res)
    for a, b in zip(*results):
        assert torch.equal(a, b)
