"""EMA schedules of the optimizer wrapper: warmup ("inv_gamma", "ratio"), min_decay,
update_after_step and half_life, against a float64 re-implementation of the formulas
(diffusers' / timm's get_decay), plus diffusers' own EMAModel where it is installed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wavg_ext import EMA


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def reference_decay(t, decay, warmup, inv_gamma, power, min_decay):
    """diffusers' EMAModel.get_decay / timm's ModelEmaV3.get_decay with step = t."""
    if t <= 0:
        return 0.0
    if warmup == "inv_gamma":
        cur = 1 - (1 + t / inv_gamma) ** -power
    elif warmup == "ratio":
        cur = (1 + t) / (10 + t)
    else:
        cur = decay
    return max(min(cur, decay), min_decay)


def reference_ema(seen, steps, decay, every=1, start=0, warmup="none", inv_gamma=1.0, power=2 / 3,
                  min_decay=0.0, update_after_step=0):
    """float64 averages and the decay of every sample, from the documented definition."""
    scheduled = warmup != "none" or update_after_step > 0
    avg, decays, after = None, [], 0
    for pos in range(start, steps + 1, every):
        if not scheduled:
            d = decay
        elif pos <= update_after_step:
            d = 0.0
        else:
            d = reference_decay(after, decay, warmup, inv_gamma, power, min_decay)
            after += 1
        w = seen[pos]
        if avg is None or d == 0.0:
            avg, d = [t.clone() for t in w], 0.0
        else:
            avg = [d * a + (1 - d) * t for a, t in zip(avg, w)]
        decays.append(d)
    return avg, decays


CASES = [
    dict(decay=0.9, warmup="inv_gamma"),
    dict(decay=0.95, warmup="inv_gamma", inv_gamma=3.0, power=0.75, min_decay=0.2),
    dict(decay=0.9, warmup="ratio"),
    dict(decay=0.8, warmup="none", update_after_step=4),
    dict(decay=0.99, warmup="inv_gamma", update_after_step=3, every=2),
    dict(decay=0.9, warmup="ratio", every=3, start=2, update_after_step=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_schedule_matches_the_float64_formula(case):
    steps = 17
    model, opt = model_and_opt()
    ema = EMA(opt, **case)
    start, every = case.get("start", 0), case.get("every", 1)
    g = torch.Generator().manual_seed(1)
    seen = [[p.detach().double().clone() for p in model.parameters()]]
    got_decays = [0.0] if start == 0 else []  # position 0 runs in the first step(), before position 1
    for i in range(steps):
        x = torch.randn(16, 5, generator=g)
        ema.zero_grad()
        model(x).pow(2).mean().backward()
        ema.step()
        seen.append([p.detach().double().clone() for p in model.parameters()])
        pos = i + 1
        if pos >= start and (pos - start) % every == 0:
            got_decays.append(ema.current_decay)
    want, want_decays = reference_ema(seen, steps, **case)
    assert got_decays == pytest.approx(want_decays, rel=0, abs=1e-15)
    assert ema.num_averaged == len(want_decays)
    for a, w in zip(ema.averaged_parameters(), want):
        torch.testing.assert_close(a.double(), w, rtol=2e-6, atol=2e-7)


def test_half_life_halves_a_sample_weight_every_h_steps():
    """A step from 0 to 1 in the weights: after h steps of ones, the average is 1/2."""
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    ema = EMA(opt, half_life=12, every=3)
    assert ema.decay == 0.5 ** (3 / 12)
    for i in range(12):
        p.grad = torch.full_like(p, -1.0) if i == 0 else torch.zeros_like(p)  # p = 1 from step 1 on
        ema.step()
    # samples: position 0 (zeros, copied), then positions 3, 6, 9, 12 (ones): 1 - d^4 = 1/2
    assert ema.num_averaged == 5
    torch.testing.assert_close(ema.averaged_parameters()[0], torch.full((4,), 0.5), rtol=0, atol=1e-6)
    assert ema.current_decay == ema.decay


def test_no_schedule_keeps_the_plain_ema():
    model, opt = model_and_opt()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    plain = EMA(opt, 0.9)
    explicit = EMA(twin_opt, decay=0.9, warmup="none", min_decay=0.5, update_after_step=0)
    assert plain._config() == explicit._config()  # no schedule keys: old checkpoints load
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        x = torch.randn(8, 5, generator=g)
        for m, o in ((model, plain), (twin, explicit)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(plain.averaged_parameters(), explicit.averaged_parameters()):
        assert torch.equal(a, b)
    assert plain.current_decay == 0.9


@pytest.mark.parametrize("bad, error, match", [
    (dict(decay=0.9, half_life=10), ValueError, "decay and half_life are exclusive"),
    (dict(half_life=0), ValueError, "half_life must be > 0"),
    (dict(half_life=float("inf")), ValueError, "half_life must be finite"),
    (dict(half_life="10"), TypeError, "half_life must be a real number"),
    (dict(warmup="linear"), ValueError, "warmup must be one of 'none', 'inv_gamma', 'ratio'"),
    (dict(warmup="inv_gamma", inv_gamma=0), ValueError, "inv_gamma must be > 0"),
    (dict(warmup="inv_gamma", power=-1), ValueError, "power must be > 0"),
    (dict(decay=0.9, min_decay=0.95), ValueError, r"min_decay must be in \[0, decay = 0.9\]"),
    (dict(update_after_step=-1), ValueError, "update_after_step must be >= 0"),
    (dict(update_after_step=2.0), TypeError, "update_after_step must be an int"),
    (dict(decay=1.0), ValueError, r"decay must be in \[0, 1\)"),
])
def test_bad_schedule_arguments(bad, error, match):
    model, opt = model_and_opt()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        EMA(opt, **bad)
    assert opt.state_dict() == before and len(opt.param_groups) == 1


@pytest.mark.parametrize("extra", [dict(), dict(compensated=True), dict(skip_nonfinite=True)])
def test_resume_is_bit_exact(extra):
    kw = dict(decay=0.95, warmup="inv_gamma", update_after_step=2, every=2, **extra)
    model, opt = model_and_opt()
    ema = EMA(opt, **kw)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 5, generator=g) for _ in range(14)]

    def run(m, o, batches):
        for x in batches:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()

    run(model, ema, xs[:7])
    saved = copy.deepcopy(ema.state_dict())
    resumed = EMA(twin_opt, **kw)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    run(model, ema, xs[7:])
    run(twin, resumed, xs[7:])
    for a, b in zip(ema.averaged_parameters(), resumed.averaged_parameters()):
        assert torch.equal(a, b)
    assert resumed.current_decay == ema.current_decay > 0
    # A checkpoint of another schedule is refused (nothing loaded).
    other_model, other_opt = model_and_opt()
    other = EMA(other_opt, decay=0.95, warmup="ratio", update_after_step=2, every=2, **extra)
    with pytest.raises(ValueError, match="warmup"):
        other.load_state_dict(saved)


def test_skip_nonfinite_with_a_schedule():
    """A skipped sample still counts in t (the schedule follows the step count), and the
    schedule's copies are copies on the device path too."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)  # the weights are set by hand before each step
    ema = EMA(opt, decay=0.9, warmup="ratio", update_after_step=1, skip_nonfinite=True)
    values = [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]
    for v in values:
        with torch.no_grad():
            p.fill_(v)
        p.grad = torch.zeros_like(p)
        ema.step()
    # positions 0 and 1 see 1.0 (copies: <= update_after_step); 2 sees 2.0 (t = 0: a copy);
    # 3 (NaN, t = 1) is skipped; 4, 5, 6 use t = 2, 3, 4: d = (1 + t) / (10 + t)
    avg = 2.0
    for t, v in ((2, 4.0), (3, 5.0), (4, 6.0)):
        d = (1 + t) / (10 + t)
        avg = d * avg + (1 - d) * v
    assert ema.num_skipped == 1 and ema.num_averaged == 6
    torch.testing.assert_close(ema.averaged_parameters()[0], torch.full((3,), avg, dtype=torch.float32))
    assert ema.current_decay == pytest.approx(5 / 14, abs=1e-15)


