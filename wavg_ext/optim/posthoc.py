"""Post-hoc EMA (Karras et al. 2024, EDM2, section 3.2 and appendix C.3): save the
power-function EMA profiles during training, choose the EMA width afterwards.

:class:`PostHocEMA` is a :class:`~wavg_ext.PowerEMA` that every ``snapshot_every`` steps
saves its profiles (cast to ``snapshot_dtype``) to ``directory``; a background thread
writes the files, so training waits only for the device-to-host copy. Under DDP only
rank 0 writes; under FSDP2 every rank writes its own shards (``...<step>.rank<r>-of-<w>.pt``).

:func:`synthesize_ema` reads such a directory, solves EDM2's least-squares problem in
float64 for the coefficients of the snapshots whose combination is the power-function
EMA of the requested ``sigma_rel`` at the last snapshot's time
(:func:`wavg_ext.power_ema.posthoc_coefficients`), and streams the snapshots one at a
time through the fused ``ops.accumulate_`` into float32 sums: memory of one model plus
one snapshot. From sharded snapshots it synthesizes into the same sharded model (each
rank reads its own files) or into a whole model in one process (the shards put together).
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

from .. import ops
from ..distributed import is_dtensor, local_tensor
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
        for i, p in enumerate(self._params):
            if is_dtensor(p) and (p.device_mesh.ndim != 1 or len(p.placements) != 1 or
                                  not p.placements[0].is_shard(0)):
                raise ValueError(f"PostHocEMA saves DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2's "
                                 f"fully_shard); {self._position_name(i)} has placements {p.placements} on a "
                                 f"{p.device_mesh.ndim}-D mesh")
        self.snapshot_every = snapshot_every
        self.directory = os.fspath(directory)
        self.snapshot_dtype = snapshot_dtype
        os.makedirs(self.directory, exist_ok=True)
        self._writer: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: List[concurrent.futures.Future] = []

    def _config(self) -> Dict[str, Any]:
        return {**super()._config(), "snapshot_every": self.snapshot_every}

    def _ranks(self) -> Optional[Tuple[int, int]]:
        """(rank, world) when every rank saves its own shards (sharded parameters under
        torch.distributed), else None."""
        dist = torch.distributed
        if self._dtensor_params and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return None

    def _writes(self) -> bool:
        dist = torch.distributed
        return self._ranks() is not None or not (dist.is_available() and dist.is_initialized()) or \
            dist.get_rank() == 0

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
        ranks = self._ranks()
        suffix = ""
        if ranks is not None:
            rank, world = ranks
            params = list(self._params) + [None] * (len(self._averages) - self._num_params)
            # Where this rank's shard of each tensor starts in dim 0 (torch.chunk's split, as
            # fully_shard's); None: a whole tensor on every rank (buffers, unsharded parameters).
            offsets = [None if p is None or not is_dtensor(p) else min(rank * -(-p.shape[0] // world), p.shape[0])
                       for p in params]
            shapes = [list(p.shape) if p is not None else list(a.shape) for p, a in zip(params, self._averages)]
            data["shard"] = {"rank": rank, "world": world, "offsets": offsets, "shapes": shapes}
            suffix = f".rank{rank:05d}-of-{world:05d}"
        path = os.path.join(self.directory, f"{_PREFIX}{position:010d}{suffix}.pt")
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


_NAME = re.compile(re.escape(_PREFIX) + r"(\d+)(?:\.rank(\d+)-of-(\d+))?\.pt$")


def _snapshots(directory: Union[str, "os.PathLike[str]"]) -> Tuple[List[List[str]], Optional[int]]:
    """The snapshot files of ``directory`` by time: one path per time, or under sharding one per
    rank (in rank order), and the world size of sharded snapshots (None: whole ones)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"synthesize_ema: directory must be a path, got {type(directory).__name__}")
    if not os.path.isdir(directory):
        raise ValueError(f"synthesize_ema: {os.fspath(directory)!r} is not a directory")
    found: Dict[int, Dict[Optional[int], str]] = {}
    worlds = set()
    for path in glob.glob(os.path.join(os.fspath(directory), f"{_PREFIX}*.pt")):
        m = _NAME.search(os.path.basename(path))
        if m is None:
            continue
        rank = None if m.group(2) is None else int(m.group(2))
        worlds.add(None if m.group(3) is None else int(m.group(3)))
        found.setdefault(int(m.group(1)), {})[rank] = path
    if not found:
        raise ValueError(f"synthesize_ema: {os.fspath(directory)!r} holds no {_PREFIX}*.pt snapshots")
    if len(worlds) > 1:
        raise ValueError(f"synthesize_ema: {os.fspath(directory)!r} mixes whole snapshots and shards of "
                         f"{sorted(w for w in worlds if w)} ranks: one run per directory")
    world = worlds.pop()
    groups = []
    for time in sorted(found):
        ranks = found[time]
        want = [None] if world is None else list(range(world))
        missing = [r for r in want if r not in ranks]
        if missing:
            raise ValueError(f"synthesize_ema: the snapshot of step {time} lacks the shards of rank(s) {missing}")
        groups.append([ranks[r] for r in want])
    return groups, world


