"""Pure-PyTorch versions of the fused ops: the test oracle and the fallback path.

Same signatures and semantics as :mod:`wavg_ext.ops`. Arithmetic runs in the
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

__all__ = ["running_mean_", "ema_", "accumulate_", "scale_copy_"]


def _opmath(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def _scalar(value: Scalar, dtype: torch.dtype, device: torch.device):
    """A Python float, or a 0-dim tensor of `dtype` on `device` (no host sync)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return float(value)


@torch.no_grad()
def running_mean_(avgs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], count: Scalar) -> None:
    """avg <- avg + (x - avg) / (count + 1); count == 0 copies x (even over NaN/inf)."""
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
    """avg <- avg + weight * (x - avg), with torch.lerp semantics."""
    for avg, x in zip(avgs, xs):
        if avg.numel() == 0:
            continue
        op = _opmath(avg, x)
        avg.copy_(torch.lerp(avg.to(op), x.to(op), _scalar(weight, op, avg.device)))


@torch.no_grad()
def accumulate_(sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], alpha: Scalar = 1.0) -> None:
    """sum <- sum + alpha * x."""
    for s, x in zip(sums, xs):
        if s.numel() == 0:
            continue
        op = _opmath(s, x)
        s.copy_(s.to(op) + _scalar(alpha, op, s.device) * x.to(op))


@torch.no_grad()
def scale_copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], scale: Scalar = 1.0) -> None:
    """dst <- scale * src, cast to dst's dtype."""
    for d, s in zip(dsts, srcs):
        if d.numel() == 0:
            continue
        op = _opmath(d, s)
        d.copy_(s.to(op) * _scalar(scale, op, d.device))
