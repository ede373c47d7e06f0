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

:func:`validate` runs an op's checks alone (nothing is written), and
:func:`param_metadata` / :func:`changed_params` tell whether an optimizer's parameters
are still the tensors (and dtypes, devices, sizes) they were: what the optimizer
wrappers of :mod:`wavg_ext.optim` use instead of the compiled extension itself.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .. import _C  # noqa: F401  (loading the extension registers torch.ops.wavg_ext.*)
from . import reference

Scalar = Union[float, int, torch.Tensor]
TensorList = Iterable[torch.Tensor]

__all__ = ["running_mean_", "ema_", "accumulate_", "scale_copy_", "running_mean_compensated_",
           "ema_compensated_", "nonfinite_flag", "dots", "combine_", "project_", "orthonormalize_",
           "orthonormalize_many_", "new_basis", "validate", "param_metadata", "changed_params", "reference",
           "force_reference"]

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
        validate(op, *lists, scalar)
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
        validate("nonfinite_flag", xs)
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
        validate(op, *args)
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
from .basis import _check_many as _check_orthonormalize_many  # noqa: E402


# --------------------------------------------------------------------------- validation


class _Validator(NamedTuple):
    check: Callable[..., Any]  # the op's checks, called with its arguments (defaults filled in)
    names: Tuple[str, ...]  # the op's parameters, in order
    lists: int  # how many of the first parameters are tensor lists (read as the op reads them)
    required: int  # how many parameters have no default
    defaults: Tuple[Any, ...]  # the defaults of the others


def _validator(fn: Callable[..., Any], check: Callable[..., Any], lists: int) -> _Validator:
    params = list(inspect.signature(fn).parameters.values())
    required = sum(p.default is inspect.Parameter.empty for p in params)
    return _Validator(check, tuple(p.name for p in params), lists, required,
                      tuple(p.default for p in params[required:]))


# op name -> its checks: the one mapping, used by validate() and by every reference-path call.
_VALIDATORS: Dict[str, _Validator] = {
    **{op: _validator(globals()[op], functools.partial(_C.check_args, op), 2)
       for op in ("running_mean_", "ema_", "accumulate_", "scale_copy_")},
    **{op: _validator(globals()[op], functools.partial(_C.check_compensated, op), 3)
       for op in ("running_mean_compensated_", "ema_compensated_")},
    "nonfinite_flag": _validator(nonfinite_flag, _C.check_nonfinite_flag, 1),
    "dots": _validator(dots, _C.check_dots, 2),
    "combine_": _validator(combine_, _C.check_combine, 2),
    "project_": _validator(project_, _C.check_project, 2),
    "orthonormalize_": _validator(orthonormalize_, _C.check_orthonormalize, 1),
    # (its list is read with list(), as the op reads it)
    "orthonormalize_many_": _validator(orthonormalize_many_, _check_orthonormalize_many, 0),
}


def validate(op: str, *args) -> None:
    """Runs the checks that ``getattr(wavg_ext.ops, op)(*args)`` runs, without running the op.

    ``args`` are the op's own positional arguments (its defaults fill in the ones left
    out). Bad arguments raise exactly what the op would raise (the same ValueError or
    TypeError, naming the offending list and index); good ones return None. Nothing is
    written and no element of the listed tensors is read (a CPU scalar tensor's value is,
    as the op reads it), so meta tensors work too: e.g. whether the ops accept an average
    of one dtype for a parameter of another, or whether every call of a multi-device
    update will succeed before the first one writes. The kernels, the reference path and
    this function run the same C++ checks.

    ``op`` is the name of one of the ops: running_mean_, ema_, accumulate_, scale_copy_,
    running_mean_compensated_, ema_compensated_, nonfinite_flag, dots, combine_,
    project_, orthonormalize_, orthonormalize_many_ (an unknown name raises ValueError).
    """
    v = _VALIDATORS.get(op) if isinstance(op, str) else None
    if v is None:
        raise ValueError(f"validate: unknown op {op!r}; the ops are {', '.join(_VALIDATORS)}")
    n = len(args)
    if not v.required <= n <= len(v.names):
        raise TypeError(f"validate: {op} takes {v.required} to {len(v.names)} arguments "
                        f"({', '.join(v.names)}), got {n}")
    args = args + v.defaults[n - v.required:]
    lists = [_as_list(name, a) for name, a in zip(v.names[:v.lists], args)]
    v.check(*lists, *args[v.lists:])


# --------------------------------------------------------------------------- parameter tracking
# How the optimizer wrappers notice, before each step, that the model's parameters changed
# under them (replaced in param_groups, or moved to another dtype or device by
# ``module.to()``): one C++ pass over the parameters, a few ns each.


def param_metadata(params: Sequence[torch.Tensor]) -> Any:
    """A record of ``params`` (a list or tuple of tensors): each tensor's identity, dtype,
    device and number of elements, for :func:`changed_params`. An opaque C++ object (it
    cannot be pickled or copied: record it again after loading)."""
    return _C.param_metadata(params)


def changed_params(groups: Sequence[Any], params: Sequence[torch.Tensor],
                   metadata: Any = None) -> Optional[List[int]]:
    """The positions i where the tensors of ``groups`` (an optimizer's ``param_groups``:
    dicts whose ``"params"`` lists, in order, give the positions; or plain lists) are no
    longer ``params[i]`` (the same Python object) or, with ``metadata`` from
    :func:`param_metadata` of ``params``, no longer have the recorded dtype, device and
    number of elements. None when the groups hold another number of tensors than
    ``params``. ``groups``, their lists and ``params`` must be lists or tuples (TypeError)."""
    return _C.changed_params(groups, params, metadata)
