"""wavg_ext.ops.Plan: a pair or compensated op over fixed lists, validated once. Every call
gives the op's bits; a tensor changed under the plan (new storage, dtype, shape, strides)
is seen before the next call, which then runs on it or raises what the op raises with
every tensor left bit-identical. Public API only."""

import pickle

import pytest
import torch

from wavg_ext import ops, testing

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
SHAPES = [(3,), (0,), (17, 5), (513,), (2, 3, 4)]


def _lists(avg_dtype=F32, x_dtype=F32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g).to(x_dtype) for s in shapes]
    avgs = [torch.randn(s, generator=g).to(avg_dtype) for s in shapes]
    return avgs, xs


def _bits(ts):
    return [t.clone() for t in ts]


def _assert_bits(a, b):
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(u.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), i


CASES = [("running_mean_", [3, 0, 7.5]), ("ema_", [0.25, 1e-3, 1.0]), ("accumulate_", [-0.5, 2.0]),
         ("scale_copy_", [1.5, 1.0])]


@pytest.mark.parametrize("op, scalars", CASES)
@pytest.mark.parametrize("dtypes", [(F32, F32), (F32, BF16), (BF16, BF16), (F64, F32)], ids=str)
def test_calls_match_the_op_bit_for_bit(device, op, scalars, dtypes):
    avgs, xs = _lists(*dtypes)
    mine = _bits(avgs)
    plan = ops.Plan(op, mine, xs)
    for s in scalars + [torch.tensor(scalars[0], dtype=F64)]:
        getattr(ops, op)(avgs, xs, s)
        plan(s)
        _assert_bits(mine, avgs)


@pytest.mark.parametrize("op", ["running_mean_compensated_", "ema_compensated_"])
def test_compensated_ops(device, op):
    avgs, xs = _lists()
    comps = [torch.zeros_like(a) for a in avgs]
    mine, my_comps = _bits(avgs), _bits(comps)
    plan = ops.Plan(op, mine, my_comps, xs)
    for s in (2, 0.5, 3):
        getattr(ops, op)(avgs, comps, xs, s)
        plan(s)
        _assert_bits(mine + my_comps, avgs + comps)


def test_a_nan_tensor_scalar_gates_the_call_off(device):
    avgs, xs = _lists()
    before = _bits(avgs)
    ops.Plan("ema_", avgs, xs)(torch.tensor(float("nan")))
    _assert_bits(avgs, before)


def test_new_storage_under_the_same_tensor_is_followed():
    """`p.data = t` and `set_` give the same tensor object new memory: the plan reads it."""
    avgs, xs = _lists()
    plan = ops.Plan("ema_", avgs, xs)
    plan(0.5)
    xs[2].data = torch.randn(17, 5)
    xs[3].set_(torch.randn(513))
    want = _bits(avgs)
    ops.ema_(want, xs, 0.5)
    plan(0.5)
    _assert_bits(avgs, want)


@pytest.mark.parametrize("change, error", [
    (lambda xs: setattr(xs[2], "data", xs[2].data.double()), TypeError),  # module.double()
    (lambda xs: setattr(xs[2], "data", torch.randn(5, 17)), ValueError),  # another shape
    (lambda xs: xs[3].resize_(600), ValueError),
    (lambda xs: xs[1].set_(torch.randn(2)), ValueError),  # an empty tensor given memory
])
def test_a_change_the_op_refuses_raises_what_the_op_raises_and_writes_nothing(change, error):
    avgs, xs = _lists()
    plan = ops.Plan("ema_", avgs, xs)
    plan(0.5)
    change(xs)
    before = _bits(avgs)
    with pytest.raises(error) as from_op:
        ops.ema_(avgs, xs, 0.5)
    with pytest.raises(error) as from_plan:
        plan(0.5)
    assert str(from_plan.value) == str(from_op.value)
    with pytest.raises(error):
        plan.check()
    _assert_bits(avgs, before)


def test_new_strides_are_followed():
    """An in-place transpose keeps the storage and changes the strides: the pair then needs
    a temporary, and the plan still gives the op's result."""
    avgs, xs = _lists(shapes=[(6, 7), (4,)])
    plan = ops.Plan("ema_", avgs, xs)
    xs[0].t_()
    avgs[0].t_()
    xs[0].copy_(torch.randn(7, 6))
    want = _bits(avgs)
    ops.ema_(want, xs, 0.25)
    plan(0.25)
    _assert_bits(avgs, want)


