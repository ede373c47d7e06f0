"""wavg_ext.TWA: against a dense float64 reimplementation of the paper's training, span invariance,
rank-deficient samples, bfloat16 storage, checkpoints (state_dict, from_checkpoints), GradScaler,
schedulers, closures and bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import wavg_ext
from wavg_ext import TWA, RankDeficientSampleWarning

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def sgd(model, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def flat_model(model):
    return flat(model.parameters())


def rel(a, b):
    return float((a - b).norm() / b.norm())


def span_of(twa):
    """Float64 orthonormal basis (columns) of the span of the stored rows [0, num_basis)."""
    k = twa.num_basis
    rows = torch.cat([b[:k].reshape(k, -1).double().cpu() for b in twa.basis], dim=1)
    return torch.linalg.qr(rows.T).Q, rows


def span_residual(twa, model):
    """|w - Q Q^T w| / |w| with Q an exact (float64) orthonormal basis of the stored rows' span."""
    q, _ = span_of(twa)
    w = flat_model(model)
    return float((w - q @ (q.T @ w)).norm() / w.norm())


def collect_phase(h, model, twa, batches, steps=30, every=5):
    """Trains `steps` steps, collecting after every `every`-th; returns the float64 samples [n, D]."""
    samples = []

    def after(i):
        if (i + 1) % every == 0:
            assert twa.collect()
            samples.append(flat_model(model))

    h.train(model, twa, batches, steps, after_step=after)
    return torch.stack(samples)


# --------------------------------------------------------------------------- the dense reference


def dense_twa(model, samples, w0, batches, first, steps, reg, lr=LR, momentum=MOMENTUM, wd=WD):
    """The paper's TWA in float64 on flattened weights: P from a QR of the samples,
    w <- (1 - reg) w - lr * (SGD momentum of P P^T g + wd w), starting at P P^T w0 with a fresh
    momentum buffer. Returns the weights after each step."""
    q = torch.linalg.qr(samples.T).Q  # D x n, orthonormal columns spanning the samples
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    w = q @ (q.T @ w0)
    buf, out = None, []
    for i in range(first, first + steps):
        torch.nn.utils.vector_to_parameters(w, params)
        x, y = batches[i % len(batches)]
        model64.zero_grad()
        (model64(x.double()) - y.double()).pow(2).mean().backward()
        g = flat(p.grad for p in params)
        w = (1 - reg) * w
        d = q @ (q.T @ g) + wd * w
        buf = d.clone() if buf is None else momentum * buf + d
        w = w - lr * buf
        out.append(w)
    return out


@pytest.mark.parametrize("init", ["mean", "current"])
def test_matches_dense_float64_reimplementation(h, init):
    model = h.tiny_model()
    batches = h.batches(8)
    twa = TWA(sgd(model), capacity=8, reg=1e-3)
    samples = collect_phase(h, model, twa, batches, steps=30, every=5)
    h.train(model, twa, batches, 33, first=30)  # the current weights are not a sample
    w_now = flat_model(model)
    twa.start_subspace(init)
    w0 = samples.mean(0) if init == "mean" else w_now
    expected = dense_twa(model, samples, w0, batches, 33, 60, reg=1e-3)
    q = torch.linalg.qr(samples.T).Q
    assert rel(flat_model(model), q @ (q.T @ w0)) < 1e-6
    actual = []
    h.train(model, twa, batches, 33 + 60, first=33, after_step=lambda i: actual.append(flat_model(model)))
    assert rel(actual[-1], actual[0]) > 1e-2  # it trained
    errors = [rel(a, e) for a, e in zip(actual, expected)]
    assert max(errors) < 1e-5, errors[-5:]


def test_weights_stay_in_the_span_for_100_momentum_steps(h):
    model = h.tiny_model()
    batches = h.batches(6)
    base = sgd(model, nesterov=True)
    twa = TWA(base, capacity=6)
    collect_phase(h, model, twa, batches, steps=30, every=5)
    assert len(base.state) == 4  # momentum from the collection phase...
    twa.start_subspace("mean")
    assert len(base.state) == 0  # ...is cleared: it holds full-space gradients
    before = flat_model(model)
    h.train(model, twa, batches, 130, first=30)
    assert rel(flat_model(model), before) > 1e-2
    assert span_residual(twa, model) <= 1e-5
    # The stored rows are orthonormal, so P P^T w is the projection too.
    _, rows = span_of(twa)
    w = flat_model(model)
    assert float((w - rows.T @ (rows @ w)).norm() / w.norm()) <= 1e-5
    assert torch.allclose(twa.coefficients(), rows @ w, rtol=1e-5, atol=1e-6)


