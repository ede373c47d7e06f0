"""orthonormalize_many_(basis, k, n): the batch path (block CGS2 + Cholesky-QR2, CGS2 fallback)."""

import pytest
import torch

from wavg_ext import ops

SHAPES = [(64, 3, 3, 3), (64,), (500, 257), (5,), (0,), (70001,)]


def _sequential(basis, k, n):
    for j in range(k, k + n):
        ops.orthonormalize_(basis, j)


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("k", [0, 5])
def test_equals_sequential_cgs2(hb, k, path):
    n = 16
    batch = hb.random_walk(SHAPES, k + n, capacity=k + n + 2)
    seq = [b.clone() for b in batch]
    _sequential(seq, 0, k + n)
    _sequential(batch, 0, k)
    previous = ops.force_reference(path == "torch")  # the float64-matmul path of other devices
    try:
        result = ops.orthonormalize_many_(batch, k, n)
    finally:
        ops.force_reference(previous)
    assert result.accepted == n and result.method == "cholqr2"
    assert result.residuals.shape == (n,)
    assert hb.orthogonality_error(batch, k + n) <= 1e-5
    torch.testing.assert_close(hb.rows(batch, k + n), hb.rows(seq, k + n), rtol=0, atol=2e-5)
    assert all(not b[k + n:].any() for b in batch)  # rows past the block untouched (zeros)


def test_ill_conditioned_block_falls_back_to_cgs2(hb):
    """Snapshots that differ by 1e-5 relative: too ill-conditioned for Cholesky-QR in
    float32, so the CGS2 fallback runs (and still orthonormalizes)."""
    n = 8
    basis = hb.random_walk(SHAPES, n, step=3e-5)
    result = ops.orthonormalize_many_(basis, 0, n)
    assert result.method == "cgs2" and result.accepted == n
    assert hb.orthogonality_error(basis, n) <= 1e-5


def test_duplicate_and_zero_snapshots_are_dropped(hb):
    n = 6
    basis = hb.random_walk(SHAPES, n, capacity=n)
    for b in basis:
        b[3].copy_(b[1])  # a copy of an earlier snapshot
        b[5].zero_()
    keep = [b[[0, 1, 2, 4]].clone() for b in basis]
    result = ops.orthonormalize_many_(basis, 0, n)
    assert result.method == "cgs2" and result.accepted == 4
    assert result.residuals[3] < 1e-5 and result.residuals[5] == 0
    expected = [k.clone() for k in keep]
    _sequential(expected, 0, 4)
    torch.testing.assert_close(hb.rows(basis, 4), hb.rows(expected, 4), rtol=0, atol=2e-5)
    assert all(not b[4:].any() for b in basis)


def test_float64_basis(hb):
    n = 10
    basis = hb.random_walk(SHAPES, n, dtype=torch.float64)
    seq = [b.clone() for b in basis]
    _sequential(seq, 0, n)
    ops.orthonormalize_many_(basis, 0, n)
    torch.testing.assert_close(hb.rows(basis), hb.rows(seq), rtol=0, atol=1e-10)


@pytest.mark.parametrize("args, error, match", [
    (dict(k=-1, n=2), ValueError, "must lie in the basis"),
    (dict(k=3, n=3), ValueError, "must lie in the basis"),
    (dict(k=0, n=0), ValueError, "n >= 1"),
    (dict(k=0, n=2, passes=0), ValueError, "passes"),
    (dict(k=0, n=2, rtol=1.5), ValueError, "rtol"),
    (dict(k=0.5, n=2), TypeError, "k must be an int"),
])
def test_bad_input_changes_nothing(h, hb, args, error, match):
    basis = hb.basis(SHAPES, 5, torch.float32)
    before = h.clones(basis)
    with pytest.raises(error, match=match):
        ops.orthonormalize_many_(basis, **args)
    h.assert_all_bits_equal(basis, before, "basis")
