"""merge_checkpoints and greedy_soup against float64 re-implementations written here."""

from __future__ import annotations

import itertools

import pytest
import torch

import wavg_ext
from wavg_ext import greedy_soup, merge_checkpoints


def state_dicts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append({
            "w": torch.randn(7, 5, generator=g),
            "half": torch.randn(33, generator=g).to(torch.bfloat16),
            "wide": torch.randn(4, 3, generator=g, dtype=torch.float64),
            "steps": torch.tensor(100 * (i + 1)),
            "empty": torch.zeros(0, 3),
        })
    return out


def reference(sds, weights):
    """sum_i w_i sd_i in float64 for the floating entries; the last one's other entries."""
    out = {}
    for k, v in sds[0].items():
        if v.is_floating_point():
            out[k] = sum(w * sd[k].double() for w, sd in zip(weights, sds))
        else:
            out[k] = sds[-1][k]
    return out


def check_close(got, want, sds):
    assert list(got) == list(sds[0])
    for k, v in got.items():
        assert v.dtype == sds[0][k].dtype and v.shape == sds[0][k].shape, k
        if v.is_floating_point():
            tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-14}[v.dtype]
            torch.testing.assert_close(v.double(), want[k], rtol=tol, atol=tol)
        else:
            assert torch.equal(v, want[k])


def test_uniform_mean(tmp_path):
    sds = state_dicts(4)
    before = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    got = merge_checkpoints(sds)
    check_close(got, reference(sds, [0.25] * 4), sds)
    for sd, b in zip(sds, before):  # inputs untouched
        for k in sd:
            assert torch.equal(sd[k], b[k])
    # from files (memory-mapped), and wrapped as {"state_dict": ...}: the same bits
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"c{i}.pt")
        torch.save({"state_dict": sd, "epoch": i} if i % 2 else sd, paths[-1])
    from_files = merge_checkpoints(paths)
    for k in got:
        assert torch.equal(got[k], from_files[k]), k


def test_ema_weights():
    sds = state_dicts(5, seed=1)
    d = 0.7
    got = merge_checkpoints(sds, "ema", decay=d)
    # the EMA written as a loop in float64: the first copied
    avg = {k: v.double() for k, v in sds[0].items() if v.is_floating_point()}
    for sd in sds[1:]:
        avg = {k: d * a + (1 - d) * sd[k].double() for k, a in avg.items()}
    avg.update({k: v for k, v in sds[-1].items() if not v.is_floating_point()})
    check_close(got, avg, sds)


def test_given_weights_are_used_as_given():
    sds = state_dicts(3, seed=2)
    w = [0.5, -0.25, 2.0]
    check_close(merge_checkpoints(sds, w), reference(sds, w), sds)
    check_close(merge_checkpoints(sds, torch.tensor(w)), reference(sds, w), sds)
    one = merge_checkpoints(sds[:1])
    for k, v in sds[0].items():
        assert torch.equal(one[k], v)


