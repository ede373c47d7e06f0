"""Bases for TWA: allocation, and orthonormalizing many snapshots at once.

:func:`new_basis` allocates one ``[capacity, *t.shape]`` tensor per tensor with rows laid
out like ``t`` (so a channels_last parameter's rows are channels_last too and the fused
ops need no temporaries).

:func:`orthonormalize_many_` orthonormalizes n rows in one go (users who load n
checkpoints from disk): block classical Gram-Schmidt against the rows already in the
basis (twice), then Cholesky-QR2 among the new rows: two Gram matrices and two
triangular updates, each a single sweep over the rows, instead of the O(n) sweeps of n
sequential :func:`orthonormalize_` calls. The Gram matrices are accumulated in float64
(float32 runs on the CPU kernels, float64 matmuls elsewhere) and the Cholesky factor is
computed in float64, so it holds for snapshot blocks with condition numbers up to
~1e5; beyond that, or when a row adds (almost) no new direction, it falls back to CGS2
row by row and drops the rows that add nothing.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _C

_EMULATION_BUILT = bool(_C.build_info()["cuda_emulation"])

__all__ = ["new_basis", "orthonormalize_many_", "OrthonormalizeResult", "default_rtol"]

# Relative residual (norm after removing the span of earlier rows / the row's norm) below
# which a row counts as adding no new direction: a few hundred roundings of the storage
# dtype (an exact copy leaves ~1e-7 in float32 and ~4e-3 in bfloat16).
_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# Cholesky-QR is trusted only while every new row keeps at least this relative residual
# (condition number of the block below ~1e3-1e4 after the block projection).
_CHOLQR_MIN_RESIDUAL = 1e-3


def default_rtol(dtype: torch.dtype) -> float:
    """The default rank-deficiency threshold for a basis stored in ``dtype``."""
    return _RTOL.get(dtype, 1e-5)


def new_basis(tensors: Sequence[torch.Tensor], capacity: int, dtype: Optional[torch.dtype] = None,
              device=None) -> List[torch.Tensor]:
    """A zero basis: for each tensor t a ``[capacity, *t.shape]`` tensor whose rows store
    their elements in t's order (t's strides for a dense t, e.g. channels_last). ``dtype`` defaults to float32
    (float64 for float64 tensors); ``device`` to each tensor's device."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"new_basis: capacity must be an int >= 1, got {capacity!r}")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"new_basis: a basis is float32, bfloat16 or float64, got {dtype}")
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"new_basis: tensors[{i}] is not a floating tensor")
        dt = dtype or (torch.float64 if t.dtype == torch.float64 else torch.float32)
        dev = t.device if device is None else torch.device(device)
        # A dense tensor in t's element order (t's own strides when t is dense).
        like = torch.empty_like(t, dtype=dt, device=dev, memory_format=torch.preserve_format)
        strides = (max(t.numel(), 1), *like.stride())
        out.append(torch.empty_strided((capacity, *t.shape), strides, dtype=dt, device=dev).zero_())
    return out


class OrthonormalizeResult(NamedTuple):
    accepted: int  # rows kept: rows [k, k + accepted) now hold the new orthonormal directions
    residuals: torch.Tensor  # float64 [n] (CPU): each sample's norm after removing earlier rows,
    #                          relative to its own norm (0 for a zero sample)
    method: str  # "cholqr2" or "cgs2" (the fallback)


def _rows(b: torch.Tensor) -> torch.Tensor:
    """A basis tensor as a [capacity, numel] matrix over the same memory (rows are dense
    blocks, so every row stores its elements in the same order)."""
    cap = b.shape[0]
    n = b[0].numel()
    return b.as_strided((cap, n), (n, 1))


