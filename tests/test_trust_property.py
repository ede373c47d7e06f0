"""Property test of the averaging wrappers' guarantees, from the user's side.

Random interleavings of ``step()``, weight assignments (``p.data = ...`` and in-place
``copy_``), ``Module.half()/.bfloat16()/.float()/.double()``, ``swap()`` twice,
``state_dict()`` round trips into a fresh wrapper, damaged checkpoints, refused
``add_param_group`` calls and ``copy_to`` are run against a float64 model of the
wrapper. The base optimizer is ``SGD(lr=0)``, so only the test changes the weights and
the expected averages are exactly computable:

- position 0 (the weights before the first step) is sampled at the start of the first
  ``step()``, then each ``step()`` samples the weights after it (README "Positions");
- SWA's average is the mean of the samples, EMA's is ``avg <- d·avg + (1-d)·w`` with the
  first sample copied; a sample is the weights as the model holds them (already rounded
  to the model's dtype);
- the averages are float32 for float16/bfloat16/float32 parameters; they become float64
  when the wrapper next follows the model after ``model.double()`` (``step()``,
  ``swap()``, ``state_dict()``, ``load_state_dict()``, ``add_param_group()`` before the
  first sample, even when these raise) and stay float64;
- ``swap()`` puts the averages, rounded to the parameters' current dtype, into the model
  and a second ``swap()`` puts the training weights back bit-exactly;
- a failing call changes nothing (the averages' values, counters, the base optimizer's
  state and lr, the weights); the only thing it may do is what the next step would do
  anyway: ``load_state_dict()``, ``swap()`` and ``add_param_group()`` (before the first
  sample) first make the averages follow a dtype change of the model (float32 -> float64,
  the values kept exactly), which the model predicts.

The averages are compared with an error budget that grows by about two roundings of the
average's dtype per update (|weights| <= 8), and ``num_averaged``/``step_count`` exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import wavg_ext

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CONVERSIONS = {"half": F16, "bfloat16": BF16, "float": F32, "double": F64}
SHAPES = [(2, 3), (3,), ()]
BOUND = 8.0  # |every weight| <= BOUND
LR = 0.0


class Tiny(nn.Module):
    def __init__(self, init):
        super().__init__()
        self.w = nn.Parameter(init[0].clone())
        self.b = nn.Parameter(init[1].clone())
        self.s = nn.Parameter(init[2].clone())


def eps(dtype):
    return torch.finfo(dtype).eps


# --------------------------------------------------------------------------- the float64 model


class Expected:
    """What the wrapper must hold, kept in float64."""

    def __init__(self, kind, decay, weights):
        self.kind, self.decay = kind, decay
        self.weights = [w.double() for w in weights]  # as the model holds them (exact in float64)
        self.dtype = weights[0].dtype  # the model's parameter dtype
        self.avg_dtype = self.fresh_avg_dtype()
        self.step = 0
        self.num = 0
        self.samples = []  # SWA: the sampled weights
        self.avg = None
        self.tol = 0.0  # error budget of the averages

    def fresh_avg_dtype(self):
        """The averages' dtype a new wrapper picks for the model's current parameters."""
        return F64 if self.dtype == F64 else F32

    def follow(self):
        """The wrapper adopts the model's dtypes: float32 averages of float64 weights become float64."""
        if self.dtype == F64:
            self.avg_dtype = F64

    def sample(self):
        w = [x.clone() for x in self.weights]
        if self.num == 0:
            self.avg = w  # copied exactly: every sample is representable in the average's dtype
        elif self.kind == "swa":
            self.avg = [torch.stack([s[i] for s in self.samples + [w]]).mean(0) for i in range(len(w))]
        else:
            d = self.decay
            self.avg = [d * a + (1.0 - d) * x for a, x in zip(self.avg, w)]
        if self.num > 0:
            self.tol += BOUND * (eps(self.avg_dtype) + eps(F64))  # ~2 roundings at |avg| <= 8
        self.samples.append(w)
        self.num += 1

    def do_step(self):
        self.follow()
        if self.step == 0:
            self.sample()  # position 0, processed at the start of the first step()
        self.step += 1
        self.sample()


# --------------------------------------------------------------------------- user-side checks


