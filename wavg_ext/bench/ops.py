"""Benchmark of the fused wavg_ext ops against pure-PyTorch ways of doing the same update.

Run ``python -m wavg_ext.bench [--quick] [--suite all|ops|wrappers|twa|trust] [--device cpu|cuda]
[--json PATH] [--plot PATH] [--repeats N] [--cases SUBSTR[,SUBSTR...]]``.

Suites: ``ops`` (below), ``wrappers`` (the optimizer wrappers' per-step overhead,
:mod:`wavg_ext.bench.wrappers`), ``twa`` (:mod:`wavg_ext.bench.twa`) and ``trust`` (what
following the model, float64 and compensated averages and ``skip_nonfinite`` cost,
:mod:`wavg_ext.bench.trust`).

Cases are (op, shape set, dtype config). Every method of a case runs on the same data:
the fused op, the pure-PyTorch baselines (``torch._foreach_*`` forms, a per-tensor Python
loop, ``torch.optim.swa_utils.AveragedModel``) and bandwidth ceilings measured on flat
fp32 buffers that move the same number of bytes (copy: 2 streams; triad out of place and
axpy in place: 3 streams; in-place ops are compared with axpy, scale_copy_ with copy).
GB/s are computed from the *minimum* bytes the op must move, for every method alike, so
they compare directly. The case definitions below are shared with
``benchmarks/test_bench_ops.py``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import build_info, ops

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
SCALARS = {"ema_": 0.001, "running_mean_": 5, "accumulate_": 1.0, "scale_copy_": 0.25}
SCALAR_NAMES = {"ema_": "weight", "running_mean_": "count", "accumulate_": "alpha", "scale_copy_": "scale"}
STREAMS = {"ema_": 3, "running_mean_": 3, "accumulate_": 3, "scale_copy_": 2}


@dataclass(frozen=True)
class Case:
    op: str
    shapes: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shapes}-{self.dtype}"

    @property
    def x_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def avg_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def scalar(self):
        return SCALARS[self.op]

    @property
    def streams(self) -> int:
        return STREAMS[self.op]

    @property
    def ceiling(self) -> str:
        """The ceiling the op is compared with: the in-place triad (axpy) for the in-place
        3-stream ops, copy for scale_copy_ (2 streams, destination only written). The
        out-of-place triad pays write-allocate reads of its output on CPUs that an
        in-place update does not, so it understates what the memory system can do."""
        return "ceiling_axpy" if self.streams == 3 else "ceiling_copy"

    def min_bytes(self) -> int:
        """Minimum bytes moved: read avg + read x + write avg, or read src + write dst."""
        n = sum(numel(s) for s in SHAPE_SETS[self.shapes]())
        a, x = n * _itemsize(self.avg_dtype), n * _itemsize(self.x_dtype)
        return 2 * a + x if self.streams == 3 else a + x


def short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def all_cases() -> List[Case]:
    cases = [Case(op, s, d) for s in SHAPE_SETS for d in DTYPES for op in ("ema_", "running_mean_")]
    cases += [Case(op, "resnet50", d) for d in DTYPES for op in ("accumulate_", "scale_copy_")]
    return cases


def make_tensors(case: Case, device, seed: int = 0) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Fresh (avgs, xs) from torch.randn with a fixed seed: one tensor per parameter."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = SHAPE_SETS[case.shapes]()
    avgs = [torch.randn(s, generator=g, device=device, dtype=case.avg_dtype) for s in shapes]
    xs = [torch.randn(s, generator=g, device=device, dtype=case.x_dtype) for s in shapes]
    return avgs, xs


def _weight(case: Case) -> float:
    """The lerp weight of ema_ / running_mean_."""
    return case.scalar if case.op == "ema_" else 1.0 / (case.scalar + 1)


@torch.no_grad()
def expected(case: Case, avgs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
             dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """One update of `avgs` computed in float64, rounded to `dtype` (default: avg dtype).

    `avgs` are first rounded to `dtype`, as a method that keeps its averages in that
    dtype (AveragedModel on a bf16 model) starts from them.
    """
    dtype = dtype or case.avg_dtype
    out = []
    for a, x in zip(avgs, xs):
        a, x = a.to(dtype).double(), x.double()
        if case.op in ("ema_", "running_mean_"):
            r = a + _weight(case) * (x - a)
        elif case.op == "accumulate_":
            r = a + case.scalar * x
        else:
            r = case.scalar * x
        out.append(r.to(dtype))
    return out


def tolerances(dtype: torch.dtype) -> dict:
    """assert_close tolerances for one update whose result is stored in `dtype`.

    The absolute bf16/fp16 term covers results near zero: AveragedModel's SWA path rounds
    its tensor weight 1/(n+1) to bf16 along with the averages.
    """
    return dict(rtol=1.6e-2, atol=1e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- methods


class Method(NamedTuple):
    run: Callable[[], None]  # one update
    outs: List[torch.Tensor]  # the tensors `run` updates (the averages it keeps)
    note: str = ""


class _ParamHolder(nn.Module):
    """An nn.Module whose parameters are the given tensors (storage shared)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


