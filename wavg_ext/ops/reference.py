"""Pure-PyTorch versions of the fused ops: the test oracle and the fallback path.

Same signatures and semantics as :mod:`wavg_ext.ops`: each function's docstring is the
op's (wavg_ext.ops gives its op this docstring). Arithmetic runs in the
"opmath" type of each pair (float64 if either tensor is float64, else float32),
like the compiled kernels, so that calling these on float64 copies of the inputs
gives the upcast reference the tests compare against.

These functions do not validate their arguments; :mod:`wavg_ext.ops` validates
(with the same C++ checks the kernels use) before it calls them.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Scalar = Union[float, int, torch.Tensor]

__all__ = ["running_mean_", "ema_", "accumulate_", "scale_copy_", "running_mean_compensated_",
           "ema_compensated_", "nonfinite_flag", "ema_stochastic_", "ema_many_", "window_push_", "dots", "combine_", "project_", "orthonormalize_"]


def _opmath(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _gated_off(value: Scalar) -> bool:
    """A one-element tensor scalar holding NaN leaves the outputs untouched (as the kernels do)."""
    return isinstance(value, torch.Tensor) and bool(torch.isnan(value.reshape(())).item())


def _scalar(value: Scalar, dtype: torch.dtype, device: torch.device):
    """A Python float, or a 0-dim tensor of `dtype` on `device` (no host sync)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return float(value)


@torch.no_grad()
def running_mean_(avgs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], count: Scalar) -> None:
    """avg <- avg + (x - avg) / (count + 1) for every pair; ``count`` = samples already in avg.

    ``count == 0`` copies x into avg (whatever avg held, NaN included).
    """
    if _gated_off(count):
        return
    for avg, x in zip(avgs, xs):
        if avg.numel() == 0:
            continue
        op = _opmath(avg, x)
        a, xv = avg.to(op), x.to(op)
        if isinstance(count, torch.Tensor):
            c = count.reshape(()).to(device=avg.device, dtype=torch.float64)
            w = (1.0 / (c + 1.0)).to(op)
            out = torch.where(c == 0, xv, torch.lerp(a, xv, w))
        elif float(count) == 0.0:
            out = xv
        else:
            # Round 1/(count+1) once, from float64, exactly as the kernels do.
            w = torch.tensor(1.0 / (float(count) + 1.0), dtype=torch.float64).to(op).item()
            out = torch.lerp(a, xv, w)
        avg.copy_(out)


@torch.no_grad()
def ema_(avgs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: Scalar) -> None:
    """avg <- avg + weight * (x - avg) for every pair (torch.lerp semantics).

    For an EMA with decay d, ``weight = 1 - d``.
    """
    if _gated_off(weight):
        return
    for avg, x in zip(avgs, xs):
        if avg.numel() == 0:
            continue
        op = _opmath(avg, x)
        avg.copy_(torch.lerp(avg.to(op), x.to(op), _scalar(weight, op, avg.device)))


@torch.no_grad()
def accumulate_(sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], alpha: Scalar = 1.0) -> None:
    """sum <- sum + alpha * x for every pair."""
    if _gated_off(alpha):
        return
    for s, x in zip(sums, xs):
        if s.numel() == 0:
            continue
        op = _opmath(s, x)
        s.copy_(s.to(op) + _scalar(alpha, op, s.device) * x.to(op))


@torch.no_grad()
def scale_copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], scale: Scalar = 1.0) -> None:
    """dst <- scale * src for every pair, cast to dst's dtype (dst is not read)."""
    if _gated_off(scale):
        return
    for d, s in zip(dsts, srcs):
        if d.numel() == 0:
            continue
        op = _opmath(d, s)
        d.copy_(s.to(op) * _scalar(scale, op, d.device))


# --------------------------------------------------------------------------- compensated averages


def _compensated(avgs, comps, xs, weight: float, copy: bool) -> None:
    for a, c, x in zip(avgs, comps, xs):
        if a.numel() == 0:
            continue
        xv = x.to(torch.float64)
        if copy:
            v = xv
        else:
            s = a.to(torch.float64) + c.to(torch.float64)
            v = s + weight * (xv - s)
        a.copy_(v)
        c.copy_(v - a.to(torch.float64))


