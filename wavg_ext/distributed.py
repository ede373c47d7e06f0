"""wavg_ext under torch.distributed: DDP, FSDP2 (``fully_shard``) and DTensor shards.

- **DDP** replicates plain tensors: every rank averages its own replica with no extra
  communication (the gradients DDP all-reduced make the replicas identical).
- **FSDP2 / DTensor**: parameters are DTensors. The wrappers run the fused kernels on each
  rank's local shard (:func:`local_tensor`) and keep their averages (and TWA its basis)
  sharded like the parameters; their ``state_dict()`` returns DTensors, so
  ``torch.distributed.checkpoint`` saves and reshards them.
- **Sharded TWA**: a whole-model inner product is the sum of the ranks' local dots, so a
  projection all-reduces k floats (:func:`sharded_dots`), not a D-float vector.

The helpers here are what the wrappers use; they are public for users who build their
own loops on ``wavg_ext.ops``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

__all__ = ["is_dtensor", "local_tensor", "like_param", "basis_like_param", "local_part", "ShardedVectors",
           "update_bn_statistics", "AllReduceCounter"]


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (sharing its storage), or t itself."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (a shard laid out like ``param``'s local tensor) as a DTensor with param's
    mesh, placements and global shape; ``local`` itself for a plain param. Shares storage."""
    if not is_dtensor(param):
        return local
    cls = _dtensor_cls()
    return cls.from_local(local, param.device_mesh, param.placements, run_check=False,
                          shape=param.shape, stride=param.stride())