def test_current_init_keeps_the_last_sample(h):
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=4)
    collect_phase(h, model, twa, h.batches(4), steps=12, every=4)  # collects right after the last step
    last = flat_model(model)
    twa.start_subspace("current")
    assert rel(flat_model(model), last) < 1e-6  # only rounding: the last sample is in the span
    assert twa.in_subspace and twa.num_basis == 3 and twa.num_samples == 3


def test_mean_init_is_the_mean_of_all_samples_refused_ones_included(h):
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=4)
    batches = h.batches(4)
    h.train(model, twa, batches, 5)
    samples = [flat_model(model)]
    assert twa.collect()
    with pytest.warns(RankDeficientSampleWarning, match="adds no new direction"):
        assert twa.collect() is False  # the same weights again
    samples.append(flat_model(model))
    h.train(model, twa, batches, 10, first=5)
    samples.append(flat_model(model))
    assert twa.collect()
    assert (twa.num_basis, twa.num_samples) == (2, 3)
    twa.start_subspace("mean")
    assert rel(flat_model(model), torch.stack(samples).mean(0)) < 1e-6


def test_rank_deficient_sample_is_refused(h):
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=4)
    batches = h.batches(4)
    assert twa.collect()
    w1 = h.params_of(model)
    h.train(model, twa, batches, 5)
    assert twa.collect()
    w2 = h.params_of(model)
    with torch.no_grad():  # a combination of the two samples adds nothing
        for p, a, b in zip(model.parameters(), w1, w2):
            p.copy_(0.3 * a + 0.7 * b)
    basis_before = [b.clone() for b in twa.basis]
    with pytest.warns(RankDeficientSampleWarning, match=r"sample 2 adds no new direction.*keeps 2 vectors"):
        assert twa.collect() is False
    assert (twa.num_basis, twa.num_samples) == (2, 3)
    for b, b0 in zip(twa.basis, basis_before):
        assert torch.equal(b, b0) and not b[2].any()  # row 2 left zero
    # A new direction is still accepted into row 2.
    h.train(model, twa, batches, 10, first=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert twa.collect()
    q, rows = span_of(twa)
    assert torch.allclose(rows @ rows.T, torch.eye(3, dtype=torch.float64), atol=1e-6)


def test_one_projection_call_per_step_and_missing_grads(h, monkeypatch):
    model = h.tiny_model()
    unused = torch.nn.Linear(3, 2)  # never in the forward pass: its grads stay None
    params = list(model.parameters()) + list(unused.parameters())
    twa = TWA(torch.optim.SGD(params, lr=LR, momentum=MOMENTUM), capacity=3)
    batches = h.batches(3)
    for i in range(3):
        with torch.no_grad():
            for p in unused.parameters():
                p.add_(0.1 * (i + 1))  # the samples differ on the unused tensors too
        h.train(model, twa, batches, i + 1, first=i)
        assert twa.collect()
    twa.start_subspace("mean")
    calls = []
    real = wavg_ext.ops.project_
    monkeypatch.setattr(wavg_ext.ops, "project_", lambda g, b, k: (calls.append(len(g)), real(g, b, k)))
    before = [p.detach().clone() for p in unused.parameters()]
    h.train(model, twa, batches, 20)
    assert calls == [6] * 20  # one call for all 6 tensors per step
    assert all(p.grad is not None for p in unused.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(unused.parameters(), before))  # moved with the span
    q, _ = span_of(twa)
    w = flat(params)
    assert float((w - q @ (q.T @ w)).norm() / w.norm()) <= 1e-5


# --------------------------------------------------------------------------- bfloat16 storage


def test_bfloat16_storage_trains_in_the_span(h):
    model, ref = h.tiny_model(), h.tiny_model()
    batches = h.batches(6)
    twa = TWA(sgd(model), capacity=6, storage_dtype=torch.bfloat16)
    ref_twa = TWA(sgd(ref), capacity=6)
    collect_phase(h, model, twa, batches, steps=30, every=5)
    collect_phase(h, ref, ref_twa, batches, steps=30, every=5)
    assert all(b.dtype == torch.bfloat16 for b in twa.basis) and twa.rtol == 2e-2
    twa.start_subspace("mean")
    ref_twa.start_subspace("mean")
    # The mean is P @ (mean of the samples' Gram-Schmidt coefficients) with the unit vectors
    # rounded to bfloat16 (2^-9 relative): ~3e-4 away from the float32 basis' mean here.
    assert rel(flat_model(model), flat_model(ref)) < 1e-3
    h.train(model, twa, batches, 130, first=30)
    h.train(ref, ref_twa, batches, 130, first=30)
    # Updates are combinations of the stored rows, so the weights stay in the span of those rows
    # as tightly as with float32 storage...
    assert span_residual(twa, model) <= 1e-5
    # ...but the rows are orthonormal only to bfloat16 rounding (~2^-9), so P P^T is not quite a
    # projector and P P^T w misses w by ~1e-3: the looser bound.
    _, rows = span_of(twa)
    w = flat_model(model)
    assert float((rows @ rows.T - torch.eye(rows.shape[0], dtype=torch.float64)).abs().max()) < 1e-2
    assert float((w - rows.T @ (rows @ w)).norm() / w.norm()) < 1e-2
    assert rel(w, flat_model(ref)) < 2e-2  # close to the float32-basis run


def test_bfloat16_samples_are_orthonormalized_before_rounding(h):
    """A new direction of 5% of the sample's norm: the sample is ~1e-3 (bf16 rounding) away from
    the span if it is rounded before Gram-Schmidt; from a float32 copy only the unit vector is
    rounded, which leaves 5% of that."""
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=3, storage_dtype=torch.bfloat16)
    assert twa.collect()
    w = flat_model(model)
    u = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u -= (u @ w) / (w @ w) * w
    w1 = w + 0.05 * w.norm() * u / u.norm()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w1.float(), model.parameters())  # (new .data tensors)
    assert twa.collect()
    q, _ = span_of(twa)
    w1 = flat_model(model)
    assert float((w1 - q @ (q.T @ w1)).norm() / w1.norm()) < 3e-4  # rounding first: ~1.3e-3


