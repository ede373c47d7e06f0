"""orthonormalize_(basis, k, passes): row k minus its projection on rows < k (CGS, `passes`
times), then normalized; returns the norm before normalizing."""

import pytest
import torch

from wavg_ext import ops

SHAPES = [(64, 3, 3, 3), (64,), (500, 257), (5,), (0,), (70001,)]


def _orthonormalize_all(fn, basis, n, passes=2):
    return [float(fn(basis, j, passes)) for j in range(n)]


@pytest.mark.parametrize("storage", [torch.float32, torch.float64])
def test_random_walk_matches_float64_oracle(h, hb, device, storage):
    """Each row of a random-walk snapshot sequence (nearly collinear, like SGD checkpoints):
    the fused result's error vs the float64 CGS2 oracle is at most twice that of the same
    algorithm in plain PyTorch at the storage dtype."""
    n = 12
    basis = hb.random_walk(SHAPES, n, dtype=storage, device=device)
    oracle = [b.to(torch.float64, copy=True) for b in basis]
    plain = h.clones(basis)
    norms = _orthonormalize_all(ops.orthonormalize_, basis, n)
    oracle_norms = _orthonormalize_all(ops.reference.orthonormalize_, oracle, n)
    _orthonormalize_all(ops.reference.orthonormalize_, plain, n)
    hb.assert_fused_error(f"orthonormalize_ {storage}", basis, oracle, plain, storage,
                          None if storage != torch.float64 else 1e-12)
    torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64), torch.tensor(oracle_norms, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_matches_torch_linalg_qr(hb, device):
    n = 8
    basis = hb.random_walk(SHAPES, n, dtype=torch.float64, device=device)
    q, r = torch.linalg.qr(hb.rows(basis).T)
    q = q * torch.sign(torch.diagonal(r))  # positive diagonal: the Gram-Schmidt basis
    norms = _orthonormalize_all(ops.orthonormalize_, basis, n)
    torch.testing.assert_close(hb.rows(basis), q.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64), torch.diagonal(r).abs(),
                               rtol=1e-10, atol=0)


@pytest.mark.slow
def test_orthogonality_100_snapshots_of_1m_params(hb):
    """max |P^T P - I| <= 1e-5 in float32 storage for 100 random-walk snapshots of a model
    with >= 1M parameters; a single pass (classical Gram-Schmidt) is far worse."""
    shapes = [(512, 256, 3, 3), (512,), (1000, 10)]  # 1.19M parameters
    n = 100
    cgs2 = hb.random_walk(shapes, n, step=1e-2)
    cgs1 = [b.clone() for b in cgs2]
    _orthonormalize_all(ops.orthonormalize_, cgs2, n, passes=2)
    _orthonormalize_all(ops.orthonormalize_, cgs1, n, passes=1)
    err2, err1 = hb.orthogonality_error(cgs2, n), hb.orthogonality_error(cgs1, n)
    assert err2 <= 1e-5, err2
    assert err1 > 100 * err2 and err1 > 1e-3, (err1, err2)


def test_bfloat16_storage(hb):
    """bf16 rows: orthogonality limited by bf16 rounding of each row (2^-9 relative per
    element, ~2^-9/sqrt(D) per inner product), not by the algorithm."""
    n = 10
    basis = hb.random_walk(SHAPES, n, dtype=torch.bfloat16, step=0.3)
    _orthonormalize_all(ops.orthonormalize_, basis, n)
    assert hb.orthogonality_error(basis, n) <= 1e-2


def test_copy_of_an_earlier_sample_is_detected(hb, device):
    basis = hb.random_walk(SHAPES, 4, capacity=5, device=device)
    for b in basis:
        b[4].copy_(b[2])
    original = torch.sqrt(ops.dots([b[4:5] for b in basis], [b[4] for b in basis], 1)).item()
    _orthonormalize_all(ops.orthonormalize_, basis, 4)
    norm = float(ops.orthonormalize_(basis, 4))
    assert norm / original < 1e-5
    # A genuinely new direction is far above that threshold.
    for b in basis:
        b[4].normal_()
    assert float(ops.orthonormalize_(basis, 4)) / hb.flat([b[4] for b in basis]).norm() > 0.5


def test_zero_row_stays_zero(hb, device):
    basis = hb.basis(SHAPES, 3, torch.float32, device)
    for b in basis:
        b[1].zero_()
    ops.orthonormalize_(basis, 0)
    assert float(ops.orthonormalize_(basis, 1)) == 0.0
    assert all(not b[1].any() for b in basis)
    assert all(b[1].isfinite().all() for b in basis)


def test_row_zero_is_normalized(hb, device):
    basis = hb.basis(SHAPES, 2, torch.float32, device)
    norm0 = hb.flat([b[0] for b in basis]).norm()
    norm = ops.orthonormalize_(basis, 0)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm.double().cpu(), norm0, rtol=1e-6, atol=0)
    assert abs(hb.flat([b[0] for b in basis]).norm().item() - 1) < 1e-6
    assert all(torch.equal(b[1], b0[1]) for b, b0 in zip(basis, hb.basis(SHAPES, 2, torch.float32, device)))


def test_deterministic_across_threads(hb):
    results = []
    for threads in (torch.get_num_threads(), 1):
        torch.set_num_threads(threads)
        basis = hb.random_walk([(200003,), (7, 5)], 5)
        _orthonormalize_all(ops.orthonormalize_, basis, 5)
        results.append(basis)
    for a, b in zip(*results):
        assert torch.equal(a, b)