class _Rows:
    """gram(a0, na, y0, ny) -> float64 [na, ny]; mix_(y0, ny, a0, na, m, beta): rows
    [y0, y0+ny) <- beta*themselves + m @ rows [a0, a0+na). Fused kernels on the CPU,
    float64 matmuls elsewhere."""

    def __init__(self, basis: Sequence[torch.Tensor], vectors=None):
        self.basis = list(basis)
        self.device = basis[0].device
        # (under wavg_ext.testing.cuda_emulation() the CPU stands for a GPU: its path)
        self.cpu = self.device.type == "cpu" and not _force_reference() and not _emulating()
        # Sharded rows (wavg_ext.distributed.ShardedVectors): local Grams, summed over ranks.
        self.vectors = vectors if vectors is not None and vectors.is_sharded else None
        if self.vectors is None:
            self.parts = [(self.basis, 1.0)]
        else:
            self.parts = [([self.basis[i] for i in idx], w) for idx, w in
                          ((self.vectors.sharded_indices, 1.0),
                           (self.vectors.whole_indices, 1.0 / self.vectors.world)) if idx]

    def _gram_of(self, basis: List[torch.Tensor], a0: int, na: int, y0: int, ny: int) -> torch.Tensor:
        if self.cpu:
            return _C.basis_gram(basis, a0, na, y0, ny)
        g = torch.zeros(na, ny, dtype=torch.float64, device=self.device)
        for m in (_rows(b) for b in basis if b.numel()):
            for s in range(0, m.shape[1], 1 << 20):  # bounded float64 temporaries
                a = m[a0:a0 + na, s:s + (1 << 20)].double()
                y = a if (a0, na) == (y0, ny) else m[y0:y0 + ny, s:s + (1 << 20)].double()
                g += a @ y.T
        return g

    def gram(self, a0: int, na: int, y0: int, ny: int) -> torch.Tensor:
        g = sum(w * self._gram_of(part, a0, na, y0, ny).to(self.device) for part, w in self.parts)
        if self.vectors is not None:
            self.vectors.all_reduce(g)
        return g.cpu()

    def mix_(self, y0: int, ny: int, a0: int, na: int, coef: torch.Tensor, beta: float) -> None:
        coef = coef.to(torch.float64)
        if self.cpu:
            _C.basis_mix_(self.basis, y0, ny, a0, na, coef.contiguous(), float(beta))
            return
        c = coef.to(self.device)
        for m in (_rows(b) for b in self.basis if b.numel()):
            op = torch.float64 if m.dtype == torch.float64 else torch.float32
            for s in range(0, m.shape[1], 1 << 20):
                a = m[a0:a0 + na, s:s + (1 << 20)].to(op)
                new = c.to(op) @ a
                if beta != 0.0:
                    new += beta * m[y0:y0 + ny, s:s + (1 << 20)].to(op)
                m[y0:y0 + ny, s:s + (1 << 20)].copy_(new)


def _emulating() -> bool:
    """Inside wavg_ext.testing.cuda_emulation() (this thread)."""
    return _EMULATION_BUILT and _C._cuda_emulation_enabled()


def _force_reference() -> bool:
    from . import _force_reference as forced  # the module-level switch of wavg_ext.ops
    return forced


def _check_many(basis, k: int, n: int, passes: int = 2, rtol: Optional[float] = None,
                vectors=None) -> Tuple[List[torch.Tensor], float]:
    """The checks of :func:`orthonormalize_many_` (``wavg_ext.ops.validate`` runs them too):
    returns the basis as a list and the rtol to use. ``vectors`` is not checked."""
    basis = list(basis)
    capacity = _C.check_basis("orthonormalize_many_", basis)
    for name, v in (("k", k), ("n", n), ("passes", passes)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"orthonormalize_many_: {name} must be an int, got {type(v).__name__}")
    if not basis:
        raise ValueError("orthonormalize_many_: the basis is an empty list")
    if k < 0 or n < 1 or k + n > capacity:
        raise ValueError(f"orthonormalize_many_: rows [k={k}, k+n={k + n}) must lie in the basis "
                         f"(capacity {capacity}) with n >= 1")
    if not 1 <= passes <= 4:
        raise ValueError(f"orthonormalize_many_: passes must be 1 to 4, got {passes}")
    if rtol is None:
        rtol = max(default_rtol(b.dtype) for b in basis)
    if not (isinstance(rtol, (int, float)) and 0.0 <= rtol < 1.0):
        raise ValueError(f"orthonormalize_many_: rtol must be in [0, 1), got {rtol!r}")
    return basis, rtol


