"""Run-time choice of the CPU kernels' vector ISA (csrc/cpu/capability.cpp).

One build holds the CPU kernels compiled for every ISA of csrc/cpu/capabilities.py;
import picks the best the CPU supports and ``WAVG_EXT_CPU_CAPABILITY`` forces a lower
one. The copies must agree: bit for bit where they compute the same formula (every ISA
with FMA, and the ops without a multiply-add on every ISA), within the ops' error
bounds where the default ISA rounds a multiply-add twice or a reduction's order
follows the vector width. (scripts/test.sh also runs the op tests under each ISA.)
"""

from __future__ import annotations

import json
import platform

import pytest
import torch

import wavg_ext
from wavg_ext import ops, testing

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
X86 = platform.machine().lower() in ("x86_64", "amd64")
SUPPORTED = testing.supported_cpu_capabilities()
FMA_ISAS = [c for c in SUPPORTED if c != "default"]
SHAPES = [(1000,), (37,), (3, 5, 7), (70001,), (0,)]
PAIRS = {"average": [(F32, F32), (F16, F16), (BF16, BF16), (F64, F64), (F32, F16), (F64, BF16)],
         "cast": [(F32, F32), (F16, F32), (F32, BF16), (F64, F64), (BF16, F64)]}
SCALARS = {"running_mean_": 2.0, "ema_": 0.3, "accumulate_": -0.7, "scale_copy_": 1.3}
PAIR_SPECS = [s for s in wavg_ext._C.op_specs() if s["kind"] == "pair"]


def _info_in_subprocess(h, env):
    code = ("import json, warnings\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import wavg_ext\n"
            "print(json.dumps({'info': wavg_ext.build_info(), 'warnings': [str(x.message) for x in w]}))\n")
    proc = h.run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_under(isa, fn):
    with testing.cpu_capability(isa):
        return fn()


def _bits_equal(a, b):
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_build_reports_compiled_and_selected_isa():
    info = wavg_ext.build_info()
    compiled = info["cpu_capabilities"]
    assert compiled == (["default", "avx2", "avx512", "avx512_bf16"] if X86 else ["default"])
    assert SUPPORTED[0] == "default" and set(SUPPORTED) <= set(compiled)
    assert info["cpu_capability"] in SUPPORTED


def test_import_picks_the_best_supported_isa(h):
    got = _info_in_subprocess(h, {"WAVG_EXT_CPU_CAPABILITY": ""})
    assert got["info"]["cpu_capability"] == SUPPORTED[-1] and got["warnings"] == []


@pytest.mark.parametrize("isa", SUPPORTED)
def test_environment_forces_a_supported_isa(h, isa):
    got = _info_in_subprocess(h, {"WAVG_EXT_CPU_CAPABILITY": isa.upper()})  # case does not matter
    assert got["info"]["cpu_capability"] == isa and got["warnings"] == []


def test_environment_with_an_unknown_isa_warns_and_keeps_the_best(h):
    got = _info_in_subprocess(h, {"WAVG_EXT_CPU_CAPABILITY": "sse9"})
    assert got["info"]["cpu_capability"] == SUPPORTED[-1]
    assert len(got["warnings"]) == 1 and "WAVG_EXT_CPU_CAPABILITY=sse9" in got["warnings"][0]


@pytest.mark.skipif(len(SUPPORTED) == len(wavg_ext.build_info()["cpu_capabilities"]),
                    reason="this CPU supports every compiled ISA")
def test_environment_with_an_unsupported_isa_warns_and_keeps_the_best(h):
    missing = [c for c in wavg_ext.build_info()["cpu_capabilities"] if c not in SUPPORTED][0]
    got = _info_in_subprocess(h, {"WAVG_EXT_CPU_CAPABILITY": missing})
    assert got["info"]["cpu_capability"] == SUPPORTED[-1]
    assert "does not support" in got["warnings"][0]


@pytest.mark.parametrize("name", ["sse9", "", "AVX2 "])
def test_switch_refuses_unknown_names_and_keeps_the_selection(name):
    before = wavg_ext.build_info()["cpu_capability"]
    with pytest.raises(ValueError, match="not an ISA of this build"):
        with testing.cpu_capability(name):
            pass
    assert wavg_ext.build_info()["cpu_capability"] == before