# --------------------------------------------------------------------------- checkpoints


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("when", ["collecting", "in_subspace"])
def test_state_dict_resume_is_bit_identical(h, when):
    batches = h.batches(5)
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=5, reg=1e-3)
    collect_phase(h, model, twa, batches, steps=10, every=5)
    if when == "in_subspace":
        twa.start_subspace("mean")
    h.train(model, twa, batches, 13, first=10)
    saved = save_load({"model": model.state_dict(), "opt": twa.state_dict()})

    def finish(m, t):
        if when == "collecting":
            assert t.collect()
            t.start_subspace("mean")
        h.train(m, t, batches, 25, first=13)
        return h.params_of(m)

    expected = finish(model, twa)
    fresh = h.tiny_model(seed=7)
    twa2 = TWA(sgd(fresh), capacity=5, reg=1e-3)
    fresh.load_state_dict(saved["model"])
    twa2.load_state_dict(saved["opt"])
    assert (twa2.num_basis, twa2.num_samples, twa2.in_subspace) == (twa.num_basis - (when == "collecting"),
                                                                   twa.num_samples - (when == "collecting"),
                                                                   when == "in_subspace")
    for a, b in zip(finish(fresh, twa2), expected):
        h.assert_bits_equal(a, b, "resumed weights")
    for a, b in zip(twa2.basis, twa.basis):
        h.assert_bits_equal(a, b, "resumed basis")


