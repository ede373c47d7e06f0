"""PowerEMA (EDM2's power-function EMA) against the EDM2 update written out in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import wavg_ext
from wavg_ext import PowerEMA
from wavg_ext.power_ema import sigma_rel_to_gamma


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def run(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 5, generator=g) for _ in range(n)]


@pytest.mark.parametrize("every, start", [(1, 0), (3, 2)])
def test_matches_the_edm2_update_in_float64(every, start):
    sigma_rels = (0.05, 0.1, 0.2)
    model, opt = model_and_opt()
    ema = PowerEMA(opt, sigma_rels, every=every, start=start)
    seen = {0: [p.detach().double().clone() for p in model.parameters()]}
    for i, x in enumerate(batches(20)):
        run(model, ema, [x])
        seen[i + 1] = [p.detach().double().clone() for p in model.parameters()]
    for k, s in enumerate(sigma_rels):
        gamma = sigma_rel_to_gamma(s)
        avg = None
        for t in range(start, 21, every):
            # EDM2: beta = (1 - t_delta / t_next) ** (gamma + 1), the first update a copy
            beta = 0.0 if avg is None or t <= every else (1 - every / t) ** (gamma + 1)
            avg = [w.clone() for w in seen[t]] if avg is None else [beta * a + (1 - beta) * w
                                                                    for a, w in zip(avg, seen[t])]
        for a, w in zip(ema.averaged_parameters(k), avg):
            torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-6)
    assert ema.num_averaged == len(range(start, 21, every)) and len(ema.current_betas) == 3


def test_gammas_and_the_running_mean_limit():
    """gamma = 0: beta = 1 - 1/t, the running mean of the weights after steps 1..T (the
    initial weights get weight 0): SWA from position 1."""
    model, opt = model_and_opt()
    ema = PowerEMA(opt, gammas=[0.0, 6.94])
    twin = copy.deepcopy(model)
    swa = wavg_ext.SWA(torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), start=1)
    xs = batches(9)
    run(model, ema, xs)
    run(twin, swa, xs)
    assert ema.sigma_rels[1] == pytest.approx(0.10, abs=1e-4)
    for a, b in zip(ema.averaged_parameters(0), swa.averaged_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_swap_and_averaged_per_profile():
    model, opt = model_and_opt()
    ema = PowerEMA(opt, (0.05, 0.2), module=model, average_buffers=True)
    run(model, ema, batches(6))
    weights = [p.detach().clone() for p in model.parameters()]
    bn_before = model[1].running_mean.clone()
    with ema.averaged(1):
        for p, a in zip(model.parameters(), ema.averaged_parameters(1)):
            assert torch.equal(p, a)
        assert torch.equal(model[1].running_mean, ema.averaged_buffers(1)["1.running_mean"])
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    assert torch.equal(model[1].running_mean, bn_before)
    ema.swap(0)
    for p, a in zip(model.parameters(), ema.averaged_parameters(0)):
        assert torch.equal(p, a)
    ema.swap()
    sd = ema.averaged_state_dict(profile=1)
    names = [n for n, _ in model.named_parameters()]
    for name, a in zip(names, ema.averaged_parameters(1)):
        assert torch.equal(sd[name], a), name
    target = copy.deepcopy(model)
    ema.copy_to(target, profile=1)
    assert torch.equal(target[0].weight, ema.averaged_parameters(1)[0])
    assert not torch.equal(ema.averaged_parameters(0)[0], ema.averaged_parameters(1)[0])
    with pytest.raises(ValueError, match=r"profile must be an int in \[0, 2\)"):
        ema.averaged_parameters(2)


def test_resume_is_bit_exact_and_a_bad_load_changes_nothing():
    model, opt = model_and_opt()
    ema = PowerEMA(opt, (0.05, 0.1, 0.15), every=2)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    xs = batches(16)
    run(model, ema, xs[:8])
    saved = copy.deepcopy(ema.state_dict())
    resumed = PowerEMA(twin_opt, (0.05, 0.1, 0.15), every=2)
    twin.load_state_dict(model.state_dict())
    # damaged checkpoints are refused before anything changes
    before = copy.deepcopy(resumed.state_dict())
    bad = copy.deepcopy(saved)
    bad["averaging"]["profiles"][1][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"profiles\[1\]\[0\] \(parameter 0\) holds NaN or inf"):
        resumed.load_state_dict(bad)
    short = copy.deepcopy(saved)
    short["averaging"]["profiles"] = short["averaging"]["profiles"][:1]
    with pytest.raises(ValueError, match="a list of 2 lists of tensors"):
        resumed.load_state_dict(short)
    other = PowerEMA(torch.optim.SGD(copy.deepcopy(twin).parameters(), lr=0.1), (0.05, 0.1, 0.2), every=2)
    with pytest.raises(ValueError, match="gammas"):
        other.load_state_dict(saved)
    after = resumed.state_dict()
    assert after["averaging"]["num_averaged"] == before["averaging"]["num_averaged"] == 0
    resumed.load_state_dict(saved)
    run(model, ema, xs[8:])
    run(twin, resumed, xs[8:])
    for k in range(3):
        for a, b in zip(ema.averaged_parameters(k), resumed.averaged_parameters(k)):
            assert torch.equal(a, b)


def test_profiles_follow_a_model_made_float64():
    model, opt = model_and_opt()
    ema = PowerEMA(opt, (0.05, 0.1))
    run(model, ema, batches(4))
    before = [[a.clone() for a in ema.averaged_parameters(k)] for k in range(2)]
    model.double()
    run(model, ema, [x.double() for x in batches(1, seed=7)])
    for k in range(2):
        got = ema.averaged_parameters(k)
        assert all(a.dtype == torch.float64 for a in got)
        assert not all(torch.equal(a, b.double()) for a, b in zip(got, before[k]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sigma_rels=(0.05, 0.3)), ValueError, r"sigma_rels\[1\]: sigma_rel must be in \(0, 0.288675\)"),
    (dict(sigma_rels=()), ValueError, "sigma_rels must be a non-empty list"),
    (dict(sigma_rels=(0.1,), gammas=(5.0,)), ValueError, "sigma_rels and gammas are exclusive"),
    (dict(gammas=(-1.0,)), ValueError, r"gamma must be in \[0"),
    (dict(gammas=("7",)), ValueError, r"gammas\[0\] must be a number"),
    (dict(every=0), ValueError, "every must be >= 1"),
    (dict(compensated=1), TypeError, "compensated must be a bool"),
    (dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite must be a bool"),
])
def test_bad_arguments(kwargs, error, match):
    model, opt = model_and_opt()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        PowerEMA(opt, **kwargs)
    assert opt.state_dict() == before


def _edm2_reference(seen, sigma_rels, every, start, steps, skipped=()):
    """The EDM2 update in float64 over the positions start, start+every, ...; positions in
    ``skipped`` (their weights hold NaN) are left out, as skip_nonfinite leaves them out: the
    beta of a later sample still comes from its own position, and the first taken sample is
    copied."""
    out = []
    for s in sigma_rels:
        gamma = sigma_rel_to_gamma(s)
        avg = None
        for t in range(start, steps + 1, every):
            if t in skipped:
                continue
            beta = 0.0 if avg is None or t <= every else (1 - every / t) ** (gamma + 1)
            avg = [w.clone() for w in seen[t]] if avg is None else [beta * a + (1 - beta) * w
                                                                    for a, w in zip(avg, seen[t])]
        out.append(avg)
    return out


def _run_seen(ema, model, n, poison_at=None):
    """Trains n steps; returns the float64 weights after each; with ``poison_at`` the weights
    after that step hold a NaN for the sample (put back right after the step)."""
    seen = {0: [p.detach().double().clone() for p in model.parameters()]}
    first = next(model.parameters())
    for i, x in enumerate(batches(n)):
        saved = None
        if poison_at == i + 1:
            def hook(opt, args, kwargs):
                nonlocal saved
                saved = first.detach()[0, 0].item()
                with torch.no_grad():
                    first[0, 0] = float("nan")
            handle = ema.optimizer.register_step_post_hook(hook)
        run(model, ema, [x])
        if poison_at == i + 1:
            handle.remove()
            with torch.no_grad():
                first[0, 0] = saved
        seen[i + 1] = [p.detach().double().clone() for p in model.parameters()]
    return seen


@pytest.mark.parametrize("compensated", [False, True])
def test_skip_nonfinite_leaves_every_profile_untouched(compensated):
    """A sample holding NaN is skipped by every profile (one count), the next ones use their own
    positions' betas; every profile matches the float64 EDM2 update without that sample."""
    sigma_rels = (0.05, 0.2)
    model, opt = model_and_opt()
    ema = PowerEMA(opt, sigma_rels, skip_nonfinite=True, compensated=compensated)
    seen = _run_seen(ema, model, 12, poison_at=5)
    assert ema.num_skipped == 1 and ema.num_averaged == 12  # positions 0..12, one skipped
    want = _edm2_reference(seen, sigma_rels, 1, 0, 12, skipped={5})
    for k in range(2):
        got = ema.averaged_parameters(k)
        assert all(bool(torch.isfinite(a).all()) for a in got)
        for a, w in zip(got, want[k]):
            torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-6)


