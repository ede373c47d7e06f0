"""Merging saved checkpoints: weighted averages streamed one checkpoint at a time, and greedy soups.

:func:`merge_checkpoints` averages the state dicts of a run's checkpoints (LAWA / PMA:
the mean of the last checkpoints of a constant-learning-rate run instead of annealing,
Kaddour 2022, Sanyal et al. 2023, Li et al. 2025) with uniform, EMA or given weights.
It reads one checkpoint at a time (files memory-mapped: read in place from the page
cache) into float32 sums (float64 for float64 entries) with the fused
``ops.accumulate_``: each checkpoint is read once, and peak memory is the sums plus one
checkpoint, never all of them.

:func:`greedy_soup` is the greedy model soup of Wortsman et al. 2022 (Recipe 1): the
checkpoints sorted by their own held-out score, each added to the soup only when the
uniform average with it scores at least as well as without it.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import ops

__all__ = ["merge_checkpoints", "greedy_soup"]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def _where(i: int, ckpt: Checkpoint) -> str:
    return f"checkpoints[{i}]" + (f" ({os.fspath(ckpt)})" if isinstance(ckpt, (str, os.PathLike)) else "")


def load_checkpoint(ckpt: Checkpoint, where: str, map_location: Any = "cpu") -> Mapping[str, Any]:
    """The state dict ``ckpt`` is or names: a mapping, or a file loaded with
    ``weights_only=True`` (memory-mapped when loaded onto the CPU: only what is read is
    loaded, in place from the page cache); a dict holding it under "state_dict" or
    "model" is unwrapped. TypeError naming ``where`` for anything else."""
    if isinstance(ckpt, (str, os.PathLike)):
        if torch.device(map_location).type == "cpu":
            try:
                obj = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                obj = torch.load(ckpt, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(ckpt, map_location=map_location, weights_only=True)
    else:
        obj = ckpt
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"{where} is a {type(obj).__name__}, not a state dict (or a path to one)")
    return obj


def _load(ckpt: Checkpoint, i: int) -> Mapping[str, Any]:
    return load_checkpoint(ckpt, _where(i, ckpt))


def _check_list(checkpoints: Any, fn: str) -> List[Checkpoint]:
    if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
        raise TypeError(f"{fn}: checkpoints must be a list of state dicts or paths, got {type(checkpoints).__name__}")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError(f"{fn}: checkpoints is empty")
    for i, c in enumerate(checkpoints):
        if not isinstance(c, (str, os.PathLike, Mapping)):
            raise TypeError(f"{fn}: checkpoints[{i}] is a {type(c).__name__}, not a state dict or a path")
    return checkpoints


def _merge_weights(weights: Any, n: int, decay: Optional[float]) -> List[float]:
    if isinstance(weights, str):
        if weights == "uniform":
            if decay is not None:
                raise ValueError("merge_checkpoints: decay is only used with weights='ema'")
            return [1.0 / n] * n
        if weights == "ema":
            if decay is None:
                raise ValueError("merge_checkpoints: weights='ema' needs decay (in [0, 1))")
            if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay < 1.0:
                raise ValueError(f"merge_checkpoints: decay must be a number in [0, 1), got {decay!r}")
            # The EMA of the checkpoints in order, the first one copied: avg_i = d avg_{i-1} + (1 - d) x_i.
            return [decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - 1 - i) for i in range(1, n)]
        raise ValueError(f"merge_checkpoints: weights must be 'uniform', 'ema' or a list of {n} numbers, "
                         f"got {weights!r}")
    if decay is not None:
        raise ValueError("merge_checkpoints: decay is only used with weights='ema'")
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if not isinstance(weights, Sequence) or len(weights) != n:
        got = len(weights) if isinstance(weights, Sequence) else type(weights).__name__
        raise ValueError(f"merge_checkpoints: weights must be 'uniform', 'ema' or a list of {n} numbers (one per "
                         f"checkpoint), got {got}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"merge_checkpoints: weights[{i}] must be a finite number, got {w!r}")
        out.append(float(w))
    return out


class _Sums:
    """Running weighted sums of the floating entries of state dicts with the same keys,
    shapes and dtypes as the first one (float32 sums; float64 for float64 entries); the
    other entries are taken from the last state dict added."""

    def __init__(self, first: Mapping[str, Any], where: str):
        self.keys = list(first)
        self.floating, self.others = [], []
        for k in self.keys:
            v = first[k]
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                self.floating.append(k)
            else:
                self.others.append(k)
        if not self.floating:
            raise ValueError(f"{where} has no floating-point tensors to average")
        self.dtypes = {k: first[k].dtype for k in self.floating}
        self.shapes = {k: first[k].shape for k in self.floating}
        self.sums = [torch.zeros(first[k].shape, dtype=torch.float64 if first[k].dtype == torch.float64
                                 else torch.float32) for k in self.floating]
        self.last_others: Dict[str, Any] = {}

    def copy(self) -> "_Sums":
        new = object.__new__(_Sums)
        new.__dict__.update(self.__dict__)
        new.sums = [s.clone() for s in self.sums]
        return new

    def tensors(self, sd: Mapping[str, Any], where: str, check_values: bool = True) -> List[torch.Tensor]:
        """sd's floating entries in order, checked against the first state dict (and for
        NaN/inf with check_values)."""
        if set(sd) != set(self.keys):
            missing = sorted(set(self.keys) - set(sd))
            extra = sorted(set(sd) - set(self.keys))
            raise ValueError(f"{where} does not have the keys of checkpoints[0]: "
                             + (f"missing {missing[:5]}" if missing else "")
                             + ("; " if missing and extra else "") + (f"extra {extra[:5]}" if extra else ""))
        out = []
        for k in self.floating:
            t = sd[k]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{where}: '{k}' is {got}, not a floating tensor as in checkpoints[0]")
            if t.shape != self.shapes[k]:
                raise ValueError(f"{where}: '{k}' has shape {list(t.shape)}, checkpoints[0] {list(self.shapes[k])}")
            if t.layout != torch.strided or t.is_meta:
                raise ValueError(f"{where}: '{k}' is a {t.layout} {t.device.type} tensor, not a dense one with data")
            if t.device.type != "cpu":
                t = t.cpu()
            if t.dtype == torch.float64 and self.dtypes[k] != torch.float64:
                t = t.float()  # (a float32 sum takes no float64 input)
            out.append(t)
        if check_values and int(ops.nonfinite_flag(out)):
            for k, t in zip(self.floating, out):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where}: '{k}' holds NaN/inf")
        return out

    def add(self, sd: Mapping[str, Any], weight: float, where: str, check_values: bool = True) -> None:
        ops.accumulate_(self.sums, self.tensors(sd, where, check_values), weight)
        self.last_others = {k: sd[k] for k in self.others}

    def result(self, scale: float = 1.0) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        floating = dict(zip(self.floating, self.sums))
        for k in self.keys:
            if k in floating:
                s = floating[k]
                out[k] = (s * scale if scale != 1.0 else s).to(self.dtypes[k])
            else:
                v = self.last_others[k]
                out[k] = v.clone() if isinstance(v, torch.Tensor) else v
        return out


def merge_checkpoints(checkpoints: Sequence[Checkpoint], weights: Union[str, Sequence[float]] = "uniform", *,
                      decay: Optional[float] = None) -> Dict[str, Any]:
    """The weighted average of saved checkpoints, as a new state dict (on the CPU).

    ``checkpoints``: state dicts or paths to them (``torch.load(weights_only=True)``,
    memory-mapped); a dict holding the state dict under ``"state_dict"`` or ``"model"`` is
    unwrapped. All must have the keys, shapes and floating dtypes of the first.
    ``weights``: ``"uniform"`` (the mean), ``"ema"`` (the EMA of the checkpoints in order
    with ``decay``, the first copied: weights d^(n-1), (1-d) d^(n-1-i)) or a list of n
    numbers used as given (pass weights that sum to 1 for an average).

    Floating entries are summed in float32 (float64 entries in float64) one checkpoint at
    a time with the fused ``ops.accumulate_`` and returned in the first checkpoint's
    dtypes; other entries (integer buffers such as ``num_batches_tracked``) are the last
    checkpoint's. A checkpoint holding NaN/inf, or one that does not match the first,
    raises ValueError/TypeError naming it and the key. Peak memory: the sums plus one
    checkpoint.
    """
    checkpoints = _check_list(checkpoints, "merge_checkpoints")
    w = _merge_weights(weights, len(checkpoints), decay)
    sums: Optional[_Sums] = None
    for i, ckpt in enumerate(checkpoints):
        sd = _load(ckpt, i)
        if sums is None:
            sums = _Sums(sd, _where(i, ckpt))
        # One read per checkpoint: NaN/inf reach the sums, checked once at the end.
        sums.add(sd, w[i], _where(i, ckpt), check_values=False)
        del sd
    assert sums is not None
    if int(ops.nonfinite_flag(sums.sums)):  # name the checkpoint (a second read, on this error only)
        for i, ckpt in enumerate(checkpoints):
            sums.tensors(_load(ckpt, i), _where(i, ckpt))
        bad = next(k for k, t in zip(sums.floating, sums.sums) if not bool(torch.isfinite(t).all()))
        raise ValueError(f"merge_checkpoints: the weighted sum of '{bad}' overflows (every checkpoint is finite)")
    return sums.result()


def greedy_soup(checkpoints: Sequence[Checkpoint], evaluate: Callable[[Dict[str, Any]], float], *,
                return_ingredients: bool = False) -> Union[Dict[str, Any], Tuple[Dict[str, Any], List[int]]]:
    """The greedy soup of ``checkpoints`` (Wortsman et al. 2022, Recipe 1) as a state dict.

    ``evaluate(state_dict) -> float`` scores a candidate on held-out data (higher is
    better). Each checkpoint is scored alone, then they are visited from the best score
    down: the first starts the soup, and each next one joins it when the uniform average
    of the soup with it scores at least the soup's current score. n + (n - 1) calls of
    ``evaluate``. The running sum of the soup is kept in float32 (float64 entries in
    float64): memory of two models plus one checkpoint. With ``return_ingredients=True``
    also returns the indices of the checkpoints in the soup, in the order they joined.
    """
    checkpoints = _check_list(checkpoints, "greedy_soup")
    if not callable(evaluate):
        raise TypeError(f"greedy_soup: evaluate must be callable (state_dict -> float), got {type(evaluate).__name__}")

    def score(sd: Dict[str, Any], what: str) -> float:
        s = evaluate(sd)
        if isinstance(s, torch.Tensor) and s.numel() == 1:
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or math.isnan(s):
            raise TypeError(f"greedy_soup: evaluate returned {s!r} for {what}; it must return a number (not NaN)")
        return float(s)

    # Score each checkpoint alone (checking it against the first on the way).
    ref: Optional[_Sums] = None
    scores = []
    for i, ckpt in enumerate(checkpoints):
        sd = _load(ckpt, i)
        if ref is None:
            ref = _Sums(sd, _where(i, ckpt))
        ref.tensors(sd, _where(i, ckpt))
        scores.append(score(dict(sd), _where(i, ckpt)))
        del sd
    order = sorted(range(len(checkpoints)), key=lambda i: -scores[i])  # stable: ties keep list order
    first = order[0]
    soup = ref  # (zero sums, built from checkpoints[0])
    soup.add(_load(checkpoints[first], first), 1.0, _where(first, checkpoints[first]))
    ingredients, best = [first], scores[first]
    for i in order[1:]:
        where = _where(i, checkpoints[i])
        sd = _load(checkpoints[i], i)
        trial = soup.copy()
        trial.add(sd, 1.0, where)
        candidate = trial.result(1.0 / (len(ingredients) + 1))
        s = score(candidate, f"the soup of checkpoints {sorted(ingredients + [i])}")
        if s >= best:
            soup, best = trial, s
            ingredients.append(i)
        del sd, trial, candidate
    result = soup.result(1.0 / len(ingredients))
    return (result, ingredients) if return_ingredients else result