def test_load_state_dict_checks_everything_first(h):
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=4)
    collect_phase(h, model, twa, h.batches(3), steps=6, every=3)
    good = save_load(twa.state_dict())
    other = TWA(sgd(h.tiny_model(seed=3)), capacity=4)
    snapshot = ([b.clone() for b in other.basis], other.num_basis, other.num_samples)

    def bad(mutate):
        sd = save_load(twa.state_dict())
        mutate(sd)
        return sd

    cases = [
        (TWA(sgd(h.tiny_model()), capacity=5).state_dict(), "capacity: saved 5 vs 4"),
        (bad(lambda sd: sd["twa"]["basis"].pop()), "basis of 3 tensors"),
        (bad(lambda sd: sd["twa"]["basis"].__setitem__(1, torch.zeros(4, 3))), r"basis\[1\] is \[4, 3\]"),
        (bad(lambda sd: sd["twa"].__setitem__("num_basis", 9)), "num_basis 9"),
        (bad(lambda sd: sd["twa"].__setitem__("num_samples", 1)), "num_samples 1"),
        (bad(lambda sd: sd["twa"].__setitem__("in_subspace", "yes")), "in_subspace"),
        (bad(lambda sd: sd["twa"].__setitem__("coefficient_sum", torch.zeros(4))), "coefficient_sum"),
        (bad(lambda sd: sd["twa"].__setitem__("method", "SWA")), "from SWA"),
        (bad(lambda sd: sd["twa"].__setitem__("version", 0)), "version 0"),
        ({"optimizer": good["optimizer"]}, "expected keys"),
        (wavg_ext.SWA(sgd(h.tiny_model())).state_dict(), "expected keys 'optimizer' and 'twa'"),
    ]
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(sd)
        assert all(torch.equal(a, b) for a, b in zip(other.basis, snapshot[0]))
        assert (other.num_basis, other.num_samples) == snapshot[1:]
        assert len(other.optimizer.state) == 0
    other.load_state_dict(good)
    assert other.num_basis == 2


def write_checkpoints(h, tmp_path, bn=False):
    """Trains with collect() every 4 steps and saves the model at each collect as a file;
    returns (the collect-route TWA's model after start_subspace("mean"), its TWA, the paths)."""
    model = h.tiny_model(bn=bn)
    batches = h.batches(4)
    twa = TWA(sgd(model), capacity=6)
    paths = []

    def after(i):
        if (i + 1) % 4 == 0:
            assert twa.collect()
            paths.append(tmp_path / f"epoch{len(paths)}.pt")
            torch.save(model.state_dict(), paths[-1])

    h.train(model, twa, batches, 20, after_step=after)
    return model, twa, paths


@pytest.mark.parametrize("form", ["paths", "dicts"])
def test_from_checkpoints_equals_collecting(h, tmp_path, form):
    model, twa, paths = write_checkpoints(h, tmp_path, bn=True)
    twa.start_subspace("mean")
    if form == "paths":
        checkpoints = [str(p) if i % 2 else p for i, p in enumerate(paths)]  # str and Path
    else:  # a training-script checkpoint: {"state_dict": DDP keys, ...}, and {"model": ...}
        sds = [torch.load(p, weights_only=True) for p in paths]
        checkpoints = [{"epoch": i, "state_dict": {"module." + k: v for k, v in sd.items()}} if i % 2 else
                       {"model": sd, "optimizer": {}} for i, sd in enumerate(sds)]
    fresh = h.tiny_model(seed=9, bn=True)
    buffers = [b.clone() for b in fresh.buffers()]
    twa2 = TWA.from_checkpoints(fresh, sgd(fresh), checkpoints, capacity=6)
    assert (twa2.num_basis, twa2.num_samples, twa2.in_subspace, twa2.capacity) == (5, 5, True, 6)
    assert rel(flat_model(fresh), flat_model(model)) < 1e-5
    for a, b in zip(twa2.basis, twa.basis):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers(), buffers))  # BN statistics: update_bn's job
    batches = h.batches(4, seed=5)
    h.train(model, twa, batches, 20)
    h.train(fresh, twa2, batches, 20)
    assert rel(flat_model(fresh), flat_model(model)) < 1e-5


