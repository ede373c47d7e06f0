"""A Hugging Face ``Trainer`` callback that keeps a weight average with wavg_ext's fused ops.

    from wavg_ext.integrations.transformers import WeightAveragingCallback
    trainer = Trainer(..., callbacks=[WeightAveragingCallback(decay=0.999)])

After every optimizer step the average is updated: ``method="ema"`` (default) keeps a
:class:`wavg_ext.ModelEMA` (keyword arguments go to it: ``warmup``, ``update_after_step``,
``average_dtype``, ...); ``method="swa"`` an equal-weight average of the weights from
optimizer step ``start`` on (a :class:`wavg_ext.AveragedModel`). Evaluations run with the
averaged weights (``evaluate_averaged``) and checkpoints hold them as the model weights
(``save_averaged``); the training weights come back right after. The average and its
counters are saved next to each checkpoint (``wavg_ext_average.pt``) and loaded when
training resumes from it.

Needs ``transformers``; ``import wavg_ext`` never imports it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..model_ema import ModelEMA, _check_unit, copy_tensors_
from ..swa_utils import AveragedModel

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - the module is only imported with transformers
    raise ImportError("wavg_ext.integrations.transformers needs transformers: pip install transformers") from err

STATE_FILE = "wavg_ext_average.pt"


class WeightAveragingCallback(TrainerCallback):
    """Hugging Face ``TrainerCallback``: a weight average kept by wavg_ext (module docstring).

    Args:
        decay: the EMA decay (``method="ema"``).
        method: ``"ema"`` or ``"swa"``.
        start: (swa) the first optimizer step whose weights are averaged.
        evaluate_averaged: evaluate with the averaged weights.
        save_averaged: save checkpoints with the averaged weights as the model's.
        **kwargs: for ``"ema"``, the other arguments of :class:`wavg_ext.ModelEMA`.
    """

    def __init__(self, decay: float = 0.999, *, method: str = "ema", start: int = 1, evaluate_averaged: bool = True,
                 save_averaged: bool = True, **kwargs: Any) -> None:
        if method not in ("ema", "swa"):
            raise ValueError(f"method must be 'ema' or 'swa', got {method!r}")
        if method == "swa" and kwargs:
            raise ValueError(f"method='swa' takes no ModelEMA arguments, got {sorted(kwargs)}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ValueError(f"start must be an int >= 1 (an optimizer step), got {start!r}")
        if not callable(decay):
            _check_unit("decay", decay)
        self.decay = decay
        self.method = method
        self.start = start
        self.evaluate_averaged = evaluate_averaged
        self.save_averaged = save_averaged
        self.kwargs = kwargs
        self.average: Any = None  # ModelEMA or AveragedModel
        self._swapped_model: Optional[torch.nn.Module] = None

    def _has_average(self) -> bool:
        if self.average is None:
            return False
        return self.average.num_updates > 0 if self.method == "ema" else self.average._host_count() > 0

    # -- training -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("WeightAveragingCallback needs the Trainer's model")
        if self.average is None:
            if self.method == "ema":
                self.average = ModelEMA(model, decay=self.decay, **self.kwargs)
            else:
                self.average = AveragedModel(model)
        if state.global_step > 0:  # resuming: the average saved with that checkpoint
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.exists(path):
                self.average.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.method == "ema":
            self.average.update(model, step=state.global_step)
        elif state.global_step >= self.start:
            self.average.update_parameters(model)
        if ((control.should_evaluate and self.evaluate_averaged) or (control.should_save and self.save_averaged)):
            self._swap_in(model)
        return control

    # -- evaluation and saving with the averaged weights ----------------------------------------
    @torch.no_grad()
    def _swap_in(self, model: torch.nn.Module) -> None:
        if self._swapped_model is not None or not self._has_average():
            return
        self._stash = [t.detach().clone() for t in _tensors(model)]
        copy_tensors_(_tensors(model), _tensors(self.average.module))
        self._swapped_model = model

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._swapped_model is None:
            return
        copy_tensors_(_tensors(self._swapped_model), self._stash)
        self._swapped_model, self._stash = None, None

    def on_evaluate(self, args, state, control, **kwargs):
        if not (control.should_save and self.save_averaged):
            self._swap_out()
        return control

    def on_save(self, args, state, control, **kwargs):
        self._swap_out()
        if self.average is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                torch.save(self.average.state_dict(), os.path.join(folder, STATE_FILE))
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        # Whatever the last step's evaluation/saving did, train on the training weights.
        self._swap_out()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._swap_out()
        return control


def _tensors(module: torch.nn.Module):
    return [t.detach() for t in list(module.parameters()) + list(module.buffers())]
