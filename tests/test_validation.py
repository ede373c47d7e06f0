"""Bad input, for every op and every path (ops.*, torch.ops, force_reference): the right
exception type, a message naming the op, the list and the index, and no tensor of either
list modified (also when the bad pair comes last, after several valid ones)."""

import math

import pytest
import torch

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
OP_NAMES = ["running_mean_", "ema_", "accumulate_", "scale_copy_"]
PATHS = ["ops", "torch.ops", "reference"]
N = 5  # pairs per call
BAD_PAIRS = {"average": [(F16, F32), (BF16, F16), (F32, F64), (F16, F64)],
             "cast": [(F16, BF16), (BF16, F16), (F16, BF16), (BF16, F16)]}  # (only these two are refused)


def _valid_lists(h, op, shapes=None):
    shapes = shapes or [(70,), (3, 4), (1,), (257,), (2, 2, 2)][:N]
    return h.make_lists(shapes, h.mixed_pairs(op, len(shapes)), "cpu")


# Each builder edits the valid lists in place so that pair i is bad, and returns
# (exception type, substrings the message must contain).
def _shape(h, info, outs, ins, i):
    outs[i], ins[i] = torch.randn(3), torch.randn(4)
    return ValueError, [f"{info.out_name}[{i}]", f"{info.in_name}[{i}]", "shape"]


def _shape_same_numel(h, info, outs, ins, i):
    outs[i], ins[i] = torch.randn(2, 3), torch.randn(3, 2)
    return ValueError, [f"{info.out_name}[{i}]", f"{info.in_name}[{i}]", "shape"]


def _device_in(h, info, outs, ins, i):
    ins[i] = torch.empty(ins[i].shape, dtype=ins[i].dtype, device="meta")
    return ValueError, [f"{info.in_name}[{i}]", "meta"]


def _device_out(h, info, outs, ins, i):
    outs[i] = torch.empty(outs[i].shape, dtype=outs[i].dtype, device="meta")
    return ValueError, [f"{info.out_name}[{i}]", "meta"]


def _dtype(out_dtype, in_dtype, token):
    def build(h, info, outs, ins, i):
        if out_dtype is not None:
            outs[i] = torch.ones(outs[i].shape, dtype=out_dtype)
        if in_dtype is not None:
            ins[i] = torch.ones(ins[i].shape, dtype=in_dtype)
        name = info.out_name if out_dtype is not None else info.in_name
        return TypeError, [f"{name}[{i}]", token]
    return build


def _bad_pair(k):
    def build(h, info, outs, ins, i):
        odt, idt = BAD_PAIRS["cast" if info.name == "scale_copy_" else "average"][k]
        outs[i], ins[i] = torch.randn(6, dtype=odt), torch.randn(6, dtype=idt)
        return TypeError, [f"{info.out_name}[{i}]", f"{info.in_name}[{i}]"]
    return build


def _in_overlaps_own_out(h, info, outs, ins, i):
    buf = torch.randn(10)
    outs[i], ins[i] = buf[:6], buf[4:10]
    return ValueError, [f"{info.in_name}[{i}]", f"{info.out_name}[{i}]"]


def _in_is_other_out(h, info, outs, ins, i):
    j = 1 if i == 0 else 0
    outs[j], ins[j] = torch.randn(6), torch.randn(6)
    outs[i], ins[i] = torch.randn(6), outs[j]
    return ValueError, [f"{info.in_name}[{i}]", f"{info.out_name}[{j}]"]


def _in_inside_strided_out(h, info, outs, ins, i):
    big = torch.randn(4, 8)  # the input's bytes interleave with the output's
    outs[i], ins[i] = big[:, ::2], big[:, 1::2]
    return ValueError, [f"{info.in_name}[{i}]", f"{info.out_name}[{i}]"]


def _outs_share(h, info, outs, ins, i):
    j = 1 if i == 0 else 0
    buf = torch.randn(10)
    outs[j], ins[j], outs[i], ins[i] = buf[:6], torch.randn(6), buf[4:10], torch.randn(6)
    return ValueError, [f"{info.out_name}[{i}]", f"{info.out_name}[{j}]"]


def _outs_identical(h, info, outs, ins, i):
    j = 1 if i == 0 else 0
    outs[j], ins[j], ins[i] = torch.randn(6), torch.randn(6), torch.randn(6)
    outs[i] = outs[j]
    return ValueError, [f"{info.out_name}[{i}]", f"{info.out_name}[{j}]"]


def _out_internal_overlap(h, info, outs, ins, i):
    outs[i], ins[i] = torch.zeros(1).expand(5), torch.randn(5)
    return ValueError, [f"{info.out_name}[{i}]"]


