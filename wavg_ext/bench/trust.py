"""What the trust features cost (part of ``python -m wavg_ext.bench``, suite ``trust``).

A case is a shape set of float32 parameters (``many_small``: 2000 x 512, ``resnet50``).
All methods share the parameters and run interleaved (one call of each per round,
medians), next to the in-place triad on flat buffers of the plain op's bytes:

- ``ema_``: the plain fused EMA update (what a wrapper's sample costs);
- ``follow_check``: the wrappers' per-step check that the averages still follow the
  model (:meth:`WeightAveraging._follow_model`: parameter identity, dtype, device and
  shape against the recorded metadata, in C++);
- ``ema_f64_avg``: the EMA update into float64 averages (the other way not to stagnate);
- ``ema_compensated_``: the update of a compensated float32 average (one more buffer
  read and written: its floor is 5/3 of the plain op's);
- ``ema_stochastic_bf16_avg``: bfloat16 averages of the float32 weights, rounded
  stochastically (the third way: half the averages' memory; its floor is 2/3 of the plain
  op's bytes: read a 2-byte average and a 4-byte weight, write the average);
- ``nonfinite_flag``: ``skip_nonfinite``'s fused NaN/inf check (reads the weights once:
  1/3 of the plain op's bytes);
- ``gated_ema_``: ``skip_nonfinite``'s whole update: the check, the device-side gate and
  the gated EMA call;
- ``sgd``, ``wrapper_step`` and ``wrapper_step_unchecked``: a base SGD step alone, and an
  ``EMA`` wrapper's whole step with and without the model check, on the same parameters
  with fixed gradients (the base step's run-to-run noise hides a difference this small);
- ``check+sample`` and ``sample``: after evicting the caches (streaming a 64 MB buffer, as
  a training step's forward and backward do), the wrapper's check followed by its fused
  update, and the update alone; only the part after the eviction is timed. Their
  difference is what the check adds where it runs: the cache misses on the tensors'
  metadata it takes are then not taken again by the update.

Each row gives the median time, its ratio to ``ema_`` and to its own bytes-moved floor
(bytes at the triad bandwidth measured in the same rounds).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from .. import ops
from ..optim import EMA
from . import common

WEIGHT = 1e-3
# Bytes moved per element relative to the plain update (read avg and x, write avg).
STREAMS = {"ema_": 3, "follow_check": 0, "ema_f64_avg": 2 * 2 + 1, "ema_compensated_": 5,
           "ema_stochastic_bf16_avg": 2, "nonfinite_flag": 1,
           "gated_ema_": 4, "sgd": 0, "wrapper_step": 0, "wrapper_step_unchecked": 0}


@dataclass(frozen=True)
class TrustCase:
    shapes: str

    @property
    def id(self) -> str:
        return f"trust-{self.shapes}-fp32"


def all_cases(quick: bool = False) -> List[TrustCase]:
    return [TrustCase("many_small"), TrustCase("resnet50")]


def methods(params: List[torch.Tensor]) -> Dict[str, Tuple[Callable[[], object], Callable[[], object]]]:
    """name -> (one call, what it leaves: its averages, the flag, ...), each method on its own
    averages (zeros at first) of the same parameters."""
    xs = [p.detach() for p in params]
    avgs = [torch.zeros_like(x) for x in xs]
    avgs64 = [torch.zeros_like(x, dtype=torch.float64) for x in xs]
    comp_avgs = [torch.zeros_like(x) for x in xs]
    comps = [torch.zeros_like(x) for x in xs]
    gated = [torch.zeros_like(x) for x in xs]
    avgs16 = [torch.zeros_like(x, dtype=torch.bfloat16) for x in xs]
    seed = [0]
    wrapper = EMA(torch.optim.SGD(params, lr=0.0), decay=1.0 - WEIGHT)
    nan = float("nan")
    # Whole steps: a tiny LR keeps the weights (and the work) the same over the rounds.
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    base = torch.optim.SGD(params, lr=1e-9, momentum=0.9, foreach=True)
    checked = EMA(base, decay=1.0 - WEIGHT)
    unchecked = EMA(base, decay=1.0 - WEIGHT)
    unchecked._follow_model = lambda: None  # the same step without the check
    flag: List[torch.Tensor] = []

    def gated_ema() -> None:
        f = ops.nonfinite_flag(xs)
        ops.ema_(gated, xs, torch.where(f != 0, nan, WEIGHT).to(torch.float64))

    def stochastic() -> None:
        seed[0] += 1  # a new seed per update, as ModelEMA passes
        ops.ema_stochastic_(avgs16, xs, WEIGHT, seed[0])

    def check() -> None:
        flag[:] = [ops.nonfinite_flag(xs)]

    return {
        "ema_": (lambda: ops.ema_(avgs, xs, WEIGHT), lambda: avgs),
        "follow_check": (wrapper._follow_model, lambda: wrapper._params),
        "ema_f64_avg": (lambda: ops.ema_(avgs64, xs, WEIGHT), lambda: avgs64),
        "ema_compensated_": (lambda: ops.ema_compensated_(comp_avgs, comps, xs, WEIGHT),
                             lambda: [a.double() + c.double() for a, c in zip(comp_avgs, comps)]),
        "ema_stochastic_bf16_avg": (stochastic, lambda: avgs16),
        "nonfinite_flag": (check, lambda: flag[0]),
        "gated_ema_": (gated_ema, lambda: gated),
        "sgd": (base.step, lambda: [base.state[p]["momentum_buffer"] for p in params]),
        "wrapper_step": (checked.step, checked.averaged_parameters),
        "wrapper_step_unchecked": (unchecked.step, unchecked.averaged_parameters),
    }


def run_case(case: TrustCase, device: torch.device, rounds: int, quick: bool = False) -> List[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    shapes = common.SHAPE_SETS[case.shapes]()
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device=device)) for s in shapes]
    fns = {k: v[0] for k, v in methods(params).items()}
    n = sum(common.numel(s) for s in shapes)
    plain_bytes = 3 * 4 * n
    fns["floor_axpy"] = common.ceilings(plain_bytes, device)["ceiling_axpy"]().run
    times = common.time_interleaved(fns, device, rounds, warmup=3)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med.pop("floor_axpy")
    rows = []
    for name, t in med.items():
        own_floor = floor * STREAMS[name] / 3
        rows.append(dict(case=case.id, method=name, shapes=case.shapes, tensors=len(shapes), rounds=rounds,
                         ms=t * 1e3, vs_ema=t / med["ema_"], floor_ms=own_floor * 1e3,
                         x_floor=(t / own_floor) if own_floor else None,
                         triad_gbps=plain_bytes / floor / 1e9))
    rows += _in_context(params, device, rounds, case)
    del fns, params
    common.free(device)
    return rows


def _in_context(params: List[torch.Tensor], device: torch.device, rounds: int, case: TrustCase) -> List[dict]:
    """Medians of (check + sample) and (sample) timed right after a cache eviction, interleaved."""
    wrapper = EMA(torch.optim.SGD(params, lr=0.0), decay=1.0 - WEIGHT)
    wrapper.step()  # positions 0 and 1: the average exists, later samples are EMA updates
    flush = torch.ones(16 * 2**20, device=device)  # 64 MB
    cuda = device.type == "cuda"
    times: Dict[str, List[float]] = {"check+sample": [], "sample": []}
    for r in range(5 * rounds + 3):  # (a difference of tens of us: more rounds)
        for name in times:
            flush.add_(1.0)
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if name == "check+sample":
                wrapper._follow_model()
            wrapper._sample()
            if cuda:
                torch.cuda.synchronize(device)
            if r >= 3:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [dict(case=case.id, method=k, shapes=case.shapes, tensors=len(params), rounds=rounds, ms=v * 1e3,
                 vs_ema=None, floor_ms=0.0, x_floor=None, triad_gbps=None) for k, v in med.items()]


def format_case(case: TrustCase, rows: List[dict]) -> str:
    r0 = rows[0]
    lines = [f"{case.id}: {r0['tensors']} float32 tensors; plain-op floor {rows[0]['floor_ms']:.3f} ms at "
             f"{r0['triad_gbps']:.1f} GB/s (in-place triad), median of {r0['rounds']} interleaved rounds",
             f"  {'method':<24}{'ms':>10}{'x ema_':>9}{'x floor':>9}"]
    by = {r["method"]: r["ms"] for r in rows}
    for r in rows:
        xf = "" if r["x_floor"] is None else f"{r['x_floor']:.2f}x"
        vs = "" if r["vs_ema"] is None else f"{r['vs_ema']:.2f}x"
        lines.append(f"  {r['method']:<24}{r['ms']:>10.3f}{vs:>9}{xf:>9}")
    check = by["check+sample"] - by["sample"]
    lines.append(f"  model check after a cache eviction: {check * 1e3:+.1f} us = {100 * check / by['sample']:+.1f}% "
                 f"of the sample's {by['sample']:.3f} ms")
    return "\n".join(lines)
