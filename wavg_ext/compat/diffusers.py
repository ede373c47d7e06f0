"""``EMAModel`` with diffusers' arguments, methods and state_dict layout, on wavg_ext's fused
update. ``from wavg_ext.compat.diffusers import EMAModel`` replaces
``from diffusers.training_utils import EMAModel``.

diffusers' semantics: the EMA is of a list of parameters (``shadow_params``); ``step(parameters)``
counts ``optimization_step`` and uses decay 0 (a copy) up to ``update_after_step + 1``, then
``(1 + s) / (10 + s)`` or, with ``use_ema_warmup``, ``1 - (1 + s / inv_gamma) ** -power``,
clamped to ``[min_decay, decay]`` (s: steps after ``update_after_step + 1``); parameters that
do not require grad are copied. ``foreach`` is
accepted and ignored (always fused). What differs: ``load_state_dict`` checks the whole dict
before changing anything and refuses one that is not an EMAModel state (diffusers silently
loads nothing from, e.g., a ModelEMA or AveragedModel state_dict).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ..model_ema import _check_unit, copy_tensors_, ema_decay, ema_update_

__all__ = ["EMAModel"]

_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power",
         "shadow_params")


class EMAModel:
    """diffusers' ``EMAModel``: same constructor (``parameters`` or, deprecated there, a
    module; ``max_value``/``min_value``/``device`` keyword forms too), ``step``, ``copy_to``,
    ``store``/``restore``, ``to``, ``pin_memory``, ``state_dict``/``load_state_dict``,
    ``get_decay``, ``cur_decay_value``, ``save_pretrained``/``from_pretrained``."""

    def __init__(self, parameters: Union[Iterable[torch.nn.Parameter], nn.Module], decay: float = 0.9999,
                 min_decay: float = 0.0, update_after_step: int = 0, use_ema_warmup: bool = False,
                 inv_gamma: Union[float, int] = 1.0, power: Union[float, int] = 2 / 3, foreach: bool = False,
                 model_cls: Optional[Any] = None, model_config: Optional[Dict[str, Any]] = None, **kwargs):
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        if kwargs.get("max_value") is not None:
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            min_decay = kwargs["min_value"]
        unknown = set(kwargs) - {"max_value", "min_value", "device"}
        if unknown:
            raise TypeError(f"EMAModel got unexpected keyword arguments {sorted(unknown)}")
        self.decay = _check_unit("decay", decay)
        self.min_decay = _check_unit("min_decay", min_decay)
        self.shadow_params: List[torch.Tensor] = [p.clone().detach() for p in parameters]
        if kwargs.get("device") is not None:
            self.to(device=kwargs["device"])
        self.temp_stored_params: Optional[List[torch.Tensor]] = None
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value: Optional[float] = None
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config

    def get_decay(self, optimization_step: int) -> float:
        """diffusers': 0 up to ``update_after_step + 1``, then the warmup form or, without
        warmup, ``(1 + s) / (10 + s)``, clamped to ``[min_decay, decay]``."""
        if self.use_ema_warmup:
            return ema_decay(optimization_step, self.decay, self.min_decay, self.update_after_step, True,
                             self.inv_gamma, self.power)
        s = max(0, optimization_step - self.update_after_step - 1)
        if s <= 0:
            return 0.0
        return max(min((1 + s) / (10 + s), self.decay), self.min_decay)

    def _check(self, parameters: List[torch.Tensor], what: str) -> None:
        if len(parameters) != len(self.shadow_params):
            raise ValueError(f"{what}: {len(parameters)} parameters given, the EMA holds {len(self.shadow_params)}")
        for i, (s, p) in enumerate(zip(self.shadow_params, parameters)):
            if s.shape != p.shape:
                raise ValueError(f"{what}: parameter {i} has shape {tuple(p.shape)}, its average {tuple(s.shape)}")

    @torch.no_grad()
    def step(self, parameters: Union[Iterable[torch.nn.Parameter], nn.Module]) -> None:
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        parameters = list(parameters)
        self._check(parameters, "step")
        decay = self.get_decay(self.optimization_step + 1)
        trained = [p.requires_grad for p in parameters]
        ema_update_([s for s, t in zip(self.shadow_params, trained) if t],
                    [p.detach() for p, t in zip(parameters, trained) if t],
                    [s for s, t in zip(self.shadow_params, trained) if not t],
                    [p.detach() for p, t in zip(parameters, trained) if not t], decay)
        self.optimization_step += 1
        self.cur_decay_value = decay

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        self._check(parameters, "copy_to")
        copy_tensors_([p.data for p in parameters], self.shadow_params)

    def pin_memory(self) -> None:
        self.shadow_params = [p.pin_memory() for p in self.shadow_params]

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        self.shadow_params = [p.to(device=device, dtype=dtype, non_blocking=non_blocking) if p.is_floating_point()
                              else p.to(device=device, non_blocking=non_blocking) for p in self.shadow_params]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
                "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
                "inv_gamma": self.inv_gamma, "power": self.power, "shadow_params": self.shadow_params}

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        parameters = list(parameters)
        if len(parameters) != len(self.temp_stored_params):
            raise ValueError(f"restore: {len(parameters)} parameters given, {len(self.temp_stored_params)} stored")
        with torch.no_grad():
            for c, p in zip(self.temp_stored_params, parameters):
                p.data.copy_(c.data)
        self.temp_stored_params = None

    def load_state_dict(self, state_dict: dict) -> None:
        """diffusers' checks, all made before anything changes; a dict with none of an
        EMAModel state's keys is refused (diffusers would load nothing, silently)."""
        if not isinstance(state_dict, dict) or not any(k in state_dict for k in _KEYS):
            keys = list(state_dict)[:5] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"load_state_dict: not an EMAModel state (it has none of {list(_KEYS)}; got {keys}); "
                             "a wavg_ext.ModelEMA or AveragedModel state loads into those classes")
        state = copy.deepcopy(state_dict)
        new = {k: state.get(k, getattr(self, k)) for k in _KEYS}
        if not 0.0 <= new["decay"] <= 1.0:
            raise ValueError("Decay must be between 0 and 1")
        checks = (("min_decay", float), ("optimization_step", int), ("update_after_step", int),
                  ("use_ema_warmup", bool), ("inv_gamma", (float, int)), ("power", (float, int)))
        for key, typ in checks:
            if not isinstance(new[key], typ):
                raise ValueError(f"Invalid {key}")
        if not isinstance(new["shadow_params"], list):
            raise ValueError("shadow_params must be a list")
        if not all(isinstance(p, torch.Tensor) for p in new["shadow_params"]):
            raise ValueError("shadow_params must all be Tensors")
        if "shadow_params" in state and len(new["shadow_params"]) != len(self.shadow_params):
            raise ValueError(f"shadow_params holds {len(new['shadow_params'])} tensors, this EMA "
                             f"{len(self.shadow_params)}")
        for k, v in new.items():
            setattr(self, k, v)

    def save_pretrained(self, path: str) -> None:
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str, model_cls: Any, foreach: bool = False) -> "EMAModel":
        _, ema_kwargs = model_cls.load_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model
