"""A Lightning callback that keeps a weight average with wavg_ext's fused ops.

    from wavg_ext.integrations.lightning import WeightAveraging
    trainer = Trainer(callbacks=[WeightAveraging("ema", decay=0.999)])

``method`` is one of wavg_ext's averaging optimizers, run by wrapping the LightningModule's
optimizer (so every optimizer step, automatic or manual, feeds it): ``"swa"``, ``"ema"``,
``"pswa"``, ``"pwalks"``, ``"pswm"`` (per epoch: ``steps_per_epoch`` defaults to the
trainer's optimizer steps per epoch, and ``bn_fraction`` recalibrates BatchNorm on that
fraction of the training data after each epoch's assignment), ``"periodic_swa"``; or
``"model_ema"``: a :class:`wavg_ext.ModelEMA` copy updated after each optimizer step. Other
keyword arguments go to that class.

Validation, test and predict run with the averaged weights (``evaluate_averaged``; by
default for swa, ema and model_ema: the periodic methods put their average into the model
themselves), and the training weights come back after. The average is saved in Lightning
checkpoints as this callback's state (the optimizer entry stays the base optimizer's, so a
checkpoint also loads without the callback) and restored on resume.

Needs ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``; ``import wavg_ext``
never imports them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ..bn import update_bn
from ..model_ema import ModelEMA
from ..optim import EMA, PSWA, PSWM, PWALKS, SWA, PeriodicSWA
from ..optim import WeightAveraging as _AveragingOptimizer


def _callback_bases() -> tuple:
    bases: List[type] = []
    try:
        from lightning.pytorch import Callback
        bases.append(Callback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback
        if PLCallback not in bases:
            bases.append(PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError("wavg_ext.integrations.lightning needs Lightning: pip install lightning")
    return tuple(bases)


_WRAPPERS = {"swa": SWA, "ema": EMA, "pswa": PSWA, "pwalks": PWALKS, "pswm": PSWM, "periodic_swa": PeriodicSWA}
_PER_EPOCH = ("pswa", "pwalks", "pswm")
METHODS = tuple(_WRAPPERS) + ("model_ema",)


class WeightAveraging(*_callback_bases()):
    """Lightning callback: a weight average kept by wavg_ext (see the module docstring).

    Args:
        method: ``"swa"``, ``"ema"``, ``"pswa"``, ``"pwalks"``, ``"pswm"``, ``"periodic_swa"`` or
            ``"model_ema"``.
        optimizer_index: which of the LightningModule's optimizers feeds the average.
        evaluate_averaged: validate/test/predict with the averaged weights (default: for
            swa, ema and model_ema).
        bn_fraction: for pswa/pwalks/pswm, recalibrate BatchNorm on this fraction of the
            training data after each epoch-end assignment.
        **kwargs: the method's own arguments (e.g. ``start``, ``decay``, ``sample_fraction``,
            ``average_buffers``, ``warmup``).
    """

    def __init__(self, method: str = "ema", *, optimizer_index: int = 0, evaluate_averaged: Optional[bool] = None,
                 bn_fraction: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if bn_fraction is not None and method not in _PER_EPOCH:
            raise ValueError(f"bn_fraction is for the per-epoch methods ({', '.join(_PER_EPOCH)}), not {method!r}")
        if bn_fraction is not None and not 0.0 < bn_fraction <= 1.0:
            raise ValueError(f"bn_fraction must be in (0, 1], got {bn_fraction}")
        self.method = method
        self.optimizer_index = optimizer_index
        self.evaluate_averaged = method in ("swa", "ema", "model_ema") if evaluate_averaged is None \
            else bool(evaluate_averaged)
        self.bn_fraction = bn_fraction
        self.kwargs = kwargs
        self.engine: Any = None  # the averaging optimizer or the ModelEMA
        self._pending: Optional[Dict[str, Any]] = None  # state from a checkpoint, before the engine exists
        self._last_step = -1
        self._swapped = False

    # -- the engine --------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        # (after the optimizers and the training data are set up and a checkpoint's optimizer
        # state is loaded into the base optimizer; before the first step)
        if self.engine is None:
            self.engine = self._make_engine(trainer, pl_module)
        if self._pending is not None:
            if self.method == "model_ema":
                self.engine.load_state_dict(self._pending)
            else:
                self.engine.load_state_dict(self._pending, optimizer=False)
            self._pending = None
        self._last_step = trainer.global_step

    def _make_engine(self, trainer: Any, pl_module: torch.nn.Module) -> Any:
        if self.method == "model_ema":
            return ModelEMA(pl_module, **self.kwargs)
        optimizers = list(trainer.strategy.optimizers)
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index}: the LightningModule has {len(optimizers)} "
                             "optimizer(s)")
        base = optimizers[self.optimizer_index]
        if isinstance(base, _AveragingOptimizer):
            raise ValueError("the LightningModule's optimizer is already a wavg_ext averaging optimizer: use it or "
                             "this callback, not both")
        kwargs = dict(self.kwargs)
        kwargs.setdefault("module", pl_module)
        if self.method in _PER_EPOCH:
            if "steps_per_epoch" not in kwargs:
                batches = trainer.num_training_batches
                if not isinstance(batches, int) or batches <= 0 or math.isinf(batches):
                    raise ValueError(f"{self.method}: give steps_per_epoch= (the trainer's epoch length is "
                                     f"{batches!r})")
                kwargs["steps_per_epoch"] = math.ceil(batches / trainer.accumulate_grad_batches)
            if self.bn_fraction is not None:
                fraction = self.bn_fraction

                def recalibrate() -> None:
                    was_training = pl_module.training
                    update_bn(trainer.train_dataloader, pl_module, fraction=fraction)
                    pl_module.train(was_training)

                kwargs["on_assign"] = recalibrate
        engine = _WRAPPERS[self.method](base, **kwargs)
        optimizers[self.optimizer_index] = engine
        trainer.strategy.optimizers = optimizers  # Lightning re-makes its LightningOptimizer proxies
        return engine

    # -- model_ema: one update per optimizer step ----------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: torch.nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.method == "model_ema" and trainer.global_step > self._last_step:
            self.engine.update(pl_module, step=trainer.global_step)
            self._last_step = trainer.global_step

    # -- evaluation with the averaged weights ---------------------------------------------------
    def _has_average(self) -> bool:
        if self.engine is None:
            return False
        return self.engine.num_updates > 0 if self.method == "model_ema" else self.engine.num_averaged > 0

    def _swap_in(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        if not self.evaluate_averaged or self._swapped or not self._has_average():
            return
        if self.method == "model_ema":
            self.engine.store(pl_module)
            self.engine.copy_to(pl_module)
        else:
            self.engine.swap()
        self._swapped = True

    def _swap_out(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        if not self._swapped:
            return
        if self.method == "model_ema":
            self.engine.restore(pl_module)
        else:
            self.engine.swap()
        self._swapped = False

    def on_validation_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._swap_out(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._swap_in(trainer, pl_module)

    def on_test_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._swap_out(trainer, pl_module)

    def on_predict_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._swap_in(trainer, pl_module)

    def on_predict_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._swap_out(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: torch.nn.Module, exception: BaseException) -> None:
        self._swap_out(trainer, pl_module)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if self.engine is None:
            return {"method": self.method, "engine": self._pending}
        if self.method == "model_ema":
            return {"method": self.method, "engine": self.engine.state_dict()}
        return {"method": self.method, "engine": self.engine.state_dict(optimizer=False)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("method") != self.method:
            raise ValueError(f"this checkpoint's WeightAveraging state is for method {state_dict.get('method')!r}, "
                             f"the callback's method is {self.method!r}")
        if state_dict.get("engine") is None:
            return
        if self.engine is None:
            self._pending = state_dict["engine"]
        elif self.method == "model_ema":
            self.engine.load_state_dict(state_dict["engine"])
        else:
            self.engine.load_state_dict(state_dict["engine"], optimizer=False)

    def on_save_checkpoint(self, trainer: Any, pl_module: torch.nn.Module, checkpoint: Dict[str, Any]) -> None:
        # The optimizer entry holds the base optimizer's state (the average is this callback's).
        if self.method != "model_ema" and self.engine is not None and "optimizer_states" in checkpoint:
            states = checkpoint["optimizer_states"]
            if self.optimizer_index < len(states):
                states[self.optimizer_index] = self.engine.optimizer.state_dict()
