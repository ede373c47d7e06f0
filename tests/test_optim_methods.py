"""Each averaging wrapper against an independent pure-Python re-implementation of its paper.

The references below share nothing with wavg_ext.optim: each is written from its
paper's algorithm, keeps its samples in float64 and decides on its own which steps
are sampled and when the model is assigned. Both sides train the same tiny model on
the same batches; the test compares, after every step, the model weights (so a
period-end assignment at the wrong step fails) and the number of samples in the
average (so a wrong sample set fails), and at the end the averages themselves.
Also the equalities the issue lists: SWA = AveragedModel, EMA = get_ema_multi_avg_fn,
PSWM(m=1) = SGD, PWALKS(k=1) = PSWA(alpha=1), PeriodicSWA(1 period) = SWA.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.optim.swa_utils import update_bn as torch_update_bn

import wavg_ext
from wavg_ext import EMA, PSWA, PSWM, PWALKS, SWA, PeriodicSWA

STEPS = 200


# --------------------------------------------------------------------------- references


SNAPSHOTS = [0]  # samples the references took (a test that samples nothing proves nothing)


def snapshot(params):
    SNAPSHOTS[0] += 1
    return [p.detach().to(torch.float64).clone() for p in params]


@torch.no_grad()
def assign(params, values):
    for p, v in zip(params, values):
        p.copy_(v)


class RefSWA:
    """SWA paper, Algorithm 1: w_SWA starts as the weights at `start`, then every c steps."""

    def __init__(self, start, every):
        self.start, self.every, self.samples = start, every, []

    def at(self, t, params):
        if t >= self.start and (t - self.start) % self.every == 0:
            self.samples.append(snapshot(params))

    @property
    def count(self):
        return len(self.samples)

    def average(self):
        return [torch.stack(ts).mean(0) for ts in zip(*self.samples)]


class RefEMA:
    """avg = decay·avg + (1 − decay)·w on the SWA sample positions; first sample copied."""

    def __init__(self, decay, every, start):
        self.decay, self.every, self.start, self.avg, self.count = decay, every, start, None, 0

    def at(self, t, params):
        if t >= self.start and (t - self.start) % self.every == 0:
            w = snapshot(params)
            self.avg = w if self.avg is None else [self.decay * a + (1 - self.decay) * x
                                                   for a, x in zip(self.avg, w)]
            self.count += 1

    def average(self):
        return self.avg


class RefEpochAveraging:
    """PSWA paper, Algorithm 1: per epoch of b batches, reset, update at chosen batches i, assign at i = b.

    chosen(i) decides line 7; rule "mean" is eq. (4), "momentum" eq. (6) as DESIGN reads it.
    """

    def __init__(self, b, chosen, rule="mean", m=None, start=0):
        self.b, self.chosen, self.rule, self.m, self.start = b, chosen, rule, m, start
        self.samples, self.avg = [], None

    def at(self, t, params):
        if t <= self.start:
            return
        i = (t - self.start - 1) % self.b + 1
        if self.chosen(i):
            w = snapshot(params)
            if self.rule == "mean":
                self.samples.append(w)
            else:
                self.avg = w if self.avg is None else [(1 - self.m) * a + self.m * x for a, x in zip(self.avg, w)]
                self.samples.append(None)  # only counted
        if i == self.b:
            assign(params, self.average())
            self.samples, self.avg = [], None

    @property
    def count(self):
        return len(self.samples)

    def average(self):
        if self.rule == "mean":
            return [torch.stack(ts).mean(0) for ts in zip(*self.samples)]
        return self.avg


def pswa_batches(b, alpha):
    """alpha·b batches (rounded up) spread evenly over the epoch, ending with the last one."""
    n = math.ceil(Fraction(str(alpha)) * b)
    return {math.ceil(j * b / n) for j in range(1, n + 1)}


def pwalks_chosen(b, k):
    """Eq. (5): the update runs only when i > b·(1 − k)."""
    return lambda i: i > b * (1 - Fraction(str(k)))


class RefPeriodicSWA:
    """Periodic SWA paper: Algorithm 1 (SWA over `period` steps from a seed) run `periods` times,
    each seeded with the previous output, which the model is set to."""

    def __init__(self, period, start, every, periods):
        self.period, self.start, self.c, self.periods = period, start, every, periods
        self.done, self.w_swa, self.i = 0, None, 0

    def at(self, t, params):
        if t < self.start or (self.periods is not None and self.done == self.periods):
            return
        if t == self.start:
            self.w_swa, self.i = snapshot(params), 0  # w_SWA <- w
            return
        self.i += 1
        if self.i % self.c == 0:
            n_models = self.i // self.c
            w = snapshot(params)
            self.w_swa = [(a * n_models + x) / (n_models + 1) for a, x in zip(self.w_swa, w)]
        if self.i == self.period:
            assign(params, self.w_swa)  # the next procedure starts from w_swa (and counts it)
            self.done += 1
            if self.periods is None or self.done < self.periods:
                self.i = 0

    @property
    def count(self):
        return 0 if self.w_swa is None else self.i // self.c + 1

    def average(self):
        return self.w_swa


CASES = {
    "SWA-0-1": (lambda o: SWA(o, start=0, every=1), lambda: RefSWA(0, 1)),
    "SWA-7-3": (lambda o: SWA(o, start=7, every=3), lambda: RefSWA(7, 3)),
    "SWA-150-5": (lambda o: SWA(o, start=150, every=5), lambda: RefSWA(150, 5)),
    "EMA-0.9": (lambda o: EMA(o, decay=0.9), lambda: RefEMA(0.9, 1, 0)),
    "EMA-0.99-every2-start5": (lambda o: EMA(o, decay=0.99, every=2, start=5), lambda: RefEMA(0.99, 2, 5)),
    "PSWA-10-a1": (lambda o: PSWA(o, 10), lambda: RefEpochAveraging(10, lambda i: True)),
    "PSWA-7-a0.3": (lambda o: PSWA(o, 7, sample_fraction=0.3),
                    lambda: RefEpochAveraging(7, pswa_batches(7, 0.3).__contains__)),
    "PSWA-10-a0.5-start4": (lambda o: PSWA(o, 10, sample_fraction=0.5, start=4),
                            lambda: RefEpochAveraging(10, pswa_batches(10, 0.5).__contains__, start=4)),
    "PSWA-12-a0.25": (lambda o: PSWA(o, 12, sample_fraction=0.25),
                      lambda: RefEpochAveraging(12, pswa_batches(12, 0.25).__contains__)),
    "PWALKS-10-k0.3": (lambda o: PWALKS(o, 10, last_fraction=0.3),
                    lambda: RefEpochAveraging(10, pwalks_chosen(10, 0.3))),
    "PWALKS-7-k0.05": (lambda o: PWALKS(o, 7, last_fraction=0.05),
                    lambda: RefEpochAveraging(7, pwalks_chosen(7, 0.05))),
    "PWALKS-9-k1": (lambda o: PWALKS(o, 9, last_fraction=1.0),
                    lambda: RefEpochAveraging(9, pwalks_chosen(9, 1.0))),
    "PSWM-10-m0.7": (lambda o: PSWM(o, 10, momentum=0.7),
                     lambda: RefEpochAveraging(10, lambda i: True, "momentum", 0.7)),
    "PSWM-8-m0.5-start3": (lambda o: PSWM(o, 8, momentum=0.5, start=3),
                           lambda: RefEpochAveraging(8, lambda i: True, "momentum", 0.5, start=3)),
    "PeriodicSWA-20-start10": (lambda o: PeriodicSWA(o, period=20, start=10),
                               lambda: RefPeriodicSWA(20, 10, 1, None)),
    "PeriodicSWA-15-every5-x3": (lambda o: PeriodicSWA(o, period=15, every=5, periods=3),
                                 lambda: RefPeriodicSWA(15, 0, 5, 3)),
    "DSWA-10-every3-start5": (lambda o: PeriodicSWA(o, period=10, every=3, periods=2, start=5),
                              lambda: RefPeriodicSWA(10, 5, 3, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_paper_reference(h, case):
    make_wrapper, make_ref = CASES[case]
    batches = h.batches(23)
    model, ref_model = h.tiny_model(), h.tiny_model()
    opt = make_wrapper(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5))
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.5)
    ref = make_ref()
    SNAPSHOTS[0] = 0
    ref.at(0, list(ref_model.parameters()))
    counts, ref_counts = [], []

    def check(i):
        x, y = batches[i % len(batches)]
        ref_opt.zero_grad()
        (ref_model(x) - y).pow(2).mean().backward()
        ref_opt.step()
        ref.at(i + 1, list(ref_model.parameters()))
        counts.append(opt.num_averaged)
        ref_counts.append(ref.count)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"after step {i + 1}: {m}")

    h.train(model, opt, batches, STEPS, after_step=check)
    assert counts == ref_counts
    assert SNAPSHOTS[0] >= 5
    if opt.num_averaged:
        for a, r in zip(opt.averaged_parameters(), ref.average()):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_sample_spread_examples():
    # alpha = 0.3 of 7 steps: ceil(2.1) = 3 samples, evenly spread, the last step included.
    assert pswa_batches(7, 0.3) == {3, 5, 7}
    assert wavg_ext.optim.fraction_count(0.3, 10) == 3  # not 4 from 0.3's binary value
    assert wavg_ext.optim.fraction_count(0.05, 7) == 1
    assert wavg_ext.optim.fraction_count(1.0, 9) == 9


# --------------------------------------------------------------------------- equalities


def test_swa_equals_averaged_model_with_batchnorm(h):
    batches = h.batches(10)
    model, twin = h.tiny_model(bn=True), h.tiny_model(bn=True)
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4), start=20, every=4)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    swa_model = AveragedModel(twin)

    def twin_step(i):
        x, y = batches[i % len(batches)]
        twin_opt.zero_grad()
        (twin(x) - y).pow(2).mean().backward()
        twin_opt.step()
        if i + 1 >= 20 and (i + 1 - 20) % 4 == 0:
            swa_model.update_parameters(twin)

    h.train(model, opt, batches, 150, after_step=twin_step)
    assert opt.num_averaged == int(swa_model.n_averaged) == 33
    for a, b in zip(opt.averaged_parameters(), swa_model.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # BN recalibration of the averaged weights: wavg_ext.update_bn == torch's update_bn.
    loader = [x for x, _ in batches]
    torch_update_bn(loader, swa_model)
    with opt.averaged():
        wavg_ext.update_bn(loader, model)
        bn, ref_bn = model[1], swa_model.module[1]
        torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-6, atol=1e-6)
        model.eval()
        swa_model.eval()
        torch.testing.assert_close(model(loader[0]), swa_model(loader[0]), rtol=1e-5, atol=1e-6)


def test_ema_equals_get_ema_multi_avg_fn(h):
    batches = h.batches(10)
    model, twin = h.tiny_model(), h.tiny_model()
    opt = EMA(torch.optim.SGD(model.parameters(), lr=0.05), decay=0.95, start=1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    ema_model = AveragedModel(twin, multi_avg_fn=get_ema_multi_avg_fn(0.95))

    def twin_step(i):
        x, y = batches[i % len(batches)]
        twin_opt.zero_grad()
        (twin(x) - y).pow(2).mean().backward()
        twin_opt.step()
        ema_model.update_parameters(twin)

    h.train(model, opt, batches, 120, after_step=twin_step)
    assert opt.num_averaged == 120
    for a, b in zip(opt.averaged_parameters(), ema_model.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pswm_with_m1_is_plain_sgd(h):
    batches = h.batches(9)
    model, sgd_model = h.tiny_model(), h.tiny_model()
    h.train(model, PSWM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 7, momentum=1.0), batches, 100)
    h.train(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9), batches, 100)
    for p, q in zip(model.parameters(), sgd_model.parameters()):
        assert torch.equal(p, q)


def test_pwalks_k1_is_pswa_alpha1(h):
    batches = h.batches(9)
    m1, m2 = h.tiny_model(), h.tiny_model()
    o1 = PWALKS(torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9), 11, last_fraction=1.0)
    o2 = PSWA(torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9), 11, sample_fraction=1.0)
    h.train(m1, o1, batches, 104)
    h.train(m2, o2, batches, 104)
    assert o1.num_averaged == o2.num_averaged == 104 % 11
    for a, b in zip(o1.averaged_parameters() + list(m1.parameters()), o2.averaged_parameters() + list(m2.parameters())):
        assert torch.equal(a, b)


def test_periodic_swa_with_one_period_is_swa(h):
    batches = h.batches(9)
    m1, m2 = h.tiny_model(), h.tiny_model()
    o1 = PeriodicSWA(torch.optim.SGD(m1.parameters(), lr=0.05), period=40, start=15, every=4, periods=1)
    o2 = SWA(torch.optim.SGD(m2.parameters(), lr=0.05), start=15, every=4)
    h.train(m1, o1, batches, 55)
    h.train(m2, o2, batches, 55)
    assert o1.num_averaged == o2.num_averaged == 11
    for a, b, p in zip(o1.averaged_parameters(), o2.averaged_parameters(), m1.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(p, b)  # the single period's end assigned the average
    # After its only period PeriodicSWA stops averaging; SWA goes on.
    h.train(m1, o1, batches, 70, first=55)
    assert o1.num_averaged == 11


@pytest.mark.parametrize("method", ["SWA", "EMA", "PSWA", "PWALKS", "PSWM", "PeriodicSWA"])
def test_bf16_model_with_fp32_averages(h, method):
    make = {"SWA": lambda o: SWA(o, start=5, every=2), "EMA": lambda o: EMA(o, decay=0.9),
            "PSWA": lambda o: PSWA(o, 10, sample_fraction=0.5), "PWALKS": lambda o: PWALKS(o, 10, 0.3),
            "PSWM": lambda o: PSWM(o, 10, 0.6), "PeriodicSWA": lambda o: PeriodicSWA(o, 12, every=3)}[method]
    model = h.tiny_model(dtype=torch.bfloat16)
    batches = h.batches(7, dtype=torch.bfloat16)
    opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5))
    snaps = []
    h.train(model, opt, batches, 49, after_step=lambda i: snaps.append(snapshot(model.parameters())))
    avgs = opt.averaged_parameters()
    assert all(a.dtype == torch.float32 for a in avgs)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(a).all() for a in avgs)
    if method == "SWA":  # positions 5, 7, ..., 49: the exact mean of those bf16 weights, in fp32
        expected = [torch.stack(ts).mean(0) for ts in zip(*snaps[4::2])]
        for a, e in zip(avgs, expected):
            torch.testing.assert_close(a.double(), e, rtol=0, atol=1e-6)