def snapshot(opt, model):
    """Everything a failing call must leave alone, read through the public API."""
    sd = copy.deepcopy(opt.state_dict())
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "averages": [a.clone() for a in opt.averaged_parameters()] if opt.num_averaged else None,
        "counters": (opt.num_averaged, opt.step_count, opt.period_index, opt.swapped),
        "groups": [len(g["params"]) for g in opt.param_groups],
        "lr": [g["lr"] for g in opt.param_groups],
        "state": sd,
    }


_INT_OF = {F16: torch.int16, BF16: torch.int16, F32: torch.int32, F64: torch.int64}


def same_bits(a, b):
    """Same dtype, shape and bits (NaNs too: the averages before the first sample are
    uninitialized memory, which a failing call must leave alone as well)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in _INT_OF:
        return torch.equal(a.view(_INT_OF[a.dtype]), b.view(_INT_OF[b.dtype]))
    return torch.equal(a, b)


def assert_state_dicts_equal(a, b, path="sd"):
    """Bit-identical nested state dicts (tensors: same dtype, shape and values)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_state_dicts_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_dicts_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert same_bits(a, b), path
    else:
        assert a == b, path


def assert_unchanged(before, after, avg_dtype):
    """`after` is bit-identical to `before`, except that the averages may have followed the
    model to `avg_dtype` (their values unchanged)."""
    assert before["counters"] == after["counters"]
    assert before["groups"] == after["groups"] and before["lr"] == after["lr"]
    for x, y in zip(before["params"], after["params"]):
        assert same_bits(x, y)
    if before["averages"] is None:
        assert after["averages"] is None
    else:
        for x, y in zip(before["averages"], after["averages"]):
            assert y.dtype == avg_dtype and same_bits(x.to(avg_dtype), y)
    saved_b, saved_a = before["state"], after["state"]
    assert_state_dicts_equal(saved_b["optimizer"], saved_a["optimizer"])
    for key in saved_b["averaging"]:
        if key == "averages":
            for x, y in zip(saved_b["averaging"]["averages"], saved_a["averaging"]["averages"]):
                assert y.dtype == avg_dtype and same_bits(x.to(avg_dtype), y)
        else:
            assert_state_dicts_equal(saved_b["averaging"][key], saved_a["averaging"][key])
    assert saved_b["averaging"].keys() == saved_a["averaging"].keys()


def check(opt, model, exp):
    """The invariants after every action."""
    assert opt.step_count == exp.step
    assert opt.num_averaged == exp.num
    assert not opt.swapped
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == LR
    for i, (p, w) in enumerate(zip(model.parameters(), exp.weights)):
        assert p.dtype == exp.dtype, i
        assert torch.equal(p.detach().double(), w), f"weights of parameter {i}"
    if exp.num == 0:
        with pytest.raises(RuntimeError):
            opt.averaged_parameters()
        return
    avgs = opt.averaged_parameters()
    assert len(avgs) == len(exp.avg)
    for i, (a, e) in enumerate(zip(avgs, exp.avg)):
        assert a.dtype == exp.avg_dtype and a.shape == e.shape, i
        err = (a.double() - e).abs().max().item()
        assert err <= exp.tol, f"average of parameter {i}: error {err:.3g} > {exp.tol:.3g}\n{a}\nexpected\n{e}"


# --------------------------------------------------------------------------- damaged checkpoints


def _damage(sd, name, i):
    avg = sd["averaging"]
    if name == "negative num_averaged":
        avg["num_averaged"] = -1
    elif name == "string step":
        avg["step"] = str(avg["step"])
    elif name == "bool num_averaged":
        avg["num_averaged"] = True
    elif name == "float step":
        avg["step"] = float(avg["step"])
    elif name == "processed ahead":
        avg["processed"] = avg["step"] + 2
    elif name == "wrong-shape average":
        avg["averages"][i] = torch.zeros(5, dtype=avg["averages"][i].dtype)
    elif name == "wrong-dtype average":
        a = avg["averages"][i]
        avg["averages"][i] = a.to(F32 if a.dtype == F64 else F64)
    elif name == "too few averages":
        del avg["averages"][i]
    elif name == "other settings":
        avg["config"]["start"] = 3
    elif name == "other method":
        avg["method"] = "PSWA"
    elif name == "base optimizer groups differ":
        sd["optimizer"]["param_groups"][0]["params"] = sd["optimizer"]["param_groups"][0]["params"][:-1]
    else:
        raise AssertionError(name)


