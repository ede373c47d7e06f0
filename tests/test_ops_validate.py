"""wavg_ext.ops.validate runs exactly an op's checks: for every op, a bad call raises what
the op itself raises (same type, same message) and leaves every tensor bit-identical; a
good call returns None and changes nothing. On the kernels and on the reference path.
Also the parameter-tracking helpers (param_metadata, changed_params). Public API only."""

from __future__ import annotations

import pytest
import torch

from wavg_ext import ops


def _f(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, generator=g).to(dtype)


def _basis(k=4, shapes=((3, 2), (5,)), dtype=torch.float32):
    b = ops.new_basis([torch.empty(s) for s in shapes], k, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for t in b:
        t.copy_(torch.randn(t.shape, generator=g))
    return b


def _pair(scalar):
    return {
        "good": lambda: ([_f(3), _f(2, 2)], [_f(3, seed=1), _f(2, 2, seed=1)], scalar),
        "shape": lambda: ([_f(3)], [_f(4)], scalar),
        "length": lambda: ([_f(3), _f(3)], [_f(3)], scalar),
        "single_tensor": lambda: (_f(3), [_f(3)], scalar),
        "int_output": lambda: ([torch.zeros(3, dtype=torch.int64)], [_f(3)], scalar),
        "not_a_tensor": lambda: ([_f(3)], [1.0], scalar),
        "bad_scalar": lambda: ([_f(3)], [_f(3)], "half"),
        "nonfinite_scalar": lambda: ([_f(3)], [_f(3)], float("inf")),
        "aliased": lambda: (lambda t: ([t[1:4]], [t[0:3]], scalar))(_f(5)),
    }


def _compensated(scalar):
    return {
        "good": lambda: ([_f(3)], [torch.zeros(3)], [_f(3, seed=1)], scalar),
        "comp_shape": lambda: ([_f(3)], [torch.zeros(4)], [_f(3)], scalar),
        "comp_dtype": lambda: ([_f(3)], [torch.zeros(3, dtype=torch.float64)], [_f(3)], scalar),
        "length": lambda: ([_f(3)], [torch.zeros(3)], [_f(3), _f(3)], scalar),
        "bad_scalar": lambda: ([_f(3)], [torch.zeros(3)], [_f(3)], None),
    }


CASES = {
    "running_mean_": _pair(3),
    "ema_": _pair(0.25),
    "accumulate_": _pair(0.5),
    "scale_copy_": _pair(2.0),
    "running_mean_compensated_": _compensated(2),
    "ema_compensated_": _compensated(0.5),
    "nonfinite_flag": {
        "good": lambda: ([_f(3), _f(2, 2)],),
        "single_tensor": lambda: (_f(3),),
        "int": lambda: ([torch.zeros(3, dtype=torch.int32)],),
        "not_a_tensor": lambda: ([_f(3), "x"],),
    },
    "ema_stochastic_": {
        "good": lambda: ([_f(3, dtype=torch.bfloat16), _f(2, 2, dtype=torch.bfloat16)],
                         [_f(3, seed=1), _f(2, 2, seed=1, dtype=torch.bfloat16)], 0.25, 7),
        "float32_average": lambda: ([_f(3)], [_f(3, seed=1)], 0.25, 7),
        "float64_weights": lambda: ([_f(3, dtype=torch.bfloat16)], [_f(3, dtype=torch.float64)], 0.25, 7),
        "float16_weights": lambda: ([_f(3, dtype=torch.bfloat16)], [_f(3, dtype=torch.float16)], 0.25, 7),
        "shape": lambda: ([_f(3, dtype=torch.bfloat16)], [_f(4)], 0.25, 7),
        "length": lambda: ([_f(3, dtype=torch.bfloat16)], [_f(3), _f(3)], 0.25, 7),
        "nonfinite_weight": lambda: ([_f(3, dtype=torch.bfloat16)], [_f(3)], float("nan"), 7),
        "aliased": lambda: (lambda t: ([t[1:4]], [t[0:3]], 0.25, 7))(_f(5, dtype=torch.bfloat16)),
    },
    "ema_many_": {
        "good": lambda: ([[_f(3), _f(2, 2)], [_f(3, seed=2), _f(2, 2, seed=2)]], [_f(3, seed=1), _f(2, 2, seed=1)],
                         [0.25, 0.5]),
        "shape": lambda: ([[_f(3)], [_f(4)]], [_f(3)], [0.25, 0.5]),
        "profiles": lambda: ([[_f(3)], [_f(3, seed=1)]], [_f(3, seed=2)], [0.25]),
        "flat": lambda: ([_f(3), _f(3, seed=1)], [_f(3, seed=2)], [0.25, 0.5]),
        "nonfinite_weight": lambda: ([[_f(3)]], [_f(3, seed=1)], [float("nan")]),
        "aliased": lambda: (lambda t: ([[t], [t]], [_f(3, seed=1)], [0.25, 0.5]))(_f(3)),
    },
    "window_push_": {
        "good": lambda: ([_f(3, dtype=torch.float64)], [_f(3, seed=2)], [_f(3, seed=1)]),
        "slot_dtype": lambda: ([_f(3, dtype=torch.float64)], [_f(3, seed=2, dtype=torch.float64)], [_f(3, seed=1)]),
        "length": lambda: ([_f(3, dtype=torch.float64)], [], [_f(3, seed=1)]),
        "aliased": lambda: (lambda t: ([_f(3, dtype=torch.float64)], [t], [t]))(_f(3)),
    },
    "dots": {
        "good": lambda: (_basis(), [_f(3, 2), _f(5)], 3),
        "k_too_big": lambda: (_basis(), [_f(3, 2), _f(5)], 5),
        "k_negative": lambda: (_basis(), [_f(3, 2), _f(5)], -1),
        "shape": lambda: (_basis(), [_f(3, 2), _f(6)], 2),
        "length": lambda: (_basis(), [_f(3, 2)], 2),
    },
    "combine_": {
        "good": lambda: ([_f(3, 2), _f(5)], _basis(), torch.tensor([0.5, -1.0]), 1.0, 0.5),
        "int_coeffs": lambda: ([_f(3, 2), _f(5)], _basis(), torch.tensor([1, 2]), 1.0, 0.0),
        "too_many_coeffs": lambda: ([_f(3, 2), _f(5)], _basis(), torch.ones(5), 1.0, 0.0),
        "shape": lambda: ([_f(3, 2), _f(4)], _basis(), torch.ones(2), 1.0, 0.0),
        "single_tensor": lambda: (_f(3, 2), _basis(), torch.ones(2), 1.0, 0.0),
    },
    "project_": {
        "good": lambda: ([_f(3, 2), _f(5)], _basis(), 2),
        "k_too_big": lambda: ([_f(3, 2), _f(5)], _basis(), 9),
        "shape": lambda: ([_f(3, 2), _f(7)], _basis(), 2),
        "f64_grads": lambda: ([_f(3, 2, dtype=torch.float64), _f(5, dtype=torch.float64)], _basis(), 2),
    },
    "orthonormalize_": {
        "good": lambda: (_basis(), 2),
        "good_default_passes": lambda: (_basis(), 1),
        "k_too_big": lambda: (_basis(), 4),
        "passes": lambda: (_basis(), 1, 0),
        "k_negative": lambda: (_basis(), -1),
        "capacities": lambda: ([_basis(k=4)[0], _basis(k=3)[1]], 1),
    },
    "orthonormalize_many_": {
        "good": lambda: (_basis(), 1, 2),
        "rows_outside": lambda: (_basis(), 2, 3),
        "passes": lambda: (_basis(), 0, 2, 5),
        "rtol": lambda: (_basis(), 0, 2, 2, 1.5),
        "k_not_int": lambda: (_basis(), 1.0, 2),
        "empty": lambda: ([], 0, 1),
    },
}


def _tensors(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def _bits(tensors):
    return [t.detach().reshape(-1).clone().view(torch.uint8) for t in tensors]


def _same_bits(before, tensors):
    return len(before) == len(tensors) and all(torch.equal(b, a) for b, a in zip(before, _bits(tensors)))


def _outcome(fn):
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e), str(e)
    return None


@pytest.fixture(params=["kernels", "reference"])
def path(request):
    previous = ops.force_reference(request.param == "reference")
    yield request.param
    ops.force_reference(previous)


BAD = [pytest.param(op, name, id=f"{op}-{name}") for op, cases in CASES.items() for name in cases
       if not name.startswith("good")]
GOOD = [pytest.param(op, name, id=f"{op}-{name}") for op, cases in CASES.items() for name in cases
        if name.startswith("good")]


def test_every_op_has_cases():
    from wavg_ext import _C
    assert set(CASES) == {spec["name"] for spec in _C.op_specs()} | {"orthonormalize_many_"}
    assert "validate" in ops.__all__


@pytest.mark.parametrize("op, case", BAD)
def test_bad_call_raises_what_the_op_raises(path, op, case):
    args = CASES[op][case]()
    tensors = _tensors(args)
    before = _bits(tensors)
    got = _outcome(lambda: ops.validate(op, *args))
    assert got is not None and got[0] in (TypeError, ValueError), got
    assert _same_bits(before, tensors), "validate changed a tensor"
    assert _outcome(lambda: getattr(ops, op)(*args)) == got
    assert _same_bits(before, tensors), "the op changed a tensor before refusing"


@pytest.mark.parametrize("op, case", GOOD)
def test_good_call_returns_none_and_changes_nothing(path, op, case):
    args = CASES[op][case]()
    tensors = _tensors(args)
    before = _bits(tensors)
    assert ops.validate(op, *args) is None
    assert _same_bits(before, tensors)
    getattr(ops, op)(*args)  # and the op accepts it


def test_defaults_are_filled_in():
    """accumulate_'s alpha and scale_copy_'s scale default to 1.0, orthonormalize_'s
    passes to 2: leaving them out is a good call, as for the op."""
    assert ops.validate("accumulate_", [_f(3)], [_f(3)]) is None
    assert ops.validate("scale_copy_", [_f(3)], [_f(3)]) is None
    assert ops.validate("combine_", [_f(3, 2), _f(5)], _basis(), torch.ones(2)) is None
    assert ops.validate("orthonormalize_", _basis(), 1) is None
    with pytest.raises(TypeError, match="accumulate_ takes 2 to 3 arguments"):
        ops.validate("accumulate_", [_f(3)])
    with pytest.raises(TypeError, match="ema_ takes 3 to 3 arguments"):
        ops.validate("ema_", [_f(3)], [_f(3)], 0.5, 0.5)


def test_meta_tensors_read_nothing():
    """Dtype pairs can be asked with meta tensors (nothing is read)."""
    a = torch.empty(0, dtype=torch.float32, device="meta")
    x = torch.empty(0, dtype=torch.bfloat16, device="meta")
    assert ops.validate("running_mean_", [a], [x], 0.0) is None
    with pytest.raises((TypeError, ValueError)):
        ops.validate("running_mean_", [torch.empty(0, dtype=torch.int64, device="meta")], [x], 0.0)


@pytest.mark.parametrize("op", ["nope", "ema", "", None, 3])
def test_unknown_op(op):
    with pytest.raises(ValueError, match="unknown op") as info:
        ops.validate(op, [_f(3)], [_f(3)], 0.5)
    assert "ema_" in str(info.value) and "orthonormalize_many_" in str(info.value)  # the known ones


# --------------------------------------------------------------------------- parameter tracking


def test_changed_params():
    params = [torch.nn.Parameter(_f(3)), torch.nn.Parameter(_f(2, 2))]
    opt = torch.optim.SGD(params, lr=0.1)
    metadata = ops.param_metadata(params)
    assert ops.changed_params(opt.param_groups, params) == []
    assert ops.changed_params(opt.param_groups, params, metadata) == []
    params[1].data = params[1].data.double()  # another dtype under the same parameter
    assert ops.changed_params(opt.param_groups, params) == []
    assert ops.changed_params(opt.param_groups, params, metadata) == [1]
    replaced = torch.nn.Parameter(_f(3))
    opt.param_groups[0]["params"][0] = replaced
    assert ops.changed_params(opt.param_groups, params) == [0]
    assert ops.changed_params([[replaced, params[1]]], params) == [0]  # plain lists as groups
    opt.add_param_group({"params": [torch.nn.Parameter(_f(1))]})
    assert ops.changed_params(opt.param_groups, params) is None  # another number of tensors
    with pytest.raises(TypeError):
        ops.changed_params(opt.param_groups, iter(params))
