"""Drop-in optimizer wrappers that keep weight averages with the fused ``wavg_ext.ops``.

One sampling engine, :class:`WeightAveraging`, decides after every base ``step()``
whether the current weights are a sample (``start``, ``every``, or within a period
``sample_fraction`` / ``last_fraction``), folds a sample into the average (``rule``
"mean" or "momentum"), and at a period end assigns the average to the model, resets
it and optionally restarts from it. The paper methods are presets of it:
:class:`SWA`, :class:`EMA`, :class:`PSWA`, :class:`PWALKS`, :class:`PSWM` and
:class:`PeriodicSWA`.

Positions: position ``t`` is the state after ``t`` completed base steps (position 0:
the weights before the first step, processed at the start of the first ``step()``).
All decisions are made on host-side integers, so a step never syncs with the device.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .. import ops
from ..distributed import is_dtensor, like_param, local_tensor
from ..model_ema import WARMUPS, scheduled_decay
from .wrapper import _check_fraction, _check_int, _check_real, _check_saved_tensors, _WrappedOptimizer

__all__ = ["WeightAveraging", "SWA", "EMA", "PSWA", "PWALKS", "PSWM", "PeriodicSWA"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- sampling helpers


def fraction_count(fraction: float, length: int) -> int:
    """Steps of a period of ``length`` steps that ``fraction`` selects: ceil(fraction·length), >= 1.

    The fraction is read as the nearest rational with denominator <= 1e9, so 0.3 of 10
    steps is exactly 3 (not 4 from 0.3's binary rounding).
    """
    exact = Fraction(fraction).limit_denominator(10**9)
    return max(1, min(length, math.ceil(exact * length)))


_META_PAIRS: Dict[Tuple[torch.dtype, torch.dtype], bool] = {}


def _pair_ok(avg_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the ops accept an average of ``avg_dtype`` for a tensor of ``dtype``, both ways:
    averaging the tensor into it and assigning it to the tensor (asked of the ops' own checks)."""
    key = (avg_dtype, dtype)
    if key not in _META_PAIRS:
        a, s = torch.empty(0, dtype=avg_dtype, device="meta"), torch.empty(0, dtype=dtype, device="meta")
        try:
            ops.validate("running_mean_", [a], [s], 0.0)
            ops.validate("scale_copy_", [s], [a], 1.0)
            _META_PAIRS[key] = True
        except (TypeError, ValueError):
            _META_PAIRS[key] = False
    return _META_PAIRS[key]


# --------------------------------------------------------------------------- the engine


class WeightAveraging(_WrappedOptimizer):
    """Wraps ``optimizer`` and keeps an average of its parameters, updated after each step.

    The wrapper shares the base optimizer's ``param_groups``, ``state`` and ``defaults``
    (LR schedulers, ``GradScaler.step``, ``zero_grad`` and closures work unchanged) and
    is an instance of ``torch.optim.Optimizer``.

    Args:
        optimizer: any ``torch.optim.Optimizer``. Every tensor of its ``param_groups`` is
            averaged, in order (position ``i`` in ``averaged_parameters()`` is the
            ``i``-th parameter of the flattened groups).
        rule: ``"mean"`` (running mean of the samples) or ``"momentum"``
            (``avg <- (1 - m)·avg + m·w``). The first sample after a reset is copied.
        momentum: ``m`` in (0, 1] for ``rule="momentum"``.
        start: first position that can be sampled (>= 0).
        every: without a period, sample positions ``start, start+every, ...``; with a
            period, sample in-period steps ``every, 2·every, ...``.
        period: period length in steps (e.g. steps per epoch); periods begin at ``start``.
        periods: number of periods (None: unlimited). After the last one the average
            (and, with ``assign``, the model) keeps the last period's result.
        sample_fraction: alpha in (0, 1]: ``ceil(alpha·period)`` samples spread evenly over
            each period, the period's last step always among them.
        last_fraction: k in (0, 1]: only the last ``ceil(k·period)`` steps of each period.
        include_period_start: the weights at each period's start are its first sample
            (periodic SWA restarts from the previous average and averages it in).
        assign: at each period end copy the average into the model's parameters
            (and averaged buffers).
        reset: at each period end start a new average (the next sample is copied).
        reset_optimizer_state: at each period end clear the base optimizer's state
            (momentum buffers, Adam moments), as if a fresh optimizer started the period.
        on_assign: called with no arguments after each period-end assignment (e.g. BN
            recalibration with :func:`wavg_ext.update_bn`).
        module: the model; needed for ``average_buffers`` and lets ``copy_to`` match
            another module's parameters by name.
        average_buffers: also average ``module``'s floating buffers (BN running stats)
            with the same rule; integer buffers (``num_batches_tracked``) are copied.
        average_dtype: dtype of the averages. Default: float32 for float16/bfloat16
            tensors, the tensor's own dtype otherwise. ``torch.float64`` gives averages
            that do not stagnate, at twice the memory of float32 ones.
        compensated: keep each average as a compensated pair (the average and the
            rounding error the average's dtype could not hold, in a second buffer of the
            same dtype), updated in float64 by :func:`wavg_ext.ops.running_mean_compensated_`
            / :func:`~wavg_ext.ops.ema_compensated_`: a float32 average then tracks the
            float64 one to a few float32 ulps (EMA decay 0.99999, 10^7 SWA samples) for
            one more buffer. ``averaged_parameters()`` are the rounded averages.
        skip_nonfinite: a sample whose weights (or averaged buffers) hold NaN/inf leaves
            the averages untouched and counts in ``num_skipped``. No host sync: a fused
            check sets a device-side flag that gates the update in the kernel; on such a
            wrapper ``num_averaged``/``num_skipped`` read device counters (they sync).
    """

    method = "WeightAveraging"
    _state_key = "averaging"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        rule: str = "mean",
        momentum: Optional[float] = None,
        start: int = 0,
        every: int = 1,
        period: Optional[int] = None,
        periods: Optional[int] = None,
        sample_fraction: Optional[float] = None,
        last_fraction: Optional[float] = None,
        include_period_start: bool = False,
        assign: bool = False,
        reset: bool = False,
        reset_optimizer_state: bool = False,
        on_assign: Optional[Callable[[], Any]] = None,
        module: Optional[nn.Module] = None,
        average_buffers: bool = False,
        average_dtype: Optional[torch.dtype] = None,
        compensated: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(optimizer)  # checks optimizer; param_groups/state/defaults are the base's
        if rule not in ("mean", "momentum"):
            raise ValueError(f"rule must be 'mean' or 'momentum', got {rule!r}")
        if rule == "momentum":
            if momentum is None:
                raise ValueError("rule='momentum' needs momentum in (0, 1]")
            momentum = _check_fraction("momentum", momentum)
        elif momentum is not None:
            raise ValueError("momentum is only used with rule='momentum'")
        start = _check_int("start", start, 0)
        every = _check_int("every", every, 1)
        if period is not None:
            period = _check_int("period", period, 1)
        if periods is not None:
            periods = _check_int("periods", periods, 1)
        if sample_fraction is not None:
            sample_fraction = _check_fraction("sample_fraction", sample_fraction)
        if last_fraction is not None:
            last_fraction = _check_fraction("last_fraction", last_fraction)
        for flag_name, flag in (("include_period_start", include_period_start), ("assign", assign),
                                ("reset", reset), ("reset_optimizer_state", reset_optimizer_state),
                                ("average_buffers", average_buffers), ("compensated", compensated),
                                ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
        if period is None:
            needs = [n for n, v in (("periods", periods), ("sample_fraction", sample_fraction),
                                    ("last_fraction", last_fraction)) if v is not None]
            needs += [n for n, v in (("include_period_start", include_period_start), ("assign", assign),
                                     ("reset", reset), ("reset_optimizer_state", reset_optimizer_state)) if v]
            if needs:
                raise ValueError(f"{', '.join(needs)} need(s) a period (steps per period)")
        else:
            chosen = [n for n, v in (("sample_fraction", sample_fraction), ("last_fraction", last_fraction))
                      if v is not None] + (["every"] if every != 1 else [])
            if len(chosen) > 1:
                raise ValueError(f"choose one in-period sampling rule, got {' and '.join(chosen)}")
            if every > period and not include_period_start:
                raise ValueError(f"every={every} > period={period}: no step of a period would be sampled")
        if on_assign is not None:
            if not callable(on_assign):
                raise TypeError(f"on_assign must be callable, got {type(on_assign).__name__}")
            if not assign:
                raise ValueError("on_assign is called after a period-end assignment: it needs assign=True")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if average_buffers and module is None:
            raise ValueError("average_buffers=True needs module= (the model whose buffers to average)")
        if average_dtype is not None and (not isinstance(average_dtype, torch.dtype)
                                          or not average_dtype.is_floating_point):
            raise TypeError(f"average_dtype must be a floating torch.dtype, got {average_dtype!r}")

        self.rule = rule
        self.momentum = momentum
        self.start = start
        self.every = every
        self.period = period
        self.periods = periods
        self.sample_fraction = sample_fraction
        self.last_fraction = last_fraction
        self.include_period_start = include_period_start
        self.assign = assign
        self.reset_at_period_end = reset
        self.reset_optimizer_state = reset_optimizer_state
        self.on_assign = on_assign
        self.module = module
        self.average_buffers = average_buffers
        self.average_dtype = average_dtype
        self.compensated = compensated
        self.skip_nonfinite = skip_nonfinite
        # Samples of a period, fixed by the period length.
        self._fraction_n = None
        if period is not None and sample_fraction is not None:
            self._fraction_n = fraction_count(sample_fraction, period)
        if period is not None and last_fraction is not None:
            self._fraction_n = fraction_count(last_fraction, period)

        self._build_tensors()
        # Counters (host integers: no device sync per step).
        self._step = 0  # completed base steps
        self._processed = -1  # last position whose events ran
        self._num = 0  # samples in the current average
        self._period_index = 0  # completed periods
        self._finished = False  # all `periods` done
        # Training weights while swapped: per device group, and the integer buffers.
        self._stash: Optional[Tuple[List[List[torch.Tensor]], List[torch.Tensor]]] = None

    # ----------------------------------------------------------------- tensors

    def _build_tensors(self) -> None:
        """Reads the parameters (and buffers) to average and makes their averages; assigns
        nothing until every check has passed."""
        params = self._flat_params()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"param_groups tensor {i} is a {type(p).__name__}, not a Tensor")
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} has dtype {p.dtype}; only floating tensors can be averaged")
        float_slots: List[Tuple[nn.Module, str]] = []
        int_slots: List[Tuple[nn.Module, str]] = []
        buffer_names: List[str] = []
        other_names: List[str] = []
        if self.average_buffers:
            for name, b in self.module.named_buffers():
                if b is None:
                    continue
                prefix, _, key = name.rpartition(".")
                slot = (self.module.get_submodule(prefix) if prefix else self.module, key)
                (float_slots if b.is_floating_point() else int_slots).append(slot)
                (buffer_names if b.is_floating_point() else other_names).append(name)
        dtensor_params = any(is_dtensor(p) for p in params)
        sources = [local_tensor(p.detach()) for p in params] + [m._buffers[k] for m, k in float_slots]
        # (zeros with skip_nonfinite: its first-sample copy is a lerp with weight 1, exact only
        # over finite averages)
        make = torch.zeros_like if self.skip_nonfinite else torch.empty_like
        averages = [make(s, dtype=self._avg_dtype(s), memory_format=torch.preserve_format) for s in sources]
        for i, (a, s) in enumerate(zip(averages, sources)):
            if not _pair_ok(a.dtype, s.dtype):
                what = f"parameter {i}" if i < len(params) else f"buffer '{buffer_names[i - len(params)]}'"
                raise TypeError(f"{what} is {s.dtype}: average_dtype {a.dtype} cannot average it (the averages "
                                "must be float32, float64 or the tensor's own dtype)")
        int_buffers = [m._buffers[k] for m, k in int_slots]
        param_names: Optional[List[Optional[str]]] = None
        if self.module is not None:
            by_id = {id(p): n for n, p in self.module.named_parameters()}
            param_names = [by_id.get(id(p)) for p in params]
        # Everything checked: commit.
        self._num_params = len(params)
        self._params = params
        # FSDP2 may give a DTensor parameter a new local tensor (e.g. padding it at its first
        # forward): their sources are looked up again before each use.
        self._dtensor_params = dtensor_params
        self._float_slots = float_slots
        self._int_slots = int_slots
        self._averages = averages
        # The compensations (the part of each average its dtype cannot hold), laid out alike.
        self._comps = [torch.zeros_like(a) for a in averages] if self.compensated else []
        self._buffer_names = buffer_names
        self._int_buffer_names = other_names
        self._int_averages = [b.clone() for b in int_buffers]
        self._int_buffers_seen = int_buffers
        self._param_names = param_names
        self._regroup()

    def _position_name(self, i: int) -> str:
        """Position i as users know it: "parameter 3 ('fc.weight')" or "buffer 'bn.running_mean'"."""
        n = self._num_params
        if i < n:
            name = self._param_names[i] if self._param_names is not None else None
            return f"parameter {i}" + (f" ('{name}')" if name else "")
        return f"buffer '{self._buffer_names[i - n]}'"

    def _current_sources(self) -> List[torch.Tensor]:
        """The tensors the model uses now, by position: the parameter objects themselves (the
        ops read and write their current storage, whatever ``p.data = ...`` did), the DTensor
        parameters' local shards, and the averaged buffers as the module holds them now."""
        if self._dtensor_params:
            srcs = [local_tensor(p.detach()) for p in self._params]
        else:
            srcs = list(self._params)
        return srcs + [m._buffers[k] for m, k in self._float_slots]

    def _regroup(self) -> None:
        """One (averages, sources, compensations) triple of lists per device: one fused call per
        device (compensations empty without ``compensated``); with ``skip_nonfinite``, each
        device keeps its counters (samples in the average, samples skipped) as 0-dim tensors."""
        sources = self._current_sources()
        groups: Dict[torch.device, Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]] = {}
        group_of: Dict[torch.device, List[int]] = {}
        for i, (s, a) in enumerate(zip(sources, self._averages)):
            g = groups.setdefault(s.device, ([], [], []))
            g[0].append(a)
            g[1].append(s)
            if self.compensated:
                g[2].append(self._comps[i])
            group_of.setdefault(s.device, []).append(i)
        self._groups = list(groups.values())
        self._group_indices = list(group_of.values())
        # op -> one ops.Plan per group, made at the op's first use on these lists (not with
        # DTensor parameters, whose groups are re-read before each use).
        self._plans: Dict[str, List[ops.Plan]] = {}
        if self.skip_nonfinite:
            # Kept per device; a new device gets a (device-to-device, no host sync) copy.
            old: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = getattr(self, "_device_counts", {})
            any_old = next(iter(old.values()), None)
            new = {}
            for d in groups:
                if d in old:
                    new[d] = old[d]
                elif any_old is not None:
                    new[d] = (any_old[0].to(d, copy=True), any_old[1].to(d, copy=True))
                else:
                    new[d] = (torch.zeros((), dtype=torch.float64, device=d),
                              torch.zeros((), dtype=torch.float64, device=d))
            self._device_counts = new
        self._buffers_seen = sources[self._num_params:]
        # What _follow_model compares the parameters with before each step (DTensor
        # parameters: their local shards are re-read before each use instead).
        self._param_metadata = None if self._dtensor_params else ops.param_metadata(self._params)

    def _follow_model(self) -> None:
        """Makes the wrapper work on the tensors the model holds now (averages follow the model).

        Runs before each base step, so that whatever the averaging would refuse after it
        raises before anything changed. A storage swapped under the same parameter
        (``p.data = t``) needs nothing: the ops read and write the parameter itself.
        Parameters replaced in the base optimizer's ``param_groups``, parameters whose shape,
        device or dtype no longer pair with their average (``Module.half()/.double()/.to()``)
        and buffers replaced in the module are adopted (:meth:`_adopt`). When nothing changed
        this costs one C++ pass over the parameters' metadata; parameters added or removed
        behind the wrapper raise.
        """
        changed = self._changed_params(self._params, "the wrapper averages", self._param_metadata)
        buffers_changed = False
        if self._float_slots or self._int_slots:
            buffers_changed = any(m._buffers.get(k) is not b for (m, k), b in
                                  zip(self._float_slots + self._int_slots, self._buffers_seen + self._int_buffers_seen))
        if changed or buffers_changed:
            self._adopt(self._flat_params())

    def _adopt(self, params: Optional[List[torch.Tensor]] = None) -> bool:
        """Takes over ``params`` (default: the current ones) and the module's current buffers.

        Checks every position first (a shape change or a non-floating tensor raises
        ValueError/TypeError naming it, and nothing changes), then converts, once, each
        average whose dtype no longer pairs with its tensor's to the dtype a new wrapper
        would choose, and moves averages to their tensor's device. Returns whether anything
        changed.
        """
        params = list(self._params) if params is None else params
        old = (self._params, self._dtensor_params)
        self._params, self._dtensor_params = params, any(is_dtensor(p) for p in params)
        try:
            for i, p in enumerate(params):
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"{self._position_name(i)} was replaced in param_groups by a "
                                    f"{type(p).__name__}, not a Tensor")
            for m, k in self._float_slots + self._int_slots:
                if not isinstance(m._buffers.get(k), torch.Tensor):
                    raise ValueError(f"buffer '{k}' of a {type(m).__name__} was removed or set to None; the "
                                     "wrapper averages it")
            sources = self._current_sources()
            plans: Dict[int, Tuple[torch.device, torch.dtype]] = {}
            for i, (a, s) in enumerate(zip(self._averages, sources)):
                if s.shape != a.shape:
                    raise ValueError(f"{self._position_name(i)} has shape {list(s.shape)} now, its average "
                                     f"{list(a.shape)}: an average cannot follow a shape change (make a new wrapper)")
                if not s.is_floating_point():
                    raise TypeError(f"{self._position_name(i)} has dtype {s.dtype} now; only floating tensors "
                                    "can be averaged")
                dtype = a.dtype if _pair_ok(a.dtype, s.dtype) else self._avg_dtype(s)
                if not _pair_ok(dtype, s.dtype):
                    raise TypeError(f"{self._position_name(i)} is {s.dtype} now: average_dtype {dtype} cannot "
                                    "average it (the averages must be float32, float64 or the tensor's own dtype)")
                if s.device != a.device or dtype != a.dtype:
                    plans[i] = (s.device, dtype)
            int_buffers = [m._buffers[k] for m, k in self._int_slots]
            for name, b, a in zip(self._int_buffer_names, int_buffers, self._int_averages):
                if b.shape != a.shape:
                    raise ValueError(f"buffer '{name}' has shape {list(b.shape)} now, its copy {list(a.shape)}")
        except BaseException:
            self._params, self._dtensor_params = old
            raise
        changed = bool(plans) or any(p is not q for p, q in zip(params, old[0])) or \
            any(s is not b for s, b in zip(sources[self._num_params:], self._buffers_seen)) or \
            any(b is not c for b, c in zip(int_buffers, self._int_buffers_seen))
        with torch.no_grad():
            for i, (device, dtype) in plans.items():
                if self.compensated:  # the pair's value, re-split in the new dtype
                    value = self._averages[i].to(torch.float64) + self._comps[i].to(torch.float64)
                    self._averages[i] = value.to(device=device, dtype=dtype)
                    self._comps[i] = (value - self._averages[i].to(torch.float64)).to(device=device, dtype=dtype)
                else:
                    self._averages[i] = self._averages[i].to(device=device, dtype=dtype,
                                                             memory_format=torch.preserve_format)
            for j, b in enumerate(int_buffers):
                if self._int_averages[j].device != b.device:
                    self._int_averages[j] = self._int_averages[j].to(b.device)
                    changed = True
        self._int_buffers_seen = int_buffers
        self._regroup()
        return changed

    def _run_ops(self, op: str, scalar: Any, pick: Callable[..., Tuple[list, ...]],
                 scalars: Optional[Callable[["WeightAveraging"], List[Any]]] = None, planned: bool = False,
                 plan_key: Optional[str] = None) -> None:
        """Runs ``ops.<op>(*pick(averages, sources, compensations, positions), scalar)`` for every
        device group (``scalars(self)``: one per group instead, e.g. device tensors; ``scalar``
        None: the op takes none). The ops validate
        everything before they write, so when one refuses the model's tensors (a dtype or device
        changed under a parameter behind the per-step check), the wrapper adopts the model as it
        is now (:meth:`_adopt`) and runs again; with several device groups all are validated
        first, so that a refusal never comes after a group was updated. ``planned``: the call of a
        sample, run through one kept :class:`ops.Plan` per group (``pick`` must then always pick
        the same lists for ``plan_key``, by default ``op``)."""
        fn = getattr(ops, op)
        for attempt in (0, 1):
            if self._dtensor_params:
                self._regroup()  # FSDP2 may have given a parameter a new local tensor
            try:
                per_group = scalars(self) if scalars is not None else [scalar] * len(self._groups)
                if not planned or self._dtensor_params:
                    calls = [pick(avgs, srcs, comps, positions) for (avgs, srcs, comps), positions in
                             zip(self._groups, self._group_indices)]
                    # (scalar None: an op without a scalar, e.g. window_push_)
                    calls = [args + ((sc,) if sc is not None else ()) for args, sc in zip(calls, per_group)]
                    if len(calls) > 1:
                        for args in calls:
                            ops.validate(op, *args)
                    for args in calls:
                        fn(*args)
                    return
                # The samples: the same lists every step, so plans validated once (one per op:
                # a planned op always picks the same lists), re-checked cheaply each call.
                key = plan_key or op
                plans = self._plans.get(key)
                if plans is None:
                    plans = [ops.Plan(op, *pick(avgs, srcs, comps, positions)) for (avgs, srcs, comps), positions
                             in zip(self._groups, self._group_indices)]
                    self._plans[key] = plans
                if len(plans) > 1:
                    for plan, sc in zip(plans, per_group):
                        plan.check(sc)
                for plan, sc in zip(plans, per_group):
                    plan(sc)
                return
            except (TypeError, ValueError):
                self._plans = {}
                if attempt or not self._adopt():
                    raise

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["_param_metadata"] = None  # a C++ object (a capsule): rebuilt on load
        state["_plans"] = {}  # C++ objects too: made again at the next sample
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        if not self._dtensor_params:
            self._param_metadata = ops.param_metadata(self._params)

    def _avg_dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.average_dtype is not None:
            return self.average_dtype
        return torch.float32 if t.dtype in _HALF_DTYPES else t.dtype

    # ----------------------------------------------------------------- Optimizer interface

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group to the base optimizer; only before the first sample (or after reset())."""
        if self._num > 0 or self._stash is not None:
            raise RuntimeError(
                "add_param_group after weights were averaged would give the new parameters an average of "
                "fewer samples than the others; call reset() first")
        if self._dtensor_params:
            raise RuntimeError("add_param_group is not supported for DTensor (FSDP2) parameters; wrap the "
                               "optimizer after adding its groups")
        self._follow_model()
        groups_before = len(self.optimizer.param_groups)
        self.optimizer.add_param_group(param_group)  # validates before it appends
        try:
            self._build_tensors()
        except BaseException:
            # The group's parameters cannot be averaged: leave the base optimizer as it was.
            del self.optimizer.param_groups[groups_before:]
            raise

    # The engine's host-side counters change every step: traced by dynamo they would
    # become guards and force a recompilation per step, so the engine stays eager.
    @torch.compiler.disable
    def _before_base_step(self, closure: Optional[Callable[[], Any]]) -> Optional[Callable[[], Any]]:
        if self._stash is not None:
            raise RuntimeError("the model holds the averaged weights (swap() or averaged() is active); "
                               "call swap() again before training")
        self._follow_model()
        if self._processed < self._step:  # position 0 (or a position whose events failed): run it now
            self._run_position(self._step)
        return closure

    @torch.compiler.disable
    def _after_base_step(self) -> None:
        self._step += 1
        self._run_position(self._step)

    # ----------------------------------------------------------------- sampling engine

    def _is_sample(self, position: int) -> bool:
        """Whether position (>= start, inside a period when there are periods) is sampled."""
        rel = position - self.start
        if self.period is None:
            return rel % self.every == 0
        if rel == 0:
            return self.include_period_start
        i = (rel - 1) % self.period + 1  # step of the period, 1..period
        if self.sample_fraction is not None:
            n = self._fraction_n
            return (i * n) // self.period != ((i - 1) * n) // self.period
        if self.last_fraction is not None:
            return i > self.period - self._fraction_n
        return i % self.every == 0

    def _run_position(self, position: int) -> None:
        """Runs the events of ``position``: a sample, then a period end. A position counts as
        processed once its events are done; one whose sample raised (nothing written) runs
        again at the next step. An exception from ``on_assign`` propagates only after the
        period end's bookkeeping (reset, counters, the next period's first sample) is done."""
        deferred: Optional[BaseException] = None
        self._position = position
        if not self._finished and position >= self.start:
            if self._is_sample(position):
                self._sample()
            rel = position - self.start
            if self.period is not None and rel > 0 and rel % self.period == 0:
                deferred = self._period_end()
            self._position_done(position)
        self._processed = position
        if deferred is not None:
            raise deferred

    def _period_end(self) -> Optional[BaseException]:
        """Assigns (then ``on_assign``, which sees the period's average still in place),
        resets and counts the period; returns ``on_assign``'s exception, if any, for
        :meth:`_run_position` to raise once this bookkeeping is complete."""
        deferred: Optional[BaseException] = None
        if self.assign:
            self._assign_average()
        if self.reset_optimizer_state:
            self.optimizer.state.clear()
        if self.assign and self.on_assign is not None:
            try:
                self.on_assign()
            except Exception as e:  # noqa: BLE001 (re-raised by _run_position)
                deferred = e
        self._period_index += 1
        if self.periods is not None and self._period_index >= self.periods:
            self._finished = True
            return deferred
        if self.reset_at_period_end:
            self._reset_count()
        if self.include_period_start:
            self._sample()
        return deferred

    def _position_done(self, position: int) -> None:
        """Runs after a position's sample and period end (EMA's update_model_every)."""

    def _assign_average(self) -> None:
        """Writes the current average into the model's tensors (nothing when it holds no sample)."""
        if self.skip_nonfinite:
            # An average whose samples were all skipped is not assigned: gated on the device
            # counter (no host sync).
            self._run_ops("scale_copy_", 1.0, lambda avgs, srcs, comps, _: (srcs, avgs),
                          scalars=lambda me: [torch.where(me._device_counts[s[0].device][0] == 0, float("nan"), 1.0)
                                              .to(torch.float64) for _, s, _ in me._groups])
            with torch.no_grad():
                for buf, avg in zip(self._int_buffers_seen, self._int_averages):
                    count = self._device_counts.get(buf.device, next(iter(self._device_counts.values())))[0]
                    buf.copy_(torch.where(count.to(buf.device) == 0, buf, avg))
        elif self._num > 0:
            self._write_model(self._averages, self._int_averages)

    def _momentum_now(self) -> Optional[float]:
        """The EMA weight of the sample at ``self._position`` (rule "momentum"; 1.0: a copy)."""
        return self.momentum

    def _sample(self) -> None:
        n = self._num
        m = self._momentum_now() if self.rule == "momentum" else None
        copy = n == 0 or m == 1.0  # the first sample of an average, or a schedule's copy
        if self.skip_nonfinite:
            self._sample_gated(m)
        elif self.compensated:
            op, scalar = ("running_mean_compensated_", 0 if copy else n) if copy or self.rule == "mean" else \
                ("ema_compensated_", m)
            self._run_ops(op, scalar, lambda avgs, srcs, comps, _: (avgs, comps, srcs), planned=True)
        elif copy:
            self._run_ops("scale_copy_", 1.0, lambda avgs, srcs, comps, _: (avgs, srcs), planned=True)
        elif self.rule == "mean":
            self._run_ops("running_mean_", n, lambda avgs, srcs, comps, _: (avgs, srcs), planned=True)
        else:
            self._run_ops("ema_", m, lambda avgs, srcs, comps, _: (avgs, srcs), planned=True)
        if self._int_slots and not self.skip_nonfinite:
            torch._foreach_copy_(self._int_averages, self._int_buffers_seen)
        self._num = n + 1

    def _sample_gated(self, momentum: Optional[float],
                      extra: Sequence[Tuple[Callable[..., Tuple[list, ...]], Optional[float]]] = ()) -> None:
        """A sample under ``skip_nonfinite``, with no host sync: one fused NaN/inf check per
        device sets a flag; the updates take their scalar as a device tensor that is NaN (the
        ops' gate: outputs untouched) when any device's flag is set, and the per-device
        counters advance on the device. ``extra``: (pick, momentum) of further averages of the
        same samples (picking lists as the op takes them), gated and counted with the main one."""
        if self._dtensor_params:
            self._regroup()  # FSDP2 may have given a parameter a new local tensor
        flags = [ops.nonfinite_flag(srcs) for _, srcs, _ in self._groups]
        if len(flags) > 1:  # a sample is skipped on every device or on none
            total = sum(f.to(flags[0].device, non_blocking=True) for f in flags[1:]) + flags[0]
            flags = [total.to(f.device, non_blocking=True) for f in flags]
        if self._dtensor_params and torch.distributed.is_initialized():
            # Sharded parameters (FSDP2): a NaN in one rank's shard skips the sample on every
            # rank (an all-reduce of one int, asynchronous on NCCL: no host sync).
            torch.distributed.all_reduce(flags[0])
            flags = [flags[0]] + [flags[0].to(f.device, non_blocking=True) for f in flags[1:]]
        bad = [f != 0 for f in flags]
        counts = [self._device_counts[f.device] for f in flags]
        nan = float("nan")

        def gate(off: List[torch.Tensor], value: Callable[[torch.Tensor], Any]) -> Callable[..., List[Any]]:
            return lambda _: [torch.where(o, nan, value(c)).to(torch.float64) for o, (c, _) in zip(off, counts)]

        comp = self.compensated
        mean_op = "running_mean_compensated_" if comp else "running_mean_"
        ema_op = "ema_compensated_" if comp else "ema_"
        pick = (lambda avgs, srcs, comps, _: (avgs, comps, srcs)) if comp else (lambda avgs, srcs, comps, _: (avgs, srcs))
        # (further averages of the same samples, e.g. PowerEMA's profiles: gated alike, counted once)
        for k, (pick, momentum) in enumerate([(pick, momentum)] + list(extra)):
            key = "" if k == 0 else f"/{k}"
            if self.rule == "mean":
                self._run_ops(mean_op, 0.0, pick, scalars=gate(bad, lambda c: c), planned=True, plan_key=mean_op + key)
                continue
            # The first sample of an average is copied (count 0), later ones are EMA updates:
            # two gated calls, one of which does nothing.
            # A schedule's copy (momentum 1) is a first sample on every device.
            first = [(c == 0) | (momentum == 1.0) for c, _ in counts]
            self._run_ops(mean_op, 0.0, pick, scalars=gate([b | ~f for b, f in zip(bad, first)],
                                                           lambda c: torch.zeros_like(c)), planned=True,
                          plan_key=mean_op + key)
            self._run_ops(ema_op, momentum, pick, scalars=gate([b | f for b, f in zip(bad, first)],
                                                              lambda c, m=momentum: torch.full_like(c, m)),
                          planned=True, plan_key=ema_op + key)
        with torch.no_grad():
            for b, (count, skipped) in zip(bad, counts):
                count.add_((~b).to(count.dtype))
                skipped.add_(b.to(skipped.dtype))
            by_device = {f.device: b for f, b in zip(flags, bad)}
            for avg, buf in zip(self._int_averages, self._int_buffers_seen):
                off = by_device.get(buf.device)
                off = bad[0].to(buf.device, non_blocking=True) if off is None else off
                avg.copy_(torch.where(off, avg, buf))

    def _device_count(self) -> int:
        """Samples in the current average under ``skip_nonfinite`` (reads a device counter)."""
        return int(next(iter(self._device_counts.values()))[0].item())

    def _write_model(self, values: Sequence[torch.Tensor], int_values: Sequence[torch.Tensor]) -> None:
        """Copies ``values`` (one per position: parameters, then averaged buffers) and the
        integer buffers' values into the tensors the model uses now (cast to their dtypes)."""
        self._run_ops("scale_copy_", 1.0, lambda _, srcs, comps, positions: (srcs, [values[i] for i in positions]))
        if self._int_slots:
            torch._foreach_copy_(self._int_buffers_seen, list(int_values))

    # ----------------------------------------------------------------- public helpers

    def _reset_count(self) -> None:
        self._num = 0
        if self.skip_nonfinite:
            for count, _ in self._device_counts.values():
                count.zero_()

    @property
    def num_averaged(self) -> int:
        """Samples in the current average (0 right after a reset). With ``skip_nonfinite``,
        skipped samples do not count (this reads a device counter: it syncs)."""
        return self._device_count() if self.skip_nonfinite else self._num

    @property
    def num_skipped(self) -> int:
        """Samples skipped for NaN/inf since the wrapper was made (``skip_nonfinite``; it syncs)."""
        if not self.skip_nonfinite:
            return 0
        return int(next(iter(self._device_counts.values()))[1].item())

    @property
    def step_count(self) -> int:
        """Completed base optimizer steps."""
        return self._step

    @property
    def period_index(self) -> int:
        """Completed periods (0 without periods)."""
        return self._period_index

    @property
    def swapped(self) -> bool:
        """Whether the model currently holds the averaged weights (after swap())."""
        return self._stash is not None

    def _require_average(self, what: str) -> None:
        if self.num_averaged == 0:
            raise RuntimeError(f"{what}: no weights have been averaged yet (num_averaged == 0)")

    def averaged_parameters(self) -> List[torch.Tensor]:
        """The averages of the parameters, in the base optimizer's parameter order.

        These are the live tensors the wrapper updates; clone them to keep a snapshot. For
        DTensor parameters (FSDP2) they are DTensors sharded like the parameters.
        """
        self._require_average("averaged_parameters()")
        if self._dtensor_params:
            return [like_param(a, p) for a, p in zip(self._averages, self._params)]
        return self._averages[: self._num_params]

    def averaged_buffers(self) -> Dict[str, torch.Tensor]:
        """The averaged (floating) and last-copied (integer) buffers, by name."""
        self._require_average("averaged_buffers()")
        out = dict(zip(self._buffer_names, self._averages[self._num_params:]))
        out.update(zip(self._int_buffer_names, self._int_averages))
        return out

    def averaged_state_dict(self, module: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """The averages keyed by the model's own names: ``model.load_state_dict`` takes it.

        Names come from the ``module`` given at construction, or from ``module`` here (its
        parameters matched to the averaged ones by identity). Buffers the wrapper does not
        average are the module's current ones, so the dict holds every key of the module's
        state_dict (a strict load works) when the wrapper averages all of its parameters.
        Tensors are the live averages (clone to keep a snapshot).
        """
        self._require_average("averaged_state_dict()")
        module = module if module is not None else self.module
        if module is None:
            raise ValueError("averaged_state_dict: the names come from a module: give module= to the wrapper "
                             "or to this call")
        by_id = {id(p): n for n, p in module.named_parameters()}
        names = [by_id.get(id(p)) for p in self._params]
        if None in names:
            raise ValueError(f"averaged_state_dict: averaged parameter {names.index(None)} is not a parameter of "
                             "the module given")
        averages = self.averaged_parameters()
        out = dict(module.state_dict())
        out.update(zip(names, averages))
        if self.average_buffers and module is self.module:
            out.update({k: v for k, v in self.averaged_buffers().items() if k in out})
        return out

    def swap(self) -> None:
        """Puts the averaged weights into the model; a second call puts the training weights back.

        The averages themselves are never overwritten (with float32 averages of bf16
        weights an exchange would round them), so swapping back and forth loses nothing.
        Training (step) is refused while swapped.
        """
        self._follow_model()
        if self._stash is None:
            self._require_average("swap()")
            with torch.no_grad():
                stash = [s.detach().clone(memory_format=torch.preserve_format) for s in self._current_sources()]
                int_stash = [b.clone() for b in self._int_buffers_seen]
            self._write_model(self._averages, self._int_averages)
            self._stash = (stash, int_stash)
        else:
            stash, int_stash = self._stash
            self._write_model(stash, int_stash)
            self._stash = None

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Context manager: averaged weights in the model inside, training weights back on exit.

        With ``module`` given, all of its buffers are restored on exit too, so BN
        statistics recalibrated inside (``update_bn``) do not leak into training.
        """
        with self._swapped_in(self.swap):
            yield

    @contextlib.contextmanager
    def _swapped_in(self, swap_in: Callable[[], None]) -> Iterator[None]:
        """averaged()'s body: ``swap_in()``, the module's buffers saved; on exit they are put
        back and ``swap()`` restores the training weights."""
        swap_in()
        saved = []
        try:
            if self.module is not None:
                saved = [(b, b.clone()) for b in self.module.buffers()]
            yield
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
            self.swap()

    def copy_to(self, target: Union[nn.Module, Sequence[torch.Tensor]]) -> None:
        """Copies the averages into ``target``: a module or a list of tensors.

        A module is matched by parameter name when the wrapper was given ``module=`` (and
        gets the averaged buffers too), otherwise by position in ``target.parameters()``.
        A list is matched by position against the averaged parameters. Shapes are
        checked before anything is written; dtypes are cast.
        """
        self._require_average("copy_to()")
        n = self._num_params
        pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        if isinstance(target, nn.Module):
            if self._param_names is not None:
                named = dict(target.named_parameters())
                missing = [name if name is not None else f"<parameter {i} not in module>"
                           for i, name in enumerate(self._param_names) if name is None or name not in named]
                if missing:
                    raise ValueError(f"copy_to: target module has no parameter(s) {missing[:5]}")
                dsts = [named[name] for name in self._param_names]
                if self.average_buffers:
                    bufs = dict(target.named_buffers())
                    names = self._buffer_names + self._int_buffer_names
                    absent = [b for b in names if b not in bufs]
                    if absent:
                        raise ValueError(f"copy_to: target module has no buffer(s) {absent[:5]}")
                    pairs += [(bufs[b], a) for b, a in zip(self._buffer_names, self._averages[n:])]
                    pairs += [(bufs[b], a) for b, a in zip(self._int_buffer_names, self._int_averages)]
            else:
                dsts = list(target.parameters())
        elif isinstance(target, torch.Tensor):
            raise TypeError("copy_to: target must be a module or a list of tensors, got a single Tensor")
        else:
            dsts = list(target)
        if len(dsts) != n:
            raise ValueError(f"copy_to: target has {len(dsts)} parameters, the wrapper averages {n}")
        # A DTensor target (FSDP2) gets its local shard from the matching local average.
        pairs = [(local_tensor(d), a) for d, a in zip(dsts, self._averages[:n])] + pairs
        for i, (dst, avg) in enumerate(pairs):
            if not isinstance(dst, torch.Tensor):
                raise TypeError(f"copy_to: target[{i}] is a {type(dst).__name__}, not a Tensor")
            if dst.shape != avg.shape:
                raise ValueError(f"copy_to: target[{i}] has shape {list(dst.shape)}, its average "
                                 f"{list(avg.shape)}")
            if dst.is_floating_point() != avg.is_floating_point():
                raise TypeError(f"copy_to: target[{i}] has dtype {dst.dtype}, its average {avg.dtype}")
        with torch.no_grad():
            for dst, avg in pairs:
                dst.copy_(avg)

    def reset(self) -> None:
        """Drops the current average: the next sample starts a new one."""
        if self._stash is not None:
            raise RuntimeError("reset() while swapped would drop the averages the model holds; swap() back first")
        self._reset_count()

    # ----------------------------------------------------------------- checkpoints

    def _config(self) -> Dict[str, Any]:
        return {
            "rule": self.rule, "momentum": self.momentum, "start": self.start, "every": self.every,
            "period": self.period, "periods": self.periods, "sample_fraction": self.sample_fraction,
            "last_fraction": self.last_fraction, "include_period_start": self.include_period_start,
            "assign": self.assign, "reset": self.reset_at_period_end,
            "reset_optimizer_state": self.reset_optimizer_state, "average_buffers": self.average_buffers,
            # (only when on: checkpoints of wrappers without them keep loading)
            **({"compensated": True} if self.compensated else {}),
            **({"skip_nonfinite": True} if self.skip_nonfinite else {}),
        }

    def state_dict(self, optimizer: bool = True) -> Dict[str, Any]:
        """Base optimizer state, averages and counters; averages keyed by parameter position.

        The tensors are the live ones (like ``Module.state_dict``): save or clone them.
        ``optimizer=False`` leaves out the base optimizer's state (e.g. to save it through
        ``torch.distributed.checkpoint.state_dict.get_state_dict`` instead); load such a
        dict with ``load_state_dict(sd, optimizer=False)``.
        """
        if self._stash is not None:
            raise RuntimeError("state_dict() while swapped: the model holds the averages; swap() back first")
        self._follow_model()  # (after model.double(), the averages a fresh wrapper would have)
        return self._state({
            "version": self._state_version,
            "method": self.method,
            "config": self._config(),
            "step": self._step,
            "processed": self._processed,
            "num_averaged": self.num_averaged,
            **({"num_skipped": self.num_skipped, "samples_attempted": self._num} if self.skip_nonfinite else {}),
            **({"compensations": [like_param(c, p) for c, p in zip(self._comps, self._params)] +
                self._comps[self._num_params:]} if self.compensated else {}),
            "period_index": self._period_index,
            "finished": self._finished,
            # DTensors for DTensor parameters (sharded like them, for torch.distributed.checkpoint)
            "averages": [like_param(a, p) for a, p in zip(self._averages, self._params)] +
                        self._averages[self._num_params:],
            "buffer_names": list(self._buffer_names),
            "integer_buffers": list(self._int_averages),
            "integer_buffer_names": list(self._int_buffer_names),
        }, optimizer)

    def _saved_list(self, kind: str, tensors: Any, mine: List[torch.Tensor], finite: bool = False) -> List[torch.Tensor]:
        """A saved list of per-position tensors (``kind`` in messages) checked against ``mine``
        (count, shapes, dtypes; with ``finite``, values) and copied to their devices."""
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(mine):
            raise ValueError(f"state dict {kind} must be a list of {len(mine)} tensors")
        tensors = [local_tensor(t) for t in tensors]
        _check_saved_tensors(kind, tensors, mine)
        if finite:
            self._refuse_nonfinite(kind, tensors)
        return [t.to(device=m.device) for t, m in zip(tensors, mine)]

    def _refuse_nonfinite(self, kind: str, tensors: Sequence[torch.Tensor]) -> None:
        """ValueError naming the first of ``tensors`` (saved per position) that holds NaN or inf:
        a damaged checkpoint must not become the model."""
        bad = next((i for i, t in enumerate(tensors) if t.numel() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise ValueError(f"state dict {kind}[{bad}] ({self._position_name(bad)}) holds NaN or inf")

    def load_state_dict(self, state_dict: Dict[str, Any], optimizer: bool = True) -> None:
        """Restores a ``state_dict()``. Everything is checked first (settings, counters as
        non-negative ints, tensor count, shapes, dtypes, finite averages); the base optimizer
        is loaded next and restored if anything fails after it, so a failing call changes
        nothing."""
        if self._stash is not None:
            raise RuntimeError("load_state_dict() while swapped; swap() back first")
        self._follow_model()
        avg = self._saved_section(state_dict, optimizer)
        step = _saved_int(avg, "step", 0)
        processed = _saved_int(avg, "processed", -1)
        num = _saved_int(avg, "num_averaged", 0)
        period_index = _saved_int(avg, "period_index", 0)
        finished = avg.get("finished")
        if not isinstance(finished, bool):
            raise ValueError(f"state dict 'finished' must be a bool, got {finished!r}")
        if processed not in (step - 1, step):
            raise ValueError(f"state dict 'processed' ({processed}) must be 'step' ({step}) or one less")
        saved, saved_int = avg.get("averages"), avg.get("integer_buffers")
        if not isinstance(saved, (list, tuple)) or not isinstance(saved_int, (list, tuple)):
            raise ValueError("state dict 'averages' and 'integer_buffers' must be lists of tensors")
        saved = [local_tensor(t) for t in saved]
        if len(saved) != len(self._averages) or len(saved_int) != len(self._int_averages):
            raise ValueError(f"state dict has {len(saved)} averages and {len(saved_int)} integer buffers, this "
                             f"wrapper {len(self._averages)} and {len(self._int_averages)}")
        _check_saved_tensors("averages", saved, self._averages)
        _check_saved_tensors("integer_buffers", saved_int, self._int_averages)
        saved_comps: List[torch.Tensor] = []
        if self.compensated:
            saved_comps = avg.get("compensations")
            if not isinstance(saved_comps, (list, tuple)) or len(saved_comps) != len(self._comps):
                raise ValueError(f"state dict 'compensations' must be a list of {len(self._comps)} tensors")
            saved_comps = [local_tensor(t) for t in saved_comps]
            _check_saved_tensors("compensations", saved_comps, self._comps)
        skipped = _saved_int(avg, "num_skipped", 0) if self.skip_nonfinite else 0
        attempted = _saved_int(avg, "samples_attempted", num) if self.skip_nonfinite else num
        if num > 0:  # one pass over the averages: a damaged checkpoint must not become the model
            for kind, tensors in (("averages", saved), ("compensations", saved_comps)):
                self._refuse_nonfinite(kind, tensors)
        if list(avg.get("buffer_names", ())) != self._buffer_names or \
                list(avg.get("integer_buffer_names", ())) != self._int_buffer_names:
            raise ValueError("state dict averages other buffers than this wrapper's module has")
        # Device copies made before anything is changed: the commit below cannot fail halfway.
        new = [s.to(device=d.device) for s, d in zip(saved, self._averages)]
        new_comps = [s.to(device=d.device) for s, d in zip(saved_comps, self._comps)]
        new_int = [s.to(device=d.device) for s, d in zip(saved_int, self._int_averages)]

        def commit() -> None:
            with torch.no_grad():
                for s, d in zip(new, self._averages):
                    d.copy_(s)
                for s, d in zip(new_comps, self._comps):
                    d.copy_(s)
                for s, d in zip(new_int, self._int_averages):
                    d.copy_(s)
                if self.skip_nonfinite:
                    for count, skip in self._device_counts.values():
                        count.fill_(num)
                        skip.fill_(skipped)
            self._step, self._processed, self._num = step, processed, attempted
            self._period_index, self._finished = period_index, finished

        self._load_base_then(state_dict, optimizer, commit)


def _saved_int(section: Dict[str, Any], key: str, minimum: int) -> int:
    """A counter of a saved state: a Python int >= minimum (not a bool, a string or a float)."""
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"state dict '{key}' must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"state dict '{key}' must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------- the paper methods


class SWA(WeightAveraging):
    """Stochastic Weight Averaging (Izmailov et al.): running mean of samples every ``every`` steps.

    Samples are the weights at positions ``start, start + every, start + 2·every, ...``
    (the paper's Algorithm 1: w_SWA starts as the weights at ``start``). The model is
    not touched: evaluate with ``averaged()`` or ``copy_to``, then ``update_bn``.
    """

    method = "SWA"

    def __init__(self, optimizer: Optimizer, start: int = 0, every: int = 1, *,
                 module: Optional[nn.Module] = None, average_buffers: bool = False,
                 average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        super().__init__(optimizer, rule="mean", start=start, every=every, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype,
                         compensated=compensated, skip_nonfinite=skip_nonfinite)


class EMA(WeightAveraging):
    """Exponential moving average: avg <- d·avg + (1 − d)·w at positions ``start, start+every, ...``.

    The first sample is copied (as ``AveragedModel`` with ``get_ema_multi_avg_fn`` does).
    ``decay`` (default 0.999) is d, or ``half_life=h`` (in steps, exclusive with ``decay``)
    sets d = 0.5^(every/h): a sample's weight halves every h steps.

    A schedule (diffusers', timm's and ema-pytorch's), with t the number of samples taken
    after step ``update_after_step`` before this one:

    - samples at steps <= ``update_after_step``, and the first one after it (t = 0), copy
      the weights (d = 0);
    - ``warmup="inv_gamma"``: d_t = 1 − (1 + t/inv_gamma)^−power; ``warmup="ratio"``:
      d_t = (1 + t)/(10 + t); ``warmup="none"``: d_t = d;
    - clamped to [min_decay, d].

    ``update_model_every=N`` (Switch EMA, Li et al. 2024): every N steps after ``start``
    the model's weights are set to the average (after that position's sample), and
    training goes on from there.

    The decay is computed on the host from the step count (no sync, resumes exactly from
    a checkpoint); ``current_decay`` is the last sample's (0.0 for one that started an
    average; under ``skip_nonfinite``, the schedule's value even where every earlier
    sample was skipped and the update was a copy). Without a schedule (the defaults)
    every sample after the first uses d.
    """

    method = "EMA"

    def __init__(self, optimizer: Optimizer, decay: Optional[float] = None, every: int = 1, start: int = 0, *,
                 warmup: str = "none", inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0,
                 update_after_step: int = 0, half_life: Optional[float] = None,
                 update_model_every: Optional[int] = None,
                 module: Optional[nn.Module] = None, average_buffers: bool = False,
                 average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        every = _check_int("every", every, 1)
        if half_life is not None:
            if decay is not None:
                raise ValueError("decay and half_life are exclusive: pass one of them")
            half_life = _check_real("half_life", half_life)
            if half_life <= 0.0:
                raise ValueError(f"half_life must be > 0 (steps), got {half_life}")
            decay = 0.5 ** (every / half_life)
        elif decay is None:
            decay = 0.999
        decay = _check_real("decay", decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}"
                             + (f" (half_life {half_life} with every={every})" if half_life is not None else ""))
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {', '.join(map(repr, WARMUPS))}, got {warmup!r}")
        for name, v in (("inv_gamma", inv_gamma), ("power", power)):
            if _check_real(name, v) <= 0.0:
                raise ValueError(f"{name} must be > 0, got {v}")
        min_decay = _check_real("min_decay", min_decay)
        if not 0.0 <= min_decay <= decay:
            raise ValueError(f"min_decay must be in [0, decay = {decay}], got {min_decay}")
        update_after_step = _check_int("update_after_step", update_after_step, 0)
        if update_model_every is not None:
            update_model_every = _check_int("update_model_every", update_model_every, 1)
        self.update_model_every = update_model_every
        self.decay = decay
        self.half_life = half_life
        self.warmup = warmup
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.current_decay: Optional[float] = None
        self._scheduled = warmup != "none" or update_after_step > 0
        super().__init__(optimizer, rule="momentum", momentum=1.0 - decay, start=start, every=every,
                         module=module, average_buffers=average_buffers, average_dtype=average_dtype,
                         compensated=compensated, skip_nonfinite=skip_nonfinite)

    def decay_at(self, position: int) -> float:
        """The decay of a sample taken after ``position`` base steps (a sampled position)."""
        if not self._scheduled:
            return self.decay
        u = self.update_after_step
        if position <= u:
            return 0.0
        # the first sampled position after u, and the samples since
        first = self.start if self.start > u else self.start + ((u - self.start) // self.every + 1) * self.every
        t = (position - first) // self.every
        return scheduled_decay(t, self.decay, self.min_decay, self.warmup, self.inv_gamma, self.power)

    def _momentum_now(self) -> float:
        self._decay_now = self.decay_at(self._position)
        return 1.0 - self._decay_now

    def _sample(self) -> None:
        first = self._num == 0
        super()._sample()
        self.current_decay = 0.0 if first else self._decay_now

    def _position_done(self, position: int) -> None:
        # Switch EMA: every update_model_every steps (after start) the model takes the average.
        n = self.update_model_every
        if n is not None and position > self.start and (position - self.start) % n == 0:
            self._assign_average()

    def _config(self) -> Dict[str, Any]:
        cfg = super()._config()
        # (only when on: checkpoints of EMAs without them keep loading)
        if self._scheduled:
            cfg.update(warmup=self.warmup, inv_gamma=self.inv_gamma, power=self.power, min_decay=self.min_decay,
                       update_after_step=self.update_after_step)
        if self.update_model_every is not None:
            cfg["update_model_every"] = self.update_model_every
        return cfg


class PSWA(WeightAveraging):
    """Periodically Sampled Weight Averaging (Tripathi, Liu et al., Algorithm 1).

    Each epoch of ``steps_per_epoch`` steps keeps a running mean of ``ceil(alpha·b)``
    of its batch-wise weights spread evenly (the last always included), then assigns it
    to the model at the epoch end (``on_assign`` runs next: BN recalibration on a
    fraction beta) and starts the next epoch's mean from scratch.
    """

    method = "PSWA"

    def __init__(self, optimizer: Optimizer, steps_per_epoch: int, sample_fraction: float = 1.0,
                 start: int = 0, *, on_assign: Optional[Callable[[], Any]] = None,
                 reset_optimizer_state: bool = False, module: Optional[nn.Module] = None,
                 average_buffers: bool = False, average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        super().__init__(optimizer, rule="mean", start=start, period=steps_per_epoch,
                         sample_fraction=sample_fraction, assign=True, reset=True,
                         reset_optimizer_state=reset_optimizer_state, on_assign=on_assign, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype,
                         compensated=compensated, skip_nonfinite=skip_nonfinite)


class PWALKS(WeightAveraging):
    """Periodic Weight Averaging over the Last K Samples (eq. 5): the mean of only the
    last ``ceil(k·b)`` steps of each epoch, assigned at the epoch end. k = 1 is PSWA with alpha = 1.
    """

    method = "PWALKS"

    def __init__(self, optimizer: Optimizer, steps_per_epoch: int, last_fraction: float,
                 start: int = 0, *, on_assign: Optional[Callable[[], Any]] = None,
                 reset_optimizer_state: bool = False, module: Optional[nn.Module] = None,
                 average_buffers: bool = False, average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        super().__init__(optimizer, rule="mean", start=start, period=steps_per_epoch,
                         last_fraction=last_fraction, assign=True, reset=True,
                         reset_optimizer_state=reset_optimizer_state, on_assign=on_assign, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype,
                         compensated=compensated, skip_nonfinite=skip_nonfinite)


class PSWM(WeightAveraging):
    """Periodically Sampled Weight Momentum (eq. 6, read as avg <- (1 − m)·avg + m·w).

    The first sample of an epoch is copied; the average is assigned at each epoch end.
    m = 1 is plain SGD.
    """

    method = "PSWM"

    def __init__(self, optimizer: Optimizer, steps_per_epoch: int, momentum: float,
                 sample_fraction: float = 1.0, start: int = 0, *,
                 on_assign: Optional[Callable[[], Any]] = None, reset_optimizer_state: bool = False,
                 module: Optional[nn.Module] = None, average_buffers: bool = False,
                 average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        super().__init__(optimizer, rule="momentum", momentum=momentum, start=start, period=steps_per_epoch,
                         sample_fraction=sample_fraction, assign=True, reset=True,
                         reset_optimizer_state=reset_optimizer_state, on_assign=on_assign, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype,
                         compensated=compensated, skip_nonfinite=skip_nonfinite)


class PeriodicSWA(WeightAveraging):
    """Periodic SWA (Guo, Jin, Liu): successive SWA procedures of ``period`` steps.

    Each procedure starts from the weights at its start (the previous procedure's
    average), averages them with samples every ``every`` steps, and at its end the model
    is set to that average. ``periods=2`` is DSWA, ``periods=3`` TSWA; after the last
    period the model keeps the final average. ``reset_optimizer_state=True`` restarts
    the base optimizer's momentum with each procedure.
    """

    method = "PeriodicSWA"

    def __init__(self, optimizer: Optimizer, period: int, start: int = 0, every: int = 1,
                 periods: Optional[int] = None, *, on_assign: Optional[Callable[[], Any]] = None,
                 reset_optimizer_state: bool = False, module: Optional[nn.Module] = None,
                 average_buffers: bool = False, average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        super().__init__(optimizer, rule="mean", start=start, every=every, period=period, periods=periods,
                         include_period_start=True, assign=True, reset=True,
                         reset_optimizer_state=reset_optimizer_state, on_assign=on_assign, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype,
                         compensated=compensated, skip_nonfinite=skip_nonfinite)
