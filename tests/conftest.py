"""Shared helpers for the wavg_ext test suite.

Test modules reach the helpers through the ``h`` fixture (the ``Helpers`` class below)
and never import this file, so the suite also runs under ``--import-mode=importlib``.
A per-op test module sets ``OP = "<op name>"``; ``pytest_generate_tests`` then
parametrizes its ``dtypes`` argument with every dtype pair that op accepts.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from dataclasses import dataclass

import pytest
import torch

# --------------------------------------------------------------------------------------
# Import check: the compiled extension lives only in the installed package.
# --------------------------------------------------------------------------------------
REPO = pathlib.Path(__file__).resolve().parents[1]
_HOWTO = (
    "Build and install it with `pip install .` from the repository "
    "root, then run the tests with plain `pytest` (not `python -m pytest`, which puts the "
    "source checkout first on sys.path and shadows the installed package)."
)


def _check_import():
    spec = importlib.util.find_spec("wavg_ext")
    if spec is None or spec.origin is None:
        raise pytest.UsageError(f"wavg_ext is not installed. {_HOWTO}")
    origin = pathlib.Path(spec.origin).resolve()
    in_checkout = REPO == origin.parent.parent or REPO in origin.parents
    compiled = any(origin.parent.glob("_C*.so")) or any(origin.parent.glob("_C*.pyd"))
    if in_checkout and not compiled:
        raise pytest.UsageError(
            f"wavg_ext is being imported from the source checkout ({origin.parent}), which "
            f"has no compiled wavg_ext._C. {_HOWTO}")
    try:
        import wavg_ext
        import wavg_ext._C  # noqa: F401
    except ImportError as exc:
        raise pytest.UsageError(
            f"cannot import wavg_ext._C from {origin.parent}: {exc}. {_HOWTO}") from exc
    return wavg_ext


wavg_ext = _check_import()
from wavg_ext import ops  # noqa: E402

# --------------------------------------------------------------------------------------
# Devices, dtypes, ops.
# --------------------------------------------------------------------------------------
BUILD_INFO = wavg_ext.build_info()
CUDA_OK = torch.cuda.is_available() and bool(BUILD_INFO["cuda"])
CUDA_REASON = "needs a CUDA device and wavg_ext built with CUDA kernels"
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)
EMULATION_OK = bool(BUILD_INFO.get("cuda_emulation"))
EMULATION_REASON = "wavg_ext built without the emulated CUDA kernels (WAVG_EXT_CUDA_EMULATION=0)"
requires_emulation = pytest.mark.skipif(not EMULATION_OK, reason=EMULATION_REASON)
# "emulated": CPU tensors, the test body inside wavg_ext.testing.cuda_emulation(), so
# every op runs the CUDA kernels' source on the emulator (see the `device` fixture).
DEVICES = ["cpu", pytest.param("emulated", marks=[pytest.mark.cuda_emulation, requires_emulation]),
           pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SHORT = {F32: "f32", F16: "f16", BF16: "bf16", F64: "f64"}
AVERAGE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64), (F32, F16), (F32, BF16),
                 (F64, F32), (F64, F16), (F64, BF16)]  # float64 averages do not stagnate
CAST_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64),
              (F32, F16), (F32, BF16), (F16, F32), (BF16, F32),
              (F64, F32), (F64, F16), (F64, BF16), (F32, F64), (F16, F64), (BF16, F64)]
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class OpInfo:
    name: str
    out_name: str
    in_name: str
    scalar_name: str
    pairs: tuple
    reads_out: bool
    lerp_like: bool  # ema_/running_mean_: exact vs torch.lerp / the reference fn


# The pair ops, from the op registry (_C.op_specs()): every test parametrized over ops
# covers a new one. Which are compared bit-for-bit with torch.lerp is test knowledge.
LERP_LIKE = {"running_mean_", "ema_"}
OPS = {spec["name"]: OpInfo(spec["name"], spec["lists"][0], spec["lists"][1], spec["scalar"],
                            tuple(AVERAGE_PAIRS if spec["pair_rule"] == "average" else CAST_PAIRS),
                            spec["reads_out"], spec["name"] in LERP_LIKE)
       for spec in wavg_ext._C.op_specs() if spec["kind"] == "pair"}
OP_NAMES = list(OPS)
# A valid, non-trivial scalar per op (exactly representable in float32 and int64 where
# it matters: see the scalar-form tests): by the scalar's rule, or chosen per op.
GOOD_SCALAR = {name: 3.0 if spec["scalar_rule"] == "finite_nonnegative" else 0.25
               for name, spec in ((s["name"], s) for s in wavg_ext._C.op_specs()) if spec["scalar"]}
GOOD_SCALAR.update({"accumulate_": -0.5, "scale_copy_": 1.5})
PATHS = ["ops", "torch.ops", "reference"]
ALL_OPS = "*"  # OP = ALL_OPS in a test module: parametrize over every op


def pair_id(pair):
    return f"{SHORT[pair[0]]}<-{SHORT[pair[1]]}"


# (out layout, in layout) pairs for the layout tests; see Helpers.embed.
LAYOUT_PAIRS = [("contig", "channels_last"), ("channels_last", "contig"),
                ("channels_last", "channels_last"), ("offset1", "offset3"), ("offset1", "contig"),
                ("strided", "transposed"), ("strided", "contig"), ("transposed", "transposed"),
                ("contig", "expanded"), ("offset1", "strided")]
ZERO_NUMEL_SHAPES = {"first": [(0,), (5,), (300,)], "middle": [(5,), (3, 0, 2), (300,)],
                     "last": [(5,), (300,), (0,)], "all": [(0,), (2, 0)]}


def pytest_generate_tests(metafunc):
    """In a module with OP = name: `dtypes` takes every dtype pair that op accepts.
    In a module with OP = ALL_OPS: `op` takes every op (with `dtypes`, every op's
    every pair). Anywhere: `layouts` takes every (out, in) pair of LAYOUT_PAIRS,
    `zero_numel` every entry of ZERO_NUMEL_SHAPES."""
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        return
    if op == ALL_OPS:
        if "dtypes" in metafunc.fixturenames:
            combos = [(name, pair) for name in OPS for pair in OPS[name].pairs]
            metafunc.parametrize("op,dtypes", combos,
                                 ids=[f"{name}-{pair_id(pair)}" for name, pair in combos])
        elif "op" in metafunc.fixturenames:
            metafunc.parametrize("op", list(OPS))
    elif "dtypes" in metafunc.fixturenames:
        metafunc.parametrize("dtypes", OPS[op].pairs, ids=pair_id)
    if "layouts" in metafunc.fixturenames:
        metafunc.parametrize("layouts", LAYOUT_PAIRS, ids="-".join)
    if "zero_numel" in metafunc.fixturenames:
        metafunc.parametrize("zero_numel", list(ZERO_NUMEL_SHAPES.values()),
                             ids=list(ZERO_NUMEL_SHAPES))


def pytest_collection_modifyitems(items):
    """Tests that take the `cuda` fixture get the `cuda` marker (`-m "not cuda"`)."""
    for item in items:
        if "cuda" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu", "cuda", or "emulated": then the test sees "cpu" and runs inside
    wavg_ext.testing.cuda_emulation(), so its ops on CPU tensors run the emulated CUDA
    kernels."""
    if request.param != "emulated":
        yield request.param
        return
    from wavg_ext.testing import cuda_emulation
    with cuda_emulation():
        yield "cpu"


