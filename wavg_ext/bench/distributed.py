"""Sharded TWA vs the paper's distributed way: per-step communication and time.

    torchrun --nproc_per_node=2 -m wavg_ext.bench.distributed [--shapes resnet50] [--k 10]

Both project a whole-model gradient onto span(P) (k basis rows) on every rank:

- ``wavg_ext`` (sharded, as under FSDP2): each rank holds its 1/world shard of every
  basis row and of the gradient; ``ShardedVectors.project_``: local dots, ONE all-reduce of
  k floats, local combine_.
- ``paper``: the TWA paper's DDP script: every rank holds the whole [k, D] matrix P and
  the whole gradient, projects it (``P @ g``, ``c @ P``) and all-reduces the D-float
  projected gradient.

Also a collect(): CGS2 of one new sample against k rows, sharded (all-reduces of k dots
and one norm) vs the whole vector on every rank. Reported per rank: median ms of 20 calls
(after a warm-up), and the floats each rank sends to all-reduce per call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List

import torch
import torch.distributed as dist

from .. import ops
from ..distributed import AllReduceCounter, ShardedVectors
from . import common


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    dist.barrier()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _floats_per_call(fn: Callable[[], object]) -> int:
    with AllReduceCounter() as c:
        fn()
    return c.numel


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=2 -m wavg_ext.bench.distributed",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="resnet50", choices=sorted(common.SHAPE_SETS))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = common.SHAPE_SETS[args.shapes]()
    d = sum(common.numel(s) for s in shapes)
    k = args.k
    gen = torch.Generator().manual_seed(0)
    full_params = [torch.randn(s, generator=gen) for s in shapes]
    # Sharded like FSDP2 (dim 0 over the mesh), no communication to build them.
    params = [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in full_params]
    vectors = ShardedVectors(params)
    local_params = [t.to_local() for t in params]
    basis = ops.new_basis(local_params, k + 1)
    for b in basis:
        b.normal_(generator=gen)
    for j in range(k):
        vectors.orthonormalize_(basis, j)
    grads = [torch.randn(t.shape, generator=gen) for t in local_params]

    # The paper's way: whole P and whole gradient on every rank.
    full_basis = ops.new_basis(full_params, k + 1)
    for b in full_basis:
        b.normal_(generator=gen)
    for j in range(k):
        ops.orthonormalize_(full_basis, j)
    pmat = torch.cat([b[:k].reshape(k, -1) for b in full_basis], dim=1)
    full_grads = [torch.randn(s, generator=gen) for s in shapes]

    def ours():
        vectors.project_(grads, basis, k)

    def paper():
        g = torch.cat([x.reshape(-1) for x in full_grads])
        gp = (pmat @ g) @ pmat
        dist.all_reduce(gp)
        gp /= world
        start = 0
        for x in full_grads:
            x.copy_(gp[start:start + x.numel()].view_as(x))
            start += x.numel()

    def collect_ours():
        for b, t in zip(basis, local_params):
            b[k].copy_(t)
        vectors.orthonormalize_(basis, k)

    def collect_whole():  # the paper: the whole sample, against k whole rows, on every rank
        for b, t in zip(full_basis, full_params):
            b[k].copy_(t)
        ops.orthonormalize_(full_basis, k)

    rows: List[tuple] = []
    for name, fn in (("project: wavg_ext sharded", ours), ("project: paper (D-float all-reduce)", paper),
                     ("collect: wavg_ext sharded CGS2", collect_ours),
                     ("collect: whole vector on every rank", collect_whole)):
        floats = _floats_per_call(fn)
        ms = _time(fn, args.repeats)
        rows.append((name, ms, floats))
    if rank == 0:
        print(f"wavg_ext.bench.distributed: {world} ranks (gloo, CPU, {torch.get_num_threads()} thread(s) each), "
              f"{args.shapes}: D = {d:,} parameters, k = {k}; each rank holds 1/{world} of every row (sharded) "
              "or all of it (paper)")
        print(f"  {'method':<38}{'ms/call':>10}{'floats all-reduced':>20}{'bytes':>14}")
        for name, ms, floats in rows:
            print(f"  {name:<38}{ms:>10.2f}{floats:>20,}{4 * floats:>14,}")
    dist.barrier()  # every rank done with its collectives before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