def test_from_checkpoints_current_init_and_bfloat16(h, tmp_path):
    model, twa, paths = write_checkpoints(h, tmp_path)
    last = flat_model(model)
    fresh = h.tiny_model(seed=9)
    fresh.load_state_dict(torch.load(paths[-1], weights_only=True))
    twa2 = TWA.from_checkpoints(fresh, sgd(fresh), paths, init="current")
    assert twa2.capacity == 5 and rel(flat_model(fresh), last) < 1e-6
    # bfloat16: the same float32 Gram-Schmidt as collect(), checkpoint by checkpoint.
    ref = h.tiny_model()
    ref_twa = TWA(sgd(ref), capacity=5, storage_dtype=torch.bfloat16)
    for p in paths:
        ref.load_state_dict(torch.load(p, weights_only=True))
        assert ref_twa.collect()
    ref_twa.start_subspace("mean")
    fresh = h.tiny_model(seed=9)
    twa3 = TWA.from_checkpoints(fresh, sgd(fresh), paths, storage_dtype=torch.bfloat16)
    for a, b in zip(twa3.basis, ref_twa.basis):
        h.assert_bits_equal(a, b, "bf16 basis")
    assert rel(flat_model(fresh), flat_model(ref)) < 1e-6


def test_from_checkpoints_drops_repeated_checkpoints(h, tmp_path):
    model, twa, paths = write_checkpoints(h, tmp_path)
    fresh = h.tiny_model(seed=9)
    with pytest.warns(RankDeficientSampleWarning, match="1 of 6 checkpoints"):
        twa2 = TWA.from_checkpoints(fresh, sgd(fresh), paths + [paths[2]])
    assert (twa2.num_basis, twa2.num_samples, twa2.capacity) == (5, 6, 6)
    samples = torch.stack([flat(torch.load(p, weights_only=True).values()) for p in paths + [paths[2]]])
    assert rel(flat_model(fresh), samples.mean(0)) < 1e-6


def test_from_checkpoints_bad_input_changes_nothing(h, tmp_path):
    _, _, paths = write_checkpoints(h, tmp_path)
    sd = torch.load(paths[0], weights_only=True)
    model = h.tiny_model(seed=9)
    base = sgd(model)
    h.train(model, base, h.batches(2), 2)  # some momentum state
    weights, state = h.params_of(model), copy.deepcopy(base.state_dict())
    short = {k: v for k, v in sd.items() if k != "2.bias"}
    wrong = dict(sd, **{"0.weight": torch.zeros(8, 5)})
    ints = dict(sd, **{"2.bias": torch.zeros(3, dtype=torch.long)})
    torch.save(short, tmp_path / "short.pt")
    cases = [
        (paths + [tmp_path / "short.pt"], {}, ValueError, r"checkpoints\[5\] \(.*short.pt\) has no parameter\(s\) "
                                                          r"\['2.bias'\]"),
        ([sd, wrong], {}, ValueError,
         r"checkpoints\[1\]: '0.weight' has shape \[8, 5\], the model's parameter \[8, 6\]"),
        ([sd, ints], {}, TypeError, "'2.bias' is torch.int64"),
        ([sd, [1, 2]], {}, TypeError, r"checkpoints\[1\] is a list"),
        ([sd, {"model": "nope"}], {}, ValueError, r"checkpoints\[1\] has no parameter"),
        ([], {}, ValueError, "empty"),
        (sd, {}, TypeError, "a list of state dicts or paths"),
        (str(paths[0]), {}, TypeError, "a list of state dicts or paths"),
        ([sd, sd, sd], {"capacity": 2}, ValueError, "capacity 2 < 3"),
        ([sd], {"init": "last"}, ValueError, "init must be"),
        ([sd], {"reg": 1.0}, ValueError, "reg must be in"),
        ([tmp_path / "missing.pt"], {}, FileNotFoundError, "missing.pt"),
    ]
    for ckpts, kw, err, match in cases:
        with pytest.raises(err, match=match):
            TWA.from_checkpoints(model, base, ckpts, **kw)
        assert all(torch.equal(a, b) for a, b in zip(h.params_of(model), weights))
        assert len(base.state) == len(state["state"])
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"optimizer parameter\(s\) \[4\] are not parameters of model"):
        TWA.from_checkpoints(model, torch.optim.SGD(list(model.parameters()) + [stranger], lr=0.1), [sd])
    assert all(torch.equal(a, b) for a, b in zip(h.params_of(model), weights))


# --------------------------------------------------------------------------- Optimizer protocol