def _destinations(into: Any, names: List[str], num_params: int) -> Tuple[List[torch.Tensor], List[str]]:
    """The tensors ``into`` gives for the snapshots' entries ``names`` (checked, nothing written)."""
    if isinstance(into, nn.Module):
        if all(not n.startswith(("parameter ", "buffer ")) for n in names):
            own = dict(into.named_parameters())
            own.update(into.named_buffers())
            missing = [n for n in names if n not in own]
            if missing:
                raise ValueError(f"synthesize_ema: into has no parameter/buffer {missing[:5]}")
            return [own[n] for n in names], names
        return list(into.parameters()), names[:num_params]
    if isinstance(into, torch.Tensor) or not isinstance(into, Sequence):
        raise TypeError(f"synthesize_ema: into must be a module or a list of tensors, got {type(into).__name__}")
    return list(into), names[:num_params]


@torch.no_grad()
def synthesize_ema(directory: Union[str, "os.PathLike[str]"], sigma_rel: float,
                   into: Union[nn.Module, Sequence[torch.Tensor]], time: Optional[int] = None) -> torch.Tensor:
    """Writes into ``into`` the power-function EMA of width ``sigma_rel`` at step ``time``
    (default: the last snapshot's), synthesized from the snapshots :class:`PostHocEMA` saved
    in ``directory`` (those taken up to ``time``). ``into``: a module (matched by the
    snapshots' names, buffers included, when PostHocEMA had ``module=``; else by position
    against its parameters) or a list of tensors (by position, the parameters). Returns the
    float64 coefficients, one per (snapshot, profile), snapshot-major.

    Snapshots of FSDP2-sharded parameters (one file per rank) go into the same sharded model
    (DTensor destinations: each rank reads its own files, as many ranks as saved them) or
    into a whole model in one process (each tensor put together from the ranks' shards).
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"synthesize_ema: sigma_rel must be a number in (0, {MAX_SIGMA_REL:.6f}), got {sigma_rel!r}")
    groups, world = _snapshots(directory)
    heads, loaded = [], []
    for paths in groups:  # each file unpickled once (memory-mapped: no tensor read yet)
        files = []
        for path in paths:
            data = load_checkpoint(path, f"snapshot {path}")
            if data.get("format") != "wavg_ext.posthoc_ema/1":
                raise ValueError(f"synthesize_ema: {path} is not a PostHocEMA snapshot")
            files.append(data)
        data = files[0]
        heads.append((int(data["time"]), list(data["sigma_rels"]), int(data["num_params"]), list(data["names"])))
        loaded.append(files)
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
    dsts, names = _destinations(into, names, num_params)
    if len(dsts) != len(names):
        raise ValueError(f"synthesize_ema: into has {len(dsts)} tensors, the snapshots {len(names)}")
    sharded_into = any(is_dtensor(d) for d in dsts)
    if sharded_into:
        dist = torch.distributed
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world != ranks:
            raise ValueError(f"synthesize_ema: into is sharded over {ranks} rank(s), the snapshots were saved "
                             + (f"by {world} ranks" if world else "whole") + ": synthesize on as many ranks, or "
                             "into a whole model")
        rank = dist.get_rank()
        used = [([files[rank]], h) for files, h in used]  # this rank's own shards
        dsts = [local_tensor(d) for d in dsts]
    first = used[0][0][0]
    if world is not None and not sharded_into:  # whole tensors, put together from the shards
        shapes, offsets = first["shard"]["shapes"], [f["shard"]["offsets"] for f in used[0][0]]
    else:
        shapes, offsets = [list(t.shape) for t in first["profiles"][0]], None
    for i, (d, shape) in enumerate(zip(dsts, shapes)):
        if not isinstance(d, torch.Tensor) or list(d.shape) != shape or not d.is_floating_point():
            what = list(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"synthesize_ema: into's {names[i]} is {what}, the snapshots' {shape}")
    sums = [torch.zeros(shape, dtype=torch.float64 if d.dtype == torch.float64 else torch.float32)
            for d, shape in zip(dsts, shapes)]
    k = 0
    for j in range(len(used)):  # one snapshot read at a time (its pages, then dropped)
        files, used[j] = used[j][0], None
        for p in range(len(files[0]["profiles"])):
            for r, data in enumerate(files):
                views, tensors = [], []
                for i, (t, total) in enumerate(zip(data["profiles"][p][:len(dsts)], sums)):
                    if offsets is not None:  # a shard's rows of the whole tensor (whole ones from rank 0)
                        off = offsets[r][i]
                        if off is None and r > 0:
                            continue
                        total = total if off is None else total.narrow(0, off, t.shape[0])
                    views.append(total)
                    tensors.append(t if t.dtype != torch.float64 or total.dtype == torch.float64 else t.float())
                ops.accumulate_(views, tensors, float(coeffs[k]))
            k += 1
        del files
    for d, s in zip(dsts, sums):
        d.copy_(s)
    return coeffs
