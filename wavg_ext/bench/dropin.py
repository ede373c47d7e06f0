"""The drop-ins against what they replace (``python -m wavg_ext.bench --suite dropin``):
``wavg_ext.AveragedModel.update_parameters`` next to ``torch.optim.swa_utils.AveragedModel``'s,
and ``wavg_ext.ModelEMA.update`` next to timm's ``ModelEmaV3.update`` (timm's own class when
it imports, else its update re-implemented as timm 1.0 writes it: ``_foreach_lerp_`` over the
floating-point state_dict values), diffusers' ``EMAModel.step`` (foreach on and off) and
ema-pytorch's ``EMA.update`` where those are installed. Power-function EMA cases
(``power_ema``): ``ops.ema_many_`` updating two profiles from one read of the weights,
against two ``ema_`` calls, one ``ema_`` (the yardstick: the fused op's floor is
(2P + 1) / 3 = 5/3 of it) and ema-pytorch's ``PostHocEMA.update`` (one ``KarrasEMA`` per
profile: a per-tensor ``lerp_`` loop and a host sync each) where it is installed. LAWA cases
(``lawa``): one window sample (``ops.window_push_`` on a ring of 4 slots plus the mean into
float32 averages) against the same update with per-tensor torch ops and with ``_foreach``
ops.

Cases: ResNet-50 and GPT-2-small parameter shapes, float32 and bfloat16 parameters (both
classes keep averages in the parameters' dtype: a deep copy of the model), default SWA and
``get_ema_multi_avg_fn(0.999)`` (each class with its own module's function). Both classes
are made from the same model and called in interleaved rounds after their first (copying)
update; the floor is the bytes an update must move (read the average and the parameter,
write the average) at the in-place triad bandwidth measured in the same run.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch.optim import swa_utils as torch_swa

from .. import model_ema, ops, swa_utils
from ..power_ema import power_ema_beta, sigma_rel_to_gamma
from . import common

EMA_DECAY = 0.999


class DropInCase(NamedTuple):
    shapes: str  # a key of common.SHAPE_SETS
    dtype: torch.dtype  # the parameters' (and the averages') dtype
    fn: str  # "swa" (default) or "ema" (get_ema_multi_avg_fn)

    @property
    def id(self) -> str:
        if self.fn in ("model_ema", "power_ema", "lawa"):
            return f"{self.fn}-{self.shapes}-{common.short(self.dtype)}"
        return f"averaged_model-{self.fn}-{self.shapes}-{common.short(self.dtype)}"


def all_cases(quick: bool = False) -> List[DropInCase]:
    """AveragedModel cases (fn "swa", "ema"), ModelEMA cases (fn "model_ema") and the
    two-profile power EMA cases (fn "power_ema") and LAWA window samples (fn "lawa")."""
    shape_sets = ["resnet50"] if quick else ["resnet50", "gpt2"]
    return ([DropInCase(s, d, fn) for s in shape_sets for d in (torch.float32, torch.bfloat16)
             for fn in ("swa", "ema", "model_ema", "power_ema", "lawa")]
            + [DropInCase("many_small", torch.float32, "model_ema")])


LAWA_WINDOW = 4


def lawa_methods(holder: torch.nn.Module) -> Dict[str, common.Method]:
    """name -> one LAWA window sample of ``holder``'s parameters (float64 running sums, a ring
    of LAWA_WINDOW slots in the parameters' dtype, float32 means), each on its own copies; the
    ring position advances with every call."""
    params = [p.detach() for p in holder.parameters()]

    def state():
        return ([torch.zeros_like(p, dtype=torch.float64) for p in params],
                [[torch.zeros_like(p) for p in params] for _ in range(LAWA_WINDOW)],
                [torch.zeros_like(p, dtype=torch.float32) for p in params], [0])

    def fused(sums, ring, avgs, n):
        ops.window_push_(sums, ring[n[0] % LAWA_WINDOW], params)
        n[0] += 1
        ops.scale_copy_(avgs, sums, 1.0 / min(n[0], LAWA_WINDOW))

    def loop(sums, ring, avgs, n):
        slots = ring[n[0] % LAWA_WINDOW]
        n[0] += 1
        scale = 1.0 / min(n[0], LAWA_WINDOW)
        for s, o, x, a in zip(sums, slots, params, avgs):
            s.add_(x).sub_(o)
            o.copy_(x)
            a.copy_(s).mul_(scale)

    def foreach(sums, ring, avgs, n):
        slots = ring[n[0] % LAWA_WINDOW]
        n[0] += 1
        torch._foreach_add_(sums, params)
        torch._foreach_sub_(sums, slots)
        torch._foreach_copy_(slots, params)
        torch._foreach_copy_(avgs, sums)
        torch._foreach_mul_(avgs, 1.0 / min(n[0], LAWA_WINDOW))

    out = {}
    for name, fn in (("wavg_ext_window_push_", fused), ("torch_loop", loop), ("torch_foreach", foreach)):
        st = state()
        out[name] = common.Method(lambda fn=fn, st=st: fn(*st), st[2])
    with torch.no_grad():
        for method in out.values():
            method.run()
    return out


POWER_SIGMA_RELS = (0.05, 0.28)  # EDM2's pair, ema-pytorch's default example


def power_ema_methods(holder: torch.nn.Module, tmpdir: str) -> Dict[str, common.Method]:
    """name -> one two-profile power-EMA update of ``holder``'s parameters (float32 averages
    for ours, as ema_ keeps them; ema-pytorch keeps a copy of the model in its dtype), each
    made from ``holder`` and updated once. Ours use the betas at step 100 of sigma_rels
    (0.05, 0.28); ema-pytorch computes its own from its step counter."""
    params = [p.detach() for p in holder.parameters()]
    weights = [1.0 - power_ema_beta(sigma_rel_to_gamma(s), 100, 1) for s in POWER_SIGMA_RELS]
    avgs = [[p.float().clone() if p.dtype != torch.float64 else p.clone() for p in params] for _ in weights]
    out: Dict[str, common.Method] = {
        "wavg_ext_ema_many_2_profiles": common.Method(lambda: ops.ema_many_(avgs, params, weights), avgs[0]),
        "wavg_ext_2x_ema_": common.Method(
            lambda: [ops.ema_(a, params, w) for a, w in zip(avgs, weights)], avgs[0]),
        "wavg_ext_one_ema_": common.Method(lambda: ops.ema_(avgs[0], params, weights[0]), avgs[0]),
    }
    try:
        from ema_pytorch import PostHocEMA

        theirs = PostHocEMA(holder, sigma_rels=POWER_SIGMA_RELS, update_every=1,
                            checkpoint_every_num_steps=10**9, checkpoint_folder=tmpdir)
        out["ema_pytorch_post_hoc"] = common.Method(
            theirs.update, list(theirs.ema_models[0].ema_model.parameters()))
    except Exception:
        pass
    for method in out.values():
        method.run()
    return out


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


class TimmModelEmaV3Reimpl(torch.nn.Module):
    """timm's ModelEmaV3 (timm 1.0, foreach) re-implemented as its source writes it, for
    where timm does not import (it imports torchvision): get_decay with the warmup form, and
    update = lerp of the floating-point state_dict values, copy of the others (with
    exclude_buffers: lerp of the parameters, copy of the buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, exclude_buffers: bool = False):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.exclude_buffers = exclude_buffers

    def get_decay(self, step: Optional[int] = None) -> float:
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: Optional[int] = None) -> None:
        decay = self.get_decay(step)
        if self.exclude_buffers:
            torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight=1.0 - decay)
            for e, m in zip(self.module.buffers(), model.buffers()):
                e.copy_(m)
            return
        lerp_e, lerp_m = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                lerp_e.append(e)
                lerp_m.append(m)
            else:
                e.copy_(m)
        torch._foreach_lerp_(lerp_e, lerp_m, weight=1.0 - decay)


