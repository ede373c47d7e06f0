"""TWA kernels vs the paper's way (part of ``python -m wavg_ext.bench``, suite ``twa``).

Projection cases (ResNet-50 shapes, k basis rows, basis stored in fp32 or bf16, fp32
gradients):

- ``project_``: ``wavg_ext.ops.project_`` (dots, then combine_: two passes over the rows);
  ``dots`` and ``combine_`` alone;
- ``paper``: the TWA paper's scripts: concatenate all gradients, ``P @ g``, ``c @ P`` with
  P one fp32 [k, D] matrix, copy back into the gradients (fp32 P even for bf16 cases);
- ``per_tensor``: a per-tensor matmul loop over the same basis (no concatenation);
- ceilings on flat fp32 buffers moving the same bytes: ``triad`` (out-of-place
  ``torch.add(b, c, out=a)``), ``axpy`` (in place) and ``dot`` (``torch.dot``: two
  read-only streams, the shape of the projection's traffic).

bytes moved by project_: (2k·s + 8)·D (k rows of s bytes read twice, the gradient read
twice and written once, 4-byte elements); dots and combine_: (k·s + 4)·D.

Orthonormalization case: n random-walk snapshots (each = previous + small noise, like SGD
checkpoints) of D parameters: ``orthonormalize_many_`` (block CGS2 + Cholesky-QR2),
n sequential ``orthonormalize_`` calls (CGS2), and ``torch.linalg.qr`` of the [D, n] matrix;
``orthonormalize_many_`` on a bfloat16 basis too (on the CPU under the ``avx512`` and
``avx512_bf16`` kernels side by side: float32 widening vs ``vdpbf16ps`` in the Gram blocks).

Post-hoc case: n PostHocEMA snapshot files (two float16 profiles each, ResNet-50 shapes):
``synthesize_ema`` of sigma_rel 0.1 against ``torch.load`` of each + a per-tensor ``add_``
with the same coefficients, and each snapshot read once in place (the floor).

From-checkpoints case: n random-walk checkpoints saved with ``torch.save`` (read from the
page cache): ``TWA.from_checkpoints`` end to end (each checkpoint read once: checked and
copied into its basis row; the mean from the rows; orthonormalize; start the subspace), against ``torch.load`` of
each, stacked into the [D, n] fp32 matrix, then ``torch.linalg.qr``, and ``torch.load`` of
each alone; ``merge_checkpoints`` of them (their mean) against ``torch.load`` + an ``add_``
loop; and the floor of ``from_checkpoints``: each checkpoint read once in place (mmap + ``nonfinite_flag``),
the basis allocated and zeroed (its first touch: page faults), ``orthonormalize_many_`` of
the loaded rows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import ops, testing
from . import common


@dataclass(frozen=True)
class ProjectCase:
    shapes: str
    k: int
    storage: str  # "fp32" or "bf16"

    @property
    def id(self) -> str:
        return f"project_-{self.shapes}-k{self.k}-{self.storage}"

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.float32 if self.storage == "fp32" else torch.bfloat16

    def numel(self) -> int:
        return sum(common.numel(s) for s in common.SHAPE_SETS[self.shapes]())

    def project_bytes(self) -> int:
        s = 4 if self.storage == "fp32" else 2
        return (2 * self.k * s + 8) * self.numel()

    def pass_bytes(self) -> int:
        s = 4 if self.storage == "fp32" else 2
        return (self.k * s + 4) * self.numel()


@dataclass(frozen=True)
class OrthoCase:
    shapes: str
    n: int
    limit: Optional[int] = None  # use only the first tensors of the shape set, up to this many elements

    @property
    def id(self) -> str:
        return f"orthonormalize-{self.shapes}-n{self.n}" + (f"-D{self.numel() // 1000}k" if self.limit else "")

    def shape_list(self) -> List[Tuple[int, ...]]:
        shapes = common.SHAPE_SETS[self.shapes]()
        if self.limit is None:
            return shapes
        out, total = [], 0
        for s in shapes:
            if total + common.numel(s) > self.limit:
                continue
            out.append(s)
            total += common.numel(s)
        return out

    def numel(self) -> int:
        return sum(common.numel(s) for s in self.shape_list())


@dataclass(frozen=True)
class CheckpointsCase(OrthoCase):
    """n saved checkpoints (shapes and limit as OrthoCase)."""

    @property
    def id(self) -> str:
        return "from_checkpoints" + super().id[len("orthonormalize"):]


@dataclass(frozen=True)
class PosthocCase(OrthoCase):
    """n PostHocEMA snapshots of two float16 profiles each (shapes and limit as OrthoCase)."""

    @property
    def id(self) -> str:
        return "synthesize_ema" + super().id[len("orthonormalize"):]


def all_cases(quick: bool = False, device: Optional[torch.device] = None) -> List[object]:
    cases: List[object] = [ProjectCase("resnet50", k, st) for k in (10, 40) for st in ("fp32", "bf16")]
    if device is None or device.type == "cuda":  # a 5 GB fp32 basis: GPUs only
        cases += [ProjectCase("gpt2", 10, st) for st in ("fp32", "bf16")]
    cases.append(OrthoCase("resnet50", 40, limit=2_600_000 if quick else None))
    if device is None or device.type == "cpu":  # (the checkpoints are loaded onto the CPU)
        cases.append(CheckpointsCase("resnet50", 8 if quick else 40, limit=2_600_000 if quick else None))
        cases.append(PosthocCase("resnet50", 8 if quick else 20, limit=2_600_000 if quick else None))
    if quick:
        cases = [c for c in cases if not (isinstance(c, ProjectCase) and c.k == 40)]
    return cases


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int, min_time: float,
               warmup: int = 2) -> Tuple[float, int]:
    t = common.time_it(fn, device, repeats, min_time, warmup=warmup)
    return statistics.median(t) * 1e3, len(t)


def paper_project(p: torch.Tensor, grads: List[torch.Tensor]) -> None:
    """The TWA paper's projection: concatenate the gradients, c = P @ g, g = c @ P (P one
    [k, D] matrix), copy back into the gradients."""
    g = torch.cat([x.reshape(-1) for x in grads])
    gp = (p @ g) @ p
    start = 0
    for x in grads:
        x.copy_(gp[start:start + x.numel()].view_as(x))
        start += x.numel()


def orthonormal_basis(shapes, k: int, dtype: torch.dtype, device: torch.device) -> List[torch.Tensor]:
    """k orthonormal rows (random, via the batch path) stored in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.empty(s, device=device) for s in shapes]
    basis = ops.new_basis(params, k, dtype=torch.float32)
    for b in basis:
        b.copy_(torch.randn(b.shape, generator=gen, device=device))
    result = ops.orthonormalize_many_(basis, 0, k)
    assert result.accepted == k
    return [b.to(dtype) for b in basis]


