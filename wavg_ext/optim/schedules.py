"""Learning-rate schedules the averaging papers use, on top of torch's schedulers."""

from __future__ import annotations

import math
from typing import List, Sequence, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .averaging import _check_int, _check_real

__all__ = ["cyclic_lr"]


def cyclic_lr(optimizer: Optimizer, min_lr: Union[float, Sequence[float]], cycle: int,
              start: int = 0, last_epoch: int = -1) -> LambdaLR:
    """The SWA paper's cyclical schedule as a ``LambdaLR`` stepped once per iteration.

    Within each cycle of ``cycle`` iterations the LR falls linearly from alpha1 (each
    group's initial LR) to alpha2 = ``min_lr`` and then jumps back:
    alpha(i) = (1 − t(i))·alpha1 + t(i)·alpha2 with t(i) = (mod(i − 1, c) + 1)/c for the
    i-th iteration after ``start`` (i = 1, 2, ...); iterations before ``start`` keep
    alpha1. The last iteration of every cycle runs at alpha2, so sample with
    ``SWA(optimizer, start=start + cycle, every=cycle)`` to average the minimum-LR
    points the paper averages. For a constant SWA LR use ``cycle=1`` (alpha2 throughout)
    or torch's ``SWALR``, which works with the wrappers too.
    """
    cycle = _check_int("cycle", cycle, 1)
    start = _check_int("start", start, 0)
    groups = optimizer.param_groups
    mins: List[float]
    if isinstance(min_lr, (list, tuple)):
        if len(min_lr) != len(groups):
            raise ValueError(f"min_lr has {len(min_lr)} values for {len(groups)} parameter groups")
        mins = [_check_real(f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
    else:
        mins = [_check_real("min_lr", min_lr)] * len(groups)
    alphas1 = [g.get("initial_lr", g["lr"]) for g in groups]
    for i, (a1, a2) in enumerate(zip(alphas1, mins)):
        if isinstance(a1, (int, float)) and not (0 <= a2 <= a1 and a1 > 0 and math.isfinite(a1)):
            raise ValueError(f"group {i}: need 0 <= min_lr ({a2}) <= lr ({a1}) and lr > 0")

    def factor(ratio: float):
        def f(j: int) -> float:  # j = scheduler steps so far = iteration index - 1
            if j < start:
                return 1.0
            t = ((j - start) % cycle + 1) / cycle
            return (1.0 - t) + t * ratio
        return f

    return LambdaLR(optimizer, [factor(a2 / float(a1)) for a1, a2 in zip(alphas1, mins)], last_epoch=last_epoch)
