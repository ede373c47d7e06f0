"""What every benchmark suite of :mod:`wavg_ext.bench` shares.

The shape sets (parameter shapes of real models), the dtype configs, bandwidth ceilings
on flat buffers, the two timing loops (:func:`time_it`: repeated calls of one method;
:func:`time_interleaved`: one call of every method per round), memory release between
methods, byte formatting and the environment a run reports. The suite modules import
this one (and the public wavg_ext modules) only, never each other.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import time
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import nn

from .. import build_info

Shape = Tuple[int, ...]

# --------------------------------------------------------------------------- shape sets


def resnet50_shapes() -> List[Shape]:
    """Parameter shapes of torchvision's ResNet-50, in ``model.parameters()`` order."""
    shapes: List[Shape] = []

    def conv_bn(cout: int, cin: int, k: int) -> None:
        shapes.extend([(cout, cin, k, k), (cout,), (cout,)])  # conv (no bias), bn weight, bias

    conv_bn(64, 3, 7)
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            conv_bn(width, cin, 1)
            conv_bn(width, width, 3)
            conv_bn(width * 4, width, 1)
            if b == 0:  # downsample: 1x1 conv + bn
                conv_bn(width * 4, cin, 1)
            cin = width * 4
    shapes.extend([(1000, 2048), (1000,)])
    _check("resnet50", shapes, 161, 25_557_032)
    return shapes


def gpt2_shapes() -> List[Shape]:
    """Parameter shapes of GPT-2 small (124M) with the lm head tied to wte."""
    d, ff = 768, 3072
    shapes: List[Shape] = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn.c_attn, attn.c_proj
                   (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    _check("gpt2", shapes, 148, 124_439_808)
    return shapes


def many_small_shapes() -> List[Shape]:
    return [(512,)] * 2000


def _check(name: str, shapes: Sequence[Shape], count: int, total: int) -> None:
    got = sum(numel(s) for s in shapes)
    assert len(shapes) == count and got == total, f"{name}: {len(shapes)} tensors, {got} elements"


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


SHAPE_SETS: Dict[str, Callable[[], List[Shape]]] = {
    "resnet50": resnet50_shapes,
    "gpt2": gpt2_shapes,
    "many_small": many_small_shapes,
}

# dtype config -> (param/x dtype, average dtype)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32)}


def short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- methods and ceilings


class Method(NamedTuple):
    run: Callable[[], None]  # one update
    outs: List[torch.Tensor]  # the tensors `run` updates (the averages it keeps)
    note: str = ""


class ParamHolder(nn.Module):
    """An nn.Module whose parameters are the given tensors (storage shared)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


class _Leaf(nn.Module):
    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t, requires_grad=False)


class TreeHolder(nn.Module):
    """An nn.Module whose parameters are the given tensors (storage shared), one per leaf
    module, the leaves nested in blocks of ``fanout`` modules up to the root: a model's
    depth (ResNet-50: 161 tensors, 4 levels) for what walks the module tree each update."""

    def __init__(self, tensors: Sequence[torch.Tensor], fanout: int = 4):
        super().__init__()
        level: List[nn.Module] = [_Leaf(t) for t in tensors]
        while len(level) > fanout:
            level = [nn.Sequential(*level[i:i + fanout]) for i in range(0, len(level), fanout)]
        self.blocks = nn.ModuleList(level)


# Value of every element of a ceiling's output after one call (a correctness check for the tests).
CEILING_RESULT = {"ceiling_copy": 1.0, "ceiling_triad": 2.0, "ceiling_axpy": 2.5}


def ceilings(nbytes: int, device) -> Dict[str, Callable[[], Method]]:
    """Bandwidth ceilings on flat fp32 buffers moving `nbytes` in all (one kernel each).

    copy and triad write a separate output, which on CPUs costs write-allocate traffic
    that in-place updates avoid; axpy (a += s*b) is the in-place 3-stream reference.
    """

    def copy():
        src = torch.full((nbytes // 8,), 1.0, device=device)
        dst = torch.empty_like(src)
        return Method(lambda: dst.copy_(src), [dst], "dst.copy_(src), 2 flat buffers")

    def triad():
        b = torch.full((nbytes // 12,), 1.0, device=device)
        c = torch.full_like(b, 2.0)
        a = torch.empty_like(b)
        return Method(lambda: torch.add(b, c, alpha=0.5, out=a), [a], "torch.add(b, c, alpha, out=a), 3 flat buffers")

    def axpy():
        b = torch.full((nbytes // 12,), 1.0, device=device)
        a = torch.full_like(b, 2.0)
        return Method(lambda: a.add_(b, alpha=0.5), [a], "a.add_(b, alpha): 3 streams in place, 2 flat buffers")

    return {"ceiling_copy": copy, "ceiling_triad": triad, "ceiling_axpy": axpy}


# --------------------------------------------------------------------------- timing


def time_it(fn: Callable[[], object], device: torch.device, repeats: int, min_time: float,
            warmup: int = 2) -> List[float]:
    """Seconds per call of `fn`, after `warmup` calls. At least `repeats` calls, more
    (up to 25x) for fast calls so that they take about `min_time` in all."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        last = time.perf_counter() - t0
    n = max(repeats, min(25 * repeats, int(min_time / max(last, 1e-7))))
    times = []
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int,
                     warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds per call of every function of `fns`, called in turn (one call of each per
    round) so that drifting machine state hits all of them alike; `warmup` rounds untimed."""
    cuda = device.type == "cuda"
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def free(device: torch.device) -> None:
    """Releases the memory of the tensors no longer referenced (between methods)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return dict(device=str(device), device_name=name, loadavg=os.getloadavg(), torch_version=torch.__version__,
                python=platform.python_version(), num_threads=torch.get_num_threads(),
                build_info=build_info(), date=datetime.datetime.now().isoformat(timespec="seconds"))


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