@pytest.fixture
def cuda():
    if not CUDA_OK:
        pytest.skip(CUDA_REASON)
    return "cuda"


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Fresh seed per test; no test may leak force_reference or a thread count."""
    torch.manual_seed(0x5EED)
    threads = torch.get_num_threads()
    previous = ops.force_reference(False)
    yield
    ops.force_reference(previous)
    torch.set_num_threads(threads)


class NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on any read of a tensor's value by the host (what synchronizes on a GPU):
    ``with h.NoHostReads(): ...`` checks that a CPU run of an update makes none."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.tolist, torch.Tensor.__index__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor: {func.__name__}")
        return func(*args, **(kwargs or {}))


class Helpers:
    """Plain functions shared by the test modules (handed out by the `h` fixture)."""

    NoHostReads = NoHostReads

    OPS = OPS
    OP_NAMES = OP_NAMES
    PATHS = PATHS
    GOOD_SCALAR = GOOD_SCALAR
    F32, F16, BF16, F64 = F32, F16, BF16, F64
    CUDA_OK = CUDA_OK

    # ---- calling the ops --------------------------------------------------------------
    @staticmethod
    def call(op, outs, ins, scalar, path="ops"):
        """Run `op` through ops.* ("ops"), torch.ops.wavg_ext ("torch.ops"), or ops.* with
        force_reference(True) ("reference")."""
        if path == "ops":
            return getattr(ops, op)(outs, ins, scalar)
        if path == "torch.ops":
            packet = getattr(torch.ops.wavg_ext, op)
            overload = packet.Tensor if isinstance(scalar, torch.Tensor) else packet.default
            return overload(list(outs), list(ins), scalar)
        if path == "reference":
            previous = ops.force_reference(True)
            try:
                return getattr(ops, op)(outs, ins, scalar)
            finally:
                ops.force_reference(previous)
        raise AssertionError(path)

    @staticmethod
    def opmath(a, b):
        return F64 if F64 in (a.dtype, b.dtype) else F32

    @staticmethod
    def run_python(code, *args, env=None, timeout=300):
        """Run `code` in a fresh interpreter, outside the checkout (so that the installed
        wavg_ext is imported), and return the CompletedProcess."""
        import os
        import subprocess
        import sys
        import tempfile

        full_env = dict(os.environ, **(env or {}))
        full_env.pop("PYTHONPATH", None)
        with tempfile.TemporaryDirectory() as cwd:
            return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, *map(str, args)], cwd=cwd,
                                  env=full_env, capture_output=True, text=True, timeout=timeout)

    # ---- data --------------------------------------------------------------------------
    @staticmethod
    def rand(shape, dtype, device="cpu"):
        """Standard-normal values drawn on the CPU (same data on every device)."""
        return torch.randn(shape, dtype=F64).to(dtype).to(device)

    @staticmethod
    def make_lists(shapes, pairs, device="cpu"):
        """outs/ins with one (out dtype, in dtype) pair for all shapes, or one per shape."""
        if isinstance(pairs, tuple) and isinstance(pairs[0], torch.dtype):
            pairs = [pairs] * len(shapes)
        outs = [Helpers.rand(s, p[0], device) for s, p in zip(shapes, pairs)]
        ins = [Helpers.rand(s, p[1], device) for s, p in zip(shapes, pairs)]
        return outs, ins

    @staticmethod
    def scalar_as(value, kind, device):
        """A scalar as a Python float ("py") or a float64 one-element tensor on the CPU
        ("cpu_tensor") or on the lists' device ("dev_tensor")."""
        if kind == "py":
            return value
        dev = "cpu" if kind == "cpu_tensor" else device
        return torch.tensor(value, dtype=F64, device=dev)

    @staticmethod
    def clones(tensors):
        return [t.clone() for t in tensors]

    @staticmethod
    def guarded(shape, dtype, device, fill=float("nan"), guard=37):
        """(buffer, view): `view` has `shape` and sits between two guard regions of a
        `fill`-filled buffer; `view` is first set to random values."""
        n = math.prod(shape)
        buf = torch.full((guard + n + guard,), fill, dtype=dtype, device=device)
        view = buf[guard:guard + n].view(shape)
        view.copy_(Helpers.rand(shape, dtype, device))
        return buf, view

    # ---- comparisons -----------------------------------------------------------------
    @staticmethod
    def bits(t):
        t = t.detach().contiguous()
        return t.view(INT_VIEW[t.element_size()]) if t.is_floating_point() else t

    @staticmethod
    def assert_bits_equal(actual, expected, what=""):
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        a, e = Helpers.bits(actual).flatten(), Helpers.bits(expected).flatten()
        if not torch.equal(a, e):
            bad = (a != e).nonzero().flatten()
            k = bad[0].item()
            raise AssertionError(
                f"{what}: {bad.numel()} of {a.numel()} elements differ bitwise; first at flat "
                f"index {k}: {actual.flatten()[k].item()!r} vs {expected.flatten()[k].item()!r}")

    @staticmethod
    def require_torch_isa(device):
        """Bit-identity with torch's own CPU kernels holds only when wavg_ext's CPU
        kernels use the vector ISA torch dispatches to (same fused multiply-adds);
        builds for another ISA are held to the error bounds instead."""
        if device != "cpu":
            return
        ours = wavg_ext.build_info()["cpu_capability"].upper()
        torch_isa = torch.backends.cpu.get_cpu_capability().upper()
        if ours != torch_isa:
            pytest.skip(f"wavg_ext built for {ours}, torch runs {torch_isa}: not bit-comparable")

    @staticmethod
    def assert_float32_is_foreach_lerp(op, device, value, lerp_weight):
        """op(avgs, xs, value) on float32, with value as a float and as a float64 tensor,
        gives the bits of torch._foreach_lerp_(avgs, xs, lerp_weight)."""
        Helpers.require_torch_isa(device)
        avgs, xs = Helpers.make_lists(Helpers.SIZES, (torch.float32, torch.float32), device)
        expected = Helpers.clones(avgs)
        torch._foreach_lerp_(expected, xs, lerp_weight)
        for scalar in (value, torch.tensor(value, dtype=torch.float64, device=device)):
            got = Helpers.clones(avgs)
            Helpers.call(op, got, xs, scalar)
            Helpers.assert_all_bits_equal(got, expected, f"{op}({scalar!r}) vs _foreach_lerp_")

    @staticmethod
    def assert_all_bits_equal(actual, expected, what="tensor"):
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            Helpers.assert_bits_equal(a, e, f"{what}[{i}]")

    # ---- oracles -----------------------------------------------------------------------
    @staticmethod
    def reference(op, outs0, ins, scalar, upcast=False):
        """The pure-PyTorch reference on copies of outs0: at the tensors' own dtypes, or
        on float64 copies of everything (upcast=True: the oracle)."""
        outs = [o.to(F64, copy=True) if upcast else o.clone() for o in outs0]
        ins = [x.to(F64) for x in ins] if upcast else list(ins)
        getattr(ops.reference, op)(outs, ins, scalar)
        return outs

    @staticmethod
    def plain(op, outs0, ins, scalar):
        """Plain PyTorch computing the op's formula at the original dtypes (opmath)."""
        if op != "accumulate_":
            return Helpers.reference(op, outs0, ins, scalar)
        alpha = float(scalar)  # test code may sync
        res = []
        for o, x in zip(outs0, ins):
            m = Helpers.opmath(o, x)
            res.append(o.to(m).add_(x.to(m), alpha=alpha).to(o.dtype))
        return res

    @staticmethod
    def assert_matches_oracle(op, outs0, ins, scalar, outs):
        """Per dtype pair, the fused max-abs error of `outs` vs the float64 oracle is at
        most 2x that of plain PyTorch at the same dtypes (+ a tiny floor; no floor for
        ema_/running_mean_ into float32/float64, which must be exact). ema_/running_mean_
        must also equal the reference fn bit for bit (the kernels' documented arithmetic)."""
        assert len(outs) == len(outs0)
        for i, (o, o0) in enumerate(zip(outs, outs0)):
            assert o.dtype == o0.dtype and o.shape == o0.shape, f"outs[{i}] changed dtype/shape"
        oracle = Helpers.reference(op, outs0, ins, scalar, upcast=True)
        plain = Helpers.plain(op, outs0, ins, scalar)
        groups = {}
        for i, (o, x) in enumerate(zip(outs0, ins)):
            if o.numel():
                groups.setdefault((o.dtype, x.dtype), []).append(i)
        for (odt, idt), idx in groups.items():
            def err(res):
                return max((res[i].double().cpu() - oracle[i].cpu()).abs().max().item() for i in idx)
            err_kernel, err_plain = err(outs), err(plain)
            exact = OPS[op].lerp_like and odt in (F32, F64)
            floor = 0.0 if exact else torch.finfo(odt).eps * 1e-3
            assert err_kernel <= 2 * err_plain + floor, (
                f"{op} {SHORT[odt]}<-{SHORT[idt]}: max error vs float64 oracle {err_kernel:.3g} > "
                f"2 * plain PyTorch's {err_plain:.3g} + {floor:.3g}")
        if OPS[op].lerp_like:
            expected = Helpers.reference(op, outs0, ins, scalar)
            Helpers.assert_all_bits_equal(outs, expected, f"{op} vs reference fn: outs")

    @staticmethod
    def run_and_check(op, outs, ins, scalar, path="ops"):
        """Call op in place on outs and check the result against the oracle; returns a
        snapshot of outs from before the call."""
        outs0 = Helpers.clones(outs)
        ins0 = Helpers.clones(ins)
        Helpers.call(op, outs, ins, scalar, path)
        Helpers.assert_all_bits_equal(ins, ins0, f"{op}: inputs modified: ins")
        Helpers.assert_matches_oracle(op, outs0, ins, scalar, outs)
        return outs0

    # ---- layouts -----------------------------------------------------------------------
    @staticmethod
    def embed(values, layout, fill=float("nan")):
        """(base, view): `view` holds `values` in the given memory layout and is a view of
        the fresh tensor `base`, whose other elements (guards) hold `fill`."""
        shape, dt, dev = values.shape, values.dtype, values.device
        if layout == "contig":
            base = values.clone()
            return base, base
        if layout.startswith("offset"):  # misaligned: base[off:], guards on both sides
            off, n = int(layout[len("offset"):]), values.numel()
            base = torch.full((off + n + 7,), fill, dtype=dt, device=dev)
            view = base[off:off + n].view(shape)
        elif layout == "channels_last":
            base = values.contiguous(memory_format=torch.channels_last)
            return base, base
        elif layout == "strided":  # every other element of the last dim: not dense
            base = torch.full((*shape[:-1], 2 * shape[-1]), fill, dtype=dt, device=dev)
            view = base[..., ::2]
        elif layout == "transposed":  # dense, but strides differ from the partner's
            base = torch.full(tuple(reversed(shape)), fill, dtype=dt, device=dev)
            view = base.permute(*reversed(range(len(shape))))
        elif layout == "expanded":  # inputs only: internally overlapping
            base = values[..., :1].clone()
            return base, base.expand(shape)
        else:
            raise AssertionError(layout)
        view.copy_(values)
        return base, view

    @staticmethod
    def outside_view(base, view):
        """A copy of `base` with the elements `view` covers zeroed: the guards only."""
        g = base.clone()
        g.as_strided(view.size(), view.stride(), view.storage_offset()).zero_()
        return g

    # ---- scenarios shared by the per-op test modules -----------------------------------
    SIZES = [(1,), (3,), (17, 241), (65537,)]

    @staticmethod
    def scenario_oracle(op, device, dtypes, value, kind, shapes=None):
        outs, ins = Helpers.make_lists(shapes or Helpers.SIZES, dtypes, device)
        Helpers.run_and_check(op, outs, ins, Helpers.scalar_as(value, kind, device))

    @staticmethod
    def mixed_pairs(op, n):
        pairs = OPS[op].pairs
        return [pairs[i % len(pairs)] for i in range(n)]

    @staticmethod
    def scenario_zero_numel(op, device, shapes):
        outs, ins = Helpers.make_lists(shapes, Helpers.mixed_pairs(op, len(shapes)), device)
        Helpers.run_and_check(op, outs, ins, GOOD_SCALAR[op])
        assert [tuple(o.shape) for o in outs] == [tuple(s) for s in shapes]

    @staticmethod
    def scenario_many_small(op, device, n=3000):
        gen = torch.Generator().manual_seed(n)
        numels = torch.randint(0, 40, (n,), generator=gen).tolist()
        shapes = [(k,) if i % 3 else (1, k, 1) for i, k in enumerate(numels)]
        outs, ins = Helpers.make_lists(shapes, Helpers.mixed_pairs(op, n), device)
        Helpers.run_and_check(op, outs, ins, GOOD_SCALAR[op])

    @staticmethod
    def scenario_big(op, device, numel=21_000_003):
        """One tensor larger than one CUDA launch (320 * 65536 elements), between small
        ones; it is not the first of its dtype group, so the launch boundary cuts it as
        entry 1 and the next launch must carry it over as its entry 0."""
        shapes = [(5,), (7,), (numel,), (3,)]
        outs, ins = Helpers.make_lists(shapes, [(F32, BF16), (F32, F32), (F32, F32), (F64, F64)], device)
        Helpers.run_and_check(op, outs, ins, GOOD_SCALAR[op])

    LAYOUT_SHAPES = [(4, 16, 33, 31), (1, 3, 1, 5), (2, 3, 4, 5)]

    @staticmethod
    def scenario_layouts(op, device, dtypes, layouts, value=None):
        value = GOOD_SCALAR[op] if value is None else value
        out_layout, in_layout = layouts
        bases, outs, ins = [], [], []
        for shape in Helpers.LAYOUT_SHAPES:
            base, out = Helpers.embed(Helpers.rand(shape, dtypes[0], device), out_layout)
            bases.append(base)
            outs.append(out)
            ins.append(Helpers.embed(Helpers.rand(shape, dtypes[1], device), in_layout)[1])
        guards = [Helpers.outside_view(b, o) for b, o in zip(bases, outs)]
        Helpers.run_and_check(op, outs, ins, value)
        for i, (b, o, g) in enumerate(zip(bases, outs, guards)):
            Helpers.assert_bits_equal(Helpers.outside_view(b, o), g, f"guards around outs[{i}]")

    @staticmethod
    def scenario_poisoned_outputs(op, device, dtypes, value, kind="py", out_layout="offset1"):
        """Ops that do not read the output (scale_copy_, running_mean_ with count 0) must
        overwrite a NaN-filled output completely, and nothing around it."""
        bases, outs = [], []
        ins = [Helpers.rand(s, dtypes[1], device) for s in Helpers.LAYOUT_SHAPES]
        for shape in Helpers.LAYOUT_SHAPES:
            base, out = Helpers.embed(torch.zeros(shape, dtype=dtypes[0], device=device), out_layout)
            out.fill_(float("nan"))
            bases.append(base)
            outs.append(out)
        guards = [Helpers.outside_view(b, o) for b, o in zip(bases, outs)]
        Helpers.call(op, outs, ins, Helpers.scalar_as(value, kind, device))
        scale = float(value) if op == "scale_copy_" else 1.0
        for i, (o, x) in enumerate(zip(outs, ins)):
            assert not o.isnan().any(), f"{op}: NaN left in outs[{i}]"
            m = Helpers.opmath(o, x)
            Helpers.assert_bits_equal(o, (x.to(m) * scale).to(o.dtype), f"{op}: outs[{i}]")
        for i, (b, o, g) in enumerate(zip(bases, outs, guards)):
            Helpers.assert_bits_equal(Helpers.outside_view(b, o), g, f"guards around outs[{i}]")

    @staticmethod
    def scenario_determinism(op, device):
        """Same call twice on clones, and with 1 thread vs all threads: same bits."""
        shapes = [(70001,), (3,), (65536 * 2 + 7,), (1,)]
        outs, ins = Helpers.make_lists(shapes, Helpers.mixed_pairs(op, len(shapes)), device)
        results = []
        for threads in (torch.get_num_threads(), torch.get_num_threads(), 1):
            torch.set_num_threads(threads)
            res = Helpers.clones(outs)
            Helpers.call(op, res, ins, GOOD_SCALAR[op])
            results.append(res)
        Helpers.assert_all_bits_equal(results[1], results[0], f"{op} second run")
        Helpers.assert_all_bits_equal(results[2], results[0], f"{op} with one thread")

    INT_SCALAR = {"running_mean_": 3, "ema_": 1, "accumulate_": -2, "scale_copy_": 3}

    @staticmethod
    def scenario_scalar_forms(op, device, tensor_dtype, tensor_device="cpu"):
        """A Python float and a one-element tensor (any accepted dtype) of the same value
        give identical results."""
        is_int = not tensor_dtype.is_floating_point
        value = Helpers.INT_SCALAR[op] if is_int else GOOD_SCALAR[op]
        outs, ins = Helpers.make_lists([(3, 7), (4097,)], Helpers.mixed_pairs(op, 2), device)
        expected = Helpers.clones(outs)
        Helpers.call(op, expected, ins, float(value))
        for shape in [(), (1,), (1, 1)]:
            scalar = torch.full(shape, value, dtype=tensor_dtype, device=tensor_device)
            for path in ("ops", "torch.ops"):
                res = Helpers.clones(outs)
                Helpers.call(op, res, ins, scalar, path)
                Helpers.assert_all_bits_equal(res, expected, f"{op} {path} scalar {scalar!r}")
            assert scalar.item() == value  # the scalar is not modified

    @staticmethod
    def scenario_empty_lists(op, path, kind, device="cpu"):
        scalar = Helpers.scalar_as(GOOD_SCALAR[op], kind, device)
        for make in (list, tuple, iter):
            if path == "torch.ops" and make is iter:
                continue
            assert Helpers.call(op, make([]), make([]), scalar, path) is None

    # ---- optimizer-wrapper tasks ------------------------------------------------------
    @staticmethod
    def tiny_model(seed=0, bn=False, dtype=torch.float32, device="cpu"):
        """A small MLP (optionally with BatchNorm) with a fixed initialization."""
        gen = torch.Generator().manual_seed(seed)
        layers = [torch.nn.Linear(6, 8)] + ([torch.nn.BatchNorm1d(8)] if bn else []) + \
                 [torch.nn.Tanh(), torch.nn.Linear(8, 3)]
        model = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model.to(device=device, dtype=dtype)

    @staticmethod
    def batches(n, seed=1, size=16, dtype=torch.float32, device="cpu"):
        """n fixed (inputs, targets) regression batches."""
        gen = torch.Generator().manual_seed(seed)
        return [(torch.randn(size, 6, generator=gen).to(device, dtype),
                 torch.randn(size, 3, generator=gen).to(device, dtype)) for _ in range(n)]

    @staticmethod
    def train(model, opt, batches, steps, first=0, after_step=None, scaler=None):
        """Steps first..steps-1 of SGD on batches[i % len]; after_step(i) after each."""
        for i in range(first, steps):
            x, y = batches[i % len(batches)]
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            if after_step is not None:
                after_step(i)

    @staticmethod
    def params_of(model):
        return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def h():
    return Helpers


