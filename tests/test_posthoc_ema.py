"""PostHocEMA snapshots and synthesize_ema: a profile synthesized after training against
the same profile tracked directly during training (PowerEMA on a twin run)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import wavg_ext
from wavg_ext import PostHocEMA, PowerEMA, synthesize_ema
from wavg_ext.power_ema import posthoc_coefficients


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def flat(ts):
    return torch.cat([t.detach().double().flatten() for t in ts])


def train(pairs, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
        for model, opt in pairs:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()


def test_synthesized_profiles_match_the_tracked_ones(tmp_path):
    saved, tracked = make(), make()
    ph = PostHocEMA(torch.optim.SGD(saved.parameters(), lr=0.05), snapshot_every=25, directory=tmp_path,
                    module=saved)
    widths = (0.10, 0.15, 0.05, 0.28)  # two synthesized, then the two saved ones
    pe = PowerEMA(torch.optim.SGD(tracked.parameters(), lr=0.05), sigma_rels=widths)
    train([(saved, ph), (tracked, pe)], 500)
    ph.wait()
    files = sorted(os.listdir(tmp_path))
    assert files == [f"posthoc-ema-{t:010d}.pt" for t in range(25, 501, 25)]
    for k, s in enumerate(widths):
        out = make()
        coeffs = synthesize_ema(tmp_path, s, into=out)
        assert coeffs.shape == (40,) and coeffs.dtype == torch.float64
        got, want, weights = flat(out.parameters()), flat(pe.averaged_parameters(k)), flat(tracked.parameters())
        err = ((got - want).norm() / (want - weights).norm()).item()  # measured: 0.025, 0.017, 0.009, 0.004
        assert err < (0.06 if k < 2 else 0.02), (s, err)


def test_coefficients_and_an_earlier_time(tmp_path):
    model = make()
    ph = PostHocEMA(torch.optim.SGD(model.parameters(), lr=0.05), (0.05, 0.1), snapshot_every=10,
                    directory=tmp_path, snapshot_dtype=torch.float32)
    train([(model, ph)], 60)
    state = ph.state_dict()  # waits for the writes
    assert state["averaging"]["config"]["snapshot_every"] == 10
    out = make()
    coeffs = synthesize_ema(tmp_path, 0.07, into=list(out.parameters()), time=40)
    times = [t for t in (10, 20, 30, 40) for _ in range(2)]
    torch.testing.assert_close(coeffs, posthoc_coefficients(times, [0.05, 0.1] * 4, 40, 0.07), rtol=0, atol=0)
    # the snapshot at step 40, profile 0.1, is reproduced by its own coefficients
    coeffs = synthesize_ema(tmp_path, 0.1, into=out, time=40)
    data = torch.load(tmp_path / "posthoc-ema-0000000040.pt", weights_only=True)
    for p, s in zip(out.parameters(), data["profiles"][1]):
        torch.testing.assert_close(p, s, rtol=1e-4, atol=1e-6)


def test_bad_input(tmp_path):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="snapshot_every must be >= 1"):
        PostHocEMA(opt, snapshot_every=0, directory=tmp_path)
    with pytest.raises(TypeError, match="directory must be a path"):
        PostHocEMA(opt, snapshot_every=5, directory=3)
    with pytest.raises(ValueError, match=r"snapshot_every \(5\) must be a multiple of every \(2\)"):
        PostHocEMA(opt, every=2, snapshot_every=5, directory=tmp_path)
    with pytest.raises(TypeError, match="snapshot_dtype must be one of"):
        PostHocEMA(opt, snapshot_every=5, directory=tmp_path, snapshot_dtype=torch.int8)
    with pytest.raises(ValueError, match="holds no posthoc-ema"):
        synthesize_ema(tmp_path, 0.1, into=model)
    with pytest.raises(ValueError, match="is not a directory"):
        synthesize_ema(tmp_path / "missing", 0.1, into=model)
    ph = PostHocEMA(opt, snapshot_every=5, directory=tmp_path)
    train([(model, ph)], 10)
    ph.wait()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"sigma_rel must be a number in \(0, 0.288675\)"):
        synthesize_ema(tmp_path, 0.3, into=model)
    with pytest.raises(ValueError, match="no snapshot was taken at or before step 4"):
        synthesize_ema(tmp_path, 0.1, into=model, time=4)
    with pytest.raises(ValueError, match="into has 3 tensors, the snapshots 4"):
        synthesize_ema(tmp_path, 0.1, into=list(model.parameters())[:3])
    wrong = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"into's parameter 2 is \[5, 16\], the snapshots' \[4, 16\]"):
        synthesize_ema(tmp_path, 0.1, into=wrong)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_directories_of_shards_are_checked(tmp_path):
    """Shards of every rank for every step, and one kind of snapshot per directory (the files
    of an FSDP2 run are named ...<step>.rank<r>-of-<w>.pt; tests/test_distributed.py runs one)."""
    model = make()
    ph = PostHocEMA(torch.optim.SGD(model.parameters(), lr=0.05), snapshot_every=5, directory=tmp_path / "whole")
    train([(model, ph)], 10)
    ph.wait()
    whole = sorted((tmp_path / "whole").iterdir())
    assert [f.name for f in whole] == ["posthoc-ema-0000000005.pt", "posthoc-ema-0000000010.pt"]
    mixed, partial = tmp_path / "mixed", tmp_path / "partial"
    mixed.mkdir()
    partial.mkdir()
    (mixed / whole[0].name).write_bytes(whole[0].read_bytes())
    (mixed / "posthoc-ema-0000000010.rank00000-of-00002.pt").write_bytes(whole[1].read_bytes())
    for rank in (0, 1):
        (partial / f"posthoc-ema-0000000005.rank{rank:05d}-of-00002.pt").write_bytes(whole[0].read_bytes())
    (partial / "posthoc-ema-0000000010.rank00000-of-00002.pt").write_bytes(whole[1].read_bytes())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="mixes whole snapshots and shards of \\[2\\] ranks"):
        synthesize_ema(mixed, 0.1, into=model)
    with pytest.raises(ValueError, match=r"the snapshot of step 10 lacks the shards of rank\(s\) \[1\]"):
        synthesize_ema(partial, 0.1, into=model)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_public_names():
    assert wavg_ext.PostHocEMA is PostHocEMA and "synthesize_ema" in wavg_ext.__all__
    assert issubclass(PostHocEMA, PowerEMA) and copy.copy(PostHocEMA.method) == "PostHocEMA"