def test_is_an_optimizer_sharing_the_base_state(h):
    model = h.tiny_model()
    base = sgd(model)
    twa = TWA(base, capacity=2)
    assert isinstance(twa, torch.optim.Optimizer)
    assert twa.param_groups is base.param_groups and twa.state is base.state and twa.defaults is base.defaults
    assert "TWA(capacity=2" in repr(twa) and "SGD" in repr(twa)
    assert "TWA" in wavg_ext.__all__ and "RankDeficientSampleWarning" in wavg_ext.optim.__all__
    assert issubclass(RankDeficientSampleWarning, UserWarning)
    h.train(model, twa, h.batches(2), 2)
    assert len(base.state) == 4 and twa.coefficients().numel() == 0
    twa.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_grad_scaler_and_lr_scheduler(h):
    batches = h.batches(4)
    bad = [(torch.full_like(batches[0][0], float("inf")), batches[0][1])]  # inf gradients

    def run(use_scaler):
        model = h.tiny_model()
        twa = TWA(sgd(model), capacity=4, reg=1e-3)
        collect_phase(h, model, twa, batches, steps=8, every=4)
        twa.start_subspace("mean")
        sched = torch.optim.lr_scheduler.StepLR(twa, step_size=3, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_scaler else None
        h.train(model, twa, batches, 20, first=8, scaler=scaler, after_step=lambda i: sched.step())
        if use_scaler:
            before = h.params_of(model)
            h.train(model, twa, bad, 1, scaler=scaler)  # skipped: no step, no decay
            assert all(torch.equal(a, b) for a, b in zip(h.params_of(model), before))
        assert twa.optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 4)
        return model, twa

    (plain, twa), (scaled, _) = run(False), run(True)
    for a, b in zip(scaled.parameters(), plain.parameters()):
        h.assert_bits_equal(a, b, "scaled by a power of two and unscaled: same steps")
    assert span_residual(twa, plain) <= 1e-5


def test_closure_is_projected(h):
    batches = h.batches(3)

    def run(closure):
        model = h.tiny_model()
        twa = TWA(sgd(model), capacity=3, reg=0.0)  # reg=0: the decay's order does not matter
        collect_phase(h, model, twa, batches, steps=6, every=3)
        twa.start_subspace("mean")
        for i in range(10):
            x, y = batches[i % 3]

            def loss_fn():
                twa.zero_grad()
                loss = (model(x) - y).pow(2).mean()
                loss.backward()
                return loss

            if closure:
                assert isinstance(twa.step(loss_fn), torch.Tensor)
            else:
                loss_fn()
                twa.step()
        return h.params_of(model)

    for a, b in zip(run(True), run(False)):
        h.assert_bits_equal(a, b, "closure vs no closure")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,err,match", [
    ({"capacity": 0}, ValueError, "capacity must be >= 1"),
    ({"capacity": 2.0}, TypeError, "capacity must be an int"),
    ({"capacity": True}, TypeError, "capacity must be an int"),
    ({"capacity": 2, "reg": 1.0}, ValueError, r"reg must be in \[0, 1\)"),
    ({"capacity": 2, "reg": -1e-3}, ValueError, r"reg must be in \[0, 1\)"),
    ({"capacity": 2, "reg": float("nan")}, ValueError, "reg must be finite"),
    ({"capacity": 2, "storage_dtype": torch.float16}, TypeError, "storage_dtype must be"),
    ({"capacity": 2, "storage_dtype": "bfloat16"}, TypeError, "storage_dtype must be"),
    ({"capacity": 2, "storage_dtype": torch.float64}, TypeError, "need a float64 basis"),
    ({"capacity": 2, "rtol": 1.0}, ValueError, r"rtol must be in \[0, 1\)"),
])
def test_bad_arguments(h, kwargs, err, match):
    model = h.tiny_model()
    base = sgd(model)
    weights = h.params_of(model)
    with pytest.raises(err, match=match):
        TWA(base, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(h.params_of(model), weights)) and len(base.state) == 0


