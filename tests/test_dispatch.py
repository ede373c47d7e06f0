"""Cross-cutting behaviour: op registration (opcheck), torch.compile, both call paths,
force_reference, autograd, build information, threading, and CUDA-only features."""

import os
import pathlib

import pytest
import torch

import wavg_ext
from wavg_ext import ops

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
OP_NAMES = [spec["name"] for spec in wavg_ext._C.op_specs() if spec["kind"] == "pair"]  # the registry's
MIXED = {"average": [(F32, F32), (F32, F16), (F16, F16), (F64, F64), (F32, BF16), (BF16, BF16), (F64, BF16)],
         "cast": [(F16, F32), (F32, F16), (BF16, F32), (F64, F64), (F32, BF16), (F16, F16), (BF16, F64)]}
SHAPES = [(3,), (2, 5), (0,), (70001,), (1, 1), (4, 3, 2)]
# torch's own opcheck/inductor internals warn about torch.jit; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def _mixed_lists(h, op, device="cpu", shapes=SHAPES):
    pairs = MIXED["cast" if op == "scale_copy_" else "average"]
    return h.make_lists(shapes, [pairs[i % len(pairs)] for i in range(len(shapes))], device)


def _overload(op, tensor_scalar):
    packet = getattr(torch.ops.wavg_ext, op)
    return packet.Tensor if tensor_scalar else packet.default


