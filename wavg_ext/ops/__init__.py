"""Functional, in-place averaging ops over lists of tensors.

Each op updates every tensor of its first list in one fused call: CPU tensors go
to the vectorized, threaded C++ kernels, CUDA tensors to the multi-tensor-apply
CUDA kernels, anything else (or everything, with ``WAVG_EXT_FORCE_REFERENCE=1``)
to :mod:`wavg_ext.ops.reference`. Arguments are validated by the same C++ checks
on every path before any tensor is modified; bad input raises ValueError or
TypeError naming the offending list and index.

The scalar argument may be a Python number or a one-element tensor. A CUDA tensor
scalar is read by the kernel on the device, so a training step needs no host
sync and can be captured in a CUDA graph (its value is then not range-checked).
"""

from __future__ import annotations

import os
from typing import Iterable, Union

import torch

from .. import _C  # noqa: F401  (loading the extension registers torch.ops.wavg_ext.*)
from . import reference

Scalar = Union[float, int, torch.Tensor]
TensorList = Iterable[torch.Tensor]

__all__ = ["running_mean_", "ema_", "accumulate_", "scale_copy_", "reference", "force_reference"]

# Device types with compiled kernels in this build (CUDA only when it was built).
_KERNEL_DEVICES = frozenset(["cpu", "cuda"] if _C.build_info()["cuda"] else ["cpu"])
_force_reference = os.environ.get("WAVG_EXT_FORCE_REFERENCE", "0") not in ("", "0")


def force_reference(enabled: bool) -> bool:
    """Route every op to the pure-PyTorch reference (True) or the kernels (False).

    Returns the previous setting. The initial value comes from the environment
    variable ``WAVG_EXT_FORCE_REFERENCE``.
    """
    global _force_reference
    previous, _force_reference = _force_reference, bool(enabled)
    return previous


def _as_list(name: str, tensors: TensorList):
    if type(tensors) is list or type(tensors) is tuple:
        return tensors
    if isinstance(tensors, torch.Tensor):
        # list(tensor) would silently split it along dim 0.
        raise TypeError(f"{name} must be a list of tensors, got a single Tensor")
    return list(tensors)


def _call(op: str, names: tuple, outs: TensorList, ins: TensorList, scalar: Scalar) -> None:
    outs = _as_list(names[0], outs)
    ins = _as_list(names[1], ins)
    first = outs[0] if outs else (ins[0] if ins else None)
    device_type = first.device.type if isinstance(first, torch.Tensor) else "cpu"
    if _force_reference or device_type not in _KERNEL_DEVICES:
        _C.check_args(op, outs, ins, scalar)
        getattr(reference, op)(outs, ins, scalar)
    elif torch.compiler.is_compiling():
        # Traceable: the registered op, with its Meta kernel for fake tensors.
        packet = getattr(torch.ops.wavg_ext, op)
        overload = packet.Tensor if isinstance(scalar, torch.Tensor) else packet.default
        overload(outs, ins, scalar)
    else:
        # Same op through the dispatcher, but reading the lists without converting
        # every tensor (torch.ops' conversion costs ~90 ns a tensor).
        getattr(_C, op)(outs, ins, scalar)


def running_mean_(avgs: TensorList, xs: TensorList, count: Scalar) -> None:
    """avg <- avg + (x - avg) / (count + 1) for every pair; ``count`` = samples already in avg.

    ``count == 0`` copies x into avg (whatever avg held, NaN included).
    """
    _call("running_mean_", ("avgs", "xs"), avgs, xs, count)


def ema_(avgs: TensorList, xs: TensorList, weight: Scalar) -> None:
    """avg <- avg + weight * (x - avg) for every pair (torch.lerp semantics).

    For an EMA with decay d, ``weight = 1 - d``.
    """
    _call("ema_", ("avgs", "xs"), avgs, xs, weight)


def accumulate_(sums: TensorList, xs: TensorList, alpha: Scalar = 1.0) -> None:
    """sum <- sum + alpha * x for every pair."""
    _call("accumulate_", ("sums", "xs"), sums, xs, alpha)


def scale_copy_(dsts: TensorList, srcs: TensorList, scale: Scalar = 1.0) -> None:
    """dst <- scale * src for every pair, cast to dst's dtype (dst is not read)."""
    _call("scale_copy_", ("dsts", "srcs"), dsts, srcs, scale)