def test_skip_nonfinite_first_sample_skipped_copies_the_next():
    ema2_model, ema2_opt = model_and_opt()
    ema2 = PowerEMA(ema2_opt, (0.05, 0.2), skip_nonfinite=True, start=1)
    seen2 = _run_seen(ema2, ema2_model, 6, poison_at=1)
    assert ema2.num_skipped == 1 and ema2.num_averaged == 5
    want = _edm2_reference(seen2, (0.05, 0.2), 1, 2, 6)  # the first taken sample (position 2) copied
    for k in range(2):
        for a, w in zip(ema2.averaged_parameters(k), want[k]):
            torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-6)


def test_compensated_profiles_track_float64_and_resume_bit_for_bit():
    """Compensated profiles: the float32 pair tracks the float64 EDM2 update to float64-ish
    precision where plain float32 profiles drift; a checkpoint holds every profile's
    compensation and resumes bit for bit."""
    sigma_rels = (0.05, 0.2)
    model, opt = model_and_opt()
    ema = PowerEMA(opt, sigma_rels, compensated=True)
    seen = _run_seen(ema, model, 30)
    want = _edm2_reference(seen, sigma_rels, 1, 0, 30)
    sd = ema.state_dict()
    assert len(sd["averaging"]["profile_compensations"]) == 1
    for k in range(2):
        comps = sd["averaging"]["compensations"] if k == 0 else sd["averaging"]["profile_compensations"][0]
        for a, c, w in zip(ema.averaged_parameters(k), comps, want[k]):
            assert (a.double() + c.double() - w).abs().max().item() < 1e-12
    saved = copy.deepcopy(sd)
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ema2 = PowerEMA(opt2, sigma_rels, compensated=True)
    ema2.load_state_dict(saved)
    more = batches(5, seed=9)
    run(model, ema, more)
    run(model2, ema2, more)
    for k in range(2):
        for a, b in zip(ema.averaged_parameters(k), ema2.averaged_parameters(k)):
            assert torch.equal(a, b)
    bad = copy.deepcopy(saved)
    bad["averaging"]["profile_compensations"][0][0] = torch.zeros(3)
    before = [a.clone() for a in ema2.averaged_parameters(1)]
    with pytest.raises(ValueError, match=r"profile_compensations\[0\]\[0\] is \[3\]"):
        ema2.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, ema2.averaged_parameters(1)))


def test_compensated_profiles_follow_a_dtype_change():
    model, opt = model_and_opt()
    ema = PowerEMA(opt, (0.05, 0.2), compensated=True)
    run(model, ema, batches(6))
    values = [[a.double() + c.double() for a, c in zip(ema.averaged_parameters(k), comps)]
              for k, comps in ((0, ema.state_dict()["averaging"]["compensations"]),
                               (1, ema.state_dict()["averaging"]["profile_compensations"][0]))]
    model.double()
    run(model, ema, [])
    ema.state_dict()  # (follows the model)
    for k in range(2):
        for a, v in zip(ema.averaged_parameters(k), values[k]):
            assert a.dtype == torch.float64 and torch.equal(a, v)