@pytest.mark.parametrize("warmup", [True, False])
def test_matches_diffusers_ema_model(warmup):
    """diffusers' EMAModel (its optimization_step counts the updates) against the wrapper
    with every=1: the same averages, step for step."""
    training_utils = pytest.importorskip("diffusers.training_utils", reason="needs diffusers")
    EMAModel = training_utils.EMAModel

    model, opt = model_and_opt()
    kw = dict(decay=0.99, min_decay=0.1, update_after_step=3, inv_gamma=2.0, power=0.7)
    theirs = EMAModel(model.parameters(), use_ema_warmup=warmup, **kw)
    ours = EMA(opt, warmup="inv_gamma" if warmup else "ratio", **kw)
    g = torch.Generator().manual_seed(4)
    for _ in range(12):
        x = torch.randn(16, 5, generator=g)
        ours.zero_grad()
        model(x).pow(2).mean().backward()
        ours.step()
        theirs.step(model.parameters())
        assert ours.current_decay == pytest.approx(theirs.cur_decay_value, rel=1e-12, abs=0)
        for a, b in zip(ours.averaged_parameters(), theirs.shadow_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_switch_ema_copies_the_average_into_the_model_every_n_steps():
    """update_model_every=N: after the sample of every N-th step the model holds the
    average (float64 reference: the same loop written out), training continues from it."""
    model, opt = model_and_opt()
    ref_model = copy.deepcopy(model)
    ema = EMA(opt, decay=0.8, update_model_every=3)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(6)
    avg = [p.detach().clone() for p in ref_model.parameters()]  # position 0: a copy
    for step in range(1, 10):
        x = torch.randn(16, 5, generator=g)
        for m, o in ((model, ema), (ref_model, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
        with torch.no_grad():
            avg = [0.8 * a + 0.2 * p for a, p in zip(avg, ref_model.parameters())]
            if step % 3 == 0:
                for p, a in zip(ref_model.parameters(), avg):
                    p.copy_(a)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        if step % 3 == 0:
            for p, a in zip(model.parameters(), ema.averaged_parameters()):
                assert torch.equal(p, a)
    with pytest.raises(ValueError, match="update_model_every must be >= 1"):
        EMA(model_and_opt()[1], update_model_every=0)
    assert ema._config()["update_model_every"] == 3