@pytest.mark.parametrize("isa", SUPPORTED)
def test_switch_selects_and_restores(isa):
    before = wavg_ext.build_info()["cpu_capability"]
    with testing.cpu_capability(isa):
        assert wavg_ext.build_info()["cpu_capability"] == isa
    assert wavg_ext.build_info()["cpu_capability"] == before


def _pair_case(spec, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(s, generator=g, dtype=F64).to(dtypes[0]) for s in SHAPES]
    ins = [torch.randn(s, generator=g, dtype=F64).to(dtypes[1]) for s in SHAPES]
    return outs, ins


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="one ISA only")
@pytest.mark.parametrize("spec,dtypes", [(s, p) for s in PAIR_SPECS for p in PAIRS[s["pair_rule"]]],
                         ids=lambda v: v["name"] if isinstance(v, dict) else f"{v[0]}<-{v[1]}")
def test_pair_ops_agree_across_isas(spec, dtypes):
    name, scalar = spec["name"], SCALARS.get(spec["name"], 0.5)
    outs0, ins = _pair_case(spec, dtypes, seed=len(name))

    def run():
        outs = [t.clone() for t in outs0]
        getattr(ops, name)(outs, ins, scalar)
        return outs

    results = {isa: _run_under(isa, run) for isa in SUPPORTED}
    for isa in FMA_ISAS[1:]:  # the same formula: the same bits
        assert _bits_equal(results[isa], results[FMA_ISAS[0]]), (name, isa)
    # The default ISA rounds a + w*(x - a) twice: every ISA within the bound of the
    # float64 oracle, and the same bits where there is no multiply-add (scale_copy_).
    oracle = [t.double() for t in outs0]
    getattr(ops.reference, name)(oracle, [t.double() for t in ins], scalar)
    for isa in SUPPORTED:
        for got, want, o0 in zip(results[isa], oracle, outs0):
            if got.numel():
                err = (got.double() - want).abs().max().item()
                # opmath is float32 (float64 for float64 pairs): a few roundings of it,
                # plus the final rounding into out's dtype.
                eps = torch.finfo(F64 if F64 in dtypes else F32).eps
                bound = 8 * eps * (want.abs().max().item() + 1) + torch.finfo(got.dtype).eps * want.abs().max().item()
                assert err <= bound, (name, isa, err, bound)
    if name == "scale_copy_":
        for isa in SUPPORTED:
            assert _bits_equal(results[isa], results["default"]), isa


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="one ISA only")
@pytest.mark.parametrize("name", ["running_mean_compensated_", "ema_compensated_"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_compensated_ops_agree_across_fma_isas(name, dtype):
    g = torch.Generator().manual_seed(7)
    avgs0 = [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in SHAPES]
    xs = [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in SHAPES]

    def run():
        avgs = [t.clone() for t in avgs0]
        comps = [torch.zeros_like(t) for t in avgs]
        getattr(ops, name)(avgs, comps, xs, 0.3 if name.startswith("ema") else 2.0)
        return avgs + comps

    results = {isa: _run_under(isa, run) for isa in SUPPORTED}
    for isa in FMA_ISAS[1:]:
        assert _bits_equal(results[isa], results[FMA_ISAS[0]]), isa
    for isa in SUPPORTED:  # the value avg + comp: float64 arithmetic on every ISA
        n = len(avgs0)
        for a, c, b, d in zip(results[isa][:n], results[isa][n:], results["default"][:n], results["default"][n:]):
            assert torch.allclose(a.double() + c.double(), b.double() + d.double(), rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="one ISA only")
def test_nonfinite_flag_and_combine_agree_bitwise_on_every_isa():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) for s in SHAPES]
    bad = [t.clone() for t in xs]
    bad[3][65536 + 11] = float("inf")
    basis = [torch.randn((3,) + s, generator=g) for s in SHAPES]
    coeffs = torch.tensor([0.5, -1.0, 2.0])

    def run():
        outs = [t.clone() for t in xs]
        ops.combine_(outs, basis, coeffs, 1.0, 0.5)
        return [ops.nonfinite_flag(xs), ops.nonfinite_flag(bad)] + outs

    results = {isa: _run_under(isa, run) for isa in SUPPORTED}
    assert int(results["default"][0]) == 0 and int(results["default"][1]) == 1
    for isa in SUPPORTED:
        assert _bits_equal(results[isa][:2], results["default"][:2]), isa
    for isa in FMA_ISAS[1:]:
        assert _bits_equal(results[isa], results[FMA_ISAS[0]]), isa


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="one ISA only")
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_row_reductions_match_the_oracle_on_every_isa(hb, dtype):
    """dots, orthonormalize_ and the batch Gram sum in the order of the vector width: every
    ISA is held to the float64 oracle (the results of one ISA are fixed for any thread count:
    test_orthonormalize*.py)."""
    g = torch.Generator().manual_seed(5)
    basis0 = [torch.randn((4,) + s, generator=g, dtype=F64).to(dtype) for s in SHAPES]
    xs = [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in SHAPES]
    want = torch.stack([sum((b[i].double() * x.double()).sum() for b, x in zip(basis0, xs)) for i in range(3)])
    for isa in SUPPORTED:
        with testing.cpu_capability(isa):
            got = ops.dots(basis0, xs, 3).double()
            b = [t.clone() for t in basis0]
            ops.orthonormalize_many_(b, 0, 4)
        tol = 1e-12 if dtype == F64 else 1e-4
        assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()), isa
        assert hb.orthogonality_error(b, 4) < (1e-12 if dtype == F64 else 3e-2 if dtype == BF16 else 1e-5), isa