def _averaged_model(case: Case, avgs: List[torch.Tensor], xs: List[torch.Tensor]) -> Method:
    model = _ParamHolder(xs)
    multi_avg_fn = get_ema_multi_avg_fn(1.0 - case.scalar) if case.op == "ema_" else None
    swa = AveragedModel(model, multi_avg_fn=multi_avg_fn)  # deep copy: averages in the model's dtype
    swa.update_parameters(model)  # the first call only copies; keep it out of the timing
    outs = [p.detach() for p in swa.module.parameters()]
    torch._foreach_copy_(outs, avgs)  # start from the same averages as every other method
    if case.op == "running_mean_":
        swa.n_averaged.fill_(case.scalar)
    note = "SWA default" if case.op == "running_mean_" else "get_ema_multi_avg_fn"
    if outs[0].dtype != case.avg_dtype:
        note += f"; averages kept in {short(outs[0].dtype)} (model dtype)"
    return Method(lambda: swa.update_parameters(model), outs, note)


def methods(case: Case, avgs: List[torch.Tensor], xs: List[torch.Tensor],
            quick: bool = False) -> Dict[str, Callable[[], Method]]:
    """name -> builder of a Method updating `avgs` (or its own copy) from `xs`.

    Builders are lazy so that a method's extra memory (AveragedModel's copy) lives only
    while it is measured. With `quick`, the slowest baselines are left out on gpt2.
    """
    op, s = case.op, case.scalar
    mixed = case.x_dtype != case.avg_dtype
    m: Dict[str, Callable[[], Method]] = {
        "fused": lambda: Method(lambda: getattr(ops, op)(avgs, xs, s), avgs),
    }
    if op in ("ema_", "running_mean_"):
        w = _weight(case)
        if mixed:
            m["foreach_lerp"] = lambda: Method(
                lambda: torch._foreach_lerp_(avgs, [x.to(case.avg_dtype) for x in xs], w), avgs,
                "incl. x.float() casts")
            m["loop"] = lambda: Method(lambda: [a.add_(x.float() - a, alpha=w) for a, x in zip(avgs, xs)],
                                       avgs, "a.add_(x.float() - a, alpha=w)")
        else:
            m["foreach_lerp"] = lambda: Method(lambda: torch._foreach_lerp_(avgs, xs, w), avgs)
            m["loop"] = lambda: Method(lambda: [a.lerp_(x, w) for a, x in zip(avgs, xs)], avgs, "a.lerp_(x, w)")

        def mul_add():
            torch._foreach_mul_(avgs, 1.0 - w)
            torch._foreach_add_(avgs, xs, alpha=w)

        m["foreach_mul_add"] = lambda: Method(mul_add, avgs, "mul_(1-w); add_(x, alpha=w)")
        m["foreach_sub_add"] = lambda: Method(
            lambda: torch._foreach_add_(avgs, torch._foreach_sub(xs, avgs), alpha=w), avgs,
            "add_(_foreach_sub(x, a), alpha=w)")
        m["averaged_model"] = lambda: _averaged_model(case, avgs, xs)
    elif op == "accumulate_":
        m["foreach_add"] = lambda: Method(lambda: torch._foreach_add_(avgs, xs, alpha=s), avgs)
        m["loop"] = lambda: Method(lambda: [a.add_(x, alpha=s) for a, x in zip(avgs, xs)], avgs,
                                   "a.add_(x, alpha)")
    elif op == "scale_copy_":
        def copy_mul():
            torch._foreach_copy_(avgs, xs)
            torch._foreach_mul_(avgs, s)

        m["foreach_copy_mul"] = lambda: Method(copy_mul, avgs, "copy_(x); mul_(s)")
        m["foreach_mul_copy"] = lambda: Method(lambda: torch._foreach_copy_(avgs, torch._foreach_mul(xs, s)),
                                               avgs, "copy_(_foreach_mul(x, s))")
        m["loop"] = lambda: Method(lambda: [torch.mul(x, s, out=a) for a, x in zip(avgs, xs)], avgs,
                                   "torch.mul(x, s, out=a)")
    else:
        raise ValueError(f"unknown op {op!r}")
    if quick and case.shapes == "gpt2":
        m.pop("loop", None)
        m.pop("averaged_model", None)
    return m


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


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def run_case(case: Case, device: torch.device, repeats: int, min_time: float, quick: bool = False) -> List[dict]:
    nbytes = case.min_bytes()
    rows = []

    def measure(name: str, builder: Callable[[], Method]) -> None:
        m = builder()
        t = time_it(m.run, device, repeats, min_time)
        med = statistics.median(t)
        rows.append(dict(case=case.id, op=case.op, shapes=case.shapes, dtype=case.dtype,
                         x_dtype=short(case.x_dtype), avg_dtype=short(m.outs[0].dtype),
                         scalar=case.scalar, method=name, note=m.note, repeats=len(t),
                         median_ms=med * 1e3, min_ms=min(t) * 1e3, bytes=nbytes, gbps=nbytes / med / 1e9))

    for name, builder in ceilings(nbytes, device).items():
        measure(name, builder)
        _free(device)
    avgs, xs = make_tensors(case, device)
    for name, builder in methods(case, avgs, xs, quick).items():
        measure(name, builder)
        _free(device)
    del avgs, xs
    _free(device)

    by = {r["method"]: r for r in rows}
    ceil = by[case.ceiling]["gbps"]
    fused = by["fused"]["median_ms"]
    baselines = [r for r in rows if r["method"] != "fused" and not r["method"].startswith("ceiling")]
    # The fastest baseline is taken over those that keep averages in the case's avg dtype:
    # AveragedModel on a bf16 model keeps bf16 averages, moving fewer bytes for a lossier result.
    best = min((r for r in baselines if r["avg_dtype"] == short(case.avg_dtype)), key=lambda r: r["median_ms"])
    best_any = min(baselines, key=lambda r: r["median_ms"])
    for r in rows:
        r["pct_of_ceiling"] = 100.0 * r["gbps"] / ceil
        r["ceiling"] = case.ceiling
        if r in baselines:
            r["fused_speedup"] = r["median_ms"] / fused
    by["fused"].update(fused_speedup=best["median_ms"] / fused, fastest_baseline=best["method"],
                       fastest_baseline_any_dtype=best_any["method"])
    return rows


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


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def format_case(case: Case, rows: List[dict]) -> str:
    shapes = SHAPE_SETS[case.shapes]()
    n = sum(numel(s) for s in shapes)
    head = (f"{case.id}: {case.op}({SCALAR_NAMES[case.op]}={case.scalar}) on {case.shapes} "
            f"({len(shapes)} tensors, {n / 1e6:.2f} M elements), x {short(case.x_dtype)}, avg "
            f"{short(case.avg_dtype)}, min bytes {_fmt_bytes(case.min_bytes())}, % of {case.ceiling[8:]}")
    lines = [head, f"  {'method':<18}{'median ms':>11}{'GB/s':>9}{'% ceil':>8}{'fused x':>9}  note"]
    for r in rows:
        speed = f"{r['fused_speedup']:.2f}x" if "fused_speedup" in r else ""
        note = r["note"]
        if r["method"] == "fused":
            note = f"fused x = vs fastest baseline ({r['fastest_baseline']})"
        lines.append(f"  {r['method']:<18}{r['median_ms']:>11.3f}{r['gbps']:>9.1f}"
                     f"{r['pct_of_ceiling']:>7.0f}%{speed:>9}  {note}")
    return "\n".join(lines)