def basis_like_param(local_rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A basis tensor ``[capacity, *local shape]`` of a DTensor param as a DTensor of global
    shape ``[capacity, *param.shape]`` sharded like the param (its mesh dimensions shard
    the same parameter dimension, one further right); ``local_rows`` for a plain param."""
    if not is_dtensor(param):
        return local_rows
    from torch.distributed.tensor import Shard
    cls = _dtensor_cls()
    placements = [Shard(p.dim + 1) if p.is_shard() else p for p in param.placements]
    shape = (local_rows.shape[0], *param.shape)
    stride = (max(param.numel(), 1), *param.stride())
    return cls.from_local(local_rows, param.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a whole tensor of param's global shape, e.g. from a
    checkpoint) as param's local shard; ``full`` for a plain param. No communication."""
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor
    full = full.to(param.device)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


class ShardedVectors:
    """How the tensors of a whole-model vector are spread over ranks, for inner products.

    Plain tensors and replicated DTensors are whole on every rank; DTensors sharded over one
    dimension of their device mesh hold a part of themselves. An inner product of two such
    vectors is then ``all_reduce(sum of the sharded tensors' local dots) + the whole
    tensors' dots`` over the mesh dimension's process group: one all-reduce of the dots
    (k floats for k dots), whatever the model size. ``group`` is None when nothing is
    sharded (DDP, one process): no communication at all.

    Read-only description (positions index the tensors it was made from): :attr:`group`,
    :attr:`world`, :attr:`is_sharded`, :attr:`sharded`, :attr:`sharded_indices` and
    :attr:`whole_indices`.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self._group = None
        self._world = 1
        sharded: List[bool] = []
        group_key = None
        for i, t in enumerate(tensors):
            shard_dims = []
            if is_dtensor(t):
                shard_dims = [d for d, p in enumerate(t.placements) if p.is_shard()]
                if any(p.is_partial() for p in t.placements):
                    raise ValueError(f"tensor {i} is a DTensor with a Partial placement; only Shard and "
                                     "Replicate placements are supported")
            if len(shard_dims) > 1:
                raise ValueError(f"tensor {i} is sharded over {len(shard_dims)} mesh dimensions; wavg_ext "
                                 "supports DTensors sharded over one mesh dimension (FSDP2, HSDP)")
            sharded.append(bool(shard_dims))
            if shard_dims:
                key = (id(t.device_mesh), shard_dims[0])
                if group_key is None:
                    group_key = key
                    self._group = t.device_mesh.get_group(shard_dims[0])
                    self._world = t.device_mesh.size(shard_dims[0])
                elif key != group_key:
                    raise ValueError(f"tensor {i} is sharded over another mesh dimension than tensor 0's "
                                     "sharded tensors; one whole-model vector needs one process group")

        self._sharded = tuple(sharded)
        self._sh = tuple(i for i, s in enumerate(sharded) if s)
        self._whole = tuple(i for i, s in enumerate(sharded) if not s)

    @property
    def group(self):
        """The process group the sharded tensors are split over (their mesh dimension's),
        None when no tensor is sharded."""
        return self._group

    @property
    def world(self) -> int:
        """The number of ranks in :attr:`group` (1 when nothing is sharded)."""
        return self._world

    @property
    def is_sharded(self) -> bool:
        """Whether any tensor is sharded (inner products then sum over :attr:`group`)."""
        return self._group is not None

    @property
    def sharded(self) -> Tuple[bool, ...]:
        """For each tensor, whether it is sharded (each rank holds a part of it)."""
        return self._sharded

    @property
    def sharded_indices(self) -> Tuple[int, ...]:
        """Positions of the sharded tensors: their local dots are summed over the ranks."""
        return self._sh

    @property
    def whole_indices(self) -> Tuple[int, ...]:
        """Positions of the tensors whole on every rank (plain tensors, replicated DTensors):
        their dots count once, entering the sum over the ranks divided by :attr:`world`."""
        return self._whole

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sums ``partial`` (the local dots) over the ranks holding the shards, in place."""
        if self._group is not None:
            import torch.distributed as dist
            dist.all_reduce(partial, group=self._group)
        return partial

    # The inner-product algorithms of wavg_ext.ops on local shards (lists aligned with the
    # tensors this object was made from: basis rows / partners of the local tensors).

    def dots(self, basis: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """``ops.dots`` of the whole-model vectors: local dots, then one all-reduce of k values.
        Whole (replicated) tensors count once: their dots enter the sum divided by the world size."""
        from . import ops
        if not self.is_sharded:
            return ops.dots(basis, xs, k)
        if not self._whole:
            c = ops.dots(basis, xs, k)
        else:
            c = ops.dots([basis[i] for i in self._sh], [xs[i] for i in self._sh], k)
            c += ops.dots([basis[i] for i in self._whole], [xs[i] for i in self._whole], k).to(c.device) / self.world
        return self.all_reduce(c)

    def norm(self, tensors: Sequence[torch.Tensor]) -> float:
        """Euclidean norm of a whole-model vector (syncs)."""
        return float(self.dots([t.unsqueeze(0) for t in tensors], tensors, 1)) ** 0.5

    def project_(self, grads: Sequence[torch.Tensor], basis: Sequence[torch.Tensor], k: int) -> None:
        """``ops.project_`` on shards: dots, one all-reduce of k values, combine_."""
        from . import ops
        if not self.is_sharded:
            ops.project_(grads, basis, k)
            return
        ops.combine_(grads, basis, self.dots(basis, grads, k), 1.0, 0.0)

    def orthonormalize_(self, basis: Sequence[torch.Tensor], k: int, passes: int = 2) -> float:
        """``ops.orthonormalize_`` on shards: each CGS pass all-reduces k dots, the norm one
        value. Returns the norm before normalizing (syncs)."""
        from . import ops
        if not self.is_sharded:
            return float(ops.orthonormalize_(basis, k, passes))
        row = [b[k] for b in basis]
        earlier = [b[:k] for b in basis]  # rows < k: views that do not overlap row k
        for _ in range(passes if k else 0):
            ops.combine_(row, earlier, self.dots(earlier, row, k), -1.0, 1.0)
        norm = self.norm(row)
        if norm > 0:
            torch._foreach_mul_(row, 1.0 / norm)
        return norm


def update_bn_statistics(model: torch.nn.Module, counts: int, group=None) -> None:
    """Makes every rank's BatchNorm running statistics the ones one process would have
    computed over all ranks' batches (``wavg_ext.update_bn(..., process_group=...)``).

    ``update_bn`` leaves each BN layer's running mean and variance as the cumulative
    average over the batches a rank saw (``counts`` of them); over all ranks' batches that
    average is the count-weighted mean of the ranks' averages. One all-reduce of every
    layer's (count * mean, count * var) and the counts, in float64.
    """
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    device = bns[0].running_mean.device
    parts = [torch.tensor([float(counts)], dtype=torch.float64, device=device)]
    for m in bns:
        parts += [m.running_mean.double() * counts, m.running_var.double() * counts]
    flat = torch.cat([p.reshape(-1) for p in parts])
    dist.all_reduce(flat, group=group)
    total = flat[0].item()
    if total <= 0:
        return
    start = 1
    with torch.no_grad():
        for m in bns:
            n = m.running_mean.numel()
            m.running_mean.copy_(flat[start:start + n] / total)
            m.running_var.copy_(flat[start + n:start + 2 * n] / total)
            start += 2 * n
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(int(total))


class AllReduceCounter:
    """Counts the ``torch.distributed.all_reduce`` calls made while active, and their elements
    (e.g. to check what a sharded TWA step communicates)::

        with AllReduceCounter() as sent:
            opt.step()
        assert (sent.calls, sent.numel) == (1, opt.num_basis)
    """

    def __init__(self) -> None:
        self.calls = 0
        self.numel = 0
        self._orig = None

    def __enter__(self) -> "AllReduceCounter":
        import torch.distributed as dist
        self._orig = orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.calls += 1
            self.numel += tensor.numel()
            return orig(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist
        dist.all_reduce = self._orig
