"""Suite ``ops`` of ``python -m wavg_ext.bench``: the fused wavg_ext ops against
pure-PyTorch ways of doing the same update.

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

import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import _C, ops
from .common import (DTYPES, SHAPE_SETS, Method, ParamHolder, ceilings, fmt_bytes, free, itemsize, numel, short,
                     time_it)

SCALARS = {"ema_": 0.001, "running_mean_": 5, "accumulate_": 1.0, "scale_copy_": 0.25}
# From the op registry: the scalar's name, and the tensor streams one update moves (in,
# out written, and out read unless the op only writes it).
_PAIR_SPECS = [spec for spec in _C.op_specs() if spec["kind"] == "pair"]
SCALAR_NAMES = {spec["name"]: spec["scalar"] for spec in _PAIR_SPECS}
STREAMS = {spec["name"]: 3 if spec["reads_out"] else 2 for spec in _PAIR_SPECS}


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
        a, x = n * itemsize(self.avg_dtype), n * itemsize(self.x_dtype)
        return 2 * a + x if self.streams == 3 else a + x


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


def _averaged_model(case: Case, avgs: List[torch.Tensor], xs: List[torch.Tensor]) -> Method:
    model = ParamHolder(xs)
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

    def planned() -> Method:
        plan = ops.Plan(op, avgs, xs)
        return Method(lambda: plan(s), avgs, "ops.Plan: validated once, re-checked per call")

    m["fused_plan"] = planned
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


# --------------------------------------------------------------------------- running a case


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
        free(device)
    avgs, xs = make_tensors(case, device)
    for name, builder in methods(case, avgs, xs, quick).items():
        measure(name, builder)
        free(device)
    del avgs, xs
    free(device)

    by = {r["method"]: r for r in rows}
    ceil = by[case.ceiling]["gbps"]
    fused = by["fused"]["median_ms"]
    baselines = [r for r in rows if not r["method"].startswith(("fused", "ceiling"))]
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
    by["fused_plan"].update(fused_speedup=best["median_ms"] / by["fused_plan"]["median_ms"],
                            fastest_baseline=best["method"])
    return rows


# --------------------------------------------------------------------------- report


def format_case(case: Case, rows: List[dict]) -> str:
    shapes = SHAPE_SETS[case.shapes]()
    n = sum(numel(s) for s in shapes)
    head = (f"{case.id}: {case.op}({SCALAR_NAMES[case.op]}={case.scalar}) on {case.shapes} "
            f"({len(shapes)} tensors, {n / 1e6:.2f} M elements), x {short(case.x_dtype)}, avg "
            f"{short(case.avg_dtype)}, min bytes {fmt_bytes(case.min_bytes())}, % of {case.ceiling[8:]}")
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
    lines = ["Summary (fused x = fastest baseline time / fused time; plan: through ops.Plan)",
             f"  {'case':<28}{'fused ms':>10}{'GB/s':>8}{'% ceil':>8}  {'fastest baseline':<18}{'ms':>9}{'fused x':>9}"
             f"{'plan ms':>9}{'plan x':>8}"]
    for case, rows in results:
        f = next(r for r in rows if r["method"] == "fused")
        p = next(r for r in rows if r["method"] == "fused_plan")
        b = next(r for r in rows if r["method"] == f["fastest_baseline"])
        lines.append(f"  {case.id:<28}{f['median_ms']:>10.3f}{f['gbps']:>8.1f}{f['pct_of_ceiling']:>7.0f}%"
                     f"  {b['method']:<18}{b['median_ms']:>9.3f}{f['fused_speedup']:>8.2f}x"
                     f"{p['median_ms']:>9.3f}{p['fused_speedup']:>7.2f}x")
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
