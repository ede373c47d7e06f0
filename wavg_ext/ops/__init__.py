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
A one-element tensor scalar holding NaN is a gate: the call validates its
arguments and leaves every output untouched. With :func:`nonfinite_flag` this
makes an update conditional on the data without a host sync (the wrappers'
``skip_nonfinite``).
"""

from __future__ import annotations

import os
from typing import Iterable, Union

import torch

from .. import _C  # noqa: F401  (loading the extension registers torch.ops.wavg_ext.*)
from . import reference

Scalar = Union[float, int, torch.Tensor]
TensorList = Iterable[torch.Tensor]

__all__ = ["running_mean_", "ema_", "accumulate_", "scale_copy_", "running_mean_compensated_",
           "ema_compensated_", "nonfinite_flag", "dots", "combine_", "project_", "orthonormalize_",
           "orthonormalize_many_", "new_basis", "reference", "force_reference"]

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


def _use_kernels(tensors) -> bool:
    """Whether a call whose first tensor list is `tensors` runs the compiled kernels."""
    first = tensors[0] if len(tensors) else None
    device_type = first.device.type if isinstance(first, torch.Tensor) else "cpu"
    return not _force_reference and device_type in _KERNEL_DEVICES


def _call(op: str, names: tuple, lists: tuple, scalar: Scalar) -> None:
    """Runs a list op (``lists``: its tensor lists, named ``names``, the first the outputs;
    three for the compensated ops) on the kernels or, for other devices / forced, checks
    then runs the reference."""
    lists = [_as_list(name, tensors) for name, tensors in zip(names, lists)]
    first = next((t[0] for t in lists if len(t)), None)
    device_type = first.device.type if isinstance(first, torch.Tensor) else "cpu"
    if _force_reference or device_type not in _KERNEL_DEVICES:
        (_C.check_compensated if len(lists) == 3 else _C.check_args)(op, *lists, scalar)
        getattr(reference, op)(*lists, scalar)
    elif torch.compiler.is_compiling():
        # Traceable: the registered op, with its Meta kernel for fake tensors.
        packet = getattr(torch.ops.wavg_ext, op)
        overload = packet.Tensor if isinstance(scalar, torch.Tensor) else packet.default
        overload(*lists, scalar)
    else:
        # Same op through the dispatcher, but reading the lists without converting
        # every tensor (torch.ops' conversion costs ~90 ns a tensor).
        getattr(_C, op)(*lists, scalar)


def running_mean_(avgs: TensorList, xs: TensorList, count: Scalar) -> None:
    """avg <- avg + (x - avg) / (count + 1) for every pair; ``count`` = samples already in avg.

    ``count == 0`` copies x into avg (whatever avg held, NaN included).
    """
    _call("running_mean_", ("avgs", "xs"), (avgs, xs), count)


def ema_(avgs: TensorList, xs: TensorList, weight: Scalar) -> None:
    """avg <- avg + weight * (x - avg) for every pair (torch.lerp semantics).

    For an EMA with decay d, ``weight = 1 - d``.
    """
    _call("ema_", ("avgs", "xs"), (avgs, xs), weight)


def accumulate_(sums: TensorList, xs: TensorList, alpha: Scalar = 1.0) -> None:
    """sum <- sum + alpha * x for every pair."""
    _call("accumulate_", ("sums", "xs"), (sums, xs), alpha)


def scale_copy_(dsts: TensorList, srcs: TensorList, scale: Scalar = 1.0) -> None:
    """dst <- scale * src for every pair, cast to dst's dtype (dst is not read)."""
    _call("scale_copy_", ("dsts", "srcs"), (dsts, srcs), scale)


# --------------------------------------------------------------------------- compensated averages
# An average kept as two tensors of its dtype whose sum is its value: avg (the nearest
# representable value) and comp (the remainder). Each update runs in float64 and splits
# the result again, so a float32 (or bfloat16) average keeps moving where its
# per-update change is below half an ulp (EMA decay 0.99999, millions of SWA samples).