DAMAGES = ["negative num_averaged", "string step", "bool num_averaged", "float step", "processed ahead",
           "wrong-shape average", "wrong-dtype average", "too few averages", "other settings", "other method",
           "base optimizer groups differ"]


# --------------------------------------------------------------------------- the driver


class Run:
    def __init__(self, kind, decay, seed):
        gen = torch.Generator().manual_seed(seed)
        init = [(torch.rand(s, generator=gen, dtype=F64) * 8 - 4).float() for s in SHAPES]  # |w| <= 4
        self.kind, self.decay = kind, decay
        self.model = Tiny(init)
        self.opt = self.make()
        self.exp = Expected(kind, decay, init)

    def make(self):
        base = torch.optim.SGD(self.model.parameters(), lr=LR)
        return wavg_ext.SWA(base) if self.kind == "swa" else wavg_ext.EMA(base, decay=self.decay)

    def params(self):
        return list(self.model.parameters())

    def set(self, p, value, inplace):
        if inplace:
            with torch.no_grad():
                p.copy_(torch.full_like(p, value))
        else:
            p.data = torch.full_like(p, value)

    # ---- actions

    def step(self):
        self.opt.step()
        self.exp.do_step()

    def set_weights(self, which, value, inplace):
        for i, p in enumerate(self.params()):
            if which is None or which == i:
                self.set(p, value, inplace)
                self.exp.weights[i] = torch.full(SHAPES[i], value, dtype=F64)

    def convert(self, name):
        getattr(self.model, name)()
        self.exp.dtype = CONVERSIONS[name]
        self.exp.weights = [w.to(self.exp.dtype).double() for w in self.exp.weights]

    def swap_twice(self, probe):
        opt, exp = self.opt, self.exp
        if exp.num == 0:
            with pytest.raises(RuntimeError):
                opt.swap()
            exp.follow()  # swap() follows the model before it finds nothing to swap in
            assert not opt.swapped
            return
        if probe == "load":
            exp.follow()  # state_dict() follows the model
        saved = copy.deepcopy(opt.state_dict()) if probe == "load" else None
        training = [p.detach().clone() for p in self.params()]
        opt.swap()
        exp.follow()
        assert opt.swapped
        avgs = opt.averaged_parameters()
        for i, (p, a, e) in enumerate(zip(self.params(), avgs, exp.avg)):
            assert p.dtype == exp.dtype and a.dtype == exp.avg_dtype
            assert torch.equal(p.detach(), a.to(p.dtype)), f"swapped-in parameter {i} is not its average rounded"
            err = (p.detach().double() - e).abs().max().item()
            assert err <= exp.tol + BOUND * eps(p.dtype), f"swapped-in parameter {i}: error {err:.3g}"
        held = [p.detach().clone() for p in self.params()]
        counters = (opt.num_averaged, opt.step_count)
        if probe == "step":
            with pytest.raises(RuntimeError):
                opt.step()
        elif probe == "state_dict":
            with pytest.raises(RuntimeError):
                opt.state_dict()
        elif probe == "load":
            with pytest.raises(RuntimeError):
                opt.load_state_dict(saved)
        elif probe == "add_group":
            with pytest.raises(RuntimeError):
                opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
        elif probe == "set":  # the user writes into the swapped-in weights: the second swap() restores
            self.set(self.params()[0], 7.5, inplace=False)
            held[0].fill_(7.5)
        assert opt.swapped and (opt.num_averaged, opt.step_count) == counters
        assert len(opt.param_groups) == 1
        for p, h in zip(self.params(), held):
            assert torch.equal(p.detach(), h)
        opt.swap()
        assert not opt.swapped
        for i, (p, t) in enumerate(zip(self.params(), training)):
            assert p.dtype == t.dtype and torch.equal(p.detach(), t), f"training weights {i} not restored"

    def roundtrip(self):
        exp = self.exp
        exp.follow()  # state_dict() follows the model first
        sd = copy.deepcopy(self.opt.state_dict())
        assert all(a.dtype == exp.avg_dtype for a in sd["averaging"]["averages"])
        fresh = self.make()
        if exp.avg_dtype == exp.fresh_avg_dtype():
            fresh.load_state_dict(sd)
            assert_state_dicts_equal(sd, copy.deepcopy(fresh.state_dict()))
            self.opt = fresh  # continue with the new wrapper
        else:  # the fresh wrapper's averages have another dtype than the saved ones: refused
            before = snapshot(fresh, self.model)
            with pytest.raises(ValueError):
                fresh.load_state_dict(sd)
            assert_unchanged(before, snapshot(fresh, self.model), exp.fresh_avg_dtype())

    def bad_load(self, damage, i):
        self.exp.follow()  # state_dict() follows the model first
        sd = copy.deepcopy(self.opt.state_dict())
        sd["optimizer"]["param_groups"][0]["lr"] = 0.77  # would show if the base were loaded
        _damage(sd, damage, i)
        before = snapshot(self.opt, self.model)
        with pytest.raises((ValueError, TypeError)):
            self.opt.load_state_dict(sd)
        self.exp.follow()  # load_state_dict adopts the model's dtypes before its checks
        assert_unchanged(before, snapshot(self.opt, self.model), self.exp.avg_dtype)

    def bad_group(self):
        self.exp.follow()  # snapshot's state_dict() follows the model first
        before = snapshot(self.opt, self.model)
        if self.exp.num > 0:
            with pytest.raises(RuntimeError):
                self.opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
        else:
            with pytest.raises(TypeError):
                self.opt.add_param_group({"params": [torch.zeros(2, dtype=torch.int64)]})
            self.exp.follow()
        assert_unchanged(before, snapshot(self.opt, self.model), self.exp.avg_dtype)

    def copy_to(self, how):
        opt = self.opt
        if self.exp.num == 0:
            with pytest.raises(RuntimeError):
                opt.copy_to([torch.zeros(s) for s in SHAPES])
            return
        avgs = opt.averaged_parameters()
        if how == "module":
            target = copy.deepcopy(self.model)
            with torch.no_grad():
                for p in target.parameters():
                    p.fill_(-1.0)
            opt.copy_to(target)
            for p, a in zip(target.parameters(), avgs):
                assert p.dtype == self.exp.dtype and torch.equal(p.detach(), a.to(p.dtype))
        elif how == "list":
            targets = [torch.full(s, -1.0, dtype=F64) for s in SHAPES]
            opt.copy_to(targets)
            for t, a in zip(targets, avgs):
                assert torch.equal(t, a.double())
        else:  # a wrong shape last: nothing is written
            targets = [torch.full(s, -1.0) for s in SHAPES[:-1]] + [torch.full((5,), -1.0)]
            with pytest.raises(ValueError):
                opt.copy_to(targets)
            for t in targets:
                assert torch.equal(t, torch.full_like(t, -1.0))

    def run(self, actions):
        check(self.opt, self.model, self.exp)
        for action in actions:
            name, args = action[0], action[1:]
            getattr(self, name)(*args)
            check(self.opt, self.model, self.exp)


