"""The basis ops through the dispatcher: opcheck (schemas, Meta kernels, aliasing),
torch.compile, autograd (never recorded, versions bumped), the reference path."""

import pytest
import torch

from wavg_ext import ops

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _args(hb, op):
    basis = hb.basis(SHAPES, 4, torch.float32)
    xs = hb.tensors(SHAPES, torch.float32)
    if op == "dots":
        return (basis, xs, 3)
    if op == "combine_":
        return (xs, basis, torch.tensor([0.5, -1.0, 2.0]), 1.5, 0.5)
    if op == "project_":
        return (xs, basis, 3)
    return (basis, 2, 2)


OPS = ["dots", "combine_", "project_", "orthonormalize_"]


@pytest.mark.parametrize("op", OPS)
def test_opcheck(hb, op):
    torch.library.opcheck(getattr(torch.ops.wavg_ext, op).default, _args(hb, op),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("op", OPS)
def test_ops_path_equals_torch_ops_and_reference(h, hb, op):
    results = []
    for path in ("ops", "torch.ops", "reference"):
        args = _args(hb, op)
        if path == "torch.ops":
            out = getattr(torch.ops.wavg_ext, op)(*args)
        else:
            previous = ops.force_reference(path == "reference")
            try:
                out = getattr(ops, op)(*args)
            finally:
                ops.force_reference(previous)
        results.append((out, args))
    (o0, a0), (o1, a1), (o2, a2) = results
    if o0 is not None:
        h.assert_bits_equal(o0, o1, f"{op} ops vs torch.ops")
        torch.testing.assert_close(o0, o2, rtol=1e-5, atol=1e-5)
    for t0, t1, t2 in zip(a0[0], a1[0], a2[0]):
        h.assert_bits_equal(t0, t1, f"{op} ops vs torch.ops: first list")
        torch.testing.assert_close(t0, t2, rtol=1e-5, atol=1e-5)


def test_compiled_projection_step(hb):
    """torch.compile(fullgraph=True) traces project_ and dots (Meta kernels)."""
    basis = hb.basis(SHAPES, 4, torch.float32)
    for j in range(4):
        ops.orthonormalize_(basis, j)

    @torch.compile(fullgraph=True, backend="eager")
    def step(grads):
        ops.project_(grads, basis, 4)
        return ops.dots(basis, grads, 2)

    grads = hb.tensors(SHAPES, torch.float32)
    expected = [g.clone() for g in grads]
    ops.project_(expected, basis, 4)
    c = step(grads)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(c, ops.dots(basis, expected, 2))


def test_autograd_not_recorded_and_versions_bumped(hb):
    basis = hb.basis(SHAPES, 4, torch.float32)
    grads = [t.requires_grad_() for t in hb.tensors(SHAPES, torch.float32)]
    with torch.no_grad():
        outs = [g.detach().clone() for g in grads]
    versions = [o._version for o in outs]
    c = ops.dots(basis, grads, 3)
    assert not c.requires_grad and c.grad_fn is None
    ops.project_(outs, basis, 3)
    assert all(o._version > v for o, v in zip(outs, versions))
    bversions = [b._version for b in basis]
    ops.orthonormalize_(basis, 0)
    assert all(b._version > v for b, v in zip(basis, bversions))


def test_inference_tensors_are_refused(hb):
    basis = hb.basis(SHAPES, 4, torch.float32)
    with torch.inference_mode():
        outs = hb.tensors(SHAPES, torch.float32)
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.project_(outs, basis, 2)
