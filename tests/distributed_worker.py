"""Worker for tests/test_distributed.py, started with torchrun (not collected by pytest).

    torchrun --nproc_per_node=2 tests/distributed_worker.py OUT_DIR [--resume-from DIR]

Every scenario trains the same small model on the same global batches, split evenly over
the ranks (DDP / FSDP2 average the gradients: the mean loss over the global batch), and
rank 0 writes what it got to OUT_DIR/<scenario>.pt. Rank 0 also runs each scenario in
one process on the whole global batches (no torch.distributed at all) and saves that as
the reference. The test compares them.

Scenarios: {ddp, fsdp} x {SWA, EMA, PSWA, TWA}; fsdp TWA also counts what its steps
all-reduce; checkpoints: fsdp SWA and TWA save with torch.distributed.checkpoint in the
middle, a fresh model/optimizer/wrapper loads and continues (must equal not stopping);
BN: update_bn(process_group=...) under DDP vs one process over all batches.
With --resume-from (e.g. world size 1 loading a 2-rank checkpoint) it only loads the
checkpoints of DIR and continues, to compare with the 2-rank results.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import wavg_ext

STEPS = 24
GLOBAL_BATCH = 12
LR = 0.05
TWA_COLLECT = (3, 7, 11)  # collect() after these steps
TWA_START = 12  # start_subspace("mean") before this step
CKPT_STEP = 15  # checkpoint before this step


def make_model(seed: int = 0, bn: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(6, 7)] + ([nn.BatchNorm1d(7)] if bn else []) + [nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                                                                        nn.Linear(5, 3)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen))
            for _ in range(STEPS)]


def local(batch, rank: int, world: int):
    n = GLOBAL_BATCH // world
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def make_wrapper(method: str, opt):
    if method == "SWA":
        return wavg_ext.SWA(opt, start=3, every=2)
    if method == "EMA":
        return wavg_ext.EMA(opt, decay=0.8)
    if method == "PSWA":
        return wavg_ext.PSWA(opt, steps_per_epoch=6, sample_fraction=0.5)
    if method == "TWA":
        return wavg_ext.TWA(opt, capacity=4, reg=1e-3)
    if method == "SWA-skip":  # skip_nonfinite + compensated; see poison()
        return wavg_ext.SWA(opt, start=3, every=2, skip_nonfinite=True, compensated=True)
    raise ValueError(method)


POISON_STEP, POISON_ROW = 7, 5  # the sample after step 7 holds a NaN in row 5 of the first weight


def poison(model, wrapper, rank: int, world: int):
    """For SWA-skip: a base-optimizer post hook that writes NaN into one element of the first
    Linear's weight after step POISON_STEP's base step (so that sample holds it), and a function
    that puts the element back after the wrapper's step. Under FSDP2 only the rank whose shard
    holds row POISON_ROW is poisoned: every rank must still skip the sample."""
    weight = next(model.parameters())
    saved = {}

    def locate():
        if not wavg_ext.distributed.is_dtensor(weight):
            return weight.data, POISON_ROW
        rows = weight.to_local()
        per = (weight.shape[0] + world - 1) // world
        owner = POISON_ROW // per
        return (rows, POISON_ROW - owner * per) if owner == rank else (None, None)

    def hook(opt, args, kwargs):
        if wrapper.step_count + 1 == POISON_STEP:
            rows, r = locate()
            if rows is not None:
                saved["value"] = rows[r, 0].item()
                with torch.no_grad():
                    rows[r, 0] = float("nan")

    def restore():
        if "value" in saved:
            rows, r = locate()
            with torch.no_grad():
                rows[r, 0] = saved.pop("value")

    wrapper.optimizer.register_step_post_hook(hook)
    return restore


def train(model, wrapper, data, steps, rank, world):
    restore = poison(model, wrapper, rank, world) if getattr(wrapper, "skip_nonfinite", False) else None
    for i in steps:
        if isinstance(wrapper, wavg_ext.TWA) and i == TWA_START:
            wrapper.start_subspace("mean")
        x, y = local(data[i], rank, world)
        wrapper.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        wrapper.step()
        if restore is not None:
            restore()
        if isinstance(wrapper, wavg_ext.TWA) and i in TWA_COLLECT:
            wrapper.collect()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if wavg_ext.distributed.is_dtensor(t) else t.detach().clone()


def result(model, wrapper):
    out = {"weights": [full(p) for p in model.parameters()]}
    if isinstance(wrapper, wavg_ext.TWA):
        out["coefficients"] = wrapper.coefficients()
        out["num_basis"] = wrapper.num_basis
    elif wrapper.num_averaged:  # PSWA ends on an epoch end: assigned to the weights and reset
        out["averages"] = [full(a) for a in wrapper.averaged_parameters()]
    if getattr(wrapper, "skip_nonfinite", False):
        out["num_skipped"], out["num_averaged"] = wrapper.num_skipped, wrapper.num_averaged
    return out


def build(kind: str, method: str, world: int):
    model = make_model()
    if kind == "ddp":
        model = DDP(model)
    elif kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, make_wrapper(method, opt)


def run_reference(method: str):
    model = make_model()
    wrapper = make_wrapper(method, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    train(model, wrapper, batches(), range(STEPS), 0, 1)
    return result(model, wrapper)


def scenario(kind: str, method: str, rank: int, world: int):
    model, wrapper = build(kind, method, world)
    data = batches()
    comm = []
    if method == "TWA" and kind == "fsdp":
        train(model, wrapper, data, range(TWA_START), rank, world)
        wrapper.start_subspace("mean")
        for i in range(TWA_START, STEPS):
            x, y = local(data[i], rank, world)
            wrapper.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            with wavg_ext.distributed.AllReduceCounter() as counter:
                wrapper.step()
            comm.append((counter.calls, counter.numel))
    else:
        train(model, wrapper, data, range(STEPS), rank, world)
    out = result(model, wrapper)
    out["comm_per_step"] = comm
    # Every rank must hold the same (full) result.
    flat = torch.cat([t.reshape(-1) for t in out["weights"] + out.get("averages", [])])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out["rank_spread"] = max((g - flat).abs().max().item() for g in gathered)
    return out


def snapshots():
    """Three full model state dicts (as saved by a one-process run): the init plus noise."""
    gen = torch.Generator().manual_seed(7)
    base = make_model().state_dict()
    return [{k: v + 0.1 * j * torch.randn(v.shape, generator=gen) for k, v in base.items()} for j in range(3)]


def from_checkpoints_run(kind: str, rank: int, world: int):
    """TWA.from_checkpoints (batch orthonormalization, sharded under FSDP2), then 6 steps."""
    model = make_model()
    if kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    twa = wavg_ext.TWA.from_checkpoints(model, opt, snapshots(), reg=1e-3)
    data = batches()
    for i in range(6):
        x, y = local(data[i], rank, world)
        twa.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        twa.step()
    return result(model, twa)


def checkpoint_state(model, wrapper):
    base = wrapper.optimizer
    model_sd, optim_sd = get_state_dict(model, base)
    return {"model": model_sd, "optim": optim_sd, "wrapper": wrapper.state_dict(optimizer=False)}


def load_checkpoint(model, wrapper, path):
    state = checkpoint_state(model, wrapper)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, wrapper.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    wrapper.load_state_dict(state["wrapper"], optimizer=False)


def checkpoint_scenario(method: str, rank: int, world: int, out_dir: str):
    data = batches()
    path = os.path.join(out_dir, f"ckpt-{method}")
    model, wrapper = build("fsdp", method, world)
    train(model, wrapper, data, range(CKPT_STEP), rank, world)
    dcp.save(checkpoint_state(model, wrapper), checkpoint_id=path)
    train(model, wrapper, data, range(CKPT_STEP, STEPS), rank, world)
    straight = result(model, wrapper)
    model2, wrapper2 = build("fsdp", method, world)
    load_checkpoint(model2, wrapper2, path)
    train(model2, wrapper2, data, range(CKPT_STEP, STEPS), rank, world)
    resumed = result(model2, wrapper2)
    return {"straight": straight, "resumed": resumed}


def resume_scenario(method: str, rank: int, world: int, ckpt_dir: str):
    data = batches()
    model, wrapper = build("fsdp", method, world)
    load_checkpoint(model, wrapper, os.path.join(ckpt_dir, f"ckpt-{method}"))
    train(model, wrapper, data, range(CKPT_STEP, STEPS), rank, world)
    return result(model, wrapper)


def bn_scenario(rank: int, world: int):
    torch.manual_seed(0)
    model = make_model(bn=True)
    data = [local(b, rank, world)[0] for b in batches()]
    used = wavg_ext.update_bn(data, model, process_group=dist.group.WORLD)
    bn = model[1]
    stats = torch.cat([bn.running_mean, bn.running_var])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    out = {"stats": stats, "spread": max((g - stats).abs().max().item() for g in gathered), "used": used,
           "num_batches_tracked": int(bn.num_batches_tracked)}
    if rank == 0:  # one process over all ranks' batches
        ref = make_model(bn=True)
        wavg_ext.update_bn([local(b, r, world)[0] for r in range(world) for b in batches()], ref)
        out["reference"] = torch.cat([ref[1].running_mean, ref[1].running_var])
    return out


def posthoc_scenario(kind: str, rank: int, world: int, out_dir: str):
    """PostHocEMA under DDP (rank 0 writes whole snapshots) or FSDP2 (every rank its shards),
    then synthesize_ema into a model sharded like the trained one and, on rank 0, into a whole
    model in one process; "plain" is the one-process reference."""
    directory = os.path.join(out_dir, f"posthoc-{kind}")
    model = make_model()
    mesh = init_device_mesh("cpu", (world,)) if kind == "fsdp" else None
    if kind == "ddp":
        model = DDP(model)
    elif kind == "fsdp":
        fully_shard(model, mesh=mesh)
    wrapper = wavg_ext.PostHocEMA(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), sigma_rels=(0.05, 0.28),
                                  snapshot_every=2, directory=directory, snapshot_dtype=torch.float32)
    train(model, wrapper, batches(), range(STEPS), rank, world)
    wrapper.wait()
    if kind != "plain":
        dist.barrier()  # every rank's files on disk
    out = {"files": sorted(os.listdir(directory))}
    target = make_model(seed=3)
    if kind == "fsdp":
        fully_shard(target, mesh=mesh)
    out["coefficients"] = wavg_ext.synthesize_ema(directory, 0.1, into=target)
    out["sharded"] = [full(p) for p in target.parameters()]
    if rank == 0:
        whole = make_model(seed=3)
        wavg_ext.synthesize_ema(directory, 0.1, into=whole)
        out["whole"] = [p.detach().clone() for p in whole.parameters()]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--resume-from", help="only load the checkpoints of this directory and continue")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    results = {}
    if args.resume_from:
        for method in ("SWA", "TWA"):
            results[f"resume-{method}"] = resume_scenario(method, rank, world, args.resume_from)
    else:
        for kind in ("ddp", "fsdp"):
            for method in ("SWA", "EMA", "PSWA", "TWA", "SWA-skip"):
                results[f"{kind}-{method}"] = scenario(kind, method, rank, world)
        for method in ("SWA", "TWA"):
            results[f"ckpt-{method}"] = checkpoint_scenario(method, rank, world, args.out_dir)
        results["from-checkpoints-fsdp"] = from_checkpoints_run("fsdp", rank, world)
        for kind in ("ddp", "fsdp"):
            results[f"posthoc-{kind}"] = posthoc_scenario(kind, rank, world, args.out_dir)
        results["bn"] = bn_scenario(rank, world)
    if rank == 0:
        if not args.resume_from:
            for method in ("SWA", "EMA", "PSWA", "TWA", "SWA-skip"):
                results[f"reference-{method}"] = run_reference(method)
            results["reference-from-checkpoints"] = from_checkpoints_run("plain", 0, 1)
            results["reference-posthoc"] = posthoc_scenario("plain", 0, 1, args.out_dir)
        results["world"] = world
        torch.save(results, os.path.join(args.out_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