@torch.no_grad()
def run_project_case(case: ProjectCase, device: torch.device, repeats: int, min_time: float) -> List[dict]:
    shapes = common.SHAPE_SETS[case.shapes]()
    d = case.numel()
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(s, generator=gen, device=device) for s in shapes]
    basis = orthonormal_basis(shapes, case.k, case.storage_dtype, device)
    k = case.k
    rows: List[dict] = []

    def add(method: str, ms: float, n: int, nbytes: int, note: str) -> None:
        rows.append(dict(case=case.id, method=method, median_ms=ms, repeats=n, bytes=nbytes,
                         gbps=nbytes / ms / 1e6, note=note))

    # Ceilings on flat fp32 buffers moving project_'s bytes.
    nbytes = case.project_bytes()
    for name, builder in common.ceilings(nbytes, device).items():
        m = builder()
        ms, n = _median_ms(m.run, device, repeats, min_time)
        add(name, ms, n, nbytes, m.note)
        del m
    a = torch.full((nbytes // 8,), 1.0, device=device)
    b = torch.full_like(a, 0.5)
    ms, n = _median_ms(lambda: torch.dot(a, b), device, repeats, min_time)
    add("ceiling_dot", ms, n, nbytes, "torch.dot(a, b): 2 read-only streams, flat buffers")
    del a, b
    common.free(device)

    ms, n = _median_ms(lambda: ops.project_(grads, basis, k), device, repeats, min_time)
    add("project_", ms, n, nbytes, "wavg_ext.ops.project_: dots + combine_")
    ms, n = _median_ms(lambda: ops.dots(basis, grads, k), device, repeats, min_time)
    add("dots", ms, n, case.pass_bytes(), "wavg_ext.ops.dots")
    coeffs = torch.randn(k, device=device) * 1e-3
    ms, n = _median_ms(lambda: ops.combine_(grads, basis, coeffs, 1.0, 0.0), device, repeats, min_time)
    add("combine_", ms, n, case.pass_bytes(), "wavg_ext.ops.combine_(beta=0)")

    # The paper's way: one fp32 [k, D] matrix P, concatenated gradients.
    p = torch.cat([bb.reshape(k, -1).float() for bb in basis], dim=1)
    ms, n = _median_ms(lambda: paper_project(p, grads), device, repeats, min_time)
    add("paper", ms, n, (8 * k + 24) * d, "cat(grads); c = P @ g; g = c @ P; copy back (fp32 P)")
    del p
    common.free(device)

    mats = [bb.reshape(k, -1) for bb in basis]

    def per_tensor():
        c = sum(m.float() @ x.reshape(-1) for m, x in zip(mats, grads))
        for m, x in zip(mats, grads):
            x.copy_((c @ m.float()).view_as(x))

    ms, n = _median_ms(per_tensor, device, repeats, min_time)
    add("per_tensor", ms, n, case.project_bytes(), "per-tensor matmuls: c = sum P_t @ g_t; g_t = c @ P_t")

    by = {r["method"]: r for r in rows}
    for r in rows:
        r["pct_triad"] = 100.0 * r["gbps"] / by["ceiling_triad"]["gbps"]
        r["pct_dot"] = 100.0 * r["gbps"] / by["ceiling_dot"]["gbps"]
        r["pct_copy"] = 100.0 * r["gbps"] / by["ceiling_copy"]["gbps"]
        r["speedup_vs_paper"] = by["paper"]["median_ms"] / r["median_ms"]
    return rows


@torch.no_grad()
def run_ortho_case(case: OrthoCase, device: torch.device, quick: bool) -> List[dict]:
    shapes = case.shape_list()
    d = case.numel()
    gen = torch.Generator(device=device).manual_seed(2)
    # The snapshots as one [n, D] matrix (row j = w_j = w_{j-1} + 1e-2 noise).
    snaps = torch.empty(case.n, d, device=device)
    snaps[0].normal_(generator=gen)
    for j in range(1, case.n):
        snaps[j].normal_(generator=gen).mul_(1e-2).add_(snaps[j - 1])
    basis = ops.new_basis([torch.empty(s, device=device) for s in shapes], case.n)

    def load() -> None:
        start = 0
        for bb in basis:
            m = bb[0].numel()
            block = snaps[:, start:start + m]
            if bb.dtype == torch.bfloat16:
                # steps 30x larger (0.3 of the weights), so that rounding to bfloat16
                # (4e-3 relative) keeps every snapshot a new direction
                block = block[:1] + 30 * (block - block[:1])
            bb.view(case.n, m).copy_(block)
            start += m

    rows: List[dict] = []
    repeats = 1 if (d > 5_000_000 and not quick) else 2

    def timed(method: str, fn: Callable[[], object], note: str, check: Callable[[], float]) -> None:
        times = []
        for _ in range(repeats):
            load()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        rows.append(dict(case=case.id, method=method, median_ms=statistics.median(times) * 1e3,
                         repeats=repeats, orthogonality=check(), note=note))
        common.free(device)

    def basis_orthogonality() -> float:
        g = torch.zeros(case.n, case.n, dtype=torch.float64, device=device)
        for bb in basis:
            m = bb.reshape(case.n, -1).double()
            g += m @ m.T
        return (g - torch.eye(case.n, dtype=torch.float64, device=device)).abs().max().item()

    info: Dict[str, str] = {}

    def batch():
        info["method"] = ops.orthonormalize_many_(basis, 0, case.n).method

    timed("orthonormalize_many_", batch, "block CGS2 + Cholesky-QR2 (CGS2 fallback)", basis_orthogonality)
    rows[-1]["note"] += f"; took the {info['method']} path"

    # A bfloat16 basis. On the CPU under each ISA from avx512 up: avx512_bf16 computes the
    # Gram blocks with vdpbf16ps, avx512 widens to float32 first.
    fp32_basis = basis
    basis = ops.new_basis([torch.empty(s, device=device) for s in shapes], case.n, dtype=torch.bfloat16)
    isas: List[Optional[str]] = [None]
    if device.type == "cpu":
        supported = testing.supported_cpu_capabilities()
        isas = [i for i in ("avx512", "avx512_bf16") if i in supported] or [None]
    for isa in isas:
        def batch_bf16(isa=isa):
            with testing.cpu_capability(isa) if isa else contextlib.nullcontext():
                info["method"] = ops.orthonormalize_many_(basis, 0, case.n).method

        timed("orthonormalize_many_ bf16" + (f" [{isa}]" if isa else ""), batch_bf16,
              "bfloat16 basis, random-walk steps of 0.3", basis_orthogonality)
        rows[-1]["note"] += f"; took the {info['method']} path"
    basis = fp32_basis

    def sequential():
        for j in range(case.n):
            ops.orthonormalize_(basis, j)

    timed("sequential_cgs2", sequential, f"{case.n} orthonormalize_ calls", basis_orthogonality)
    del basis
    common.free(device)

    q_holder: Dict[str, torch.Tensor] = {}

    def qr():
        q_holder["q"], _ = torch.linalg.qr(snaps.T)

    def qr_orthogonality() -> float:
        q = q_holder.pop("q")
        g = torch.zeros(case.n, case.n, dtype=torch.float64, device=device)
        for s in range(0, q.shape[0], 1 << 20):  # float64 copies of 1M rows at a time
            blk = q[s:s + (1 << 20)].double()
            g += blk.T @ blk
        del q
        return (g - torch.eye(case.n, dtype=torch.float64, device=device)).abs().max().item()

    basis = []  # load() is a no-op for QR
    timed("torch.linalg.qr", qr, "Householder QR of the [D, n] fp32 matrix (reduced)", qr_orthogonality)
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["speedup_vs_qr"] = by["torch.linalg.qr"]["median_ms"] / r["median_ms"]
        r["n"], r["D"] = case.n, d
    return rows


def _random_walk(shapes: List[Tuple[int, ...]], n: int):
    """n successive weight sets: each the previous plus 0.01 noise (like SGD checkpoints)."""
    g = torch.Generator().manual_seed(0)
    cur = [0.05 * torch.randn(s, generator=g) for s in shapes]
    for _ in range(n):
        cur = [c + 0.01 * torch.randn(c.shape, generator=g) for c in cur]
        yield cur


def _row_timer(rows: List[dict], case: OrthoCase, device: torch.device,
               repeats: int) -> Callable[[str, Callable[[], object], str], None]:
    """timed(method, fn, note): appends the row of fn's median time over ``repeats`` calls."""
    def timed(method: str, fn: Callable[[], object], note: str) -> None:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            common.free(device)
        rows.append(dict(case=case.id, method=method, median_ms=statistics.median(times) * 1e3, repeats=repeats,
                         note=note, n=case.n, D=case.numel()))
    return timed


def run_checkpoints_case(case: CheckpointsCase, device: torch.device, quick: bool) -> List[dict]:
    from ..optim import TWA  # (the suite's other cases need only the ops)

    shapes = case.shape_list()
    d = case.numel()
    names = [f"params.{i}" for i in range(len(shapes))]  # ParamHolder's parameter names
    tmp = tempfile.mkdtemp(prefix="wavg_ext_bench_")
    rows: List[dict] = []
    try:
        paths = []
        for j, cur in enumerate(_random_walk(shapes, case.n)):  # like SGD checkpoints
            paths.append(os.path.join(tmp, f"checkpoint{j}.pt"))
            torch.save(dict(zip(names, cur)), paths[-1])
        del cur
        repeats = 1 if (d > 5_000_000 and not quick) else 2
        timed = _row_timer(rows, case, device, repeats)

        def from_checkpoints() -> None:
            model = common.ParamHolder([torch.zeros(s) for s in shapes])
            twa = TWA.from_checkpoints(model, torch.optim.SGD(model.parameters(), lr=0.1), paths)
            assert twa.num_basis == case.n

        def load_and_qr() -> None:
            m = torch.empty(case.n, d)
            for j, path in enumerate(paths):
                sd = torch.load(path, weights_only=True)
                torch.cat([sd[k].reshape(-1) for k in names], out=m[j])
                del sd
            torch.linalg.qr(m.T)

        def load_each() -> None:
            for path in paths:
                torch.load(path, weights_only=True)

        def read_each() -> None:  # every byte of every checkpoint read once, nothing written
            for path in paths:
                sd = torch.load(path, weights_only=True, mmap=True)
                ops.nonfinite_flag([sd[k] for k in names])

        holder: Dict[str, List[torch.Tensor]] = {}

        def allocate() -> None:
            holder["basis"] = ops.new_basis([torch.empty(s) for s in shapes], case.n)

        def orthonormalize() -> None:  # (the rows loaded untimed by the previous repeat's load)
            ops.orthonormalize_many_(holder["basis"], 0, case.n)

        def load_rows() -> None:
            for j, path in enumerate(paths):
                sd = torch.load(path, weights_only=True, mmap=True)
                ops.scale_copy_([b[j] for b in holder["basis"]], [sd[k] for k in names], 1.0)

        def merge() -> None:
            from ..merge import merge_checkpoints
            merge_checkpoints(paths)

        def load_and_add() -> None:  # the plain way to average checkpoints
            total = None
            for path in paths:
                sd = torch.load(path, weights_only=True)
                if total is None:
                    total = {k: v.clone() for k, v in sd.items()}
                else:
                    for k, v in sd.items():
                        total[k].add_(v)
                del sd
            for v in total.values():
                v.div_(len(paths))

        timed("TWA.from_checkpoints", from_checkpoints, "end to end: one read per checkpoint, mean from the rows, CGS2/Cholesky-QR2")
        timed("merge_checkpoints", merge, "their mean: memory-mapped, fused accumulate_ into float32 sums")
        timed("torch.load + add_ loop", load_and_add, "their mean: torch.load each, add_ per tensor, div_")
        timed("torch.load + linalg.qr", load_and_qr, "load each, stack into [n, D], Householder QR of its transpose")
        timed("torch.load", load_each, "each checkpoint loaded into fresh memory")
        # The floor: each checkpoint read once, the basis allocated and written once, the
        # orthonormalization's own passes.
        timed("floor: read each", read_each, "each checkpoint read once in place (mmap + one fused pass)")
        timed("floor: new_basis", allocate, "allocate the [n, D] fp32 basis and zero it (first touch)")
        orth_times = []
        for _ in range(repeats):
            load_rows()
            t0 = time.perf_counter()
            orthonormalize()
            orth_times.append(time.perf_counter() - t0)
        rows.append(dict(case=case.id, method="floor: orthonormalize_many_",
                         median_ms=statistics.median(orth_times) * 1e3, repeats=repeats,
                         note="the loaded rows' block CGS2 + Cholesky-QR2", n=case.n, D=d))
        holder.clear()
        common.free(device)
        floor_ms = sum(r["median_ms"] for r in rows if r["method"].startswith("floor: "))
        rows.append(dict(case=case.id, method="floor (sum)", median_ms=floor_ms, repeats=repeats,
                         note="read each + new_basis + orthonormalize_many_", n=case.n, D=d))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["speedup_vs_qr"] = by["torch.load + linalg.qr"]["median_ms"] / r["median_ms"]
        r["vs_floor"] = r["median_ms"] / floor_ms
    return rows


def run_posthoc_case(case: PosthocCase, device: torch.device, quick: bool) -> List[dict]:
    from ..optim.posthoc import synthesize_ema  # (the suite's other cases need only the ops)
    from ..power_ema import posthoc_coefficients

    shapes = case.shape_list()
    d = case.numel()
    sigmas = [0.05, 0.28]
    tmp = tempfile.mkdtemp(prefix="wavg_ext_bench_")
    rows: List[dict] = []
    try:
        paths = []
        for j, cur in enumerate(_random_walk(shapes, case.n)):  # as PostHocEMA(snapshot_every=100) writes
            profiles = [[(c * (1 + 0.01 * k)).half() for c in cur] for k in range(len(sigmas))]
            data = {"format": "wavg_ext.posthoc_ema/1", "time": 100 * (j + 1), "sigma_rels": sigmas,
                    "gammas": [], "num_params": len(shapes), "names": [f"params.{i}" for i in range(len(shapes))],
                    "profiles": profiles}
            paths.append(os.path.join(tmp, f"posthoc-ema-{100 * (j + 1):010d}.pt"))
            torch.save(data, paths[-1])
        del cur, profiles, data
        repeats = 1 if (d > 5_000_000 and not quick) else 2
        timed = _row_timer(rows, case, device, repeats)

        model = common.ParamHolder([torch.zeros(s) for s in shapes])

        def synthesize() -> None:
            synthesize_ema(tmp, 0.1, into=model)

        def load_and_add() -> None:  # the plain way: torch.load each, a per-tensor multiply-add
            times = [100.0 * (j + 1) for j in range(case.n) for _ in sigmas]
            coeffs = posthoc_coefficients(times, sigmas * case.n, 100.0 * case.n, 0.1).tolist()
            acc = [torch.zeros(s) for s in shapes]
            k = 0
            for path in paths:
                data = torch.load(path, weights_only=True)
                for profile in data["profiles"]:
                    for a, t in zip(acc, profile):
                        a.add_(t.float(), alpha=coeffs[k])
                    k += 1
                del data
            with torch.no_grad():
                for p, a in zip(model.params, acc):
                    p.copy_(a)

        def read_each() -> None:
            for path in paths:
                data = torch.load(path, weights_only=True, mmap=True)
                ops.nonfinite_flag([t for profile in data["profiles"] for t in profile])

        timed("synthesize_ema", synthesize, "float64 solve, snapshots memory-mapped, fused accumulate_")
        timed("torch.load + add_ loop", load_and_add, "the same coefficients, per-tensor add_(t.float(), alpha)")
        timed("floor: read each", read_each, "each snapshot read once in place (mmap + one fused pass)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["speedup_vs_loop"] = by["torch.load + add_ loop"]["median_ms"] / r["median_ms"]
        r["vs_floor"] = r["median_ms"] / by["floor: read each"]["median_ms"]
    return rows


def run_case(case, device: torch.device, repeats: int, min_time: float, quick: bool) -> List[dict]:
    if isinstance(case, ProjectCase):
        return run_project_case(case, device, repeats, min_time)
    if isinstance(case, CheckpointsCase):
        return run_checkpoints_case(case, device, quick)
    if isinstance(case, PosthocCase):
        return run_posthoc_case(case, device, quick)
    return run_ortho_case(case, device, quick)


def _floor_table(head: str, rows: List[dict], speedup: str, label: str) -> str:
    """The rows of a case with a floor: ms, the speedup over its baseline, the ratio to the floor."""
    lines = [head, f"  {'method':<28}{'ms':>10}{label:>9}{'/ floor':>9}  note"]
    for r in rows:
        lines.append(f"  {r['method']:<28}{r['median_ms']:>10.1f}{r[speedup]:>8.2f}x{r['vs_floor']:>8.2f}x  {r['note']}")
    return "\n".join(lines)


def format_case(case, rows: List[dict]) -> str:
    if isinstance(case, ProjectCase):
        head = (f"{case.id}: D = {case.numel():,}, k = {case.k}, basis {case.storage}, fp32 grads; project_ moves "
                f"{case.project_bytes() / 1e9:.2f} GB")
        lines = [head, f"  {'method':<16}{'ms':>10}{'GB/s':>8}{'% triad':>9}{'% dot':>7}{'% copy':>8}{'vs paper':>10}"]
        for r in rows:
            lines.append(f"  {r['method']:<16}{r['median_ms']:>10.2f}{r['gbps']:>8.1f}{r['pct_triad']:>8.0f}%"
                         f"{r['pct_dot']:>6.0f}%{r['pct_copy']:>7.0f}%{r['speedup_vs_paper']:>9.2f}x")
        return "\n".join(lines)
    if isinstance(case, PosthocCase):
        return _floor_table(f"{case.id}: n = {case.n} PostHocEMA snapshots (two float16 profiles each) of D = "
                            f"{case.numel():,} parameters; synthesize sigma_rel 0.1", rows, "speedup_vs_loop", "vs loop")
    if isinstance(case, CheckpointsCase):
        return _floor_table(f"{case.id}: n = {case.n} saved random-walk checkpoints of D = {case.numel():,} "
                            "parameters (fp32)", rows, "speedup_vs_qr", "vs qr")
    head = f"{case.id}: n = {case.n} random-walk snapshots of D = {case.numel():,} parameters (fp32)"
    lines = [head, f"  {'method':<40}{'ms':>10}{'max|QtQ-I|':>12}{'vs qr':>9}  note"]
    for r in rows:
        lines.append(f"  {r['method']:<40}{r['median_ms']:>10.1f}{r['orthogonality']:>12.2e}"
                     f"{r['speedup_vs_qr']:>8.2f}x  {r['note']}")
    return "\n".join(lines)
