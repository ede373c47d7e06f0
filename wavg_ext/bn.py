"""BatchNorm recalibration for averaged weights (the papers' BN step, on a fraction beta of the data)."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .optim.averaging import fraction_count

__all__ = ["update_bn"]

# Keys of a dict batch that are targets, not model inputs.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def _to_device(obj: Any, device: Optional[torch.device]) -> Any:
    """``obj`` with every tensor in it moved to ``device``, containers rebuilt with their own
    types: namedtuples field by field (``type(obj)(*items)``: their constructors take no
    iterable), lists/tuples from the items, dicts (OrderedDict, defaultdict, nested) key by
    key on a shallow copy. Anything else is passed through as is."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the dict's type and extras (a defaultdict's factory)
        for k, v in obj.items():
            out[k] = _to_device(v, device)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # collections.namedtuple, typing.NamedTuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)([_to_device(v, device) for v in obj])
    return obj


def _default_forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("update_bn: got an empty batch")
        model(batch[0])  # (inputs, targets, ...)
    elif isinstance(batch, dict):
        model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    else:
        raise TypeError(f"update_bn: batches must be tensors, (inputs, targets) tuples or dicts, got "
                        f"{type(batch).__name__}; pass forward=lambda model, batch: ...")


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, fraction: float = 1.0,
              device: Optional[Union[str, torch.device]] = None, progress: bool = False,
              forward: Optional[Callable[[nn.Module, Any], Any]] = None, process_group: Any = None) -> int:
    """Recomputes the running statistics of every BatchNorm layer of ``model``.

    The statistics are reset and re-estimated as a cumulative average (momentum None)
    over the first ``ceil(fraction·len(loader))`` batches (at least one): a shuffled
    loader gives a random fraction beta of the data, as in PSWA. Batches may be tensors,
    (inputs, targets, ...) tuples/lists (the first element is the input) or dicts (passed
    as keyword arguments without the keys label(s)/target(s)/y); ``forward(model, batch)``
    overrides this. ``device`` moves each batch there first. Each module's train/eval
    mode and each BN layer's momentum are restored afterwards. ``progress`` shows a tqdm
    bar. Returns the number of batches used (0 when the model has no BN layer with
    running statistics: nothing to do).

    Distributed training: with ``process_group`` (e.g. ``torch.distributed.group.WORLD``)
    every rank recalibrates on its own batches (its shard of a DistributedSampler) and the
    statistics are then combined with one all-reduce into what one process would compute
    over all ranks' batches, the same on every rank. Pass the unwrapped model
    (``ddp.module``): DDP's forward broadcasts rank 0's buffers over the others'. Without
    ``process_group`` each rank keeps the statistics of its own batches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        raise TypeError(f"fraction must be a finite number, got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    if device is not None:
        device = torch.device(device)
    total = _len_or_none(loader)
    limit = None
    if fraction < 1.0:
        if total is None:
            raise TypeError("update_bn: fraction < 1 needs a loader with len()")
        limit = fraction_count(fraction, total) if total > 0 else 1
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    # Restored if anything fails (a bad batch, an empty loader): the old statistics are not lost.
    saved = [(b, b.clone()) for bn in bns for b in bn.buffers(recurse=False)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches seen
    run = forward or _default_forward
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=limit if limit is not None else total, desc="update_bn", leave=False)
    used = 0
    ok = False
    try:
        model.train()
        for batch in loader:
            run(model, _to_device(batch, device))
            used += 1
            if bar is not None:
                bar.update(1)
            if limit is not None and used >= limit:
                break  # before drawing another batch: a DataLoader would load it for nothing
        if used == 0:
            raise ValueError("update_bn: the loader yielded no batches")
        ok = True
    finally:
        if not ok:
            for b, copy in saved:
                b.copy_(copy)
        if bar is not None:
            bar.close()
        for bn, momentum in momenta:
            bn.momentum = momentum
        for m, training in modes:
            m.training = training
    if process_group is not None:
        from .distributed import update_bn_statistics
        update_bn_statistics(model, used, process_group)
    return used


def _len_or_none(loader: Iterable) -> Optional[int]:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
