"""Per-step overhead of the averaging wrappers (part of ``python -m wavg_ext.bench``, suite ``wrappers``).

A case is (method, shape set, param dtype). All methods of a case share one set of
parameters with fixed gradients and one base optimizer (SGD with momentum, foreach):

- ``sgd``: the base ``step()`` alone, the reference;
- ``wavg_ext``: the wrapper's ``step()`` (base step, then its fused averaging op);
- ``averaged_model``: base step, then ``AveragedModel.update_parameters``;
- ``foreach_lerp``: base step, then ``torch._foreach_lerp_`` (what a careful hand-written
  update does; bf16 params are cast to the fp32 averages first);
- ``loop``: base step, then a per-tensor Python loop of ``lerp_``;
- ``wavg_ext_op_only``: the wrapper's averaging call alone (no base step; an ``ops.Plan``
  call, as the wrapper's samples are), which
  shows the averaging cost when it is smaller than the base step's run-to-run noise
  (many small tensors).

Calls are interleaved (one call of every method per round) so that drifting machine
state hits all of them alike; overhead = median(method) − median(sgd). The floor of the
averaging is the bytes it must move (read average and weights, write the average) over
the in-place triad bandwidth measured in the same run on flat buffers of that size.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import ops
from ..optim import EMA, SWA
from . import common

EMA_DECAY = 0.999
Averages = Callable[[], List[torch.Tensor]]  # returns the averages a method keeps


@dataclass(frozen=True)
class WrapperCase:
    method: str  # "SWA" (running mean, every step) or "EMA"
    shapes: str  # a common.SHAPE_SETS key
    dtype: str  # a common.DTYPES key: params and their averages

    @property
    def id(self) -> str:
        return f"step-{self.method}-{self.shapes}-{self.dtype}"

    @property
    def x_dtype(self) -> torch.dtype:
        return common.DTYPES[self.dtype][0]

    @property
    def avg_dtype(self) -> torch.dtype:
        return common.DTYPES[self.dtype][1]

    def floor_bytes(self) -> int:
        n = sum(common.numel(s) for s in common.SHAPE_SETS[self.shapes]())
        return n * (2 * common.itemsize(self.avg_dtype) + common.itemsize(self.x_dtype))


def all_cases(quick: bool = False) -> List[WrapperCase]:
    shape_dtypes = [("resnet50", "fp32"), ("many_small", "fp32"), ("gpt2", "bf16")]
    if quick:
        shape_dtypes = shape_dtypes[:2]
    return [WrapperCase(m, s, d) for s, d in shape_dtypes for m in ("SWA", "EMA")]


class Setup:
    """Parameters with fixed gradients, the shared base optimizer and every method's step."""

    def __init__(self, case: WrapperCase, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        shapes = common.SHAPE_SETS[case.shapes]()
        self.case = case
        self.params = [torch.nn.Parameter(torch.randn(s, generator=g, device=device, dtype=case.x_dtype))
                       for s in shapes]
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 1e-3
        # A tiny LR keeps the weights (and so the work) the same over thousands of steps.
        self.base = torch.optim.SGD(self.params, lr=1e-6, momentum=0.9, foreach=True)

    def methods(self, names: Sequence[str] = ()) -> Dict[str, Tuple[Callable[[], None], Averages]]:
        """name -> (one step, the averages it keeps). Built in order; each keeps its own averages."""
        case, params, base = self.case, self.params, self.base
        ema = case.method == "EMA"
        out: Dict[str, Tuple[Callable[[], None], Averages]] = {}
        want = set(names) or {"sgd", "wavg_ext", "averaged_model", "foreach_lerp", "loop", "wavg_ext_op_only"}
        if "sgd" in want:
            out["sgd"] = (base.step, lambda: [])
        if "wavg_ext" in want:
            wrapper = EMA(base, decay=EMA_DECAY) if ema else SWA(base, every=1)
            out["wavg_ext"] = (wrapper.step, wrapper.averaged_parameters)
        if "averaged_model" in want:
            holder = common.ParamHolder([p.detach() for p in params])
            am = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY) if ema else None)

            def am_step() -> None:
                base.step()
                am.update_parameters(holder)

            out["averaged_model"] = (am_step, lambda: [p.detach() for p in am.module.parameters()])
        xs = [p.detach() for p in params]
        mixed = case.x_dtype != case.avg_dtype
        if "wavg_ext_op_only" in want:
            op_avgs = [x.to(case.avg_dtype, copy=True) for x in xs]
            # (through an ops.Plan, as the wrapper's samples run)
            plan = ops.Plan("ema_" if ema else "running_mean_", op_avgs, xs)
            scalar = 1.0 - EMA_DECAY if ema else 1

            def op_only() -> None:
                plan(scalar)
            out["wavg_ext_op_only"] = (op_only, lambda: op_avgs)
        for kind in ("foreach_lerp", "loop"):
            if kind not in want:
                continue
            avgs = [x.to(case.avg_dtype, copy=True) for x in xs]
            count = [1]

            def step(kind=kind, avgs=avgs, count=count) -> None:
                base.step()
                w = (1.0 - EMA_DECAY) if ema else 1.0 / (count[0] + 1)
                count[0] += 1
                if kind == "foreach_lerp":
                    torch._foreach_lerp_(avgs, [x.to(case.avg_dtype) for x in xs] if mixed else xs, w)
                elif mixed:
                    for a, x in zip(avgs, xs):
                        a.add_(x.float() - a, alpha=w)
                else:
                    for a, x in zip(avgs, xs):
                        a.lerp_(x, w)

            out[kind] = (step, lambda avgs=avgs: avgs)
        return out


