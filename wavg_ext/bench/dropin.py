"""The drop-ins against what they replace: ``wavg_ext.AveragedModel.update_parameters`` next
to ``torch.optim.swa_utils.AveragedModel.update_parameters`` (``python -m wavg_ext.bench
--suite dropin``).

Cases: ResNet-50 and GPT-2-small parameter shapes, float32 and bfloat16 parameters (both
classes keep averages in the parameters' dtype: a deep copy of the model), default SWA and
``get_ema_multi_avg_fn(0.999)`` (each class with its own module's function). Both classes
are made from the same model and called in interleaved rounds after their first (copying)
update; the floor is the bytes an update must move (read the average and the parameter,
write the average) at the in-place triad bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
from typing import Dict, List, NamedTuple, Optional

import torch
from torch.optim import swa_utils as torch_swa

from .. import swa_utils
from . import common

EMA_DECAY = 0.999


class DropInCase(NamedTuple):
    shapes: str  # a key of common.SHAPE_SETS
    dtype: torch.dtype  # the parameters' (and the averages') dtype
    fn: str  # "swa" (default) or "ema" (get_ema_multi_avg_fn)

    @property
    def id(self) -> str:
        return f"averaged_model-{self.fn}-{self.shapes}-{common.short(self.dtype)}"


def all_cases(quick: bool = False) -> List[DropInCase]:
    shape_sets = ["resnet50"] if quick else ["resnet50", "gpt2"]
    return [DropInCase(s, d, fn) for s in shape_sets for d in (torch.float32, torch.bfloat16) for fn in ("swa", "ema")]


def models(case: DropInCase, device: torch.device, limit: Optional[int] = None):
    """(the model, torch's AveragedModel, wavg_ext's), both after their first update; the
    model holds the case's first ``limit`` shapes (all by default)."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = common.SHAPE_SETS[case.shapes]()[:limit]
    params = [torch.randn(s, generator=g, device=device).to(case.dtype) for s in shapes]
    holder = common.ParamHolder(params)
    theirs = torch_swa.AveragedModel(
        holder, multi_avg_fn=torch_swa.get_ema_multi_avg_fn(EMA_DECAY) if case.fn == "ema" else None)
    ours = swa_utils.AveragedModel(
        holder, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY) if case.fn == "ema" else None)
    theirs.update_parameters(holder)
    ours.update_parameters(holder)
    return holder, theirs, ours


def run_case(case: DropInCase, device: torch.device, rounds: int) -> List[dict]:
    holder, theirs, ours = models(case, device)
    nbytes = 3 * sum(p.numel() * p.element_size() for p in holder.parameters())
    axpy = common.ceilings(nbytes, device)["ceiling_axpy"]()
    fns: Dict[str, object] = {"torch_averaged_model": lambda: theirs.update_parameters(holder),
                              "wavg_ext_averaged_model": lambda: ours.update_parameters(holder),
                              "ceiling_axpy": axpy.run}
    times = common.time_interleaved(fns, device, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["ceiling_axpy"]
    rows = []
    for name in ("torch_averaged_model", "wavg_ext_averaged_model"):
        rows.append(dict(case=case.id, method=name, shapes=case.shapes, dtype=common.short(case.dtype), fn=case.fn,
                         tensors=len(list(holder.parameters())), bytes=nbytes, rounds=rounds, ms=med[name] * 1e3,
                         floor_ms=floor * 1e3, x_floor=med[name] / floor, gbps=nbytes / med[name] / 1e9,
                         triad_gbps=nbytes / floor / 1e9,
                         speedup_vs_torch=med["torch_averaged_model"] / med[name]))
    del holder, theirs, ours, axpy
    common.free(device)
    return rows


def format_case(case: DropInCase, rows: List[dict]) -> str:
    r0 = rows[0]
    lines = [f"{case.id}: {r0['tensors']} {r0['dtype']} tensors, {common.fmt_bytes(r0['bytes'])} moved per update; "
             f"floor {r0['floor_ms']:.3f} ms at {r0['triad_gbps']:.1f} GB/s (in-place triad, same run), "
             f"median of {r0['rounds']} interleaved rounds",
             f"  {'method':<26}{'ms':>10}{'GB/s':>9}{'x floor':>9}{'vs torch':>10}"]
    for r in rows:
        lines.append(f"  {r['method']:<26}{r['ms']:>10.3f}{r['gbps']:>9.1f}{r['x_floor']:>8.2f}x"
                     f"{r['speedup_vs_torch']:>9.2f}x")
    return "\n".join(lines)
