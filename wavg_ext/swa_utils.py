"""A drop-in for ``torch.optim.swa_utils.AveragedModel`` and its averaging functions, fused.

Switching is the import: ``from wavg_ext import AveragedModel, get_ema_multi_avg_fn``. The
class is a subclass of torch's (``isinstance`` holds; ``module``, ``n_averaged``,
``forward``, ``state_dict`` keys are torch's own, so checkpoints load either way) and
keeps its update semantics: the first update copies, later ones average; ``use_buffers``
averages the buffers too, otherwise they are copied from the model at every update.

What differs is how: the SWA and EMA updates of floating-point tensors run as one fused op
per device (``ops.running_mean_`` / ``ops.ema_``), with no host-device synchronization: the
count lives on the host as well (re-read from ``n_averaged`` only when something else wrote
that buffer: ``load_state_dict``, an assignment), where torch reads ``n_averaged`` on the
device twice per update. The fused path is taken for the default (SWA), for this module's
``get_*_avg_fn`` and for torch's own ``torch.optim.swa_utils.get_*_avg_fn`` functions;
any other ``avg_fn`` / ``multi_avg_fn`` is called exactly as torch calls it. Integer and
complex tensors (e.g. BatchNorm's ``num_batches_tracked`` with ``use_buffers``) take
torch's own arithmetic. Mismatched models (another number of parameters, another shape,
a dtype pair the ops do not average) raise a ValueError naming the tensor before anything
is written, where torch would stop half-way or silently skip the extra parameters.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import swa_utils as _torch_swa

from . import ops
from ._module_tree import PairedTrees, same_shapes
from .model_ema import group_pairs

__all__ = ["AveragedModel", "get_ema_multi_avg_fn", "get_swa_multi_avg_fn", "get_ema_avg_fn", "get_swa_avg_fn"]

_FUSED_DTYPES = ops.FLOAT_DTYPES


def _check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a float in [0, 1], got {type(decay).__name__}")
    if not 0.0 <= decay <= 1.0:  # also rejects NaN
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")
    return float(decay)


# ------------------------------------------------------------------------ averaging functions
# Classes, not closures: picklable, comparable, and recognized by AveragedModel (which then
# runs its own fused, sync-free update). Called directly, each does what torch's does.


def _swa_other_dtypes(avgs: Sequence[Tensor], xs: Sequence[Tensor], n: Union[Tensor, int]) -> None:
    """SWA of integer and complex tensors as torch's avg_fn computes it (true division, the
    result cast back: BatchNorm's num_batches_tracked with use_buffers). torch's
    multi_avg_fn raises for integers (addcdiv), and torch's AveragedModel takes it on CUDA."""
    for a, x in zip(avgs, xs):
        a.copy_(a + (x - a) / (n + 1))


class _SWAMultiAvgFn:
    """``multi_avg_fn`` of an equal-weight average (SWA): avg <- avg + (x - avg) / (n + 1)."""

    kind = "swa"

    @torch.no_grad()
    def __call__(self, averaged_param_list: Sequence[Tensor], current_param_list: Sequence[Tensor],
                 num_averaged: Union[Tensor, int]) -> None:
        if averaged_param_list and averaged_param_list[0].dtype in _FUSED_DTYPES:
            ops.running_mean_(list(averaged_param_list), list(current_param_list), num_averaged)
        else:
            _swa_other_dtypes(averaged_param_list, current_param_list, num_averaged)

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return "wavg_ext.get_swa_multi_avg_fn()"


class _EMAMultiAvgFn:
    """``multi_avg_fn`` of an exponential moving average: avg <- decay * avg + (1 - decay) * x."""

    kind = "ema"

    def __init__(self, decay: float):
        self.decay = _check_decay(decay)

    @torch.no_grad()
    def __call__(self, ema_param_list: Sequence[Tensor], current_param_list: Sequence[Tensor], _: Any = None) -> None:
        if ema_param_list and ema_param_list[0].dtype in _FUSED_DTYPES:
            ops.ema_(list(ema_param_list), list(current_param_list), 1.0 - self.decay)
        else:
            _torch_swa.get_ema_multi_avg_fn(self.decay)(ema_param_list, current_param_list, _)

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.decay == self.decay

    def __hash__(self) -> int:
        return hash((type(self), self.decay))

    def __repr__(self) -> str:
        return f"wavg_ext.get_ema_multi_avg_fn({self.decay!r})"


class _SWAAvgFn(_SWAMultiAvgFn):
    """``avg_fn`` of SWA: returns avg + (x - avg) / (n + 1)."""

    @torch.no_grad()
    def __call__(self, averaged_param: Tensor, current_param: Tensor, num_averaged: Union[Tensor, int]) -> Tensor:
        return averaged_param + (current_param - averaged_param) / (num_averaged + 1)

    def __repr__(self) -> str:
        return "wavg_ext.get_swa_avg_fn()"


