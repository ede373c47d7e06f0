"""The averaging wrappers' API: swap/averaged/copy_to/reset, buffers, checkpoints and resume,
schedulers, GradScaler, closures, torch.compile, one fused op call per sample, bad input."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch.optim.swa_utils import SWALR

import wavg_ext
from wavg_ext import EMA, PSWA, PSWM, PWALKS, SWA, PeriodicSWA, WeightAveraging, cyclic_lr

METHODS = {
    "SWA": lambda o, **kw: SWA(o, start=3, every=2, **kw),
    "EMA": lambda o, **kw: EMA(o, decay=0.9, **kw),
    "PSWA": lambda o, **kw: PSWA(o, 10, sample_fraction=0.4, **kw),
    "PWALKS": lambda o, **kw: PWALKS(o, 10, last_fraction=0.5, **kw),
    "PSWM": lambda o, **kw: PSWM(o, 10, momentum=0.6, **kw),
    "PeriodicSWA": lambda o, **kw: PeriodicSWA(o, period=12, start=4, every=3, **kw),
}


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, **kw)


def all_equal(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


# --------------------------------------------------------------------------- Optimizer protocol


def test_is_an_optimizer_sharing_the_base_state(h):
    model = h.tiny_model()
    base = sgd(model)
    opt = SWA(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    h.train(model, opt, h.batches(3), 3)
    assert len(base.state) == 4  # momentum buffers created by the base step
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "SWA(" in repr(opt) and "SGD" in repr(opt)


def test_closure_is_passed_and_loss_returned(h):
    model = h.tiny_model()
    x, y = h.batches(1)[0]
    opt = EMA(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3), decay=0.5)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.num_averaged == 2  # position 0 and 1


def test_one_fused_op_call_per_sample(h, monkeypatch):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])  # 40 parameters
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.01), every=1)
    calls = []
    for name in ("running_mean_", "scale_copy_", "ema_"):
        real = getattr(wavg_ext.ops, name)
        monkeypatch.setattr(wavg_ext.ops, name, lambda *a, _real=real, _n=name: (calls.append(_n), _real(*a)))
    real_plan_call = wavg_ext.ops.Plan.__call__  # the wrappers' planned calls (ops.Plan)
    monkeypatch.setattr(wavg_ext.ops.Plan, "__call__", lambda self, s: (calls.append(self.op), real_plan_call(self, s)))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    # position 0 (copy), then one running_mean_ per step: one call for all 40 tensors each time
    assert calls == ["scale_copy_", "running_mean_", "running_mean_", "running_mean_"]


def test_lr_schedulers_drive_the_base_optimizer(h):
    model = h.tiny_model()
    opt = SWA(sgd(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        h.train(model, opt, h.batches(2), 5, after_step=lambda i: sched.step())
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    swalr = SWALR(opt, swa_lr=0.01, anneal_epochs=2)
    swalr.step()
    swalr.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_cyclic_lr_is_the_swa_paper_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = SWA(torch.optim.SGD([p], lr=0.1), start=6, every=4)
    sched = cyclic_lr(opt, min_lr=0.001, cycle=4, start=2)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        sched.step()
    a1, a2, c = 0.1, 0.001, 4
    expected = [a1, a1] + [(1 - t) * a1 + t * a2 for i in range(1, 13) for t in [((i - 1) % c + 1) / c]]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[5] == pytest.approx(a2) and seen[9] == pytest.approx(a2)  # SWA samples at min LR
    with pytest.raises(ValueError, match="min_lr"):
        cyclic_lr(torch.optim.SGD([p], lr=0.1), min_lr=0.5, cycle=4)
    with pytest.raises(ValueError, match="cycle"):
        cyclic_lr(torch.optim.SGD([p], lr=0.1), min_lr=0.01, cycle=0)


def test_grad_scaler_skipped_steps_are_not_samples(h):
    model = h.tiny_model()
    opt = SWA(sgd(model), every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = h.batches(4)
    bad = [(torch.full_like(batches[0][0], float("inf")), batches[0][1])]  # inf gradients
    h.train(model, opt, batches, 3, scaler=scaler)
    before = h.params_of(model)
    avg_before = [a.clone() for a in opt.averaged_parameters()]
    h.train(model, opt, bad, 1, scaler=scaler)  # skipped by the scaler
    assert opt.step_count == 3 and opt.num_averaged == 4
    assert all_equal(h.params_of(model), before) and all_equal(opt.averaged_parameters(), avg_before)
    h.train(model, opt, batches, 2, scaler=scaler)
    assert opt.step_count == 5 and opt.num_averaged == 6


@pytest.mark.slow
def test_torch_compiled_model(h):
    batches = h.batches(5)
    eager, compiled = h.tiny_model(bn=True), h.tiny_model(bn=True)
    o1 = PSWA(sgd(eager), 6, sample_fraction=0.5)
    o2 = PSWA(sgd(compiled), 6, sample_fraction=0.5)
    h.train(eager, o1, batches, 20)
    h.train(torch.compile(compiled), o2, batches, 20)
    assert o1.num_averaged == o2.num_averaged == 1
    for a, b in zip(o1.averaged_parameters() + list(eager.parameters()),
                    o2.averaged_parameters() + list(compiled.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["SWA", "PSWA"])
def test_torch_compiled_optimizer_step(h, method):
    """torch.compile(opt.step): the base step is compiled, the averaging engine stays eager
    (its counters would otherwise be guards, recompiling every step) and nothing is skipped."""
    import torch._dynamo

    torch._dynamo.reset()
    batches = h.batches(5)
    eager, compiled = h.tiny_model(), h.tiny_model()
    o1 = METHODS[method](sgd(eager))
    o2 = METHODS[method](sgd(compiled))
    step = torch.compile(o2.step)
    counts1, counts2 = [], []
    for i in range(23):
        for model, opt, run, counts in ((eager, o1, o1.step, counts1), (compiled, o2, step, counts2)):
            x, y = batches[i % 5]
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            run()
            counts.append(opt.num_averaged)
    assert counts1 == counts2 and max(counts2) > 0
    for a, b in zip(o1.averaged_parameters() + list(eager.parameters()),
                    o2.averaged_parameters() + list(compiled.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- swap / averaged / copy_to / reset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_round_trip_loses_nothing(h, dtype):
    model = h.tiny_model(dtype=dtype)
    opt = SWA(sgd(model), every=1)
    h.train(model, opt, h.batches(3, dtype=dtype), 6)
    weights = h.params_of(model)
    avgs = [a.clone() for a in opt.averaged_parameters()]
    opt.swap()
    assert opt.swapped
    for p, a in zip(model.parameters(), avgs):
        assert torch.equal(p, a.to(dtype))
    with pytest.raises(RuntimeError, match="swap"):
        opt.step()
    with pytest.raises(RuntimeError, match="swap"):
        opt.state_dict()
    opt.swap()
    assert not opt.swapped
    assert all_equal(h.params_of(model), weights) and all_equal(opt.averaged_parameters(), avgs)
    with opt.averaged():
        assert torch.equal(next(model.parameters()), avgs[0].to(dtype))
    assert all_equal(h.params_of(model), weights)


def test_averaged_restores_buffers_changed_inside(h):
    model = h.tiny_model(bn=True)
    opt = SWA(sgd(model), module=model)
    h.train(model, opt, h.batches(3), 4)
    stats = [b.clone() for b in model.buffers()]
    with opt.averaged():
        wavg_ext.update_bn([torch.randn(8, 6)], model)
        assert not torch.equal(model[1].running_mean, stats[0])
    assert all_equal([b.clone() for b in model.buffers()], stats)
    with pytest.raises(KeyError):
        with opt.averaged():
            raise KeyError("inside")
    assert not opt.swapped and all_equal(list(model.buffers()), stats)


def test_swap_and_friends_before_any_sample(h):
    model = h.tiny_model()
    opt = SWA(sgd(model), start=100)
    h.train(model, opt, h.batches(2), 3)
    weights = h.params_of(model)
    for call in (opt.swap, opt.averaged_parameters, lambda: opt.copy_to(model), opt.averaged().__enter__):
        with pytest.raises(RuntimeError, match="no weights have been averaged"):
            call()
    assert all_equal(h.params_of(model), weights) and not opt.swapped


def test_copy_to_module_list_and_by_name(h):
    model, other = h.tiny_model(seed=0), h.tiny_model(seed=5)
    opt = EMA(sgd(model), decay=0.5)
    h.train(model, opt, h.batches(3), 4)
    avgs = opt.averaged_parameters()
    opt.copy_to(other)
    assert all_equal([p.detach() for p in other.parameters()], avgs)
    tensors = [torch.zeros_like(a, dtype=torch.float64) for a in avgs]
    opt.copy_to(tensors)
    assert all(torch.equal(t, a.double()) for t, a in zip(tensors, avgs))
    wrong = h.params_of(h.tiny_model(seed=7))
    bad = wrong[:-1] + [torch.zeros(5)]
    with pytest.raises(ValueError, match=r"target\[3\] has shape \[5\]"):
        opt.copy_to(bad)
    assert all_equal(bad[:-1], wrong[:-1])  # nothing written
    with pytest.raises(ValueError, match="target has 3 parameters"):
        opt.copy_to(wrong[:3])
    with pytest.raises(TypeError, match="single Tensor"):
        opt.copy_to(wrong[0])
    # With module=, another module is matched by name (order does not matter).
    named = EMA(sgd(model), decay=0.5, module=model)
    h.train(model, named, h.batches(3), 2)
    shuffled = torch.nn.Module()
    shuffled.add_module("2", torch.nn.Linear(8, 3))
    shuffled.add_module("0", torch.nn.Linear(6, 8))
    named.copy_to(shuffled)
    assert torch.equal(shuffled.get_submodule("0").weight, named.averaged_parameters()[0])
    with pytest.raises(ValueError, match="no parameter"):
        named.copy_to(torch.nn.Linear(6, 8))


def test_reset_starts_a_new_average(h):
    model = h.tiny_model()
    opt = SWA(sgd(model), every=1)
    h.train(model, opt, h.batches(2), 5)
    opt.reset()
    assert opt.num_averaged == 0
    h.train(model, opt, h.batches(2), 1)
    assert opt.num_averaged == 1
    assert all_equal(opt.averaged_parameters(), h.params_of(model))


# --------------------------------------------------------------------------- period ends, buffers


def test_on_assign_runs_after_each_assignment(h):
    model = h.tiny_model()
    seen = []

    def on_assign():  # the model already holds the period's average
        seen.append((opt.step_count, all_equal(h.params_of(model), opt.averaged_parameters())))

    opt = PSWA(sgd(model), 7, on_assign=on_assign)
    h.train(model, opt, h.batches(3), 21)
    assert seen == [(7, True), (14, True), (21, True)]
    assert opt.period_index == 3 and opt.num_averaged == 0


def test_reset_optimizer_state_restarts_momentum(h):
    model = h.tiny_model()
    opt = PeriodicSWA(sgd(model), period=5, reset_optimizer_state=True, on_assign=lambda: sizes.append(len(opt.state)))
    sizes = []
    h.train(model, opt, h.batches(3), 10)
    assert sizes == [0, 0]  # cleared at each period end, before on_assign
    h.train(model, opt, h.batches(3), 11, first=10)
    assert len(opt.state) == 4


def test_buffers_floating_averaged_integer_copied_untruncated(h):
    model = h.tiny_model(bn=True)
    # start=1: buffers are read when step() runs, i.e. after that step's forward pass
    opt = SWA(sgd(model), start=1, every=1, module=model, average_buffers=True)
    bn = model[1]
    means, counts = [], []

    def record(i):
        means.append(bn.running_mean.clone())
        counts.append(int(bn.num_batches_tracked))

    h.train(model, opt, h.batches(3), 4, after_step=record)
    bufs = opt.averaged_buffers()
    torch.testing.assert_close(bufs["1.running_mean"], torch.stack(means).mean(0), rtol=0, atol=1e-6)
    assert bufs["1.num_batches_tracked"].dtype == torch.int64 and int(bufs["1.num_batches_tracked"]) == counts[-1]
    bn.num_batches_tracked.fill_(2**40 + 3)
    h.train(model, opt, h.batches(3), 1, scaler=None)
    assert int(opt.averaged_buffers()["1.num_batches_tracked"]) == 2**40 + 4
    opt.swap()
    assert torch.equal(bn.running_mean, bufs["1.running_mean"])
    opt.swap()


def test_period_end_assigns_buffers_too(h):
    model = h.tiny_model(bn=True)
    seen = []

    def on_assign():
        bufs = opt.averaged_buffers()
        seen.append(torch.equal(model[1].running_mean, bufs["1.running_mean"])
                    and torch.equal(model[1].running_var, bufs["1.running_var"]))

    opt = PSWM(sgd(model), 5, momentum=0.5, module=model, average_buffers=True, on_assign=on_assign)
    h.train(model, opt, h.batches(3), 10)
    assert seen == [True, True]
    assert opt.num_averaged == 0 and opt.period_index == 2


def test_add_param_group(h):
    model, extra = h.tiny_model(), torch.nn.Parameter(torch.randn(3))
    groups = list(model.parameters())
    opt = SWA(torch.optim.SGD(groups[:2], lr=0.1))
    opt.add_param_group({"params": groups[2:] + [extra]})
    x, y = h.batches(1)[0]
    (model(x) - y).pow(2).mean().backward()
    extra.grad = torch.ones(3)
    opt.step()
    assert len(opt.averaged_parameters()) == 5
    with pytest.raises(RuntimeError, match="reset"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    opt.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(RuntimeError, match="added or removed behind the wrapper"):
        opt.step()


# --------------------------------------------------------------------------- checkpoints


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("split", [7, 16])
def test_resume_mid_period_is_bit_identical(h, method, split):
    batches = h.batches(5)
    total = 37
    model = h.tiny_model(bn=True)
    opt = METHODS[method](sgd(model, weight_decay=1e-3), module=model, average_buffers=True)
    h.train(model, opt, batches, total)

    first = h.tiny_model(bn=True)
    opt1 = METHODS[method](sgd(first, weight_decay=1e-3), module=first, average_buffers=True)
    h.train(first, opt1, batches, split)
    saved = roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})
    del first, opt1

    resumed = h.tiny_model(seed=99, bn=True)  # a fresh model and optimizer
    resumed.load_state_dict(saved["model"])
    opt2 = METHODS[method](sgd(resumed, weight_decay=1e-3), module=resumed, average_buffers=True)
    opt2.load_state_dict(saved["opt"])
    h.train(resumed, opt2, batches, total, first=split)

    assert (opt2.step_count, opt2.num_averaged, opt2.period_index) == (opt.step_count, opt.num_averaged,
                                                                      opt.period_index)
    assert all_equal(list(resumed.state_dict().values()), list(model.state_dict().values()))
    if opt.num_averaged:
        assert all_equal(opt2.averaged_parameters(), opt.averaged_parameters())
        assert all_equal(list(opt2.averaged_buffers().values()), list(opt.averaged_buffers().values()))


def test_load_state_dict_rejects_mismatches_and_changes_nothing(h):
    model = h.tiny_model()
    opt = PSWA(sgd(model), 10)
    h.train(model, opt, h.batches(3), 4)
    good = roundtrip(opt.state_dict())
    target = PSWA(sgd(h.tiny_model()), 10)
    other_cfg = PSWA(sgd(h.tiny_model()), 10, sample_fraction=0.5)
    with pytest.raises(ValueError, match="sample_fraction"):
        other_cfg.load_state_dict(good)
    with pytest.raises(ValueError, match="from PSWA"):
        SWA(sgd(h.tiny_model())).load_state_dict(good)
    bad = roundtrip(opt.state_dict())
    bad["averaging"]["averages"][1] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"averages\[1\]"):
        target.load_state_dict(bad)
    with pytest.raises(ValueError, match="not a wavg_ext"):
        target.load_state_dict({"state": {}})
    assert target.step_count == 0 and target.num_averaged == 0 and len(target.state) == 0
    target.load_state_dict(good)
    assert target.step_count == 4 and target.num_averaged == 4


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, err, match", [
    (lambda o: SWA(o, strat=3), TypeError, "strat"),
    (lambda o: PSWA(o, 10, alpha=0.5), TypeError, "alpha"),
    (lambda o: SWA(object()), TypeError, "torch.optim.Optimizer"),
    (lambda o: SWA(o, start=-1), ValueError, "start must be >= 0"),
    (lambda o: SWA(o, every=0), ValueError, "every must be >= 1"),
    (lambda o: SWA(o, every=2.0), TypeError, "every must be an int"),
    (lambda o: PSWA(o, 0), ValueError, "period must be >= 1"),
    (lambda o: PSWA(o, 10.5), TypeError, "period must be an int"),
    (lambda o: PSWA(o, 10, sample_fraction=0.0), ValueError, r"sample_fraction must be in \(0, 1\]"),
    (lambda o: PSWA(o, 10, sample_fraction=1.5), ValueError, r"sample_fraction must be in \(0, 1\]"),
    (lambda o: PSWA(o, 10, sample_fraction=float("nan")), ValueError, "finite"),
    (lambda o: PWALKS(o, 10, last_fraction=-0.1), ValueError, r"last_fraction must be in \(0, 1\]"),
    (lambda o: PWALKS(o, 10, last_fraction=True), TypeError, "last_fraction must be a real"),
    (lambda o: PSWM(o, 10, momentum=0.0), ValueError, r"momentum must be in \(0, 1\]"),
    (lambda o: PSWM(o, 10, momentum=1.2), ValueError, r"momentum must be in \(0, 1\]"),
    (lambda o: EMA(o, decay=1.0), ValueError, r"decay must be in \[0, 1\)"),
    (lambda o: PeriodicSWA(o, period=4, periods=0), ValueError, "periods must be >= 1"),
    (lambda o: WeightAveraging(o, rule="median"), ValueError, "rule"),
    (lambda o: WeightAveraging(o, rule="momentum"), ValueError, "momentum"),
    (lambda o: WeightAveraging(o, assign=True), ValueError, "need"),
    (lambda o: WeightAveraging(o, period=5, every=6), ValueError, "no step of a period"),
    (lambda o: WeightAveraging(o, period=5, every=2, last_fraction=0.5), ValueError, "one in-period"),
    (lambda o: PSWA(o, 5, on_assign=3), TypeError, "on_assign must be callable"),
    (lambda o: SWA(o, average_buffers=True), ValueError, "needs module"),
    (lambda o: SWA(o, module=3), TypeError, "module must be"),
    (lambda o: SWA(o, average_dtype=torch.int32), TypeError, "average_dtype"),
    (lambda o: SWA(o, average_dtype=torch.float16), TypeError, r"parameter 0 is torch.float32: average_dtype torch.float16"),  # fp16 avg of fp32 x
])
def test_bad_arguments(h, make, err, match):
    model = h.tiny_model()
    base = sgd(model)
    weights = h.params_of(model)
    with pytest.raises(err, match=match):
        make(base)
    assert all_equal(h.params_of(model), weights) and len(base.state) == 0


def test_non_floating_parameter_is_refused(h):
    with pytest.raises(TypeError, match="parameter 1 has dtype torch.int64"):
        SWA(torch.optim.SGD([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.long)], lr=0.1))


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_steps_never_sync_with_the_host(h, cuda, method):
    model = h.tiny_model(bn=True, device=cuda)
    opt = METHODS[method](torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True),
                          module=model, average_buffers=True)
    batches = h.batches(3, device=cuda)
    h.train(model, opt, batches, 2)  # warm-up (lazy state creation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h.train(model, opt, batches, 30, first=2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_model = h.tiny_model(bn=True)
    cpu_opt = METHODS[method](torch.optim.SGD(cpu_model.parameters(), lr=0.05, momentum=0.9),
                              module=cpu_model, average_buffers=True)
    h.train(cpu_model, cpu_opt, h.batches(3), 30)
    assert opt.num_averaged == cpu_opt.num_averaged
    for a, b in zip(model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(opt.averaged_buffers()["1.running_mean"].sum())) if opt.num_averaged else True


@pytest.mark.parametrize("method", ["SWA", "TWA"])
def test_state_dict_without_the_base_optimizer(h, method):
    """state_dict(optimizer=False) leaves out the base optimizer (saved elsewhere, e.g. with
    torch.distributed.checkpoint's get_state_dict); load_state_dict(sd, optimizer=False)
    restores the wrapper's part only; a plain load_state_dict refuses such a dict."""
    def make():
        model = h.tiny_model()
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, base, (wavg_ext.SWA(base, start=1) if method == "SWA" else wavg_ext.TWA(base, capacity=3))
    model, base, opt = make()
    data = h.batches(6)
    h.train(model, opt, data, 4)
    if method == "TWA":
        opt.collect()
    sd = opt.state_dict(optimizer=False)
    assert "optimizer" not in sd and len(sd) == 1
    model2, base2, opt2 = make()
    with pytest.raises(ValueError, match="expected keys 'optimizer'"):
        opt2.load_state_dict(sd)
    opt2.load_state_dict(sd, optimizer=False)
    assert base2.state_dict()["state"] == {}  # the base optimizer was not touched
    mine, theirs = opt.state_dict(optimizer=False), opt2.state_dict(optimizer=False)
    key = next(iter(mine))
    for name, value in mine[key].items():
        other = theirs[key][name]
        if isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, other)), name
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
        else:
            assert value == other, name
