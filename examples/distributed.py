"""SWA or TWA under DDP or FSDP2 on CPU: a runnable example.

    torchrun --nproc_per_node=2 examples/distributed.py                    # FSDP2, SWA
    torchrun --nproc_per_node=2 examples/distributed.py --method twa       # FSDP2, sharded TWA
    torchrun --nproc_per_node=2 examples/distributed.py --wrap ddp         # DDP

An MLP with BatchNorm on scikit-learn's digits (embedded, no download), each rank
training on its DistributedSampler shard. The wavg_ext wrapper wraps the optimizer as it
would on one process; under FSDP2 it keeps its averages (or TWA's basis) sharded like the
parameters. At the end the BN statistics are recomputed for the averaged weights across
all ranks (update_bn with process_group), rank 0 reports test accuracy, and every rank
saves its shard of a torch.distributed.checkpoint checkpoint.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import wavg_ext


def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["swa", "twa"], default="swa")
    p.add_argument("--wrap", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--checkpoint", help="directory for the DCP checkpoint (default: a temporary one)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    train_set, test_set = digits()
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler, drop_last=True)
    net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    if args.wrap == "ddp":
        model, plain = DDP(net), net  # update_bn runs on the unwrapped module
    else:
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
        model = plain = net
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = len(loader)
    swa_start = args.epochs // 2
    if args.method == "swa":
        opt = wavg_ext.SWA(base, start=swa_start * steps, every=steps)  # one sample per epoch
    else:
        opt = wavg_ext.TWA(base, capacity=args.epochs)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        if args.method == "twa" and epoch == swa_start:
            opt.start_subspace("mean")  # train in the span of the samples from here on
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if args.method == "twa" and epoch < swa_start:
            opt.collect()

    if args.method == "swa":
        opt.copy_to(plain)  # the average into the model (each rank its shard)
    wavg_ext.update_bn(loader, plain, process_group=dist.group.WORLD)
    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()

    model_sd, optim_sd = get_state_dict(model, base)
    path = args.checkpoint or os.path.join(tempfile.gettempdir(), f"wavg_ext_example_{args.method}_{args.wrap}")
    dcp.save({"model": model_sd, "optim": optim_sd, "wrapper": opt.state_dict(optimizer=False)},
             checkpoint_id=path)
    if rank == 0:
        what = f"TWA in the span of {opt.num_basis} samples" if args.method == "twa" else \
            f"SWA of {opt.num_averaged} samples"
        print(f"{args.wrap} on {world} ranks, {what}: test accuracy {100 * accuracy:.2f}% "
              f"({len(y)} images); checkpoint in {path}")
    dist.barrier()  # every rank done with its collectives before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