def run_case(case: WrapperCase, device: torch.device, rounds: int, quick: bool = False) -> List[dict]:
    setup = Setup(case, device)
    names = ["sgd", "wavg_ext", "averaged_model", "foreach_lerp", "loop", "wavg_ext_op_only"]
    if quick or case.shapes == "gpt2":
        names.remove("loop")  # per-tensor loops on big models only confirm what the ops bench shows
    fns = {k: v[0] for k, v in setup.methods(names).items()}
    floor_bytes = case.floor_bytes()
    axpy = common.ceilings(floor_bytes, device)["ceiling_axpy"]()
    fns["floor_axpy"] = axpy.run
    times = common.time_interleaved(fns, device, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["floor_axpy"]
    rows = []
    for name in fns:
        if name == "floor_axpy":
            continue
        over = med[name] - (0.0 if name == "wavg_ext_op_only" else med["sgd"])
        rows.append(dict(case=case.id, method=name, wrapper=case.method, shapes=case.shapes, dtype=case.dtype,
                         rounds=rounds, step_ms=med[name] * 1e3, overhead_ms=over * 1e3,
                         floor_ms=floor * 1e3, floor_bytes=floor_bytes,
                         floor_gbps=floor_bytes / floor / 1e9,
                         overhead_vs_floor=(over / floor) if name != "sgd" else None))
    del setup, fns
    common.free(device)
    return rows


def format_case(case: WrapperCase, rows: List[dict]) -> str:
    r0 = rows[0]
    shapes = common.SHAPE_SETS[case.shapes]()
    what = f"EMA(decay={EMA_DECAY})" if case.method == "EMA" else "SWA(every=1)"
    lines = [f"{case.id}: {what} on {case.shapes} ({len(shapes)} tensors), params {case.dtype}, averages "
             f"{common.short(case.avg_dtype)}; floor {r0['floor_ms']:.3f} ms = "
             f"{common.fmt_bytes(r0['floor_bytes'])} at {r0['floor_gbps']:.1f} GB/s (in-place triad)",
             f"  {'method':<16}{'step ms':>10}{'overhead ms':>13}{'x floor':>9}"]
    for r in rows:
        x = "" if r["overhead_vs_floor"] is None else f"{r['overhead_vs_floor']:.2f}x"
        over = "" if r["method"] == "sgd" else f"{r['overhead_ms']:.3f}"
        lines.append(f"  {r['method']:<16}{r['step_ms']:>10.3f}{over:>13}{x:>9}")
    return "\n".join(lines)