def test_bad_parameters(h):
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        TWA(h.tiny_model().parameters(), capacity=2)
    with pytest.raises(TypeError, match="parameter 1 has dtype torch.int64"):
        TWA(torch.optim.SGD([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.long)], lr=0.1), 2)
    with pytest.raises(ValueError, match="parameter 1 is on meta.*one device"):
        TWA(torch.optim.SGD([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta")], lr=0.1), 2)
    model64 = h.tiny_model(dtype=torch.float64)
    twa = TWA(sgd(model64), capacity=2)  # float64 parameters: a float64 basis by default
    assert all(b.dtype == torch.float64 for b in twa.basis) and twa.rtol == 1e-12
    with pytest.raises(TypeError, match="need a float64 basis"):
        TWA(sgd(model64), capacity=2, storage_dtype=torch.float32)


def test_misuse_raises_and_changes_nothing(h):
    model = h.tiny_model()
    twa = TWA(sgd(model), capacity=2)

    def unchanged(call, err, match):
        weights, basis = h.params_of(model), [b.clone() for b in twa.basis]
        counters = (twa.num_basis, twa.num_samples, twa.in_subspace)
        with pytest.raises(err, match=match):
            call()
        assert all(torch.equal(a, b) for a, b in zip(h.params_of(model), weights))
        assert all(torch.equal(a, b) for a, b in zip(twa.basis, basis))
        assert (twa.num_basis, twa.num_samples, twa.in_subspace) == counters

    unchanged(lambda: twa.start_subspace("mean"), RuntimeError, "the basis is empty")
    assert twa.collect()
    unchanged(lambda: twa.start_subspace("best"), ValueError, "init must be 'mean' or 'current'")
    unchanged(lambda: twa.start_subspace("mean", reset_optimizer_state=1), TypeError, "must be a bool")
    h.train(model, twa, h.batches(2), 3)
    assert twa.collect()
    unchanged(twa.collect, RuntimeError, r"the basis is full \(2 samples\)")
    unchanged(lambda: twa.add_param_group({"params": [torch.zeros(2, requires_grad=True)]}), RuntimeError,
              "add_param_group after collect")
    twa.start_subspace("current", reset_optimizer_state=False)
    assert len(twa.optimizer.state) == 4  # kept when asked
    unchanged(twa.collect, RuntimeError, "collect\\(\\) after start_subspace")
    unchanged(lambda: twa.start_subspace("mean"), RuntimeError, "already called")
    twa.optimizer.param_groups[0]["params"].append(torch.zeros(2, requires_grad=True))
    unchanged(twa.step, RuntimeError, "added or removed behind the wrapper")


def test_add_param_group_before_collecting(h):
    model = h.tiny_model()
    twa = TWA(torch.optim.SGD(list(model.parameters())[:2], lr=0.1), capacity=2)
    twa.add_param_group({"params": list(model.parameters())[2:], "lr": 0.01})
    assert len(twa.basis) == 4 and twa.basis[3].shape == (2, 3)
    with pytest.raises(TypeError, match="only floating tensors"):
        twa.add_param_group({"params": [torch.zeros(2, dtype=torch.long)]})
    assert len(twa.param_groups) == 2 and len(twa.basis) == 4


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_never_syncs(h, cuda, storage):
    batches = h.batches(4, device=cuda)
    model = h.tiny_model(device=cuda)
    twa = TWA(sgd(model, foreach=True), capacity=4, reg=1e-3, storage_dtype=storage)
    collect_phase(h, model, twa, batches, steps=12, every=4)
    twa.start_subspace("mean")
    h.train(model, twa, batches, 14, first=12)  # warm-up (lazy state creation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h.train(model, twa, batches, 40, first=14)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = h.tiny_model()
    cpu_twa = TWA(sgd(cpu), capacity=4, reg=1e-3, storage_dtype=storage)
    collect_phase(h, cpu, cpu_twa, h.batches(4), steps=12, every=4)
    cpu_twa.start_subspace("mean")
    h.train(cpu, cpu_twa, h.batches(4), 40, first=12)
    assert rel(flat_model(model), flat_model(cpu)) < 1e-4
    assert span_residual(twa, model) <= 1e-5


@pytest.mark.cuda
def test_cuda_from_checkpoints_loads_onto_the_device(h, cuda, tmp_path):
    _, _, paths = write_checkpoints(h, tmp_path)  # saved from a CPU model
    model = h.tiny_model(seed=9, device=cuda)
    twa = TWA.from_checkpoints(model, sgd(model), paths)
    assert twa.num_basis == 5 and all(b.device.type == "cuda" for b in twa.basis)
    samples = torch.stack([flat(torch.load(p, weights_only=True).values()) for p in paths])
    assert rel(flat_model(model), samples.mean(0)) < 1e-5