@pytest.mark.skipif("avx512_bf16" not in SUPPORTED, reason="the CPU lacks AVX512-BF16")
def test_bf16_dot_instruction_matches_float32_runs_accuracy():
    """avx512_bf16 computes the bfloat16 x bfloat16 Gram tiles of orthonormalize_many_ with
    vdpbf16ps: orthonormal rows, the same bits on one thread and on two; its one-partner
    dots keep float64 products (within twice plain float32 PyTorch's error, too)."""
    g = torch.Generator().manual_seed(9)
    shapes = [(200003,), (37,), (3, 5, 7), (65536 * 2 + 33,), (0,)]
    basis = [torch.randn((6,) + s, generator=g).to(BF16) for s in shapes]
    xs = [torch.randn(s, generator=g).to(BF16) for s in shapes]
    exact = torch.stack([sum((b[i].double() * x.double()).sum() for b, x in zip(basis, xs)) for i in range(6)])
    plain = torch.stack([sum((b[i].float() * x.float()).sum() for b, x in zip(basis, xs)) for i in range(6)])
    floor = 1e-6 * exact.abs().max().item()
    with testing.cpu_capability("avx512_bf16"):
        got = ops.dots(basis, xs, 6).double()
        assert (got - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + floor
        # the Gram tiles: orthonormal rows, the same bits for any thread count
        results = []
        threads = torch.get_num_threads()
        try:
            for n in (threads, 1):
                torch.set_num_threads(n)
                rows = [b.clone() for b in basis]
                res = ops.orthonormalize_many_(rows, 0, 6)
                results.append((rows, res.residuals))
        finally:
            torch.set_num_threads(threads)
    assert _bits_equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    rows = [r.double().reshape(6, -1) for r in results[0][0]]
    gram = sum(r @ r.T for r in rows)
    assert (gram - torch.eye(6, dtype=F64)).abs().max() < 3e-2


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="one ISA only")
def test_switch_applies_to_worker_threads():
    """at::parallel_for's threads run the kernels the calling thread chose: a tensor large
    enough to be split over threads gets the bits of the same update done piece by piece
    (each piece too small to leave the calling thread), and the ISAs give different bits."""
    g = torch.Generator().manual_seed(11)
    n, piece = 1 << 22, 4096
    avgs0, xs = torch.randn(n, generator=g), torch.randn(n, generator=g)
    results = {}
    for isa in ["default", FMA_ISAS[-1]]:
        with testing.cpu_capability(isa):
            whole = avgs0.clone()
            ops.ema_([whole], [xs], 0.3)
            pieces = avgs0.clone()
            for i in range(0, n, piece):
                ops.ema_([pieces[i:i + piece]], [xs[i:i + piece]], 0.3)
        assert torch.equal(whole, pieces), isa
        results[isa] = whole
    assert not torch.equal(results["default"], results[FMA_ISAS[-1]])