PAIR_CASES = {
    "shape": _shape, "shape_same_numel": _shape_same_numel,
    "device_in": _device_in, "device_out": _device_out,
    "int64_in": _dtype(None, torch.int64, "Long"), "int32_out": _dtype(torch.int32, None, "Int"),
    "bool_out": _dtype(torch.bool, None, "Bool"), "complex_in": _dtype(None, torch.complex64, "Complex"),
    "uint8_in": _dtype(None, torch.uint8, "Byte"),
    **{f"disallowed_pair{k}": _bad_pair(k) for k in range(4)},
    "in_overlaps_own_out": _in_overlaps_own_out, "in_is_other_out": _in_is_other_out,
    "in_interleaved_with_out": _in_inside_strided_out,
    "outs_share_memory": _outs_share, "outs_identical": _outs_identical,
    "out_internal_overlap": _out_internal_overlap,
}
NON_TENSOR_CASES = {"int_element_in": ("in", 3), "none_element_out": ("out", None),
                    "float_element_out": ("out", 1.5), "list_element_in": ("in", [1.0, 2.0])}


def _snapshot(tensors):
    return [t.clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None
            for t in tensors]


def _assert_unchanged(h, tensors, snapshot, what):
    for k, (t, s) in enumerate(zip(tensors, snapshot)):
        if s is not None:
            h.assert_bits_equal(t, s, f"{what}[{k}] modified by a rejected call")


def _expect_rejected(h, op, path, outs, ins, scalar, exc, tokens):
    snap_outs, snap_ins = _snapshot(outs), _snapshot(ins)
    with pytest.raises(exc) as info:
        h.call(op, outs, ins, scalar, path)
    msg = str(info.value)
    assert msg.startswith(f"{op}: "), f"message does not start with the op name: {msg!r}"
    for token in tokens:
        assert token in msg, f"{token!r} not in message {msg!r}"
    _assert_unchanged(h, outs, snap_outs, h.OPS[op].out_name)
    _assert_unchanged(h, ins, snap_ins, h.OPS[op].in_name)
    return msg


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("position", ["first", "last"])
@pytest.mark.parametrize("case", list(PAIR_CASES))
@pytest.mark.parametrize("op", OP_NAMES)
def test_bad_pair(h, op, case, position, path):
    outs, ins = _valid_lists(h, op)
    i = 0 if position == "first" else N - 1
    exc, tokens = PAIR_CASES[case](h, h.OPS[op], outs, ins, i)
    _expect_rejected(h, op, path, outs, ins, h.GOOD_SCALAR[op], exc, tokens)


# A non-tensor element. Not for torch.ops, where the dispatcher's own argument parsing
# rejects a non-tensor in a Tensor[] argument (RuntimeError) before any check runs.
@pytest.mark.parametrize("path", ["ops", "reference"])
@pytest.mark.parametrize("case", list(NON_TENSOR_CASES))
@pytest.mark.parametrize("op", OP_NAMES)
def test_non_tensor_element_first(h, op, case, path):
    outs, ins = _valid_lists(h, op)
    side, value = NON_TENSOR_CASES[case]
    (outs if side == "out" else ins)[0] = value
    name = h.OPS[op].out_name if side == "out" else h.OPS[op].in_name
    _expect_rejected(h, op, path, outs, ins, h.GOOD_SCALAR[op], TypeError,
                     [f"{name}[0]", "not a Tensor"])


_CHILD = r"""
import gc, sys, torch
from wavg_ext import ops
op, scalar, out_name, in_name = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
dtypes = [torch.float32, torch.float16, torch.float64, torch.float32, torch.float32]
for path in ("ops", "reference"):
    ops.force_reference(path == "reference")
    for side, value in [("in", 3), ("out", None), ("out", 1.5), ("in", [1.0, 2.0])]:
        outs = [torch.randn(7, dtype=d) for d in dtypes]
        ins = [torch.randn(7, dtype=d) for d in dtypes]
        before = [t.clone() for t in outs + ins]
        (outs if side == "out" else ins)[4] = value
        try:
            getattr(ops, op)(outs, ins, scalar)
            sys.exit(f"{path} {side} {value!r}: no exception")
        except TypeError as exc:
            name = out_name if side == "out" else in_name
            assert str(exc).startswith(f"{op}: {name}[4] ") and "not a Tensor" in str(exc), str(exc)
        after = [t for t in outs + ins if isinstance(t, torch.Tensor)]
        before = [b for b, t in zip(before, outs + ins) if isinstance(t, torch.Tensor)]
        for b, t in zip(before, after):
            assert torch.equal(b, t), f"{path} {side} {value!r}: a tensor was modified"
        del outs, ins, after  # frees the tensors: refcounts must be intact
        gc.collect()
        print(path, side, "ok", flush=True)
print("ALL OK")
"""


