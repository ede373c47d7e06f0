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
from .. import _cuda_loaded
from . import reference

Scalar = Union[float, int, torch.Tensor]
TensorList = Iterable[torch.Tensor]

__all__ = [spec["name"] for spec in _C.op_specs()] + [
    "orthonormalize_many_", "new_basis", "validate", "Plan", "FLOAT_DTYPES", "param_metadata", "changed_params",
    "reference", "force_reference"]

# The floating dtypes the ops' kernels read and write (float8 and complex are refused).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Device types with compiled kernels loaded (CUDA only when wavg_ext loaded _C_cuda).
_KERNEL_DEVICES = frozenset(["cpu", "cuda"] if _cuda_loaded else ["cpu"])
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
    """Runs a pair op (``lists``: its tensor lists, named ``names``, the first the outputs;
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


def _basis_call(op: str, device_list: int, *args):
    """Runs an op with its own signature (the basis ops, nonfinite_flag) on the kernels
    (eager: the borrowed-list entry; compiling: the registered op) or, for other devices
    / forced, checks then runs the reference. ``args[device_list]`` decides the device."""
    if not _use_kernels(args[device_list]):
        validate(op, *args)
        return getattr(reference, op)(*args)
    if torch.compiler.is_compiling():
        return getattr(torch.ops.wavg_ext, op)(*args)
    return getattr(_C, op)(*args)


# --------------------------------------------------------------------------- the ops
# One function per op of the registry (_C.op_specs(), written in csrc/op_registry.h and
# csrc/basis_ops.h), with the op schema's parameters and the reference function's
# docstring. Pair ops update every (out, in) pair of two lists; the compensated ops keep
# an average as two tensors of its dtype whose sum is its value (avg, the nearest
# representable value, and comp, the remainder), updated in float64, so a float32 (or
# bfloat16) average keeps moving where its per-update change is below half an ulp.
# The basis ops (TWA) work on a basis: a list with one tensor per parameter, of shape
# [capacity, *param.shape] (make one with new_basis); row i of every tensor together is
# one vector of the whole model. Same dispatch for all: kernels for CPU/CUDA, the
# reference elsewhere, one set of C++ checks everywhere.

_SPECS = {spec["name"]: spec for spec in _C.op_specs()}


def _make_op(spec: dict):
    """The public function of one op: generated source, so that it has the op's exact
    signature and costs no more than a hand-written wrapper."""
    name = spec["name"]
    schema = getattr(torch.ops.wavg_ext, name).default._schema
    params, annotations = [], {}
    for arg in schema.arguments:
        kind = str(arg.type)
        if kind == "List[Tensor]":
            annotations[arg.name] = TensorList
        elif arg.name == spec["scalar"]:
            annotations[arg.name] = Scalar
        else:
            annotations[arg.name] = {"int": int, "float": float, "Tensor": torch.Tensor,
                                     "List[float]": Sequence[float]}[kind]
        params.append(f"{arg.name}={arg.default_value!r}" if arg.has_default_value() else arg.name)
    lists = [a.name for a in schema.arguments if str(a.type) == "List[Tensor]"]
    if spec["kind"] not in ("pair", "compensated"):
        args = ", ".join(f"_as_list({a.name!r}, {a.name})" if a.name in lists else a.name
                         for a in schema.arguments)
        body = f"return _basis_call({name!r}, {lists.index(spec['device_list'])}, {args})"
    else:
        body = (f"_call({name!r}, {tuple(lists)!r}, ({', '.join(lists)},), {spec['scalar']})")
    namespace = {"_call": _call, "_basis_call": _basis_call, "_as_list": _as_list}
    exec(f"def {name}({', '.join(params)}):\n    {body}\n", namespace)  # noqa: S102
    fn = namespace[name]
    returns = schema.returns
    annotations["return"] = torch.Tensor if returns else None
    fn.__annotations__ = annotations
    fn.__doc__ = getattr(reference, name).__doc__
    fn.__module__ = __name__
    fn.__qualname__ = name
    return fn


for _name, _spec in _SPECS.items():
    globals()[_name] = _make_op(_spec)
del _name, _spec



def _profiles(avgs: Any, xs: Sequence[torch.Tensor], weights: Any) -> Tuple[list, list]:
    """ema_many_'s public form (one list of averages per profile) as the registered op takes
    it (the lists concatenated), with its weights as a list; raises on a wrong nesting."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"ema_many_: weights must be a list or tuple of numbers, got {type(weights).__name__}")
    if isinstance(avgs, torch.Tensor) or not isinstance(avgs, (list, tuple)):
        raise TypeError(f"ema_many_: avgs must be a list of lists of tensors (one per profile), "
                        f"got {type(avgs).__name__}")
    if len(avgs) != len(weights):
        raise ValueError(f"ema_many_: avgs has {len(avgs)} lists (profiles) but weights has {len(weights)} entries")
    flat = []
    for p, profile in enumerate(avgs):
        if isinstance(profile, torch.Tensor) or not isinstance(profile, (list, tuple)):
            raise TypeError(f"ema_many_: avgs[{p}] must be a list of tensors (profile {p}'s averages), "
                            f"got {type(profile).__name__}")
        if len(profile) != len(xs):
            raise ValueError(f"ema_many_: avgs[{p}] has {len(profile)} tensors but xs has {len(xs)}")
        flat += profile
    return flat, list(weights)