def format_summary(results: List[Tuple[Case, List[dict]]]) -> str:
    lines = ["Summary (fused x = fastest baseline time / fused time)",
             f"  {'case':<28}{'fused ms':>10}{'GB/s':>8}{'% ceil':>8}  {'fastest baseline':<18}{'ms':>9}{'fused x':>9}"]
    for case, rows in results:
        f = next(r for r in rows if r["method"] == "fused")
        b = next(r for r in rows if r["method"] == f["fastest_baseline"])
        lines.append(f"  {case.id:<28}{f['median_ms']:>10.3f}{f['gbps']:>8.1f}{f['pct_of_ceiling']:>7.0f}%"
                     f"  {b['method']:<18}{b['median_ms']:>9.3f}{f['fused_speedup']:>8.2f}x")
    return "\n".join(lines)


def plot(results: List[Tuple[Case, List[dict]]], env: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    names = []
    for _, rows in results:
        names += [r["method"] for r in rows if not r["method"].startswith("ceiling") and r["method"] not in names]
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(results)) + 2, 5))
    x, ticks, seen = 0.0, [], set()
    for case, rows in results:
        bars = [r for r in rows if not r["method"].startswith("ceiling")]
        start = x
        for r in bars:
            ax.bar(x, r["gbps"], width=0.8, color=colors[r["method"]],
                   label=r["method"] if r["method"] not in seen else None)
            seen.add(r["method"])
            x += 1
        ceil = next(r for r in rows if r["method"] == case.ceiling)["gbps"]
        ax.hlines(ceil, start - 0.4, x - 0.6, colors="k", linestyles="--",
                  label="ceiling (axpy / copy)" if "ceiling" not in seen else None)
        seen.add("ceiling")
        ticks.append(((start + x - 1) / 2, case.id.replace("-", "\n")))
        x += 1
    ax.set_xticks([t for t, _ in ticks], [l for _, l in ticks], fontsize=7)
    ax.set_ylabel("GB/s (minimum bytes moved / median time)")
    ax.set_title(f"wavg_ext fused ops vs PyTorch baselines: {env['device_name']}, "
                 f"{env['num_threads']} threads, torch {env['torch_version']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wavg_ext.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats; skip loop and AveragedModel on gpt2")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available and built, else cpu")
    p.add_argument("--json", metavar="PATH", help="write environment and all rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--repeats", type=int, metavar="N", help="timed calls per method (default 20, 5 with --quick; "
                                                             "fast calls get up to 25x more)")
    p.add_argument("--cases", metavar="SUBSTR", help="only cases whose id (op-shapes-dtype, or "
                   "step-method-shapes-dtype) contains one of these comma-separated substrings")
    p.add_argument("--suite", choices=["all", "ops", "wrappers", "twa", "trust"], default="all",
                   help="the fused averaging ops, the optimizer wrappers' per-step overhead, the TWA "
                        "kernels (projection, orthonormalization), the cost of the trust features (model "
                        "check, float64/compensated averages, skip_nonfinite), or all of them (default)")
    args = p.parse_args(argv)

    cuda_ok = torch.cuda.is_available() and build_info()["cuda"]
    device = torch.device(args.device or ("cuda" if cuda_ok else "cpu"))
    if device.type == "cuda" and not cuda_ok:
        p.error("--device cuda: no CUDA device, or wavg_ext was built without CUDA kernels")
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    repeats = args.repeats or (5 if args.quick else 20)
    min_time = 0.05 if args.quick else 0.25
    from . import trust as bench_trust, twa as bench_twa, wrappers as bench_wrappers

    cases = all_cases() if args.suite in ("all", "ops") else []
    wcases = bench_wrappers.all_cases(args.quick) if args.suite in ("all", "wrappers") else []
    tcases = bench_twa.all_cases(args.quick, device) if args.suite in ("all", "twa") else []
    rcases = bench_trust.all_cases(args.quick) if args.suite in ("all", "trust") else []
    if args.cases:
        subs = args.cases.split(",")
        cases = [c for c in cases if any(s in c.id for s in subs)]
        wcases = [c for c in wcases if any(s in c.id for s in subs)]
        tcases = [c for c in tcases if any(s in c.id for s in subs)]
        rcases = [c for c in rcases if any(s in c.id for s in subs)]
        if not cases and not wcases and not tcases and not rcases:
            names = [c.id for c in all_cases()] + [c.id for c in bench_wrappers.all_cases()] + \
                    [c.id for c in bench_twa.all_cases()] + [c.id for c in bench_trust.all_cases()]
            p.error(f"--cases {args.cases!r} matches none of: {', '.join(names)}")

    env = environment(device)
    info = ", ".join(f"{k}={v}" for k, v in env["build_info"].items())
    print(f"wavg_ext.bench {env['date']} | {env['device_name']} ({device}) | torch {env['torch_version']} "
          f"| {env['num_threads']} threads\nbuild_info: {info}")
    print(f"median of >= {repeats} calls after 2 warm-up calls; GB/s = minimum bytes moved / median time "
          "for every method;\nceilings: flat fp32 buffers moving the same bytes. AveragedModel keeps "
          "its averages in the model's dtype (bf16 for bf16 params);\nsuch a baseline does not count as "
          "'fastest baseline'. % ceil: in-place ops vs ceiling_axpy (in-place triad), scale_copy_ vs\n"
          "ceiling_copy; the out-of-place triad pays write-allocate reads on CPU and is shown for reference.",
          flush=True)
    if env["loadavg"][0] > 0.5 * env["num_threads"]:
        print(f"WARNING: load average {env['loadavg'][0]:.2f} with {env['num_threads']} threads: other processes "
              "compete for the cores and the timings will be noisy.", flush=True)
    print(flush=True)
    t_start = time.perf_counter()
    results = []
    for case in cases:
        rows = run_case(case, device, repeats, min_time, args.quick)
        results.append((case, rows))
        print(format_case(case, rows) + "\n", flush=True)
    if results:
        print(format_summary(results))
    wrows = []
    if wcases:
        rounds = args.repeats or (10 if args.quick else 30)
        print(f"\nOptimizer wrappers: per-step time with and without averaging, median of {rounds} interleaved "
              "rounds;\noverhead = step - sgd step; x floor = overhead / (bytes the averaging moves at the "
              "in-place triad bandwidth).", flush=True)
        for wcase in wcases:
            rows = bench_wrappers.run_case(wcase, device, rounds, args.quick)
            wrows += rows
            print("\n" + bench_wrappers.format_case(wcase, rows), flush=True)
    trows = []
    if tcases:
        print("\nTWA kernels: projection vs the paper's way and the bandwidth ceilings (same bytes, same run);\n"
              "orthonormalization of n snapshots vs torch.linalg.qr. GB/s = bytes the method must move / median "
              "time.", flush=True)
        for tcase in tcases:
            rows = bench_twa.run_case(tcase, device, repeats, min_time, args.quick)
            trows += rows
            print("\n" + bench_twa.format_case(tcase, rows), flush=True)
    rrows = []
    if rcases:
        rounds = args.repeats or (10 if args.quick else 40)
        print("\nTrust features: the per-step model check, float64 and compensated averages, skip_nonfinite's "
              "check and gated update,\nnext to the plain fused EMA update on the same float32 parameters.",
              flush=True)
        for rcase in rcases:
            rows = bench_trust.run_case(rcase, device, rounds, args.quick)
            rrows += rows
            print("\n" + bench_trust.format_case(rcase, rows), flush=True)
    elapsed = time.perf_counter() - t_start
    load = os.getloadavg()[0]
    print(f"\n{len(cases) + len(wcases) + len(tcases) + len(rcases)} cases in {elapsed:.1f} s; load average now "
          f"{load:.2f}")
    if load > 0.5 * env["num_threads"] + 1:  # this run itself adds about 1
        print("WARNING: other processes competed for the cores during the run; the timings are noisy.")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, args=vars(args), repeats=repeats, elapsed_s=elapsed,
                           rows=[r for _, rows in results for r in rows], wrapper_rows=wrows, twa_rows=trows,
                           trust_rows=rrows),
                      f, indent=1)
        print(f"wrote {args.json}")
    if args.plot and results:
        plot(results, env, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