@torch.no_grad()
def orthonormalize_many_(basis: Sequence[torch.Tensor], k: int, n: int, passes: int = 2,
                         rtol: Optional[float] = None, vectors=None) -> OrthonormalizeResult:
    """Orthonormalizes rows [k, k + n) of ``basis`` in order, against rows [0, k) (assumed
    orthonormal) and each other, as n calls of ``orthonormalize_`` would, but in a few sweeps.

    A row whose relative residual (its norm after removing the earlier rows' span over its
    own norm) is at most ``rtol`` adds no new direction: it is dropped and the later rows
    move up. Returns ``(accepted, residuals, method)``; rows [k + accepted, k + n) are zeroed.
    ``rtol`` defaults to :func:`default_rtol` of the basis dtype. ``vectors``
    (:class:`wavg_ext.distributed.ShardedVectors`): the basis holds this rank's shards; every
    Gram matrix (n x n values) is summed over the ranks, nothing else is communicated.
    """
    from . import orthonormalize_  # the fused op of wavg_ext.ops

    if vectors is not None and vectors.is_sharded:
        def orthonormalize_(b, row, p):  # noqa: F811  (the sharded version)
            return vectors.orthonormalize_(b, row, p)

    basis, rtol = _check_many(basis, k, n, passes, rtol)
    rows = _Rows(basis, vectors)
    gram = rows.gram(k, n, k, n)
    original = gram.diagonal().clamp_min(0).sqrt()
    if k > 0:  # block CGS against the rows already in the basis
        for _ in range(passes):
            c = rows.gram(0, k, k, n)  # [k, n]
            rows.mix_(k, n, 0, k, -c.T, 1.0)
        gram = rows.gram(k, n, k, n)
    chol, info = torch.linalg.cholesky_ex(gram)
    residual = chol.diagonal() if int(info) == 0 else None
    safe = original > 0
    if residual is not None and bool(safe.all()) and \
            bool((residual / original).min() >= max(_CHOLQR_MIN_RESIDUAL, rtol)):
        # Cholesky-QR2: rows <- L^-1 rows, twice (the second pass repairs the rounding of
        # the first, as the second pass of CGS2 does).
        eye = torch.eye(n, dtype=torch.float64)
        rows.mix_(k, n, k, n, torch.linalg.solve_triangular(chol, eye, upper=False), 0.0)
        chol2, info2 = torch.linalg.cholesky_ex(rows.gram(k, n, k, n))
        if int(info2) == 0:
            rows.mix_(k, n, k, n, torch.linalg.solve_triangular(chol2, eye, upper=False), 0.0)
            return OrthonormalizeResult(n, (residual / original).cpu(), "cholqr2")
        # (cannot happen for a block that passed the first check; fall through to be safe)

    # CGS2 row by row; rows that add nothing are dropped and later rows move up.
    residuals = torch.zeros(n, dtype=torch.float64)
    accepted = 0
    for j in range(n):
        src, dst = k + j, k + accepted
        if src != dst:
            for b in basis:
                b[dst].copy_(b[src])
        norm = float(orthonormalize_(basis, dst, passes))
        rel = norm / float(original[j]) if float(original[j]) > 0 else 0.0
        residuals[j] = rel
        if rel > rtol:
            accepted += 1
    for b in basis:
        b[k + accepted:k + n].zero_()
    return OrthonormalizeResult(accepted, residuals, "cgs2")