@pytest.mark.parametrize("make, kwargs, error, match", [
    (lambda s: [], {}, ValueError, "checkpoints is empty"),
    (lambda s: s[0], {}, TypeError, "must be a list of state dicts or paths, got dict"),
    (lambda s: [s[0], 3], {}, TypeError, r"checkpoints\[1\] is a int"),
    (lambda s: [s[0], {**s[1], "extra": torch.ones(1)}], {}, ValueError, r"checkpoints\[1\] does not have the keys.*extra \['extra'\]"),
    (lambda s: [s[0], {k: v for k, v in s[1].items() if k != "w"}], {}, ValueError, r"missing \['w'\]"),
    (lambda s: [s[0], {**s[1], "w": torch.ones(5, 7)}], {}, ValueError, r"checkpoints\[1\]: 'w' has shape \[5, 7\]"),
    (lambda s: [s[0], {**s[1], "w": torch.ones(7, 5, dtype=torch.int32)}], {}, TypeError, "'w' is torch.int32"),
    (lambda s: [s[0], {**s[1], "half": torch.full((33,), float("nan"), dtype=torch.bfloat16)}], {}, ValueError,
     r"checkpoints\[1\]: 'half' holds NaN/inf"),
    (lambda s: s[:2], dict(weights=[1.0]), ValueError, "a list of 2 numbers"),
    (lambda s: s[:2], dict(weights=[1.0, float("inf")]), ValueError, r"weights\[1\] must be a finite number"),
    (lambda s: s[:2], dict(weights="mean"), ValueError, "weights must be 'uniform', 'ema'"),
    (lambda s: s[:2], dict(weights="ema"), ValueError, "weights='ema' needs decay"),
    (lambda s: s[:2], dict(weights="ema", decay=1.0), ValueError, r"decay must be a number in \[0, 1\)"),
    (lambda s: s[:2], dict(decay=0.5), ValueError, "decay is only used with weights='ema'"),
    (lambda s: [{"steps": torch.tensor(1)}], {}, ValueError, "no floating-point tensors"),
])
def test_bad_input(make, kwargs, error, match):
    sds = state_dicts(2)
    with pytest.raises(error, match=match):
        merge_checkpoints(make(sds), **kwargs)


def soup_reference(sds, evaluate):
    """Wortsman et al. Recipe 1, in float64."""
    floating = [k for k, v in sds[0].items() if v.is_floating_point()]

    def mean(idx):
        return {k: sum(sds[i][k].double() for i in idx) / len(idx) for k in floating}

    scores = [evaluate({k: sd[k].double() for k in floating}) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -scores[i])
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        s = evaluate(mean(soup + [i]))
        if s >= best:
            soup, best = soup + [i], s
    return mean(soup), soup


def test_greedy_soup_matches_recipe_1():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sds = state_dicts(6, seed=4)
    for j, sd in enumerate(sds):  # some near the target, some far
        sd["w"] = (target + (0.3 if j % 2 else 3.0) * torch.randn(7, 5, generator=g, dtype=torch.float64)).float()
    calls = []

    def evaluate(sd):
        calls.append(1)
        return -float((sd["w"].double() - target).norm())

    soup, ingredients = greedy_soup(sds, evaluate, return_ingredients=True)
    want, want_ingredients = soup_reference(sds, evaluate)
    assert ingredients == want_ingredients and 1 < len(ingredients) < len(sds)
    assert len(calls) == 2 * len(sds) - 1 + len(sds) + len(sds) - 1  # ours, then the reference's
    for k, v in want.items():
        torch.testing.assert_close(soup[k].double(), v, rtol=1e-2 if soup[k].dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-2 if soup[k].dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(soup["steps"], sds[ingredients[-1]]["steps"])


def test_greedy_soup_bad_input():
    sds = state_dicts(2)
    with pytest.raises(ValueError, match="checkpoints is empty"):
        greedy_soup([], lambda sd: 0.0)
    with pytest.raises(TypeError, match="evaluate must be callable"):
        greedy_soup(sds, 3)
    with pytest.raises(TypeError, match=r"evaluate returned nan for checkpoints\[0\]"):
        greedy_soup(sds, lambda sd: float("nan"))
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: 'w' has shape"):
        greedy_soup([sds[0], {**sds[1], "w": torch.ones(2)}], lambda sd: 0.0)


def test_public_names():
    assert wavg_ext.merge_checkpoints is merge_checkpoints and "greedy_soup" in wavg_ext.__all__
    assert list(itertools.islice(iter(merge_checkpoints(state_dicts(2))), 1)) == ["w"]


def test_overflowing_sum_is_named():
    sds = state_dicts(2)
    big = [{**sd, "w": torch.full((7, 5), 3e38)} for sd in sds]
    with pytest.raises(ValueError, match="the weighted sum of 'w' overflows"):
        merge_checkpoints(big, [1.0, 1.0])
    assert merge_checkpoints(big)["w"].isfinite().all()  # the mean of the same is fine
