"""LAWA (latest weight averaging): the mean of the last k samples taken every c steps, against a
float64 re-implementation written here from the definition (Kaddour 2022: the average of the
k latest checkpoints); the ring in other storage; re-sums; dtype changes of the model;
reset; checkpoints that resume bit for bit; bad input refused before anything changes.
Public API only."""

import copy

import pytest
import torch
from torch import nn

import wavg_ext


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _train(model, opt, steps, seed=1, on_step=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for step in range(1, steps + 1):
        x = torch.randn(16, 6, generator=g).to(dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)


class WindowMean:
    """The float64 reference: every sampled position's weights, the mean of the last k.
    Position p is the weights after p steps; position 0 (start=0) the initial weights."""

    def __init__(self, model, window, every, start, initial=True):
        self.model, self.window, self.every, self.start = model, window, every, start
        self.samples = []
        if initial and start == 0:
            self(0)

    def __call__(self, step):
        if step >= self.start and (step - self.start) % self.every == 0:
            self.samples.append([p.detach().double().clone() for p in self.model.parameters()])

    def mean(self):
        last = self.samples[-self.window:]
        return [sum(s[i] for s in last) / len(last) for i in range(len(last[0]))]


@pytest.mark.parametrize("window, every, start", [(1, 1, 0), (3, 2, 1), (5, 1, 4), (4, 3, 0)])
def test_the_mean_of_the_last_k_samples_at_every_step(window, every, start):
    model = _model()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=window, every=every, start=start)
    ref = WindowMean(model, window, every, start)

    def check(step):
        ref(step)
        assert opt.num_averaged == min(len(ref.samples), window)
        if ref.samples:
            for a, r in zip(opt.averaged_parameters(), ref.mean()):
                torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-7)

    _train(model, opt, 4 * window * every + 3, on_step=check)
    assert len(ref.samples) > window  # the window slid


@pytest.mark.parametrize("resum_every", [1, 2, 7])
def test_re_sums_change_nothing_but_rounding(resum_every):
    models = [_model(), _model()]
    opts = [wavg_ext.LAWA(torch.optim.SGD(m.parameters(), lr=0.1), window=3, resum_every=r)
            for m, r in zip(models, (resum_every, 10**6))]
    for m, o in zip(models, opts):
        _train(m, o, 20)
    for a, b in zip(opts[0].averaged_parameters(), opts[1].averaged_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_bfloat16_weights_keep_bfloat16_samples_and_float32_means():
    model = _model(torch.bfloat16)
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=4, every=1)
    ref = WindowMean(model, 4, 1, 0)
    _train(model, opt, 9, on_step=ref)
    sd = opt.state_dict()["averaging"]["window"]
    assert all(t.dtype == torch.bfloat16 for slots in sd["ring"] for t in slots)
    assert all(t.dtype == torch.float64 for t in sd["sums"])
    for a, r in zip(opt.averaged_parameters(), ref.mean()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r, rtol=0, atol=1e-6)  # (the samples are exact bf16)


def test_storage_device_cpu_holds_the_ring_there():
    model = _model()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=2, storage_device="cpu")
    ref = WindowMean(model, 2, 1, 0)
    _train(model, opt, 5, on_step=ref)
    assert all(t.device.type == "cpu" for slots in opt.state_dict()["averaging"]["window"]["ring"] for t in slots)
    for a, r in zip(opt.averaged_parameters(), ref.mean()):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-7)


def test_the_model_changing_dtype_keeps_the_window_right():
    """model.double() mid-run: samples, sums and means follow, and the window's mean stays
    the mean of the samples (the older ones as float32 weights were)."""
    model = _model()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=3)
    ref = WindowMean(model, 3, 1, 0)
    _train(model, opt, 4, on_step=ref)
    model.double()
    _train(model, opt, 2, seed=5, on_step=lambda s: ref(s + 4))
    for a, r in zip(opt.averaged_parameters(), ref.mean()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, r, rtol=0, atol=1e-7)


def test_reset_empties_the_window():
    model = _model()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=3)
    _train(model, opt, 5)
    opt.reset()
    assert opt.num_averaged == 0
    ref = WindowMean(model, 3, 1, 0, initial=False)  # (the next sample is the next position)
    _train(model, opt, 2, seed=9, on_step=ref)
    assert opt.num_averaged == 2
    for a, r in zip(opt.averaged_parameters(), ref.mean()):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-7)


