"""Suite ``threads`` of ``python -m wavg_ext.bench``: where a second thread starts to pay.

The CPU kernels split an update over threads only when it has at least
``2 * kMinParallelElements`` elements (65536 a thread, csrc/cpu/pairwise_cpu.h): below
that a parallel region's fork/join (and, on a small shared machine, a busy neighbour
stalling its barrier for a time slice) costs more than the second core saves. This suite
measures the planned ``ema_`` (float32, caches warm) on one and on two threads, interleaved
call by call, around that threshold, for one tensor and for 512-element tensors; the
threshold on the machine at hand is where ``2 threads / 1 thread`` drops well below 1.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import List

import torch

from .. import ops

# What the CPU kernels use (csrc/cpu/pairwise_cpu.h: kMinParallelElements per thread).
MIN_ELEMENTS_PER_THREAD = 65536


@dataclass(frozen=True)
class ThreadsCase:
    elements: int
    layout: str  # "one" tensor, or "small512": elements / 512 tensors of 512

    @property
    def id(self) -> str:
        return f"threads-{self.layout}-{self.elements}"


def all_cases(quick: bool = False) -> List[ThreadsCase]:
    sizes = [32768, 65536, 131072, 262144, 1048576] if quick else [16384, 32768, 65536, 131072, 262144, 524288,
                                                                   1048576, 4194304]
    return [ThreadsCase(n, layout) for n in sizes for layout in ("one", "small512")]


def run_case(case: ThreadsCase, device: torch.device, rounds: int) -> List[dict]:
    if device.type != "cpu":
        return []
    g = torch.Generator().manual_seed(0)
    shapes = [(case.elements,)] if case.layout == "one" else [(512,)] * (case.elements // 512)
    xs = [torch.randn(s, generator=g) for s in shapes]
    avgs = [x.clone() for x in xs]
    plan = ops.Plan("ema_", avgs, xs)
    threads = torch.get_num_threads()
    counts = [1, 2] if threads >= 2 else [1]
    times = {t: [] for t in counts}
    calls = max(rounds, min(4000, int(4e8 / (12 * case.elements))))  # ~0.1 s of work each
    try:
        for r in range(calls + 3):
            for t in counts:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                plan(1e-3)
                if r >= 3:
                    times[t].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    med = {t: statistics.median(v) for t, v in times.items()}
    p90 = {t: sorted(v)[int(0.9 * len(v))] for t, v in times.items()}
    rows = []
    for t in counts:
        rows.append(dict(case=case.id, layout=case.layout, elements=case.elements, tensors=len(shapes), threads=t,
                         calls=calls, us=med[t] * 1e6, p90_us=p90[t] * 1e6, vs_one_thread=med[t] / med[1],
                         kernels_use=1 if case.elements < 2 * MIN_ELEMENTS_PER_THREAD else min(2, threads)))
    return rows


def format_rows(rows: List[dict]) -> str:
    lines = [f"  {'case':<28}{'tensors':>8}{'1 thread us':>13}{'(p90)':>9}{'2 threads us':>14}{'(p90)':>9}"
             f"{'2 / 1':>8}{'kernels use':>13}"]
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["threads"]] = r
    for case, rs in by_case.items():
        one, two = rs[1], rs.get(2)
        lines.append(f"  {case:<28}{one['tensors']:>8}{one['us']:>13.1f}{one['p90_us']:>9.1f}"
                     + (f"{two['us']:>14.1f}{two['p90_us']:>9.1f}{two['vs_one_thread']:>8.2f}" if two else "")
                     + f"{one['kernels_use']:>10} th")
    return "\n".join(lines)
