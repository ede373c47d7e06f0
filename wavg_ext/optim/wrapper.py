"""The ``torch.optim.Optimizer`` wrapper plumbing shared by the averaging wrappers and TWA.

:class:`_WrappedOptimizer` wraps a base optimizer without ``Optimizer.__init__``: it
shares the base's ``param_groups``, ``state`` and ``defaults`` (so LR schedulers,
``GradScaler.step``, ``zero_grad`` and step hooks act on the base) and runs
``_before_base_step()``, the base ``step()`` and ``_after_base_step()`` in ``step()``.
Subclasses keep their own host-side bookkeeping out of dynamo with
``@torch.compiler.disable`` on those two hooks. It also holds the argument checks and
the header check of the wrappers' ``state_dict`` sections.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.optim import Optimizer

from .. import ops

__all__ = ["_WrappedOptimizer", "find_averaging", "_check_int", "_check_real", "_check_fraction", "_check_saved_tensors"]


# --------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_fraction(name: str, value: Any) -> float:
    value = _check_real(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _check_saved_tensors(kind: str, saved: Any, mine: List[torch.Tensor]) -> None:
    """ValueError unless ``saved`` holds tensors of ``mine``'s shapes and dtypes (lengths checked by the caller)."""
    for i, (s, d) in enumerate(zip(saved, mine)):
        if not isinstance(s, torch.Tensor) or s.shape != d.shape or s.dtype != d.dtype:
            got = f"{list(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"state dict {kind}[{i}] is {got}, expected {list(d.shape)} {d.dtype}")


# --------------------------------------------------------------------------- proxies

# Frameworks hand the user a proxy of the optimizer: Lightning's LightningOptimizer is an
# instance of a class made from (LightningOptimizer, the wrapper's class) that forwards the
# attributes it lacks to the wrapper (older Lightning copied the wrapper's __dict__). A
# wrapper method called through it runs with self = the proxy, so state it writes (swap's
# stash, reset's counters) would land on the proxy, out of sight of step() and of every
# other proxy. The public methods and properties therefore run on the wrapper itself:
# _wavg_owner is the wrapper, found through the proxy's forwarding or its copied __dict__.


