"""``ModelEmaV3`` with timm's arguments, methods and state_dict layout (``module.*``), on
wavg_ext's fused update. ``from wavg_ext.compat.timm import ModelEmaV3`` replaces
``from timm.utils import ModelEmaV3``.

timm's schedule: ``update(model)`` without a step uses ``decay`` from the first update on
(the copy made at construction is the start); with ``step``, the average is a copy up to
``update_after_step + 1`` and then ``decay`` (or, with ``use_warmup``, the warmup form clamped
to ``[min_decay, decay]``). Floating-point state is averaged, integer state copied;
``exclude_buffers=True`` copies the buffers. ``foreach`` is accepted and ignored (always
fused); ``device`` keeps the copy there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model_ema import ModelEMA

__all__ = ["ModelEmaV3", "checkpoint_dict"]


def checkpoint_dict(model: nn.Module, ema: ModelEMA, **extra) -> dict:
    """A training checkpoint in timm's layout: ``state_dict`` (the model's), ``state_dict_ema``
    (the averages by the model's names: what ``timm.models.load_checkpoint(..., use_ema=True)``
    loads) and any ``extra`` entries (``epoch``, ``optimizer``, ...). For ``torch.save``."""
    return dict(extra, state_dict=model.state_dict(), state_dict_ema=ema.averaged_state_dict())


class ModelEmaV3(ModelEMA):
    """timm's ``ModelEmaV3`` (same constructor, ``get_decay``, ``update``, ``set``, ``forward``
    and state_dict keys: a timm checkpoint's EMA loads into it and back)."""

    # timm's layout: module.* only (no _extra_state key), so that timm loads it strictly.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[torch.device] = None, foreach: bool = True, exclude_buffers: bool = False):
        super().__init__(model, decay, min_decay=min_decay, update_after_step=update_after_step, warmup=use_warmup,
                         inv_gamma=warmup_gamma, power=warmup_power, exclude_buffers=exclude_buffers, device=device)
        self.foreach = foreach
        self.device = device

    use_warmup = property(lambda self: self.warmup, lambda self, v: setattr(self, "warmup", bool(v)))
    warmup_gamma = property(lambda self: self.inv_gamma, lambda self, v: setattr(self, "inv_gamma", float(v)))
    warmup_power = property(lambda self: self.power, lambda self, v: setattr(self, "power", float(v)))

    def get_decay(self, step: Optional[int] = None) -> float:
        """timm's: ``decay`` without a step; with one, 0 up to ``update_after_step + 1``."""
        if step is None:
            return self.decay
        if max(0, step - self.update_after_step - 1) <= 0:
            return 0.0
        return self.decay_at(step) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        self._apply(model, self.get_decay(step), self.num_updates + 1 if step is None else step)

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        self._apply(model, decay, self.num_updates + 1)

    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        exclude_buffers, self.exclude_buffers = self.exclude_buffers, True
        try:
            self._apply(model, decay, self.num_updates + 1)
        finally:
            self.exclude_buffers = exclude_buffers

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copies the model's weights and buffers into the average."""
        self.copy_from(model)