@pytest.mark.parametrize("op", OP_NAMES)
def test_non_tensor_element_after_tensors(h, op):
    """A non-tensor after valid tensors (every case, ops.* and reference path): TypeError
    naming the index, nothing modified, and the already-seen tensors stay intact. Runs in
    a child process so that a refcount bug fails this test instead of killing the run."""
    info = h.OPS[op]
    proc = h.run_python(_CHILD, op, h.GOOD_SCALAR[op], info.out_name, info.in_name)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, (
        f"child exited with {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
        f"stderr:\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("short", ["outs", "ins"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_list_lengths_differ(h, op, short, path):
    outs, ins = _valid_lists(h, op)
    (outs if short == "outs" else ins).pop()
    info = h.OPS[op]
    _expect_rejected(h, op, path, outs, ins, h.GOOD_SCALAR[op], ValueError,
                     [info.out_name, info.in_name])


def _scalar_cases(op):
    cases = []
    cases += [(math.nan, ValueError)]  # (a NaN *tensor* is the gate: test_nan_tensor_scalar_is_a_gate)
    for v in (math.inf, -math.inf):
        cases += [(v, ValueError), (torch.tensor(v), ValueError),
                  (torch.tensor(v, dtype=F64), ValueError)]
    if op == "running_mean_":
        cases += [(-1, ValueError), (-0.5, ValueError), (-1e-300, ValueError),
                  (torch.tensor(-1), ValueError), (torch.tensor(-1, dtype=torch.int32), ValueError),
                  (torch.tensor(-0.5, dtype=F64), ValueError)]
    cases += [(torch.tensor([0.5, 0.5]), ValueError), (torch.tensor([]), ValueError),
              (torch.ones(2, 1), ValueError),
              (torch.tensor(True), TypeError), (torch.tensor(1 + 0j), TypeError),
              (torch.tensor(0.5, dtype=F16), TypeError), (torch.tensor(0.5, dtype=BF16), TypeError),
              (torch.tensor(1, dtype=torch.int8), TypeError),
              (torch.tensor(0.5, device="meta"), ValueError)]
    return cases


SCALAR_CASES = [(op, k) for op in OP_NAMES for k in range(len(_scalar_cases(op)))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op, k", SCALAR_CASES)
def test_bad_scalar(h, op, k, path):
    scalar, exc = _scalar_cases(op)[k]
    outs, ins = _valid_lists(h, op)
    snap = scalar.clone() if isinstance(scalar, torch.Tensor) and scalar.device.type != "meta" else None
    _expect_rejected(h, op, path, outs, ins, scalar, exc, [h.OPS[op].scalar_name])
    if snap is not None:
        assert torch.equal(scalar, snap) or scalar.isnan().all()


@pytest.mark.parametrize("path", ["ops", "reference"])
@pytest.mark.parametrize("which", ["outs", "ins"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_single_tensor_instead_of_list(h, op, which, path):
    outs, ins = _valid_lists(h, op, [(4,)] * N)
    info = h.OPS[op]
    snap = outs[0].clone() if which == "outs" else ins[0].clone()
    args = (torch.stack(outs), ins) if which == "outs" else (outs, torch.stack(ins))
    keep = [t.clone() for t in outs]
    with pytest.raises(TypeError) as exc:
        h.call(op, *args, h.GOOD_SCALAR[op], path)
    assert (info.out_name if which == "outs" else info.in_name) in str(exc.value)
    h.assert_all_bits_equal(outs, keep, "outs")
    assert torch.equal(args[0 if which == "outs" else 1][0], snap)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OP_NAMES)
def test_inputs_may_overlap_each_other(h, op, path):
    """Overlap among inputs is allowed (only outputs are written)."""
    buf = torch.randn(20)
    outs = [torch.randn(10), torch.randn(10), torch.randn(10)]
    ins = [buf[:10], buf[5:15], buf[:10]]
    h.run_and_check(op, outs, ins, h.GOOD_SCALAR[op], path)


@pytest.mark.parametrize("op", OP_NAMES)
def test_same_message_on_every_path(h, op):
    """ops.*, torch.ops and the reference path share one C++ validation."""
    messages = {}
    for path in PATHS:
        for case in ("shape", "disallowed_pair0", "outs_share_memory", "int64_in"):
            outs, ins = _valid_lists(h, op)
            exc, _ = PAIR_CASES[case](h, h.OPS[op], outs, ins, N - 1)
            with pytest.raises(exc) as info:
                h.call(op, outs, ins, h.GOOD_SCALAR[op], path)
            messages.setdefault(case, set()).add(str(info.value))
    for case, msgs in messages.items():
        assert len(msgs) == 1, f"{case}: messages differ between paths: {msgs}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OP_NAMES)
def test_nan_tensor_scalar_is_a_gate(h, op, path):
    """A one-element tensor holding NaN leaves every output untouched, after validating
    the lists as always (bad lists still raise)."""
    outs, ins = _valid_lists(h, op)
    before = [o.clone() for o in outs]
    for dtype in (torch.float32, F64):
        h.call(op, outs, ins, torch.tensor(math.nan, dtype=dtype), path)
        assert all(torch.equal(a, b) for a, b in zip(outs, before))
    with pytest.raises(ValueError):
        h.call(op, outs, ins[:-1], torch.tensor(math.nan), path)