class _EMAAvgFn(_EMAMultiAvgFn):
    """``avg_fn`` of an EMA: returns decay * avg + (1 - decay) * x."""

    @torch.no_grad()
    def __call__(self, ema_param: Tensor, current_param: Tensor, num_averaged: Any = None) -> Tensor:
        return self.decay * ema_param + (1 - self.decay) * current_param

    def __repr__(self) -> str:
        return f"wavg_ext.get_ema_avg_fn({self.decay!r})"


def get_ema_multi_avg_fn(decay: float = 0.999) -> Callable[[List[Tensor], List[Tensor], Any], None]:
    """torch.optim.swa_utils.get_ema_multi_avg_fn, fused (one ``ops.ema_`` call) and picklable.

    W_0 = the model's weights; W_{t+1} = decay * W_t + (1 - decay) * model_{t+1}.
    """
    return _EMAMultiAvgFn(decay)


def get_swa_multi_avg_fn() -> Callable[[List[Tensor], List[Tensor], Union[Tensor, int]], None]:
    """torch.optim.swa_utils.get_swa_multi_avg_fn, fused (one ``ops.running_mean_`` call) and picklable."""
    return _SWAMultiAvgFn()


def get_ema_avg_fn(decay: float = 0.999) -> Callable[[Tensor, Tensor, Any], Tensor]:
    """torch.optim.swa_utils.get_ema_avg_fn, picklable; AveragedModel runs it fused."""
    return _EMAAvgFn(decay)


def get_swa_avg_fn() -> Callable[[Tensor, Tensor, Union[Tensor, int]], Tensor]:
    """torch.optim.swa_utils.get_swa_avg_fn, picklable; AveragedModel runs it fused."""
    return _SWAAvgFn()


_TORCH_FUNCTIONS = {  # torch's closures, by qualified name: what they compute
    "get_swa_multi_avg_fn.<locals>.swa_update": "swa",
    "get_swa_avg_fn.<locals>.swa_update": "swa",
    "get_ema_multi_avg_fn.<locals>.ema_update": "ema",
    "get_ema_avg_fn.<locals>.ema_update": "ema",
}


def _fused_kind(fn: Optional[Callable]) -> Optional[Tuple[str, Optional[float]]]:
    """("swa", None) or ("ema", decay) when ``fn`` is one of the averaging functions of this
    module or of torch.optim.swa_utils (found through torch.no_grad's wrapper and the
    closure's ``decay``); None for any other function."""
    if isinstance(fn, (_SWAMultiAvgFn, _EMAMultiAvgFn)):
        return (fn.kind, getattr(fn, "decay", None))
    inner = getattr(fn, "__wrapped__", fn)
    kind = _TORCH_FUNCTIONS.get(getattr(inner, "__qualname__", ""))
    if kind is None or getattr(inner, "__module__", None) != _torch_swa.__name__:
        return None
    if kind == "swa":
        return ("swa", None)
    cells = dict(zip(inner.__code__.co_freevars, inner.__closure__ or ()))
    try:
        decay = cells["decay"].cell_contents
    except (KeyError, ValueError):
        return None
    return ("ema", float(decay)) if isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0 else None


# ------------------------------------------------------------------------------ the model
class _BothAvgFnsError(ValueError, AssertionError):
    """Both avg_fn and multi_avg_fn given (torch raises AssertionError; a ValueError names it)."""


def _named(module: nn.Module, use_buffers: bool) -> List[Tuple[str, Tensor]]:
    named = list(module.named_parameters())
    if use_buffers:
        named += list(module.named_buffers())
    return named


