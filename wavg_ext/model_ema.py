"""``wavg_ext.ModelEMA``: an exponential moving average of a model, kept in a separate copy
you can evaluate while training goes on (the model-EMA of timm's ``ModelEmaV3``, diffusers'
``EMAModel``, ema-pytorch's ``EMA`` and torch-ema), updated by one fused op per device.

The decay at optimizer step ``t`` (``update(model, step=t)``, or the count of updates when
no step is given) follows timm's schedule (diffusers' and ema-pytorch's with warmup;
diffusers without warmup ramps ``(1 + s) / (10 + s)``, which ``compat.diffusers`` keeps):

- ``s = t - update_after_step - 1``; while ``s <= 0`` the average is a copy of the model
  (decay 0: the first update copies);
- with ``warmup=True``: ``1 - (1 + s / inv_gamma) ** -power`` (@crowsonkb's warmup; ``inv_gamma=1,
  power=2/3`` reaches 0.999 at 31.6k steps, 0.9999 at 1M), else ``decay``;
- clamped to ``[min_decay, decay]``. ``decay`` may be a callable of the step instead (it
  is kept across ``load_state_dict``, which restores the step).

Floating-point parameters and buffers are averaged (``exclude_buffers=True`` copies the
buffers instead, as do names matching ``exclude``); integer ones (BatchNorm's
``num_batches_tracked``) are copied. ``average_dtype=torch.float32`` keeps float32
averages of a bfloat16/float16 model; ``stochastic_rounding=True`` keeps bfloat16 averages
that still move when each update is below half an ulp. No host-device synchronization per
update; bad input raises before anything is written.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from ._module_tree import PairedTrees, same_shapes

__all__ = ["ModelEMA", "ema_decay", "scheduled_decay", "WARMUPS"]

_FLOATS = ops.FLOAT_DTYPES
Decay = Union[float, Callable[[int], float]]


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


WARMUPS = ("none", "inv_gamma", "ratio")


def ema_decay(step: int, decay: float, min_decay: float = 0.0, update_after_step: int = 0,
              warmup: Union[bool, str] = False, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The decay of the EMA update at optimizer step ``step`` (see the module docstring):
    0 (a copy) up to ``update_after_step + 1``, then ``decay`` or the warmup form, within
    ``[min_decay, decay]``. ``warmup``: ``"inv_gamma"`` (or True) ``1 - (1 + s / inv_gamma)
    ** -power``, ``"ratio"`` ``(1 + s) / (10 + s)``, ``"none"`` (or False) ``decay``."""
    return scheduled_decay(step - update_after_step - 1, decay, min_decay, warmup, inv_gamma, power)