def model_ema_methods(holder: torch.nn.Module) -> Dict[str, common.Method]:
    """name -> one EMA update of `holder` by that library, and the averages it keeps (each
    made from `holder` and updated once: a copy of its weights)."""
    out: Dict[str, common.Method] = {}
    ours = model_ema.ModelEMA(holder, decay=EMA_DECAY)
    out["wavg_ext_model_ema"] = common.Method(lambda: ours.update(holder), list(ours.module.parameters()))
    try:
        from timm.utils import ModelEmaV3  # imports torchvision

        timm_ema = ModelEmaV3(holder, decay=EMA_DECAY)
        out["timm_model_ema_v3"] = common.Method(lambda: timm_ema.update(holder), list(timm_ema.module.parameters()))
    except Exception:
        ref = TimmModelEmaV3Reimpl(holder, EMA_DECAY)
        out["timm_model_ema_v3_reimpl"] = common.Method(lambda: ref.update(holder), list(ref.module.parameters()))
    try:
        from diffusers.training_utils import EMAModel

        for foreach in (True, False):
            d = EMAModel(holder.parameters(), decay=EMA_DECAY, foreach=foreach)
            out[f"diffusers_ema_model{'_foreach' if foreach else ''}"] = common.Method(
                lambda d=d: d.step(holder.parameters()), d.shadow_params)
    except Exception:
        pass
    try:
        from ema_pytorch import EMA

        e = EMA(holder, beta=EMA_DECAY, update_after_step=0, update_every=1)
        out["ema_pytorch"] = common.Method(e.update, list(e.ema_model.parameters()))
    except Exception:
        pass
    for method in out.values():
        method.run()
    return out