class AveragedModel(_torch_swa.AveragedModel):
    """Drop-in for ``torch.optim.swa_utils.AveragedModel`` (a subclass of it), fused and
    without host-device synchronization. See the module docstring for what differs.

    Args:
        model: the model whose weights are averaged (deep-copied).
        device: where the averaged copy lives (e.g. ``"cpu"`` while training on a GPU); the
            model's tensors are copied there at each update (from a GPU to the CPU through
            pinned buffers, all copies queued before one wait).
        avg_fn / multi_avg_fn: the averaging function, as torch's (at most one).
        use_buffers: average the buffers too (else they are copied from the model).
    """

    def __init__(self, model: nn.Module, device: Optional[Union[int, str, torch.device]] = None,
                 avg_fn: Optional[Callable[[Tensor, Tensor, Union[Tensor, int]], Tensor]] = None,
                 multi_avg_fn: Optional[Callable[[List[Tensor], List[Tensor], Union[Tensor, int]], None]] = None,
                 use_buffers: bool = False) -> None:
        if avg_fn is not None and multi_avg_fn is not None:
            raise _BothAvgFnsError("Only one of avg_fn and multi_avg_fn should be provided")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        self._count = 0  # host mirror of n_averaged
        self._count_key = self._buffer_key()
        self._pinned: List[Tensor] = []  # staging for device-to-CPU copies (device=)
        self._pairing: Optional[PairedTrees] = None  # the last update's pairs (see _pairs)

    # -- the host mirror of n_averaged ----------------------------------------------------
    def _buffer_key(self) -> Tuple[int, int]:
        buf = self.n_averaged
        try:
            return (id(buf), buf._version)
        except RuntimeError:  # an inference tensor tracks no version: read it every time
            return (id(buf), -1)

    def _host_count(self) -> int:
        key = self._buffer_key()
        if key != self._count_key or key[1] < 0:
            # Written by someone else (load_state_dict, an assignment, .to()): read it once.
            self._count = int(self.n_averaged.item())
            self._count_key = self._buffer_key()
        return self._count

    # Pickling and deepcopy go through these (Module has __setstate__): the copy's buffer is a
    # new tensor, so it re-reads its count once; pinned staging is not copied.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pinned"] = []
        state["_pairing"] = None  # holds the model's tensors
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._count_key = (-1, -1)
        self._pinned = []
        self._pairing = None

    # -- update ---------------------------------------------------------------------------
    def _pairs(self, model: nn.Module) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor], bool]:
        """(averaged tensors, the model's, the copied buffers, the model's, checked): the
        tensors themselves (a later ``p.data = ...`` is followed), paired by name and shape
        (checked: True), or the pairing kept from the last update while neither tree changed
        (:class:`PairedTrees`; checked: False, the shapes are for the caller to check: a
        ``.data`` of another shape stays the same object). Pairing them by name again costs
        more than the update on models of many small tensors."""
        pairing = self.__dict__.get("_pairing")
        if pairing is not None:
            value = pairing.get(self.module, model, self.use_buffers)
            if value is not None:
                return value + (False,)
        value = self._pair_by_name(model)
        self._pairing = PairedTrees.make(self.module, model, self.use_buffers, value)
        return value + (True,)

    def _pair_by_name(self, model: nn.Module) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """Raises a ValueError naming what does not correspond before anything is written."""
        mine = _named(self.module, self.use_buffers)
        theirs = _named(model, self.use_buffers)
        what = "parameters and buffers" if self.use_buffers else "parameters"
        if len(mine) != len(theirs):
            raise ValueError(f"update_parameters: the model has {len(theirs)} {what}, the averaged model "
                             f"{len(mine)}: not the model this AveragedModel was made from")
        for (name, a), (their_name, x) in zip(mine, theirs):
            if a.shape != x.shape:
                raise ValueError(f"update_parameters: the model's {their_name} has shape {tuple(x.shape)}, its "
                                 f"average {tuple(a.shape)}")
        buffers: List[Tensor] = []
        model_buffers: List[Tensor] = []
        if not self.use_buffers:
            named_buffers = list(self.module.named_buffers())
            model_buffers = list(model.buffers())
            if len(named_buffers) != len(model_buffers):
                raise ValueError(f"update_parameters: the model has {len(model_buffers)} buffers, the averaged "
                                 f"model {len(named_buffers)}: not the model this AveragedModel was made from")
            for (name, b), m in zip(named_buffers, model_buffers):
                if b.shape != m.shape:
                    raise ValueError(f"update_parameters: the model's buffer {name} has shape {tuple(m.shape)}, "
                                     f"the averaged model's {tuple(b.shape)}")
            buffers = [b for _, b in named_buffers]
        return [a for _, a in mine], [x for _, x in theirs], buffers, model_buffers

    def _check_shapes(self, model: nn.Module, checked: bool, avgs: Sequence[Tensor], xs: Sequence[Tensor]) -> None:
        """Pairs from an earlier update: any shape changed since raises the error that names it."""
        if not checked and not same_shapes(avgs, xs):
            self._pair_by_name(model)

    @staticmethod
    def _one_call(op: str, avgs: Sequence[Tensor], xs: Sequence[Tensor], scalar: Any) -> bool:
        """Runs op over all the pairs in one call where it takes them (all floating-point,
        each x on its average's device, one device); False where its check refuses them,
        which it does before writing anything: the pairs are then grouped, and a bad pair is
        named by the groups' checks."""
        try:
            getattr(ops, op)(avgs, xs, scalar)
        except (TypeError, ValueError):
            return False
        return True

    def _on_devices(self, avgs: Sequence[Tensor], xs: Sequence[Tensor]) -> List[Tensor]:
        """xs, each on its average's device. GPU to CPU goes through pinned buffers (reused
        across updates): every copy is queued, then one wait per source stream."""
        out = list(xs)
        to_cpu = [i for i, (a, x) in enumerate(zip(avgs, xs)) if a.device != x.device
                  and a.device.type == "cpu" and x.device.type == "cuda"]
        if to_cpu:
            want = [(xs[i].shape, xs[i].dtype) for i in to_cpu]
            if [(p.shape, p.dtype) for p in self._pinned] != want:
                self._pinned = [torch.empty(s, dtype=d, pin_memory=True) for s, d in want]
            streams = {}
            for p, i in zip(self._pinned, to_cpu):
                p.copy_(xs[i], non_blocking=True)
                streams[xs[i].device] = torch.cuda.current_stream(xs[i].device)
            for stream in streams.values():
                stream.synchronize()
            for p, i in zip(self._pinned, to_cpu):
                out[i] = p
        for i, (a, x) in enumerate(zip(avgs, out)):
            if a.device != x.device:
                out[i] = x.to(a.device)
        return out

    @staticmethod
    def _groups(avgs: Sequence[Tensor], xs: Sequence[Tensor], by_dtype: bool):
        """{(device, dtype or fused/other): ([avg], [x])}, in order of first appearance."""
        return group_pairs(avgs, xs, lambda a: (a.device, a.dtype if by_dtype else a.dtype in _FUSED_DTYPES))

    def _fused_by_groups(self, model: nn.Module, checked: bool, op: str, scalar: Any, avgs: Sequence[Tensor],
                         xs: Sequence[Tensor], n: int, fused: Optional[Tuple[str, Optional[float]]]) -> None:
        """op per device over the floating-point pairs (each x already on its average's
        device), torch's arithmetic on the others; every fused call checked before the first
        one writes."""
        groups = self._groups(avgs, xs, by_dtype=False)
        for (_, is_float), (ga, gx) in groups.items():
            if not is_float:
                self._check_shapes(model, checked, ga, gx)
                continue
            try:
                ops.validate(op, ga, gx, scalar)
            except ValueError:
                if not checked:
                    self._pair_by_name(model)  # a shape changed since: say which tensor
                raise
        for (device, is_float), (ga, gx) in groups.items():
            if is_float:
                getattr(ops, op)(ga, gx, scalar)
            elif n == 0:
                torch._foreach_copy_(ga, gx)
            else:  # integer / complex tensors: torch's own arithmetic
                for (_, dtype), (da, dx) in self._groups(ga, gx, by_dtype=True).items():
                    if fused[0] == "swa":
                        _swa_other_dtypes(da, dx, n)  # the host count: no device read
                    else:
                        _torch_swa.get_ema_multi_avg_fn(fused[1])(da, dx, None)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Adds the model's current weights to the average (the first call copies them)."""
        avgs, xs, buffers, model_buffers, checked = self._pairs(model)
        self._check_shapes(model, checked, buffers, model_buffers)
        n = self._host_count()
        fused = _fused_kind(self.multi_avg_fn if self.multi_avg_fn is not None else self.avg_fn)
        if self.avg_fn is None and self.multi_avg_fn is None:
            fused = ("swa", None)
        op, scalar = None, None
        if n == 0 or fused is not None:
            op, scalar = ("scale_copy_", 1.0) if n == 0 else (
                ("running_mean_", n) if fused[0] == "swa" else ("ema_", 1.0 - fused[1]))
        # The common case, every pair floating-point on one device, runs in one call; the rest
        # is grouped by device and kind (a Python step a tensor).
        if op is None or not self._one_call(op, avgs, xs, scalar):
            xs = self._on_devices(avgs, xs)
            if op is not None:
                self._fused_by_groups(model, checked, op, scalar, avgs, xs, n, fused)
            elif self.multi_avg_fn is not None:  # a function of the user's: called as torch calls it
                self._check_shapes(model, checked, avgs, xs)
                for (device, _), (ga, gx) in self._groups(avgs, xs, by_dtype=True).items():
                    self.multi_avg_fn([a.detach() for a in ga], [x.detach() for x in gx], self.n_averaged.to(device))
            else:
                self._check_shapes(model, checked, avgs, xs)
                for a, x in zip(avgs, xs):
                    a.detach().copy_(self.avg_fn(a.detach(), x.detach(), self.n_averaged.to(a.device)))
        if not self.use_buffers:  # buffers follow the model
            model_buffers = self._on_devices(buffers, model_buffers)
            for (_, _), (gb, gm) in self._groups(buffers, model_buffers, by_dtype=True).items():
                torch._foreach_copy_(gb, gm)
        self.n_averaged += 1
        self._count = n + 1
        self._count_key = self._buffer_key()

    def averaged_state_dict(self) -> dict:
        """The averages keyed by the model's own parameter and buffer names (``module.`` and
        ``n_averaged`` left out): loadable with ``model.load_state_dict``."""
        return self.module.state_dict()
