"""Bad input to the basis ops: clear ValueError/TypeError naming the problem, raised
before anything is modified, on every path (ops, torch.ops, reference)."""

import pytest
import torch

from wavg_ext import ops

SHAPES = [(3, 4), (5,), (2, 3, 2)]
PATHS = ["ops", "torch.ops", "reference"]


def _setup(hb):
    basis = hb.basis(SHAPES, 4, torch.float32)
    xs = hb.tensors(SHAPES, torch.float32)
    return basis, xs


def _call(path, op, *args):
    if path == "torch.ops":
        return getattr(torch.ops.wavg_ext, op)(*args)
    previous = ops.force_reference(path == "reference")
    try:
        return getattr(ops, op)(*args)
    finally:
        ops.force_reference(previous)


def _case(name, basis, xs):
    """(op, args, error, match) for a named bad call built from fresh valid lists."""
    b, x = basis, xs
    c3 = torch.ones(3)
    cases = {
        "dots_length": ("dots", (b, x[:2], 2), ValueError, "basis has 3 tensors but xs has 2"),
        "dots_shape": ("dots", (b, [x[0], torch.zeros(6), x[2]], 2), ValueError, r"xs\[1\] has shape \[6\]"),
        "dots_k0": ("dots", (b, x, 0), ValueError, "k must be >= 1"),
        "dots_k_big": ("dots", (b, x, 5), ValueError, "exceeds the basis capacity 4"),
        "dots_capacity": ("dots", ([b[0], b[1][:3], b[2]], x, 2), ValueError, r"basis\[1\].*capacity 4"),
        "dots_basis_f16": ("dots", ([b[0].half(), b[1], b[2]], x, 2), TypeError, "a basis is float32, bfloat16 or float64"),
        "dots_basis_int": ("dots", ([b[0].int(), b[1], b[2]], x, 2), TypeError, r"basis\[0\] has dtype Int"),
        "dots_pairing": ("dots", (b, [x[0], x[1].double(), x[2]], 2), TypeError, "a float32/bfloat16 basis goes with"),
        "dots_rows_not_blocks": ("dots", ([b[0].transpose(0, 1).contiguous().transpose(0, 1), b[1], b[2]], x, 2),
                                 ValueError, "consecutive dense blocks"),
        "dots_0dim_basis": ("dots", ([torch.tensor(1.0), b[1], b[2]], x, 2), ValueError, "0-dimensional"),
        "combine_coeffs_2d": ("combine_", (x, b, torch.ones(1, 3)), ValueError, "1-D tensor"),
        "combine_coeffs_int": ("combine_", (x, b, torch.ones(3, dtype=torch.int64)), TypeError, "float32 or float64"),
        "combine_coeffs_empty": ("combine_", (x, b, torch.ones(0)), ValueError, "coeffs is empty"),
        "combine_coeffs_big": ("combine_", (x, b, torch.ones(5)), ValueError, "5 coefficients but the basis capacity is 4"),
        "combine_alpha_nan": ("combine_", (x, b, c3, float("nan"), 0.0), ValueError, "alpha must be finite"),
        "combine_beta_inf": ("combine_", (x, b, c3, 1.0, float("inf")), ValueError, "beta must be finite"),
        "combine_out_is_basis_row": ("combine_", ([b[0][1], x[1], x[2]], b, c3), ValueError,
                                     r"basis\[0\] shares memory with outs\[0\]"),
        "combine_outs_share": ("combine_", ([x[0], x[1], x[0].view(2, 3, 2)], b, c3), ValueError,
                               r"outs\[0\] and outs\[2\] share memory"),
        "project_expanded": ("project_", ([x[0], torch.zeros(1).expand(5), x[2]], b, 2), ValueError,
                             "internally overlapping"),
        "project_k_big": ("project_", (x, b, 7), ValueError, "exceeds the basis capacity"),
        "project_list_type": ("project_", (x[0], b, 2), TypeError, "list"),
        "ortho_k_big": ("orthonormalize_", (b, 4), ValueError, r"row k=4 is outside the basis \(capacity 4\)"),
        "ortho_k_negative": ("orthonormalize_", (b, -1), ValueError, "must be >= 0"),
        "ortho_passes": ("orthonormalize_", (b, 1, 0), ValueError, "passes must be 1"),
        "ortho_overlap": ("orthonormalize_", ([b[0], b[1], b[0].view(4, 2, 3, 2)], 1), ValueError, r"basis\[0\] and basis\[2\] share memory"),
    }
    return cases[name]


CASES = ["dots_length", "dots_shape", "dots_k0", "dots_k_big", "dots_capacity", "dots_basis_f16",
         "dots_basis_int", "dots_pairing", "dots_rows_not_blocks", "dots_0dim_basis", "combine_coeffs_2d",
         "combine_coeffs_int", "combine_coeffs_empty", "combine_coeffs_big", "combine_alpha_nan",
         "combine_beta_inf", "combine_out_is_basis_row", "combine_outs_share", "project_expanded",
         "project_k_big", "project_list_type", "ortho_k_big", "ortho_k_negative", "ortho_passes",
         "ortho_overlap"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CASES)
def test_bad_input_raises_and_changes_nothing(h, hb, name, path):
    basis, xs = _setup(hb)
    op, args, error, match = _case(name, basis, xs)
    if path == "torch.ops" and name == "project_list_type":
        error, match = (TypeError, RuntimeError), None  # the dispatcher's own argument parser
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, torch.Tensor)] + basis + xs
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        _call(path, op, *args)
    for i, (t, t0) in enumerate(zip(tensors, before)):
        h.assert_bits_equal(t, t0, f"{name}: tensor {i}")


def test_device_mismatch_is_refused(hb):
    basis, xs = _setup(hb)
    meta = [t.to("meta") for t in xs]
    with pytest.raises(ValueError, match="on one device"):
        ops.dots(basis, meta, 2)


def test_coeffs_on_another_device_is_refused(hb, cuda):
    basis, xs = _setup(hb)
    with pytest.raises(ValueError, match="pass it on the CPU or on the basis' device"):
        ops.combine_(xs, basis, torch.ones(2, device=cuda))


def test_basis_on_another_device_than_grads_is_refused(hb, cuda):
    basis, xs = _setup(hb)
    with pytest.raises(ValueError, match="on one device"):
        ops.project_([x.to(cuda) for x in xs], basis, 2)
