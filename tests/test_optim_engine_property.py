"""Property test of the sampling engine: random configurations against a brute-force simulator.

The "model" is one float64 scalar that the base optimizer increments by 1 per step, so
the weights at position t are known exactly: the engine's sample counts after every step
must equal those of a simulator that enumerates each period's sample set from the
definitions (DESIGN.md and the wrappers' docstrings), not from the engine's arithmetic,
and its averages and assigned weights must match the simulator's exact rational means to
float64 rounding (the engine's running mean rounds at each update).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wavg_ext import WeightAveraging


class Increment(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1.0)


def period_samples(cfg, period):
    """In-period steps (1..period) that are samples."""
    if cfg["sample_fraction"] is not None:
        n = max(1, math.ceil(Fraction(str(cfg["sample_fraction"])) * period))
        return {math.ceil(j * period / n) for j in range(1, n + 1)}
    if cfg["last_fraction"] is not None:
        n = max(1, math.ceil(Fraction(str(cfg["last_fraction"])) * period))
        return set(range(period - n + 1, period + 1))
    return set(range(cfg["every"], period + 1, cfg["every"]))


def simulate(cfg, steps):
    """Counts after every step, and the final (weight, average, count)."""
    w = 0.0  # the model: +1 per step, overwritten by assignments
    samples, avg = [], None
    m = cfg["momentum"]

    def take():
        nonlocal avg
        samples.append(w)
        avg = w if len(samples) == 1 else (
            sum(Fraction(x) for x in samples) / len(samples) if cfg["rule"] == "mean" else (1 - m) * avg + m * w)

    start, period = cfg["start"], cfg["period"]
    done = 0
    finished = False
    counts = []
    for t in range(steps + 1):
        if t > 0:
            w += 1.0
        if t >= start and not finished:
            rel = t - start
            if period is None:
                if rel % cfg["every"] == 0:
                    take()
            elif rel == 0:
                if cfg["include_period_start"]:
                    take()
            else:
                i = (rel - 1) % period + 1
                if i in period_samples(cfg, period):
                    take()
                if i == period:
                    if cfg["assign"]:
                        w = float(avg)
                    done += 1
                    if cfg["periods"] is not None and done == cfg["periods"]:
                        finished = True
                    else:
                        if cfg["reset"]:
                            samples, avg = [], None
                        if cfg["include_period_start"]:
                            take()
        if t > 0:
            counts.append(len(samples))
    return counts, w, avg


@st.composite
def configs(draw):
    periodic = draw(st.booleans())
    cfg = dict(rule=draw(st.sampled_from(["mean", "momentum"])), start=draw(st.integers(0, 12)), every=1,
               period=None, periods=None, sample_fraction=None, last_fraction=None,
               include_period_start=False, assign=False, reset=False, momentum=None)
    if cfg["rule"] == "momentum":
        cfg["momentum"] = draw(st.sampled_from([0.25, 0.5, 0.75, 1.0]))  # exact in binary
    if not periodic:
        cfg["every"] = draw(st.integers(1, 5))
        return cfg
    cfg["period"] = draw(st.integers(1, 12))
    cfg["periods"] = draw(st.none() | st.integers(1, 4))
    cfg["include_period_start"] = draw(st.booleans())
    cfg["assign"] = draw(st.booleans())
    cfg["reset"] = draw(st.booleans())
    which = draw(st.sampled_from(["every", "sample_fraction", "last_fraction"]))
    if which == "every":
        cfg["every"] = draw(st.integers(1, cfg["period"]))
    else:
        cfg[which] = draw(st.sampled_from([0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0]))
    return cfg


@settings(max_examples=150, deadline=None)
@given(cfg=configs(), steps=st.integers(1, 60))
def test_engine_matches_brute_force(cfg, steps):
    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = WeightAveraging(Increment([p]), **cfg)
    counts = []
    for _ in range(steps):
        opt.step()
        counts.append(opt.num_averaged)
    want_counts, want_w, want_avg = simulate(cfg, steps)
    assert counts == want_counts
    assert math.isclose(p.item(), float(want_w), rel_tol=1e-12, abs_tol=1e-12)
    if opt.num_averaged:
        assert math.isclose(opt.averaged_parameters()[0].item(), float(want_avg), rel_tol=1e-12, abs_tol=1e-12)
