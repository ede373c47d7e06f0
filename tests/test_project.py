"""project_(grads, basis, k): g <- P P^T g with P the first k (orthonormal) basis rows."""

import pytest
import torch

from wavg_ext import ops

SHAPES = [(64, 3, 3, 3), (64,), (1000, 257), (5,), (0,), (70001,)]


def _orthonormal_basis(hb, k, dtype, device, capacity=None):
    """Rows from torch.linalg.qr (float64) of a random-walk snapshot sequence, stored in dtype."""
    walk = hb.random_walk(SHAPES, k, capacity=capacity, dtype=torch.float64)
    q, _ = torch.linalg.qr(hb.rows(walk, k).T)
    basis = ops.new_basis([torch.empty(s) for s in SHAPES], capacity or k, dtype=dtype)
    start = 0
    for b in basis:
        n = b[0].numel()
        b[:k].copy_(q[start:start + n].T.reshape(k, *b.shape[1:]))
        start += n
    return [b.to(device) for b in basis]


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_matches_dense_float64_projection(h, hb, device, k, storage):
    basis = _orthonormal_basis(hb, k, storage, device, capacity=12)
    for gdt in (torch.float32, torch.bfloat16, torch.float16):
        grads = hb.tensors(SHAPES, gdt, device, seed=k)
        g0 = h.clones(grads)
        ops.project_(grads, basis, k)
        p = hb.rows(basis, k)  # the stored rows, float64
        expected = p.T @ (p @ hb.flat(g0))
        oracle = []
        start = 0
        for g in g0:
            oracle.append(expected[start:start + g.numel()].view(g.shape))
            start += g.numel()
        plain = h.clones(g0)
        ops.reference.project_(plain, basis, k)
        hb.assert_fused_error(f"project_ {storage}/{gdt} k={k}", grads, oracle, plain, gdt)


def test_projection_is_idempotent_and_keeps_span_vectors(hb, device):
    k = 6
    basis = _orthonormal_basis(hb, k, torch.float32, device, capacity=8)
    # A vector in the span: P^T c.
    inside = [torch.zeros(s, device=device) for s in SHAPES]
    coeffs = torch.randn(k)
    ops.combine_(inside, basis, coeffs, 1.0, 0.0)
    projected = [t.clone() for t in inside]
    ops.project_(projected, basis, k)
    d = hb.flat(projected) - hb.flat(inside)
    assert d.norm() <= 1e-6 * hb.flat(inside).norm()
    twice = [t.clone() for t in projected]
    ops.project_(twice, basis, k)
    assert (hb.flat(twice) - hb.flat(projected)).norm() <= 1e-6 * hb.flat(projected).norm()


def test_channels_last_grads_with_matching_basis(hb, device):
    p = torch.randn(8, 4, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    basis = ops.new_basis([p], 3)
    assert basis[0][0].is_contiguous(memory_format=torch.channels_last)
    basis[0].copy_(torch.linalg.qr(torch.randn(p.numel(), 3, dtype=torch.float64))[0].T
                   .reshape(3, *p.shape).float())
    g = torch.randn_like(p)
    expected = hb.rows(basis).T @ (hb.rows(basis) @ hb.flat([g]))
    ops.project_([g], basis, 3)
    assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(hb.flat([g]), expected, rtol=1e-5, atol=1e-6)


def test_paper_way_agrees(hb):
    """The paper's own way (concatenate grads, P @ g, c @ P, copy back) gives the same result."""
    k = 5
    basis = _orthonormal_basis(hb, k, torch.float32, "cpu")
    grads = hb.tensors(SHAPES, torch.float32)
    p = torch.cat([b.reshape(k, -1) for b in basis], 1)
    g = torch.cat([x.reshape(-1) for x in grads])
    expected = (p @ g) @ p
    ops.project_(grads, basis, k)
    torch.testing.assert_close(hb.flat(grads).float(), expected, rtol=1e-4, atol=1e-5)