@torch.no_grad()
def running_mean_compensated_(avgs, comps, xs, count: Scalar) -> None:
    """running_mean_ on compensated averages: (avg + comp) <- (avg + comp) + (x - (avg + comp)) / (count + 1),
    in float64, then avg = the nearest value of its dtype and comp = the remainder.

    ``count == 0`` copies x (comp gets x's remainder, zero when x has avg's dtype).
    ``comps[i]`` has ``avgs[i]``'s dtype, shape and strides (``torch.zeros_like(avg)``);
    averages are float32, float16/bfloat16 (of the same dtype's x) or float64 (whose
    compensation stays zero)."""
    if _gated_off(count):
        return
    n = float(count.reshape(()).item()) if isinstance(count, torch.Tensor) else float(count)
    _compensated(avgs, comps, xs, 1.0 / (n + 1.0), n == 0.0)


@torch.no_grad()
def ema_compensated_(avgs, comps, xs, weight: Scalar) -> None:
    """ema_ on compensated averages: (avg + comp) <- s + weight * (x - s) with s = avg + comp,
    in float64, then split into avg and comp (see :func:`running_mean_compensated_`)."""
    if _gated_off(weight):
        return
    w = float(weight.reshape(()).item()) if isinstance(weight, torch.Tensor) else float(weight)
    _compensated(avgs, comps, xs, w, False)