# ---------------------------------------------------------------- registration ---------
@pytest.mark.parametrize("overload", ["default", "Tensor"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_schema(op, overload):
    schema = str(getattr(getattr(torch.ops.wavg_ext, op), overload)._schema)
    out_name, in_name = ("dsts", "srcs") if op == "scale_copy_" else (
        ("sums", "xs") if op == "accumulate_" else ("avgs", "xs"))
    assert f"Tensor(a!)[] {out_name}, Tensor[] {in_name}," in schema
    assert schema.endswith("-> ()")
    assert ("Tensor " if overload == "Tensor" else "float ") in schema.split(",")[-1]


@pytest.mark.parametrize("overload", ["default", "Tensor"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck(h, op, overload):
    samples = [_mixed_lists(h, op, shapes=[(3,), (2, 5), (0,), (4, 3, 2)]),
               h.make_lists([(6,)], (F64, F64)),
               h.make_lists([(2, 3, 4, 5)], (F32, F32))]
    t = samples[2][1][0]
    samples[2][1][0] = t.contiguous(memory_format=torch.channels_last)  # layouts differ
    for outs, ins in samples:
        scalar = h.GOOD_SCALAR[op]
        if overload == "Tensor":
            scalar = torch.tensor(scalar, dtype=F64 if op != "running_mean_" else torch.int64)
        result = torch.library.opcheck(getattr(getattr(torch.ops.wavg_ext, op), overload),
                                       (outs, ins, scalar))
        assert all(v == "SUCCESS" for v in result.values()), result


# ---------------------------------------------------------------- torch.compile -------
def _compile_and_compare(h, fn, outs, *args):
    compiled = torch.compile(fn, fullgraph=True)
    eager_outs, compiled_outs = h.clones(outs), h.clones(outs)
    fn(eager_outs, *args)
    compiled(compiled_outs, *args)
    h.assert_all_bits_equal(compiled_outs, eager_outs, "compiled vs eager")
    return compiled


def test_compile_ema(h):
    def step(avgs, xs, weight):
        ops.ema_(avgs, xs, weight)
        return avgs

    avgs, xs = _mixed_lists(h, "ema_", shapes=[(3,), (2, 5), (0,), (300,)])
    for weight in (0.1, torch.tensor(0.75)):
        _compile_and_compare(h, step, avgs, xs, weight)


def test_compile_running_mean_with_tensor_count(h):
    def step(avgs, xs, count):
        ops.running_mean_(avgs, xs, count)
        return avgs

    avgs, xs = _mixed_lists(h, "running_mean_", shapes=[(3,), (2, 5), (0,), (300,)])
    compiled = _compile_and_compare(h, step, avgs, xs, torch.tensor(3))
    for count in (0, 1, 9):  # a changing count is data, not a constant baked into the graph
        expected, got = h.clones(avgs), h.clones(avgs)
        ops.running_mean_(expected, xs, torch.tensor(count))
        compiled(got, xs, torch.tensor(count))
        h.assert_all_bits_equal(got, expected, f"compiled running_mean_ count={count}")


# ---------------------------------------------------------------- call paths -----------
@pytest.mark.parametrize("tensor_scalar", [False, True])
@pytest.mark.parametrize("op", OP_NAMES)
def test_torch_ops_path_equals_ops_path(h, device, op, tensor_scalar):
    outs, ins = _mixed_lists(h, op, device)
    big = torch.randn(9, 8, dtype=F32, device=device)
    outs.append(big[:, ::2])  # a non-dense output, written through a temporary
    ins.append(h.rand((9, 4), F16 if op == "scale_copy_" else F32, device))
    scalar = h.GOOD_SCALAR[op]
    if tensor_scalar:
        scalar = torch.tensor(scalar, dtype=F64, device=device)
    via_ops, via_torch_ops = h.clones(outs), h.clones(outs)
    getattr(ops, op)(via_ops, ins, scalar)
    _overload(op, tensor_scalar)(via_torch_ops, ins, scalar)
    h.assert_all_bits_equal(via_ops, via_torch_ops, f"{op}: ops.* vs torch.ops")
    h.assert_matches_oracle(op, outs, ins, scalar, via_ops)


@pytest.mark.parametrize("container", [list, tuple, iter])
@pytest.mark.parametrize("op", OP_NAMES)
def test_lists_tuples_and_generators(h, op, container):
    outs, ins = _mixed_lists(h, op)
    expected = h.clones(outs)
    getattr(ops, op)(expected, ins, h.GOOD_SCALAR[op])
    got = h.clones(outs)
    getattr(ops, op)(container(got), (x for x in ins) if container is iter else container(ins),
                     h.GOOD_SCALAR[op])
    h.assert_all_bits_equal(got, expected, f"{op} with {container.__name__}")


# ---------------------------------------------------------------- force_reference ------
def test_force_reference_returns_previous_and_routes(h, monkeypatch):
    calls = []
    real = ops.reference.ema_
    monkeypatch.setattr(ops.reference, "ema_", lambda *a: (calls.append(1), real(*a))[1])
    avgs, xs = h.make_lists([(5,)], (F32, F32))
    assert ops.force_reference(True) is False
    ops.ema_(avgs, xs, 0.5)
    assert calls == [1]
    assert ops.force_reference(False) is True
    ops.ema_(avgs, xs, 0.5)
    assert calls == [1]


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False)])
def test_force_reference_initial_value_from_environment(h, value, expected):
    proc = h.run_python("from wavg_ext import ops; print(ops.force_reference(False))",
                        env={"WAVG_EXT_FORCE_REFERENCE": value})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(expected)


@pytest.mark.parametrize("tensor_scalar", [False, True])
@pytest.mark.parametrize("op", OP_NAMES)
def test_force_reference_matches_kernels(h, device, op, tensor_scalar):
    outs, ins = _mixed_lists(h, op, device)
    scalar = h.GOOD_SCALAR[op]
    if tensor_scalar:
        scalar = torch.tensor(scalar, dtype=F64, device=device)
    kernel = h.clones(outs)
    h.call(op, kernel, ins, scalar, "ops")
    reference = h.clones(outs)
    h.run_and_check(op, reference, ins, scalar, "reference")
    if op != "accumulate_":  # the reference's sum is not fused (two roundings)
        h.assert_all_bits_equal(kernel, reference, f"{op}: kernels vs force_reference")


def test_force_reference_still_validates(h):
    ops.force_reference(True)
    avgs, xs = h.make_lists([(3,), (4,)], (F32, F32))
    xs[1] = torch.randn(5)
    before = h.clones(avgs)
    with pytest.raises(ValueError, match=r"ema_: avgs\[1\] has shape \[4\] but xs\[1\] has shape \[5\]"):
        ops.ema_(avgs, xs, 0.5)
    h.assert_all_bits_equal(avgs, before, "avgs")


# ---------------------------------------------------------------- autograd -------------
@pytest.mark.parametrize("path", ["ops", "torch.ops", "reference"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_does_not_join_autograd(h, device, op, path):
    outs, ins = _mixed_lists(h, op, device, shapes=[(3,), (70001,)])
    params = [torch.nn.Parameter(x) for x in ins]
    versions = [o._version for o in outs]
    h.call(op, outs, params, h.GOOD_SCALAR[op], path)
    for o, v in zip(outs, versions):
        assert not o.requires_grad and o.grad_fn is None
        assert o._version > v, "the output's version counter was not bumped"
    loss = sum((p.float() ** 2).sum() for p in params)  # the params' graph still works
    loss.backward()
    assert all(p.grad is not None for p in params)


# ---------------------------------------------------------------- build info, threads --
def test_build_info():
    info = wavg_ext.build_info()
    types = {"version": str, "cpu": bool, "cpu_capability": str, "openmp": bool,
             "num_threads": int, "cuda": bool, "cuda_built": bool, "cuda_status": str, "cuda_version": str,
             "cuda_archs": str, "torch_version": str}
    assert set(types) <= set(info), f"missing keys: {set(types) - set(info)}"
    for key, typ in types.items():
        assert type(info[key]) is typ, f"{key}: {info[key]!r} is not a {typ.__name__}"
    assert info["version"] == wavg_ext.__version__
    assert info["cpu"] is True and info["cpu_capability"]
    assert info["num_threads"] == torch.get_num_threads()
    assert info["torch_version"] == torch.__version__, "built against another torch"
    if info["cuda_built"]:
        assert info["cuda_version"] and info["cuda_archs"]
    assert info["cuda_built"] or not info["cuda"]
    if info["openmp"] is False:
        assert not torch.backends.openmp.is_available(), "torch has OpenMP but the kernels do not"


@pytest.mark.parametrize("built_for", ["same", "other", "none"])
def test_import_failure_names_the_torch_versions(h, tmp_path, built_for):
    """An extension that cannot be loaded (here: a file that is no shared object) gives one
    clear ImportError: built for another torch (both versions named), or not built at all."""
    import shutil

    pkg = tmp_path / "wavg_ext"
    shutil.copytree(pathlib.Path(wavg_ext.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    version = {"same": torch.__version__, "other": "9.9.9+cu999", "none": None}[built_for]
    if version is not None:
        import importlib.machinery

        (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(
            b"\x7fELF not really " + f"wavg_ext built for torch {version};".encode())
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import wavg_ext"
    proc = h.run_python(code)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: wavg_ext's compiled extension"), proc.stderr
    if built_for == "other":
        assert f"built for torch 9.9.9+cu999, but torch {torch.__version__} is installed" in last
    elif built_for == "same":
        assert f"built for this torch, {torch.__version__}" in last
    else:
        assert "was not found" in last


def test_the_installed_extension_names_its_torch():
    assert wavg_ext._torch_built_for() == torch.__version__


def test_openmp_really_runs_threads():
    if not wavg_ext.build_info()["openmp"]:
        pytest.skip("built without OpenMP")
    for n in (1, min(2, os.cpu_count() or 1)):
        torch.set_num_threads(n)  # restored by the autouse fixture
        assert wavg_ext._C.parallel_threads_used() == min(2, torch.get_num_threads())


# ---------------------------------------------------------------- CUDA only ------------
@pytest.mark.parametrize("scalar_dtype", [F32, F64, torch.int64, torch.int32])
@pytest.mark.parametrize("op", OP_NAMES)
def test_cuda_tensor_scalar_is_read_on_device_without_sync(h, cuda, op, scalar_dtype):
    value = float(h.INT_SCALAR[op] if not scalar_dtype.is_floating_point else h.GOOD_SCALAR[op])
    outs, ins = _mixed_lists(h, op, cuda)
    expected = h.clones(outs)
    h.call(op, expected, ins, value)
    for where in (cuda, "cpu"):
        scalar = torch.tensor(value, dtype=scalar_dtype, device=where)
        for path in ("ops", "torch.ops"):
            got = h.clones(outs)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                h.call(op, got, ins, scalar, path)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            h.assert_all_bits_equal(got, expected, f"{op} {path} scalar on {where}")


def test_cuda_graph_capture_of_ema_with_device_weight(h, cuda):
    avgs, xs = _mixed_lists(h, "ema_", cuda)
    static_xs = h.clones(xs)
    weight = torch.tensor(0.5, device=cuda)
    eager = h.clones(avgs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        warm = h.clones(avgs)
        ops.ema_(warm, static_xs, weight)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.ema_(avgs, static_xs, weight)
    # Capture records but does not run the kernels: avgs still hold their start values.
    for step, w in enumerate([0.125, 0.875, 0.25, 1.0, 0.0]):  # exact in float32
        new_xs = [h.rand(x.shape, x.dtype, cuda) for x in xs]
        for s, n in zip(static_xs, new_xs):
            s.copy_(n)
        weight.fill_(w)
        graph.replay()
        ops.ema_(eager, new_xs, w)
        torch.cuda.synchronize()
        h.assert_all_bits_equal(avgs, eager, f"graph replay {step}")


def test_cuda_device_mismatch(h, cuda):
    avgs, xs = h.make_lists([(3,), (3,)], (F32, F32), cuda)
    xs[1] = xs[1].cpu()
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        ops.ema_(avgs, xs, 0.5)