def running_mean_compensated_(avgs: TensorList, comps: TensorList, xs: TensorList, count: Scalar) -> None:
    """running_mean_ on compensated averages: (avg + comp) <- (avg + comp) + (x - (avg + comp)) / (count + 1),
    in float64, then avg = the nearest value of its dtype and comp = the remainder.

    ``count == 0`` copies x (comp gets x's remainder, zero when x has avg's dtype).
    ``comps[i]`` has ``avgs[i]``'s dtype, shape and strides (``torch.zeros_like(avg)``);
    averages are float32, float16/bfloat16 (of the same dtype's x) or float64 (whose
    compensation stays zero)."""
    _call("running_mean_compensated_", ("avgs", "comps", "xs"), (avgs, comps, xs), count)


def ema_compensated_(avgs: TensorList, comps: TensorList, xs: TensorList, weight: Scalar) -> None:
    """ema_ on compensated averages: (avg + comp) <- s + weight * (x - s) with s = avg + comp,
    in float64, then split into avg and comp (see :func:`running_mean_compensated_`)."""
    _call("ema_compensated_", ("avgs", "comps", "xs"), (avgs, comps, xs), weight)


def nonfinite_flag(xs: TensorList) -> torch.Tensor:
    """A 0-dim int32 tensor on the tensors' device: 1 when any element of any tensor is NaN
    or +-inf, else 0. One fused pass; no host sync on CUDA."""
    xs = _as_list("xs", xs)
    if not _use_kernels(xs):
        _C.check_nonfinite_flag(xs)
        return reference.nonfinite_flag(xs)
    if torch.compiler.is_compiling():
        return torch.ops.wavg_ext.nonfinite_flag(xs)
    return _C.nonfinite_flag(xs)


# --------------------------------------------------------------------------- basis ops (TWA)
# A basis is a list with one tensor per parameter, of shape [capacity, *param.shape]
# (make one with new_basis); row i of every tensor together is one vector of the whole
# model. Same dispatch as above: kernels for CPU/CUDA, the reference elsewhere, one
# set of checks everywhere.


def _basis_call(op: str, *args):
    """Runs basis op `op` on the kernels (eager: the borrowed-list entry; compiling: the
    registered op) or, for other devices / forced, checks then runs the reference.
    args[0] and args[1] are the op's two lists (args[0] is the basis for
    orthonormalize_); the basis decides the device."""
    basis = args[0] if op in ("dots", "orthonormalize_") else args[1]
    if not _use_kernels(basis):
        getattr(_C, "check_" + op.rstrip("_"))(*args)
        return getattr(reference, op)(*args)
    if torch.compiler.is_compiling():
        return getattr(torch.ops.wavg_ext, op)(*args)
    return getattr(_C, op)(*args)


def dots(basis: TensorList, xs: TensorList, k: int) -> torch.Tensor:
    """The k inner products c_i = sum over tensors of <basis_t[i], x_t>, i < k, in one pass
    that reads xs once. Returns a float32 tensor [k] (float64 for a float64 basis) on the
    basis' device; products and sums are float64."""
    return _basis_call("dots", _as_list("basis", basis), _as_list("xs", xs), k)


def combine_(outs: TensorList, basis: TensorList, coeffs: torch.Tensor, alpha: float = 1.0,
             beta: float = 0.0) -> None:
    """out <- beta*out + alpha*sum_i coeffs_i*basis_t[i] for every tensor, k = coeffs.numel().

    ``coeffs`` is a float32/float64 tensor [k] on the CPU or the basis' device (a device
    tensor is read by the kernel: no host sync). With beta == 0, out is not read."""
    _basis_call("combine_", _as_list("outs", outs), _as_list("basis", basis), coeffs, alpha, beta)


def project_(grads: TensorList, basis: TensorList, k: int) -> None:
    """g <- P P^T g for every tensor, P = the first k basis rows (assumed orthonormal):
    dots, then combine_, two passes over the rows; no host sync on CUDA."""
    _basis_call("project_", _as_list("grads", grads), _as_list("basis", basis), k)


def orthonormalize_(basis: TensorList, k: int, passes: int = 2) -> torch.Tensor:
    """Row k <- row k minus its projection on rows < k, ``passes`` times (2: CGS2, which
    keeps the rows orthogonal to working precision), then normalized.

    Returns the norm before normalizing (0-dim, float32; float64 for a float64 basis): a
    norm tiny relative to the row's original norm means the row added no new direction.
    A row of norm exactly 0 is left as zeros."""
    return _basis_call("orthonormalize_", _as_list("basis", basis), k, passes)


from .basis import new_basis, orthonormalize_many_  # noqa: E402