@torch.no_grad()
def nonfinite_flag(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim int32 tensor on the tensors' device: 1 when any element of any tensor is NaN
    or +-inf, else 0. One fused pass; no host sync on CUDA."""
    device = xs[0].device if len(xs) else torch.device("cpu")
    flag = torch.zeros((), dtype=torch.int32, device=device)
    for x in xs:
        if x.numel():
            flag |= (~torch.isfinite(x)).any().to(torch.int32)
    return flag


# --------------------------------------------------------------------------- stochastic rounding
# csrc/stochastic_rounding.h, re-implemented with Python integers (the keys) and int64
# tensors (the per-element hash; products split so that none overflows int64).

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """Each element's position in the order the kernels walk t: its memory order when t is
    dense (non-overlapping, no gaps), else its logical (row-major) order."""
    n = t.numel()
    order = torch.arange(n, dtype=torch.int64, device=t.device)
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return order.reshape(t.shape)
        expected *= sz
    return order.as_strided(t.shape, t.stride())


def _stochastic_bfloat16(v: torch.Tensor, element: torch.Tensor, pair_key: int) -> torch.Tensor:
    """float32 v rounded to bfloat16 with the random bits of elements `element` (int64)."""
    low, block = element & _M32, element >> 32
    key = torch.zeros_like(element)
    for b in torch.unique(block).tolist():
        key[block == b] = _splitmix64((pair_key + b) & _M64) >> 32
    noise = _lowbias32(low ^ key) >> 16
    bits = v.view(torch.int32).to(torch.int64) & _M32
    top = ((bits + noise) >> 16) & 0xFFFF
    rounded = (top - (top >= 0x8000).to(torch.int64) * 0x10000).to(torch.int16).view(torch.bfloat16)
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, v.to(torch.bfloat16))


@torch.no_grad()
def ema_stochastic_(avgs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: float, seed: int) -> None:
    """ema_ for bfloat16 averages with stochastic rounding: avg <- avg + weight * (x - avg)
    in float32 (ema_'s arithmetic), then rounded to bfloat16 up or down with probability
    given by the distance to each neighbour, so the average is exact in expectation and
    keeps moving where round-to-nearest would freeze it (changes below half an ulp). xs
    are bfloat16 or float32. The random bits are a hash of (seed, the pair's position in
    the lists, the element's position in the average's memory): a call is reproducible,
    the same on every backend and thread count; pass a new seed for every update."""
    seed_key = _splitmix64(int(seed) & _M64)
    for i, (avg, x) in enumerate(zip(avgs, xs)):
        if avg.numel() == 0:
            continue
        v = torch.lerp(avg.to(torch.float32), x.to(torch.float32), float(weight))
        avg.copy_(_stochastic_bfloat16(v, _memory_order(avg), _splitmix64(seed_key ^ i)))


def ema_many_(avgs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    """P exponential averages of the same tensors in one pass: for every profile p,
    ``ema_(avgs[p], xs, weights[p])``, with ema_'s arithmetic and the same bits, but each x
    is read once for all profiles (2P + 1 tensor-sized streams instead of 3P: two profiles
    cost at best 5/3 of one EMA, not 2).

    ``avgs`` is a list of P lists, ``avgs[p][i]`` being profile p's average of ``xs[i]``
    (each validated as ema_ validates its lists; no two profiles may share memory);
    ``weights`` P finite numbers, ``weights[p] = 1 - decay_p``. (The registered op,
    ``torch.ops.wavg_ext.ema_many_``, takes the P lists concatenated, profile after profile.)
    """
    n = len(xs)
    for p, weight in enumerate(weights):
        ema_(avgs[p * n:(p + 1) * n], xs, float(weight))


@torch.no_grad()
def window_push_(sums: Sequence[torch.Tensor], slots: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> None:
    """One step of a sliding-window sum: sum <- sum + (x - slot), then slot <- x, for every
    triple, in one pass (a read of sum, slot and x, a write of sum and slot).

    With ``slots`` the ring slot of the oldest of the last k samples (zeros while the
    window fills), ``sums`` stay the sum of the window: LAWA's ``sum += new - oldest``. The
    difference and the sum are taken in float64 for float64 sums, float32 otherwise. A sum
    pairs with its x as an EMA average does (float64, float32 for 16-bit x, or x's dtype);
    a slot has x's dtype and its sum's shape and strides (``torch.zeros_like(sum,
    dtype=x.dtype)``).
    """
    for s, o, x in zip(sums, slots, xs):
        if s.numel() == 0:
            continue
        op = _opmath(s, x)
        s.copy_(s.to(op) + (x.to(op) - o.to(op)))
        o.copy_(x)


# --------------------------------------------------------------------------- basis ops
# A basis is one [capacity, *param.shape] tensor per parameter; row i of all of them is
# one vector of the whole model. Arithmetic in float64 for float64 bases, float32 else.


def _basis_opmath(basis: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(b.dtype == torch.float64 for b in basis) else torch.float32


@torch.no_grad()
def dots(basis: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The k inner products c_i = sum over tensors of <basis_t[i], x_t>, i < k, in one pass
    that reads xs once. Returns a float32 tensor [k] (float64 for a float64 basis) on the
    basis' device; products and sums are float64."""
    op = _basis_opmath(basis)
    device = basis[0].device if len(basis) else torch.device("cpu")
    out = torch.zeros(k, dtype=op, device=device)
    for b, x in zip(basis, xs):
        if x.numel():
            out += b[:k].reshape(k, -1).to(op) @ x.reshape(-1).to(op)
    return out


@torch.no_grad()
def combine_(outs: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], coeffs: torch.Tensor,
             alpha: float = 1.0, beta: float = 0.0) -> None:
    """out <- beta*out + alpha*sum_i coeffs_i*basis_t[i] for every tensor, k = coeffs.numel().

    ``coeffs`` is a float32/float64 tensor [k] on the CPU or the basis' device (a device
    tensor is read by the kernel: no host sync). With beta == 0, out is not read."""
    op = _basis_opmath(basis)
    k = coeffs.numel()
    for o, b in zip(outs, basis):
        if o.numel() == 0:
            continue
        new = float(alpha) * (coeffs.to(device=o.device, dtype=op) @ b[:k].reshape(k, -1).to(op))
        if beta != 0.0:
            new = new + float(beta) * o.reshape(-1).to(op)
        o.copy_(new.view(o.shape))


@torch.no_grad()
def project_(grads: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], k: int) -> None:
    """g <- P P^T g for every tensor, P = the first k basis rows (assumed orthonormal):
    dots, then combine_, two passes over the rows; no host sync on CUDA."""
    combine_(grads, basis, dots(basis, grads, k), 1.0, 0.0)


@torch.no_grad()
def orthonormalize_(basis: Sequence[torch.Tensor], k: int, passes: int = 2) -> torch.Tensor:
    """Row k <- row k minus its projection on rows < k, ``passes`` times (2: CGS2, which
    keeps the rows orthogonal to working precision), then normalized.

    Returns the norm before normalizing (0-dim, float32; float64 for a float64 basis): a
    norm tiny relative to the row's original norm means the row added no new direction.
    A row of norm exactly 0 is left as zeros."""
    op = _basis_opmath(basis)
    device = basis[0].device if len(basis) else torch.device("cpu")
    used = [b for b in basis if b.numel()]
    if not used:
        return torch.zeros((), dtype=op, device=device)
    rows = torch.cat([b[: k + 1].reshape(k + 1, -1).to(op) for b in used], dim=1)
    v = rows[k]
    for _ in range(passes if k > 0 else 0):
        v = v - (rows[:k] @ v) @ rows[:k]
    norm = v.norm()
    v = torch.where(norm > 0, v / norm, torch.zeros_like(v))
    start = 0
    for b in used:
        n = b[k].numel()
        b[k].copy_(v[start:start + n].view(b[k].shape))
        start += n
    return norm