def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def test_checkpoint_resumes_bit_for_bit():
    model = _model()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), window=3, every=2, resum_every=5)
    _train(model, opt, 7)
    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = wavg_ext.LAWA(torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9), window=3, every=2, resum_every=5)
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (model2, opt2)):
        _train(m, o, 9, seed=3)
    assert opt.num_averaged == opt2.num_averaged == 3
    for a, b in zip(opt.averaged_parameters(), opt2.averaged_parameters()):
        assert torch.equal(_bits(a), _bits(b))
    w1, w2 = opt.state_dict()["averaging"]["window"], opt2.state_dict()["averaging"]["window"]
    assert w1["pushed"] == w2["pushed"]
    for a, b in zip(w1["sums"], w2["sums"]):
        assert torch.equal(_bits(a), _bits(b))


def _state(opt):
    sd = opt.state_dict()["averaging"]
    return [t.clone() for t in sd["averages"] + sd["window"]["sums"] + sum(sd["window"]["ring"], [])], \
        (opt.num_averaged, opt.step_count, sd["window"]["pushed"])


@pytest.mark.parametrize("damage", ["pushed", "num", "sums_len", "ring_len", "shape", "dtype", "nan", "missing"])
def test_a_bad_checkpoint_is_refused_and_changes_nothing(damage):
    model = _model()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=3)
    _train(model, opt, 4)
    good = copy.deepcopy(opt.state_dict())
    _train(model, opt, 2, seed=4)
    before_tensors, before_counts = _state(opt)
    bad = copy.deepcopy(good)
    w = bad["averaging"]["window"]
    if damage == "pushed":
        w["pushed"] = -1
    elif damage == "num":
        bad["averaging"]["num_averaged"] = 2
    elif damage == "sums_len":
        w["sums"] = w["sums"][:-1]
    elif damage == "ring_len":
        w["ring"] = w["ring"][:2]
    elif damage == "shape":
        w["ring"][1][0] = torch.zeros(3)
    elif damage == "dtype":
        w["sums"][0] = w["sums"][0].float()
    elif damage == "nan":
        w["ring"][2][1][0] = float("nan")
    else:
        del bad["averaging"]["window"]
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    after_tensors, after_counts = _state(opt)
    assert after_counts == before_counts
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(before_tensors, after_tensors))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(window=0), ValueError, "window must be"),
    (dict(window=2.5), TypeError, "window must be an int"),
    (dict(window=True), TypeError, "window must be an int"),
    (dict(window=2, every=0), ValueError, "every must be"),
    (dict(window=2, resum_every=0), ValueError, "resum_every must be"),
    (dict(window=2, storage_device="nowhere"), ValueError, "storage_device"),
    (dict(window=2, storage_device=3.0), TypeError, "storage_device must be a torch.device"),
    (dict(window=2, storage_device="meta"), ValueError, "cannot be 'meta'"),
])
def test_bad_arguments_are_refused(kwargs, error, message):
    model = _model()
    with pytest.raises(error, match=message):
        wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and wavg_ext.build_info()["cuda"]),
                    reason="needs a CUDA device and wavg_ext built with CUDA kernels")
def test_cuda_weights_with_the_ring_in_pinned_cpu_memory():
    """storage_device="cpu" for CUDA weights: the leaving samples come to the GPU and the new
    ones go back asynchronously; the sum and the means stay on the GPU."""
    model = _model().cuda()
    opt = wavg_ext.LAWA(torch.optim.SGD(model.parameters(), lr=0.1), window=3, storage_device="cpu",
                        resum_every=4)
    ref = WindowMean(model, 3, 1, 0)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 10):
        loss = model(torch.randn(16, 6, generator=g).cuda()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref(step)
    torch.cuda.synchronize()
    window = opt.state_dict()["averaging"]["window"]
    assert all(t.device.type == "cpu" and t.is_pinned() for slots in window["ring"] for t in slots)
    assert all(t.device.type == "cuda" for t in window["sums"])
    for a, r in zip(opt.averaged_parameters(), ref.mean()):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-7)