def scheduled_decay(s: int, decay: float, min_decay: float = 0.0, warmup: Union[bool, str] = False,
                    inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The decay of the update that follows ``s`` updates after ``update_after_step + 1``
    (0, a copy, for ``s <= 0``): ema_decay's schedule counted in updates."""
    if s <= 0:
        return 0.0
    kind = ("inv_gamma" if warmup else "none") if isinstance(warmup, bool) else warmup
    if kind == "inv_gamma":
        d = 1.0 - (1.0 + s / inv_gamma) ** -power
    elif kind == "ratio":
        d = (1.0 + s) / (10.0 + s)
    else:
        d = decay
    return max(min(d, decay), min_decay)


def group_pairs(avgs: Sequence[Tensor], xs: Sequence[Tensor],
                key: Callable[[Tensor], Any] = lambda a: a.device) -> Dict[Any, Tuple[List[Tensor], List[Tensor]]]:
    """{key(avg): ([avg], [x])} in order of first appearance (by default: per device)."""
    groups: Dict[Any, Tuple[List[Tensor], List[Tensor]]] = {}
    for a, x in zip(avgs, xs):
        ga, gx = groups.setdefault(key(a), ([], []))
        ga.append(a)
        gx.append(x)
    return groups


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; asynchronous only where that is safe to read at once (to a GPU:
    stream-ordered). A device-to-CPU copy made with non_blocking lands in memory the host may
    read before the copy is done, so that one blocks."""
    if x.device == device:
        return x
    return x.to(device, non_blocking=device.type != "cpu")


def copy_tensors_(dsts: Sequence[Tensor], srcs: Sequence[Tensor]) -> None:
    """dsts[i] <- srcs[i] (each moved to its destination's device): one foreach copy per device."""
    srcs = [to_device(s, d.device) for d, s in zip(dsts, srcs)]
    for gd, gs in group_pairs(dsts, srcs).values():
        torch._foreach_copy_(gd, gs)


def _calls(op: str, avgs: Sequence[Tensor], xs: Sequence[Tensor], *args) -> List[Tuple[str, list, list, tuple]]:
    """The calls of ``op`` over (avgs, xs), one per device, all checked before the first runs.
    xs on another device than their average are moved to it first."""
    try:  # the common case, everything on one device: one check, one call
        ops.validate(op, avgs, xs, *args)
        return [(op, avgs, xs, args)] if len(avgs) else []
    except (ValueError, TypeError):
        xs = [to_device(x, a.device) for a, x in zip(avgs, xs)]
        groups = list(group_pairs(avgs, xs).values())
        for ga, gx in groups:
            ops.validate(op, ga, gx, *args)  # raises what is wrong (shape, dtype), naming the index
        return [(op, ga, gx, args) for ga, gx in groups]


def update_seed(seed: int, update: int) -> int:
    """The ema_stochastic_ seed of update number ``update`` (from 0) of a run seeded ``seed``:
    distinct per update (the kernels hash it), an int64."""
    v = (seed + update * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def ema_update_(avgs: Sequence[Tensor], xs: Sequence[Tensor], copies: Sequence[Tensor], copy_from: Sequence[Tensor],
                decay: float, seed: Optional[int] = None) -> None:
    """avgs <- decay * avgs + (1 - decay) * xs (a copy when decay is 0), copies <- copy_from:
    one fused op per device for the averages, checked for every device before any write.
    xs on another device than their average are moved to it first. With ``seed``, the
    bfloat16 averages are rounded stochastically (ops.ema_stochastic_ with that seed)."""
    if decay == 0.0:
        calls = _calls("scale_copy_", avgs, xs, 1.0)
    elif seed is None:
        calls = _calls("ema_", avgs, xs, 1.0 - decay)
    else:
        # (the pairs' positions in the stochastic call are their order among the bfloat16 ones)
        by_kind = group_pairs(avgs, xs, lambda a: a.dtype == torch.bfloat16)
        calls = (_calls("ema_stochastic_", *by_kind.get(True, ([], [])), 1.0 - decay, seed)
                 + _calls("ema_", *by_kind.get(False, ([], [])), 1.0 - decay))
    for op, ga, gx, args in calls:
        getattr(ops, op)(ga, gx, *args)
    copy_tensors_(copies, copy_from)


class _PairCache(PairedTrees):
    """ModelEMA's pairs for the model it last updated from (:class:`PairedTrees`: kept while
    neither tree changes, the model held weakly), with an :class:`ops.Plan` for the ``ema_``
    call when it is one call on one device."""

    __slots__ = ("plan",)

    def release(self) -> None:
        super().release()
        self.plan = None

    def run_ema(self, weight: float) -> bool:
        """ops.ema_(avgs, xs, weight) through the kept plan; False when there is none (several
        devices, xs to be moved) or it refused the tensors (something changed under them:
        the caller then runs the op's own path, which says what, before any write)."""
        try:
            if getattr(self, "plan", None) is None:
                avgs, xs = self.value[0], self.value[1]
                calls = _calls("ema_", avgs, xs, weight)
                one = len(calls) == 1 and calls[0][1] is avgs and calls[0][2] is xs
                self.plan = ops.Plan("ema_", avgs, xs) if one else False
            if self.plan is False:
                return False
            self.plan(weight)
        except (TypeError, ValueError):
            self.plan = None  # made again at the next call, for the tensors as they are then
            return False
        return True


class ModelEMA(nn.Module):
    """An exponential moving average of ``model`` in a separate copy (``self.module``).

    Args:
        model: the model being trained (deep-copied; the copy is in eval mode and needs no grad).
        decay: the decay (``0.9999``), or a callable ``step -> decay``.
        min_decay, update_after_step, warmup, inv_gamma, power: the schedule (module docstring).
        exclude_buffers: copy the buffers from the model instead of averaging them.
        exclude: names (fnmatch patterns, e.g. ``"*.running_*"``) of parameters/buffers that
            are copied from the model instead of averaged.
        average_dtype: dtype of the floating-point averages (e.g. ``torch.float32`` for a
            bfloat16 model); default: the model's.
        device: where the copy lives (e.g. ``"cpu"``); default: the model's device.
        stochastic_rounding: round the bfloat16 averages stochastically (``ops.ema_stochastic_``):
            unbiased, so a bfloat16 average keeps moving where a decay close to 1 makes each
            step smaller than half a bfloat16 ulp and round-to-nearest freezes it; at the
            memory of a bfloat16 average, where ``average_dtype=torch.float32`` doubles it.
        seed: the random bits of update ``n`` are a hash of (seed, n, the tensor, the element):
            a run is reproducible, and resuming from ``state_dict()`` continues it bit for bit.

    ``update(model, step=None)`` after each optimizer step; ``current_decay`` is the decay it
    used, ``num_updates`` how many it made. ``module`` (or calling this object) evaluates the
    average; ``copy_to(model)``, ``store(model)``/``restore(model)`` and ``averaged(model)``
    put it into the training model. ``state_dict()`` holds the averages (``module.*``) and
    the counters: loading it resumes bit for bit.
    """

    def __init__(self, model: nn.Module, decay: Decay = 0.9999, *, min_decay: float = 0.0,
                 update_after_step: int = 0, warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3,
                 exclude_buffers: bool = False, exclude: Sequence[str] = (),
                 average_dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                 stochastic_rounding: bool = False, seed: int = 0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(decay):
            _check_unit("decay", decay)
        self.min_decay = _check_unit("min_decay", min_decay)
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int) or update_after_step < 0:
            raise ValueError(f"update_after_step must be an int >= 0, got {update_after_step!r}")
        for name, v in (("inv_gamma", inv_gamma), ("power", power)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        if average_dtype is not None and average_dtype not in _FLOATS:
            raise TypeError(f"average_dtype must be a floating-point dtype, got {average_dtype}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise TypeError(f"seed must be an int64, got {seed!r}")
        self.decay = decay
        self.update_after_step = update_after_step
        self.warmup = bool(warmup)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.exclude_buffers = bool(exclude_buffers)
        self.exclude = tuple(exclude)
        self.num_updates = 0
        self.step = 0  # the step of the last update
        self.current_decay: Optional[float] = None
        self._stored: Optional[List[Tensor]] = None
        self._cache: Optional[_PairCache] = None
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device)
        if average_dtype is not None:
            for t in itertools.chain(self.module.parameters(), self.module.buffers()):
                if t.dtype in _FLOATS:
                    t.data = t.data.to(average_dtype)
        unmatched = [p for p in self.exclude if not any(fnmatch.fnmatchcase(n, p) for n, _ in self._entries(self.module))]
        if unmatched:
            raise ValueError(f"exclude: {unmatched} match no parameter or buffer name of the model")
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = seed
        if self.stochastic_rounding:
            dtypes = {t.dtype for _, t in self._entries(self.module) if t.is_floating_point()}
            if torch.bfloat16 not in dtypes:
                raise ValueError("stochastic_rounding rounds bfloat16 averages, and this ModelEMA has none (its "
                                 f"floating-point averages are {sorted(map(str, dtypes))}): pass a bfloat16 model "
                                 "or average_dtype=torch.bfloat16")

    # -- the schedule -----------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """The decay ``update(model, step)`` uses."""
        if callable(self.decay):
            s = step - self.update_after_step - 1
            return 0.0 if s <= 0 else max(min(_check_unit("decay(step)", self.decay(step)), 1.0), self.min_decay)
        return ema_decay(step, self.decay, self.min_decay, self.update_after_step, self.warmup, self.inv_gamma,
                         self.power)

    # -- what is averaged -------------------------------------------------------------------
    @staticmethod
    def _entries(module: nn.Module) -> List[Tuple[str, Tensor]]:
        return list(module.named_parameters()) + list(module.named_buffers())

    def _excluded(self, names: List[str]) -> frozenset:
        """The names ``exclude`` matches (cached: the names rarely change)."""
        key = tuple(names)
        if getattr(self, "_excluded_key", None) != key:
            self._excluded_key = key
            self._excluded_set = frozenset(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.exclude))
        return self._excluded_set

    def _pairs(self, model: nn.Module):
        """(averages, the model's tensors, copies, their sources): the model's own tensors
        (parameters as they are: a later ``p.data = ...`` is followed), names checked here,
        shapes by the ops' checks (names added on failure: ``_named_error``). Kept while
        neither tree changes (:class:`_PairCache`): pairing them by name again costs more
        than the update on models of many small tensors."""
        cache = self.__dict__.get("_cache")
        settings = (self.exclude, self.exclude_buffers)
        if cache is not None:
            pairs = cache.get(self.module, model, settings)
            # (the copies' shapes; the averaged pairs' are checked by the ops)
            if pairs is not None and same_shapes(pairs[2], pairs[3]):
                return pairs
        pairs = self._pair_by_name(model)
        self._cache = _PairCache.make(self.module, model, settings, pairs)
        return pairs

    def _pair_by_name(self, model: nn.Module):
        mine_p, mine_b = list(self.module.named_parameters()), list(self.module.named_buffers())
        their_p, their_b = list(model.named_parameters()), list(model.named_buffers())
        names = [n for n, _ in mine_p] + [n for n, _ in mine_b]
        their_names = [n for n, _ in their_p] + [n for n, _ in their_b]
        if names != their_names:
            missing = sorted(set(names) ^ set(their_names))
            raise ValueError("update: the model's parameters and buffers are not the ones this ModelEMA was made "
                             f"from (differing names: {missing[:5]}{' ...' if len(missing) > 5 else ''})")
        excluded = self._excluded(names) if self.exclude else frozenset()
        avgs, xs, copies, sources = [], [], [], []
        for (name, a), (_, x) in zip(mine_p, their_p):
            if a.is_floating_point() and name not in excluded:
                avgs.append(a)
                xs.append(x)
            else:
                copies.append(a)
                sources.append(x)
        for (name, a), (_, x) in zip(mine_b, their_b):
            if a.is_floating_point() and not self.exclude_buffers and name not in excluded:
                avgs.append(a)
                xs.append(x)
            else:
                copies.append(a)
                sources.append(x)
        for c, x in zip(copies, sources):  # (copy_ would broadcast a smaller tensor silently)
            if c.shape != x.shape:
                self._named_error(model)
        return avgs, xs, copies, sources

    def _named_error(self, model: nn.Module) -> None:
        """Raises the ValueError that names the first tensor whose shape differs from its average's."""
        for (name, a), (_, x) in zip(self._entries(self.module), self._entries(model)):
            if a.shape != x.shape:
                raise ValueError(f"update: the model's {name} has shape {tuple(x.shape)}, its average "
                                 f"{tuple(a.shape)}")

    # -- update -----------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Adds the model's current weights: ``avg <- d * avg + (1 - d) * weight`` with ``d =
        decay_at(step)`` (``step`` defaults to the number of updates so far plus one)."""
        if step is None:
            step = self.num_updates + 1
        elif isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        self._apply(model, self.decay_at(step), step)

    def _apply(self, model: nn.Module, decay: float, step: int) -> None:
        avgs, xs, copies, sources = self._pairs(model)
        seed = update_seed(self.seed, self.num_updates) if self.stochastic_rounding else None
        try:
            cache = self.__dict__.get("_cache")
            if seed is None and decay != 0.0 and cache is not None and cache.run_ema(1.0 - decay):
                copy_tensors_(copies, sources)
            else:
                ema_update_(avgs, xs, copies, sources, decay, seed)
        except ValueError:
            self._named_error(model)  # a shape: say which tensor
            raise
        self.num_updates += 1
        self.step = step
        self.current_decay = decay

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # Pickling and deepcopy go through these (Module has __setstate__): the cache holds the
    # model's tensors and a C++ plan, neither of which a copy should carry.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_cache", None)

    # -- putting the average into the training model ----------------------------------------
    def _targets(self, model: nn.Module) -> Tuple[List[Tensor], List[Tensor]]:
        mine, theirs = self._entries(self.module), self._entries(model)
        if [n for n, _ in mine] != [n for n, _ in theirs] or any(a.shape != x.shape for (_, a), (_, x) in zip(mine, theirs)):
            raise ValueError("the model's parameters and buffers are not the ones this ModelEMA was made from")
        return [x.detach() for _, x in theirs], [a.detach() for _, a in mine]

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the averages (and the copied buffers) into ``model``'s tensors."""
        dsts, srcs = self._targets(model)
        copy_tensors_(dsts, srcs)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Sets the averages to ``model``'s current weights (the counters are kept)."""
        srcs, dsts = self._targets(model)
        copy_tensors_(dsts, srcs)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keeps a copy of ``model``'s weights for ``restore``."""
        dsts, _ = self._targets(model)
        self._stored = [t.clone() for t in dsts]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Puts back the weights ``store`` kept."""
        if self._stored is None:
            raise RuntimeError("restore: nothing stored (call store(model) first)")
        dsts, _ = self._targets(model)
        copy_tensors_(dsts, self._stored)
        self._stored = None

    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.averaged(model):`` the model holds the averages inside, its own weights
        after (even on an exception)."""
        self.store(model)
        try:
            self.copy_to(model)
            yield model
        finally:
            self.restore(model)

    def pin_memory(self) -> "ModelEMA":
        """Pins the (CPU) averages, for non-blocking copies to and from a GPU."""
        for t in itertools.chain(self.module.parameters(), self.module.buffers()):
            if t.device.type == "cpu" and not t.is_pinned():
                t.data = t.data.pin_memory()
        return self

    def averaged_state_dict(self) -> Dict[str, Tensor]:
        """The averages keyed by the model's own names: ``model.load_state_dict`` takes it."""
        return self.module.state_dict()

    # -- importing the averages of other libraries ------------------------------------------
    @torch.no_grad()
    def load_averages(self, state: Dict[str, Any]) -> None:
        """Loads averages saved in another layout, checked completely before anything changes:

        - ``torch.optim.swa_utils.AveragedModel.state_dict()`` (``n_averaged``, ``module.*``;
          also wavg_ext.AveragedModel's) and timm ``ModelEmaV3.state_dict()`` (``module.*``);
        - a timm training checkpoint (its ``state_dict_ema``);
        - diffusers ``EMAModel.state_dict()`` (``shadow_params`` in parameter order, and
          ``optimization_step``, which becomes the step and the update count);
        - the model's own names (``averaged_state_dict()``, ``model.state_dict()``).

        Buffers missing from the saved state (diffusers keeps parameters only) are left as
        they are; every parameter must be there.
        """
        if not isinstance(state, dict):
            raise TypeError(f"load_averages: expected a dict, got {type(state).__name__}")
        names = [n for n, _ in self._entries(self.module)]
        params = [n for n, _ in self.module.named_parameters()]
        count = None
        if "shadow_params" in state:  # diffusers
            shadow = state["shadow_params"]
            if not isinstance(shadow, (list, tuple)):
                raise TypeError(f"load_averages: shadow_params is a {type(shadow).__name__}, not a list")
            if len(shadow) != len(params):
                raise ValueError(f"load_averages: shadow_params holds {len(shadow)} tensors, the model has "
                                 f"{len(params)} parameters")
            values = dict(zip(params, shadow))
            count = state.get("optimization_step")
        else:
            if "state_dict_ema" in state:  # a timm checkpoint file
                state = state["state_dict_ema"]
            if any(k.startswith("module.") for k in state):
                values = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
                if "n_averaged" in state:
                    count = int(state["n_averaged"])
            else:
                values = dict(state)
        missing = [n for n in params if n not in values]
        unknown = [k for k in values if k not in names]
        if missing or unknown:
            raise ValueError(f"load_averages: not this model's averages (missing {missing[:5]}, unknown "
                             f"{unknown[:5]})")
        own = dict(self._entries(self.module))
        for name, v in values.items():
            if not isinstance(v, torch.Tensor) or v.shape != own[name].shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"load_averages: {name} is {got}, its average {tuple(own[name].shape)}")
            if v.is_floating_point() != own[name].is_floating_point():
                raise TypeError(f"load_averages: {name} is {v.dtype}, its average {own[name].dtype}")
        for name, v in values.items():
            own[name].detach().copy_(v)
        if count is not None:
            self.num_updates = self.step = int(count)

    # -- checkpoints: the averages (module.*) and the counters ------------------------------
    def get_extra_state(self) -> dict:
        state = dict(num_updates=self.num_updates, step=self.step, current_decay=self.current_decay,
                     min_decay=self.min_decay, update_after_step=self.update_after_step, warmup=self.warmup,
                     inv_gamma=self.inv_gamma, power=self.power, stochastic_rounding=self.stochastic_rounding,
                     seed=self.seed)
        if not callable(self.decay):
            state["decay"] = self.decay
        return state

    def set_extra_state(self, state: dict) -> None:
        for key in ("num_updates", "step", "current_decay", "min_decay", "update_after_step", "warmup", "inv_gamma",
                    "power"):
            setattr(self, key, state[key])
        # (checkpoints written before stochastic rounding existed have neither)
        self.stochastic_rounding = bool(state.get("stochastic_rounding", False))
        self.seed = int(state.get("seed", 0))
        if "decay" in state and not callable(self.decay):  # a callable decay is kept
            self.decay = state["decay"]