VALUES = st.integers(-16, 16).map(lambda k: k / 2)  # exact in float16 and bfloat16
# Steps three times, weight and dtype changes twice as often as the other actions.
KINDS = ["step"] * 3 + ["set_weights"] * 2 + ["convert"] * 2 + ["swap_twice", "roundtrip", "bad_load", "bad_group",
                                                                "copy_to"]


@st.composite
def actions(draw):
    kind = draw(st.sampled_from(KINDS))
    if kind == "set_weights":
        return (kind, draw(st.none() | st.integers(0, len(SHAPES) - 1)), draw(VALUES), draw(st.booleans()))
    if kind == "convert":
        return (kind, draw(st.sampled_from(sorted(CONVERSIONS))))
    if kind == "swap_twice":
        return (kind, draw(st.sampled_from([None, "step", "state_dict", "load", "add_group", "set"])))
    if kind == "bad_load":
        return (kind, draw(st.sampled_from(DAMAGES)), draw(st.integers(0, len(SHAPES) - 1)))
    if kind == "copy_to":
        return (kind, draw(st.sampled_from(["module", "list", "bad"])))
    return (kind,)


ACTION_LISTS = st.lists(actions(), min_size=4, max_size=40)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**16), actions=ACTION_LISTS)
def test_swa_matches_float64_model(seed, actions):
    Run("swa", None, seed).run(actions)


@SETTINGS
@given(decay=st.sampled_from([0.0, 0.5, 0.75, 0.9]), seed=st.integers(0, 2**16), actions=ACTION_LISTS)
def test_ema_matches_float64_model(decay, seed, actions):
    Run("ema", decay, seed).run(actions)