def run_case(case: DropInCase, device: torch.device, rounds: int) -> List[dict]:
    tmp = None
    if case.fn == "power_ema":
        tmp = tempfile.TemporaryDirectory()
        g = torch.Generator(device=device).manual_seed(0)
        holder = common.ParamHolder([torch.randn(s, generator=g, device=device).to(case.dtype)
                                     for s in common.SHAPE_SETS[case.shapes]()])
        fns = {k: m.run for k, m in power_ema_methods(holder, tmp.name).items()}
        baseline = "ema_pytorch_post_hoc" if "ema_pytorch_post_hoc" in fns else "wavg_ext_2x_ema_"
    elif case.fn == "lawa":
        g = torch.Generator(device=device).manual_seed(0)
        holder = common.ParamHolder([torch.randn(s, generator=g, device=device).to(case.dtype)
                                     for s in common.SHAPE_SETS[case.shapes]()])
        fns = {k: m.run for k, m in lawa_methods(holder).items()}
        baseline = "torch_foreach"
    elif case.fn == "model_ema":  # (a module tree: every library walks it each update)
        g = torch.Generator(device=device).manual_seed(0)
        holder = common.TreeHolder([torch.randn(s, generator=g, device=device).to(case.dtype)
                                    for s in common.SHAPE_SETS[case.shapes]()])
        for p in holder.parameters():
            p.requires_grad_(True)  # diffusers copies parameters that need no grad
        fns: Dict[str, Callable[[], object]] = {k: m.run for k, m in model_ema_methods(holder).items()}
        baseline = next(k for k in fns if k.startswith("timm"))
    else:
        holder, theirs, ours = models(case, device)
        fns = {"torch_averaged_model": lambda: theirs.update_parameters(holder),
               "wavg_ext_averaged_model": lambda: ours.update_parameters(holder)}
        baseline = "torch_averaged_model"
    nbytes = 3 * sum(p.numel() * p.element_size() for p in holder.parameters())
    if case.fn == "power_ema":  # read x once, read and write two float32 averages
        nbytes = sum(p.numel() * (p.element_size() + 2 * len(POWER_SIGMA_RELS) * 4) for p in holder.parameters())
    elif case.fn == "lawa":  # sum (float64) and slot read and written, x read; sum read and mean written
        nbytes = sum(p.numel() * (2 * 8 + 3 * p.element_size() + 8 + 4) for p in holder.parameters())
    axpy = common.ceilings(nbytes, device)["ceiling_axpy"]()
    fns["ceiling_axpy"] = axpy.run
    times = common.time_interleaved(fns, device, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med.pop("ceiling_axpy")
    rows = []
    for name, t in med.items():
        rows.append(dict(case=case.id, method=name, shapes=case.shapes, dtype=common.short(case.dtype), fn=case.fn,
                         tensors=len(list(holder.parameters())), bytes=nbytes, rounds=rounds, ms=t * 1e3,
                         floor_ms=floor * 1e3, x_floor=t / floor, gbps=nbytes / t / 1e9, triad_gbps=nbytes / floor / 1e9,
                         baseline=baseline, speedup_vs_torch=med[baseline] / t))
        if case.fn == "power_ema":
            x = common.itemsize(case.dtype)  # (float32 averages: 4 bytes)
            rows[-1]["x_one_ema"] = t / med["wavg_ext_one_ema_"]
            rows[-1]["floor_x_one_ema"] = (x + 2 * len(POWER_SIGMA_RELS) * 4) / (x + 2 * 4)
    del holder, fns, axpy
    if tmp is not None:
        tmp.cleanup()
    common.free(device)
    return rows


def format_case(case: DropInCase, rows: List[dict]) -> str:
    r0 = rows[0]
    lines = [f"{case.id}: {r0['tensors']} {r0['dtype']} tensors, {common.fmt_bytes(r0['bytes'])} moved per update; "
             f"floor {r0['floor_ms']:.3f} ms at {r0['triad_gbps']:.1f} GB/s (in-place triad, same run), "
             f"median of {r0['rounds']} interleaved rounds",
             f"  {'method':<30}{'ms':>10}{'GB/s':>9}{'x floor':>9}  speedup vs {r0['baseline']}"]
    for r in rows:
        lines.append(f"  {r['method']:<30}{r['ms']:>10.3f}{r['gbps']:>9.1f}{r['x_floor']:>8.2f}x"
                     f"{r['speedup_vs_torch']:>9.2f}x" + (f"  {r['x_one_ema']:.2f}x one ema_" if "x_one_ema" in r else ""))
    if case.fn == "power_ema":
        lines.append(f"  (GB/s and x floor count the fused op's bytes for every method; ema_many_'s floor is "
                     f"{r0['floor_x_one_ema']:.2f}x one ema_: its bytes over one EMA's)")
    return "\n".join(lines)