class BasisHelpers:
    """Helpers for the basis ops (dots, combine_, project_, orthonormalize_*): the `hb` fixture."""

    BASIS_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
    # (basis dtype, partner dtype) pairs the ops accept.
    PAIRS = [(F32, F32), (F32, F16), (F32, BF16), (BF16, F32), (BF16, BF16), (BF16, F16), (F64, F64)]
    SHAPES = [(3,), (17, 241), (0,), (1,), (4, 3, 5, 7), (70001,)]

    @staticmethod
    def basis(shapes, capacity, dtype, device="cpu", seed=0):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn((capacity, *s), generator=gen, dtype=F64).to(dtype).to(device) for s in shapes]

    @staticmethod
    def tensors(shapes, dtype, device="cpu", seed=1):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=gen, dtype=F64).to(dtype).to(device) for s in shapes]

    @staticmethod
    def rows(basis, k=None):
        """The first k rows of a basis as one float64 [k, D] matrix (logical element order)."""
        cap = basis[0].shape[0]
        k = cap if k is None else k
        return torch.cat([b[:k].reshape(k, -1).double().cpu() for b in basis], dim=1)

    @staticmethod
    def flat(tensors):
        return torch.cat([t.reshape(-1).double().cpu() for t in tensors])

    @staticmethod
    def random_walk(shapes, n, capacity=None, dtype=F32, device="cpu", step=1e-2, seed=0):
        """A basis whose rows 0..n-1 are a random walk w_j = w_{j-1} + step * noise, like
        SGD checkpoints (nearly collinear)."""
        from wavg_ext import ops
        gen = torch.Generator().manual_seed(seed)
        w = [torch.randn(s, generator=gen) for s in shapes]
        basis = ops.new_basis(w, capacity or n, dtype=dtype)
        for j in range(n):
            for b, x in zip(basis, w):
                b[j].copy_(x)
            w = [x + step * torch.randn(x.shape, generator=gen) for x in w]
        return [b.to(device) for b in basis]

    @staticmethod
    def orthogonality_error(basis, k):
        p = BasisHelpers.rows(basis, k)
        return (p @ p.T - torch.eye(k, dtype=F64)).abs().max().item()


@pytest.fixture
def hb():
    return BasisHelpers


def _max_err(got, oracle):
    return max(((g.double().cpu() - o.double().cpu()).abs().max().item() if o.numel() else 0.0)
               for g, o in zip(got, oracle))


def _assert_fused_error(what, got, oracle, plain, dtype, floor=None):
    """flash-attn style: the fused error vs the float64 oracle is at most twice plain
    PyTorch's error at the same dtypes, plus one rounding of the result dtype (or `floor`:
    float64 results, whose oracle is no more precise than themselves, pass the size of
    float64 summation error)."""
    scale = max((o.abs().max().item() if o.numel() else 0.0) for o in oracle)
    if floor is None:
        floor = torch.finfo(dtype).eps * max(scale, 1e-30)
    err, err_plain = _max_err(got, oracle), _max_err(plain, oracle)
    assert err <= 2 * err_plain + floor, (
        f"{what}: max error vs float64 oracle {err:.3g} > 2 * plain PyTorch's {err_plain:.3g} + {floor:.3g}")


BasisHelpers.assert_fused_error = staticmethod(_assert_fused_error)
