"""Post-hoc EMA (Karras et al. 2024, EDM2, section 3.2 and appendix C.3): save the
power-function EMA profiles during training, choose the EMA width afterwards.

:class:`PostHocEMA` is a :class:`~wavg_ext.PowerEMA` that every ``snapshot_every`` steps
saves its profiles (cast to ``snapshot_dtype``) to ``directory``; a background thread
writes the files, so training waits only for the device-to-host copy. Under DDP only
rank 0 writes.

:func:`synthesize_ema` reads such a directory, solves EDM2's least-squares problem in
float64 for the coefficients of the snapshots whose combination is the power-function
EMA of the requested ``sigma_rel`` at the last snapshot's time
(:func:`wavg_ext.power_ema.posthoc_coefficients`), and streams the snapshots one at a
time through the fused ``ops.accumulate_`` into float32 sums: memory of one model plus
one snapshot.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .. import ops
from ..merge import load_checkpoint
from ..power_ema import MAX_SIGMA_REL, posthoc_coefficients
from .power_ema import PowerEMA
from .wrapper import _check_int

__all__ = ["PostHocEMA", "synthesize_ema"]

_PREFIX = "posthoc-ema-"
_SNAPSHOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PostHocEMA(PowerEMA):
    """A :class:`~wavg_ext.PowerEMA` that saves its profiles every ``snapshot_every`` steps.

    Args:
        sigma_rels / gammas, every, start, module, average_buffers, average_dtype: as for
            PowerEMA (default sigma_rels (0.05, 0.28): EDM2's pair, which spans the widths
            between and around them).
        snapshot_every: steps between snapshots (after ``start``; a snapshot is written
            after that position's sample).
        directory: where the snapshots go (created if missing); file
            ``posthoc-ema-<step>.pt`` holds the step, the profiles' widths, the averaged
            tensors' names (from ``module``) and every profile's averages.
        snapshot_dtype: the dtype the averages are saved in (default float16, as EDM2).

    ``wait()`` blocks until every snapshot so far is on disk (and raises what a write
    raised); ``state_dict()`` waits too, so a checkpoint never refers to snapshots still
    in flight. Pass ``directory`` to :func:`synthesize_ema` afterwards.
    """

    method = "PostHocEMA"

    def __init__(self, optimizer: Optimizer, sigma_rels: Optional[Sequence[float]] = None, every: int = 1,
                 start: int = 0, *, snapshot_every: int, directory: Union[str, "os.PathLike[str]"],
                 snapshot_dtype: torch.dtype = torch.float16, gammas: Optional[Sequence[float]] = None,
                 module: Optional[nn.Module] = None, average_buffers: bool = False,
                 average_dtype: Optional[torch.dtype] = None) -> None:
        snapshot_every = _check_int("snapshot_every", snapshot_every, 1)
        every = _check_int("every", every, 1)
        if snapshot_every % every:
            raise ValueError(f"snapshot_every ({snapshot_every}) must be a multiple of every ({every}): a "
                             "snapshot's time is the step of a sample")
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        if snapshot_dtype not in _SNAPSHOT_DTYPES:
            raise TypeError(f"snapshot_dtype must be one of {', '.join(map(str, _SNAPSHOT_DTYPES))}, "
                            f"got {snapshot_dtype!r}")
        if sigma_rels is None and gammas is None:
            sigma_rels = (0.05, 0.28)
        super().__init__(optimizer, sigma_rels, every, start, gammas=gammas, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype)
        if self._dtensor_params:
            raise ValueError("PostHocEMA does not save sharded (DTensor/FSDP2) parameters yet: gather them or use "
                             "PowerEMA")
        self.snapshot_every = snapshot_every
        self.directory = os.fspath(directory)
        self.snapshot_dtype = snapshot_dtype
        os.makedirs(self.directory, exist_ok=True)
        self._writer: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: List[concurrent.futures.Future] = []

    def _config(self) -> Dict[str, Any]:
        return {**super()._config(), "snapshot_every": self.snapshot_every}

    def _writes(self) -> bool:
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _position_done(self, position: int) -> None:
        super()._position_done(position)
        rel = position - self.start
        if rel > 0 and rel % self.snapshot_every == 0 and self.num_averaged > 0:
            self._snapshot(position)

    def _snapshot(self, position: int) -> None:
        self._raise_failed_writes()
        if not self._writes():
            return
        names = [self._position_name(i) for i in range(len(self._averages))]
        if self._param_names is not None:
            names = list(self._param_names) + list(self._buffer_names)
        with torch.no_grad():  # the copy training waits for; torch.save runs in the background
            profiles = [[a.detach().to(device="cpu", dtype=self.snapshot_dtype, copy=True) for a in self._profile(k)]
                        for k in range(self.num_profiles)]
        data = {"format": "wavg_ext.posthoc_ema/1", "time": position, "sigma_rels": list(self.sigma_rels),
                "gammas": list(self.gammas), "num_params": self._num_params, "names": names, "profiles": profiles}
        path = os.path.join(self.directory, f"{_PREFIX}{position:010d}.pt")
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wavg_ext_posthoc")
        self._pending.append(self._writer.submit(_save_atomically, data, path))

    def _raise_failed_writes(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()  # raises the write's exception

    def wait(self) -> None:
        """Blocks until every snapshot taken so far is written; raises a failed write's error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def state_dict(self, optimizer: bool = True) -> Dict[str, Any]:
        self.wait()
        return super().state_dict(optimizer)

    def __getstate__(self) -> Dict[str, Any]:
        self.wait()
        state = super().__getstate__()
        state["_writer"], state["_pending"] = None, []
        return state


def _save_atomically(data: Dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    torch.save(data, tmp)
    os.replace(tmp, path)  # a reader never sees half a snapshot


def _snapshots(directory: Union[str, "os.PathLike[str]"]) -> List[str]:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"synthesize_ema: directory must be a path, got {type(directory).__name__}")
    if not os.path.isdir(directory):
        raise ValueError(f"synthesize_ema: {os.fspath(directory)!r} is not a directory")
    paths = sorted(glob.glob(os.path.join(os.fspath(directory), f"{_PREFIX}*.pt")))
    if not paths:
        raise ValueError(f"synthesize_ema: {os.fspath(directory)!r} holds no {_PREFIX}*.pt snapshots")
    return paths


@torch.no_grad()
def synthesize_ema(directory: Union[str, "os.PathLike[str]"], sigma_rel: float,
                   into: Union[nn.Module, Sequence[torch.Tensor]], time: Optional[int] = None) -> torch.Tensor:
    """Writes into ``into`` the power-function EMA of width ``sigma_rel`` at step ``time``
    (default: the last snapshot's), synthesized from the snapshots :class:`PostHocEMA` saved
    in ``directory`` (those taken up to ``time``). ``into``: a module (matched by the
    snapshots' names, buffers included, when PostHocEMA had ``module=``; else by position
    against its parameters) or a list of tensors (by position, the parameters). Returns the
    float64 coefficients, one per (snapshot, profile), snapshot-major.
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"synthesize_ema: sigma_rel must be a number in (0, {MAX_SIGMA_REL:.6f}), got {sigma_rel!r}")
    paths = _snapshots(directory)
    heads, loaded = [], []
    for i, path in enumerate(paths):  # each file unpickled once (memory-mapped: no tensor read yet)
        data = load_checkpoint(path, f"snapshot {path}")
        if data.get("format") != "wavg_ext.posthoc_ema/1":
            raise ValueError(f"synthesize_ema: {path} is not a PostHocEMA snapshot")
        heads.append((int(data["time"]), list(data["sigma_rels"]), int(data["num_params"]), list(data["names"])))
        loaded.append(data)
    if time is None:
        time = heads[-1][0]
    elif isinstance(time, bool) or not isinstance(time, int) or time < 1:
        raise ValueError(f"synthesize_ema: time must be an int >= 1, got {time!r}")
    used = [(d, h) for d, h in zip(loaded, heads) if h[0] <= time]
    del loaded
    if not used:
        raise ValueError(f"synthesize_ema: no snapshot was taken at or before step {time}")
    num_params, names = used[0][1][2], used[0][1][3]
    if any(h[2] != num_params or h[3] != names for _, h in used):
        raise ValueError("synthesize_ema: the snapshots in the directory come from different models")
    times = [float(h[0]) for _, h in used for _ in h[1]]
    sigmas = [s for _, h in used for s in h[1]]
    coeffs = posthoc_coefficients(times, sigmas, float(time), float(sigma_rel))
    # The destination tensors, checked before anything is read or written.
    if isinstance(into, nn.Module):
        if all(not n.startswith(("parameter ", "buffer ")) for n in names):
            own = dict(into.named_parameters())
            own.update(into.named_buffers())
            missing = [n for n in names if n not in own]
            if missing:
                raise ValueError(f"synthesize_ema: into has no parameter/buffer {missing[:5]}")
            dsts = [own[n] for n in names]
        else:
            dsts = list(into.parameters())
            names = names[:num_params]
    elif isinstance(into, torch.Tensor) or not isinstance(into, Sequence):
        raise TypeError(f"synthesize_ema: into must be a module or a list of tensors, got {type(into).__name__}")
    else:
        dsts = list(into)
        names = names[:num_params]
    if len(dsts) != len(names):
        raise ValueError(f"synthesize_ema: into has {len(dsts)} tensors, the snapshots {len(names)}")
    first = used[0][0]["profiles"][0]
    for i, (d, s) in enumerate(zip(dsts, first)):
        if not isinstance(d, torch.Tensor) or d.shape != s.shape or not d.is_floating_point():
            what = list(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"synthesize_ema: into's {names[i]} is {what}, the snapshots' {list(s.shape)}")
    sums = [torch.zeros(s.shape, dtype=torch.float64 if d.dtype == torch.float64 else torch.float32)
            for d, s in zip(dsts, first)]
    k = 0
    for j in range(len(used)):  # one snapshot read at a time (its pages, then dropped)
        data, used[j] = used[j][0], None
        for profile in data["profiles"]:
            tensors = [t if t.dtype != torch.float64 or s.dtype == torch.float64 else t.float()
                       for t, s in zip(profile[:len(dsts)], sums)]
            ops.accumulate_(sums, tensors, float(coeffs[k]))
            k += 1
        del data
    for d, s in zip(dsts, sums):
        d.copy_(s)
    return coeffs