def _on_owner(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        owner = self.__dict__.get("_wavg_owner")
        if owner is None:  # no __dict__ entry: maybe a forwarding proxy
            owner = getattr(self, "_wavg_owner", None)
        if owner is not None and owner is not self:
            return fn(owner, *args, **kwargs)
        return fn(self, *args, **kwargs)

    return call


def find_averaging(optimizer: Any) -> "_WrappedOptimizer":
    """The wavg_ext optimizer wrapper (SWA, EMA, ..., TWA) behind framework proxies:
    follows ``.optimizer`` / ``._optimizer`` (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer, ...). ``find_averaging(opt).averaged()`` works wherever the proxy
    does not forward the wrapper's methods itself. TypeError when there is none."""
    seen = []
    current = optimizer
    while current is not None and len(seen) < 16:
        if isinstance(current, _WrappedOptimizer):
            owner = current.__dict__.get("_wavg_owner") or getattr(current, "_wavg_owner", current)
            return owner
        seen.append(type(current).__name__)
        current = current.__dict__.get("optimizer", current.__dict__.get("_optimizer")) \
            if hasattr(current, "__dict__") else None
    chain = " -> ".join(seen) if seen else repr(optimizer)
    raise TypeError(f"find_averaging: no wavg_ext averaging optimizer behind {chain}")


# --------------------------------------------------------------------------- the wrapper


class _WrappedOptimizer(Optimizer):
    """An ``Optimizer`` that delegates to ``self.optimizer`` (deliberately no ``Optimizer.__init__``).

    Subclasses set ``method`` (their name in state dicts and ``repr``), ``_state_key``
    (the key of their own section next to ``"optimizer"`` in ``state_dict()``) and
    ``_state_version``, and implement ``_config()`` (the settings a checkpoint must match).
    """

    method = "WrappedOptimizer"
    _state_key = "wrapper"
    _state_version = 1

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._wavg_owner = self  # (a copy or an unpickled wrapper gets its own: memo/pickle keep the cycle)

    # Every public method and property a subclass defines runs on the wrapper, also when
    # called through a proxy (_on_owner); step stays direct (proxies wrap it themselves).
    _DIRECT = frozenset({"step"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("_") or name in cls._DIRECT:
                continue
            if isinstance(value, property):
                setattr(cls, name, property(_on_owner(value.fget) if value.fget else None,
                                            _on_owner(value.fset) if value.fset else None, value.fdel, value.__doc__))
            elif isinstance(value, classmethod) or isinstance(value, staticmethod):
                continue
            elif callable(value):
                setattr(cls, name, _on_owner(value))

    # ----------------------------------------------------------------- shared with the base

    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[Dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> Dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: Dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> Dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({cfg},\n  optimizer={self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def _flat_params(self) -> List[torch.Tensor]:
        """Every tensor of the base optimizer's groups, in order (the wrappers' parameter positions)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _changed_params(self, params: List[torch.Tensor], what: str, metadata: Any = None) -> List[int]:
        """Positions where the base optimizer's parameters are no longer ``params`` (by identity,
        or with ``metadata`` from ``ops.param_metadata`` by dtype, device and numel), in one C++
        pass; RuntimeError when parameters were added or removed behind the wrapper (``what``:
        how the wrapper's count is described)."""
        changed = ops.changed_params(self.optimizer.param_groups, params, metadata)
        if changed is None:
            counts = [len(g["params"]) for g in self.optimizer.param_groups]
            raise RuntimeError(f"the base optimizer now holds {sum(counts)} parameters (groups of {counts}), "
                               f"{what} {len(params)}: parameters were added or removed behind the wrapper; add "
                               "parameter groups through the wrapper's add_param_group")
        return changed

    # ----------------------------------------------------------------- step

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """``_before_base_step()``, one base optimizer step, then ``_after_base_step()``.

        Under ``torch.compile`` (e.g. ``torch.compile(opt.step)``) only the base step is
        traced; the subclasses' hooks run eagerly around it (``@torch.compiler.disable``).
        """
        closure = self._before_base_step(closure)
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._after_base_step()
        return loss

    def _before_base_step(self, closure: Optional[Callable[[], Any]]) -> Optional[Callable[[], Any]]:
        """Runs before the base step; returns the closure to hand to it."""
        return closure

    def _after_base_step(self) -> None:
        """Runs after the base step."""

    # ----------------------------------------------------------------- checkpoints

    def _config(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _state(self, section: Dict[str, Any], optimizer: bool) -> Dict[str, Any]:
        """{"optimizer": base optimizer state, <key>: section}, or only the section."""
        if not isinstance(optimizer, bool):
            raise TypeError(f"optimizer must be a bool, got {type(optimizer).__name__}")
        out = {"optimizer": self.optimizer.state_dict()} if optimizer else {}
        out[self._state_key] = section
        return out

    def _load_base_then(self, state_dict: Dict[str, Any], optimizer: bool, commit: Callable[[], None]) -> None:
        """Loads the base optimizer's section (when ``optimizer``), then runs ``commit``; if
        either raises, the base optimizer's state and param_groups are put back as they were."""
        if not optimizer:
            commit()
            return
        before = copy.deepcopy(self.optimizer.state_dict())  # the live tensors would change under us
        try:
            self.optimizer.load_state_dict(state_dict["optimizer"])
            commit()
        except BaseException:
            self.optimizer.load_state_dict(before)
            raise

    def _saved_section(self, state_dict: Any, optimizer: bool = True) -> Dict[str, Any]:
        """The wrapper's own section of ``state_dict`` after checking its header: format,
        version, method and settings (ValueError naming what differs). ``optimizer``: the
        base optimizer's state must be there too."""
        key = self._state_key
        if not isinstance(optimizer, bool):
            raise TypeError(f"optimizer must be a bool, got {type(optimizer).__name__}")
        if not isinstance(state_dict, dict) or key not in state_dict or (optimizer and "optimizer" not in state_dict):
            expected = f"'optimizer' and '{key}'" if optimizer else f"'{key}'"
            raise ValueError(f"not a wavg_ext {key} state dict (expected keys {expected})")
        section = state_dict[key]
        if not isinstance(section, dict):
            raise ValueError(f"state dict['{key}'] is a {type(section).__name__}, not a dict")
        if section.get("version") != self._state_version:
            raise ValueError(f"unsupported {key} state version {section.get('version')!r}")
        if section.get("method") != self.method:
            raise ValueError(f"state dict is from {section.get('method')}, this wrapper is {self.method}")
        mine, saved = self._config(), section.get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"state dict['{key}'] has no settings ('config')")
        diff = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs {mine.get(k)!r}" for k in diff)
            raise ValueError(f"state dict was saved with other settings ({detail})")
        return section
