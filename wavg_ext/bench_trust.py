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
- ``nonfinite_flag``: ``skip_nonfinite``'s fused NaN/inf check (reads the weights once:
  1/3 of the plain op's bytes);
- ``gated_ema_``: ``skip_nonfinite``'s whole update: the check, the device-side gate and
  the gated EMA call.

Each row gives the median time, its ratio to ``ema_`` and to its own bytes-moved floor
(bytes at the triad bandwidth measured in the same rounds).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from . import bench, ops
from .optim import EMA

WEIGHT = 1e-3
# Bytes moved per element relative to the plain update (read avg and x, write avg).
STREAMS = {"ema_": 3, "follow_check": 0, "ema_f64_avg": 2 * 2 + 1, "ema_compensated_": 5, "nonfinite_flag": 1,
           "gated_ema_": 4}


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
    wrapper = EMA(torch.optim.SGD(params, lr=0.0), decay=1.0 - WEIGHT)
    nan = float("nan")
    flag: List[torch.Tensor] = []

    def gated_ema() -> None:
        f = ops.nonfinite_flag(xs)
        ops.ema_(gated, xs, torch.where(f != 0, nan, WEIGHT).to(torch.float64))

    def check() -> None:
        flag[:] = [ops.nonfinite_flag(xs)]

    return {
        "ema_": (lambda: ops.ema_(avgs, xs, WEIGHT), lambda: avgs),
        "follow_check": (wrapper._follow_model, lambda: wrapper._params),
        "ema_f64_avg": (lambda: ops.ema_(avgs64, xs, WEIGHT), lambda: avgs64),
        "ema_compensated_": (lambda: ops.ema_compensated_(comp_avgs, comps, xs, WEIGHT),
                             lambda: [a.double() + c.double() for a, c in zip(comp_avgs, comps)]),
        "nonfinite_flag": (check, lambda: flag[0]),
        "gated_ema_": (gated_ema, lambda: gated),
    }


def run_case(case: TrustCase, device: torch.device, rounds: int, quick: bool = False) -> List[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    shapes = bench.SHAPE_SETS[case.shapes]()
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device=device)) for s in shapes]
    fns = {k: v[0] for k, v in methods(params).items()}
    n = sum(bench.numel(s) for s in shapes)
    plain_bytes = 3 * 4 * n
    fns["floor_axpy"] = bench.ceilings(plain_bytes, device)["ceiling_axpy"]().run
    times = _interleaved(fns, device, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med.pop("floor_axpy")
    rows = []
    for name, t in med.items():
        own_floor = floor * STREAMS[name] / 3
        rows.append(dict(case=case.id, method=name, shapes=case.shapes, tensors=len(shapes), rounds=rounds,
                         ms=t * 1e3, vs_ema=t / med["ema_"], floor_ms=own_floor * 1e3,
                         x_floor=(t / own_floor) if own_floor else None,
                         triad_gbps=plain_bytes / floor / 1e9))
    del fns, params
    bench._free(device)
    return rows


def _interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int) -> Dict[str, List[float]]:
    from .bench_wrappers import time_interleaved
    return time_interleaved(fns, device, rounds, warmup=3)


def format_case(case: TrustCase, rows: List[dict]) -> str:
    r0 = rows[0]
    lines = [f"{case.id}: {r0['tensors']} float32 tensors; plain-op floor {rows[0]['floor_ms']:.3f} ms at "
             f"{r0['triad_gbps']:.1f} GB/s (in-place triad), median of {r0['rounds']} interleaved rounds",
             f"  {'method':<18}{'ms':>10}{'x ema_':>9}{'x floor':>9}"]
    for r in rows:
        xf = "" if r["x_floor"] is None else f"{r['x_floor']:.2f}x"
        lines.append(f"  {r['method']:<18}{r['ms']:>10.3f}{r['vs_ema']:>8.2f}x{xf:>9}")
    return "\n".join(lines)