def _check_ema_many(avgs: Sequence[TensorList], xs: TensorList, weights: Sequence[float]) -> None:
    xs = _as_list("xs", xs)
    flat, weights = _profiles(avgs, xs, weights)
    _C.check_ema_many(flat, xs, weights)


def ema_many_(avgs: Sequence[TensorList], xs: TensorList, weights: Sequence[float]) -> None:
    xs = _as_list("xs", xs)
    flat, weights = _profiles(avgs, xs, weights)
    if not _use_kernels(flat):
        _C.check_ema_many(flat, xs, weights)
        reference.ema_many_(flat, xs, weights)
    elif torch.compiler.is_compiling():
        torch.ops.wavg_ext.ema_many_(flat, xs, weights)
    else:
        _C.ema_many_(flat, xs, weights)


ema_many_.__doc__ = reference.ema_many_.__doc__

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
def _check_of(spec: dict) -> Callable[..., Any]:
    if spec["kind"] == "pair":
        return functools.partial(_C.check_args, spec["name"])
    if spec["kind"] == "compensated":
        return functools.partial(_C.check_compensated, spec["name"])
    return getattr(_C, "check_" + spec["name"].rstrip("_"))


# op name -> its checks: the one mapping, used by validate() and by every reference-path call.
_VALIDATORS: Dict[str, _Validator] = {
    **{name: _validator(globals()[name], _check_of(spec), len(spec["lists"])) for name, spec in _SPECS.items()},
    # (its list is read with list(), as the op reads it)
    "orthonormalize_many_": _validator(orthonormalize_many_, _check_orthonormalize_many, 0),
    # (its averages are a list of lists: read as the op reads them)
    "ema_many_": _validator(ema_many_, _check_ema_many, 0),
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
    running_mean_compensated_, ema_compensated_, nonfinite_flag, ema_stochastic_, ema_many_,
    window_push_, dots, combine_, project_, orthonormalize_, orthonormalize_many_ (an unknown name
    raises ValueError).
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


# --------------------------------------------------------------------------- plans


class Plan:
    """One pair or compensated op over tensor lists that stay the same from call to call,
    validated once: ``plan = Plan("ema_", avgs, xs)``, then ``plan(weight)`` each step does
    what ``ops.ema_(avgs, xs, weight)`` does, without validating every pair again.

    Before each call the plan re-checks, in C++, what can change under the same tensor
    objects (each tensor's data pointer, dtype, device, sizes and strides: ``p.data = ...``,
    ``module.to(...)``); when anything changed it validates everything again and raises
    exactly what the op would raise, before any write. The lists themselves are copied at
    construction: the plan keeps those tensors (and their memory) alive, and replacing a
    tensor in your list does not reach it (make a new plan). The scalar is checked on every
    call, as by the op. CPU tensors with matching layouts run the kept plan; other devices,
    pairs that need temporaries (different layouts) and forced reference mode call the op
    each time, with the same results.

    ``op``: a pair op (running_mean_, ema_, accumulate_, scale_copy_) or a compensated op
    (running_mean_compensated_, ema_compensated_, whose lists are (avgs, comps, xs)).
    """

    __slots__ = ("op", "lists", "_fn", "_plan")

    def __init__(self, op: str, *lists: TensorList) -> None:
        spec = _SPECS.get(op) if isinstance(op, str) else None
        if spec is None or spec["kind"] not in ("pair", "compensated"):
            ops = [n for n, s in _SPECS.items() if s["kind"] in ("pair", "compensated")]
            raise ValueError(f"Plan: {op!r} is not a pair or compensated op; those are {', '.join(ops)}")
        names = spec["lists"]
        if len(lists) != len(names):
            raise TypeError(f"Plan: {op} takes {len(names)} tensor lists ({', '.join(names)}), got {len(lists)}")
        self.op = op
        self.lists = tuple(list(_as_list(name, t)) for name, t in zip(names, lists))
        self._fn = globals()[op]
        validate(op, *self.lists, 0.0)  # the op's own checks and messages
        self._plan = _C.CallPlan(op, list(self.lists)) if _use_kernels(self.lists[0]) else None

    def check(self, scalar: Optional[Scalar] = None) -> None:
        """Raises what a call would raise about the tensors, and with ``scalar`` about it too,
        writing nothing."""
        if self._plan is not None and not _force_reference:
            self._plan.check()
        else:
            validate(self.op, *self.lists, 0.0)
        if scalar is not None:  # the scalar alone: the op's checks over empty lists
            validate(self.op, *([] for _ in self.lists), scalar)

    def __call__(self, scalar: Scalar) -> None:
        if self._plan is None or _force_reference or torch.compiler.is_compiling():
            self._fn(*self.lists, scalar)
        else:
            self._plan.run(scalar)

    def __reduce__(self):
        raise TypeError("a wavg_ext.ops.Plan holds a C++ plan and cannot be pickled or copied; make a new one")


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