def test_mismatched_layouts_run_through_the_op():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    avg = torch.randn(2, 3, 4, 5)
    want = avg.clone()
    plan = ops.Plan("ema_", [avg], [x])
    ops.ema_([want], [x], 0.5)
    plan(0.5)
    _assert_bits([avg], [want])


def test_the_scalar_is_checked_on_every_call():
    avgs, xs = _lists()
    plan = ops.Plan("running_mean_", avgs, xs)
    before = _bits(avgs)
    for bad, error in ((float("inf"), ValueError), (-1, ValueError), ("x", TypeError)):
        with pytest.raises(error):
            plan(bad)
    _assert_bits(avgs, before)


def test_versions_are_bumped_as_by_the_op():
    avgs, xs = _lists()
    plan = ops.Plan("ema_", avgs, xs)
    v = [a._version for a in avgs]
    plan(0.5)
    assert all(a._version > u for a, u in zip(avgs, v))


def test_emulated_cuda_kernels_and_forced_reference():
    avgs, xs = _lists()
    want = _bits(avgs)
    ops.ema_(want, xs, 0.3)
    for mode in ("emulated", "reference"):
        mine = _bits(_lists()[0])
        plan = ops.Plan("ema_", mine, xs)
        if mode == "emulated":
            if not testing.cuda_emulation_available():
                continue
            with testing.cuda_emulation() as stats:
                plan(0.3)
            assert stats.launches == 1
        else:
            previous = ops.force_reference(True)
            try:
                plan(0.3)
            finally:
                ops.force_reference(previous)
        torch.testing.assert_close(mine, want, rtol=0, atol=1e-6)


def test_bad_plans():
    avgs, xs = _lists()
    with pytest.raises(ValueError, match="not a pair or compensated op"):
        ops.Plan("dots", avgs, xs)
    with pytest.raises(TypeError, match="takes 2 tensor lists"):
        ops.Plan("ema_", avgs)
    with pytest.raises(ValueError, match=r"avgs\[1\] has shape"):
        ops.Plan("ema_", avgs, xs[:1] + xs[2:] + xs[:1])
    with pytest.raises(TypeError, match="single Tensor"):
        ops.Plan("ema_", avgs[0], xs)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ops.Plan("ema_", avgs, xs))


def test_the_plan_keeps_its_own_lists():
    """Replacing a tensor in the caller's list does not reach the plan (it copied the list)."""
    avgs, xs = _lists()
    plan = ops.Plan("ema_", avgs, xs)
    old = xs[0]
    xs[0] = torch.full((3,), 100.0)
    want = _bits(avgs)
    ops.ema_(want, [old] + xs[1:], 0.5)
    plan(0.5)
    _assert_bits(avgs, want)


def test_inference_tensors_as_for_the_op():
    """Inference averages of normal weights are written inside torch.inference_mode() only,
    as by the op; a plan made inside it refuses outside it."""
    xs = _lists()[1]
    with torch.inference_mode():
        avgs = _lists()[0]
        plan = ops.Plan("ema_", avgs, xs)
        plan(0.5)
        want = _bits(avgs)
    before = _bits(avgs)
    with pytest.raises(RuntimeError, match="inference tensor") as from_op:
        ops.ema_(avgs, xs, 0.5)
    with pytest.raises(RuntimeError, match="inference tensor") as from_plan:
        plan(0.5)
    assert str(from_plan.value) == str(from_op.value)
    _assert_bits(avgs, before)
    with torch.inference_mode():
        ops.ema_(want, xs, 0.5)
        plan(0.5)
    _assert_bits(avgs, want)


def test_inference_tensors_only_run_anywhere():
    """All tensors inference tensors: the op runs outside inference mode too, and so does a plan."""
    with torch.inference_mode():
        avgs, xs = _lists()
    want = _bits(avgs)
    ops.ema_(want, xs, 0.5)
    ops.Plan("ema_", avgs, xs)(0.5)
    _assert_bits(avgs, want)


@pytest.mark.parametrize("op, bad", [("running_mean_", -1), ("ema_compensated_", float("inf"))])
def test_check_with_a_scalar_checks_it_too(op, bad):
    avgs, xs = _lists()
    lists = (avgs, [torch.zeros_like(a) for a in avgs], xs) if "compensated" in op else (avgs, xs)
    plan = ops.Plan(op, *lists)
    before = _bits(avgs)
    plan.check()
    plan.check(0.5)
    with pytest.raises(ValueError) as from_plan:
        plan.check(bad)
    with pytest.raises(ValueError) as from_op:
        getattr(ops, op)(*lists, bad)
    assert str(from_plan.value) == str(from_op.value)
    _assert_bits(avgs, before)
