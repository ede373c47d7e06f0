"""wavg_ext.AveragedModel and the get_*_avg_fn functions against torch.optim.swa_utils: same
results (to float rounding), same state_dict layout both ways, no host sync per update,
and bad input refused before anything changes. Public API only."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as T

import wavg_ext
from wavg_ext import ops

F64 = torch.float64


class Net(nn.Module):
    """Parameters of several shapes, a BatchNorm (float and integer buffers), a 0-d parameter."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.to(dtype)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)) * self.scale


def _train_step(model, gen):
    """Moves every parameter and runs the BatchNorm (its buffers change too)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.1)
    model.train()
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=F64).to(model.conv.weight.dtype)
    model(x)


FNS = {  # name: (wavg_ext's kwargs, torch's kwargs)
    "swa-default": ({}, {}),
    "swa-multi": (dict(multi_avg_fn=wavg_ext.get_swa_multi_avg_fn()), dict(multi_avg_fn=T.get_swa_multi_avg_fn())),
    "ema-multi": (dict(multi_avg_fn=wavg_ext.get_ema_multi_avg_fn(0.9)), dict(multi_avg_fn=T.get_ema_multi_avg_fn(0.9))),
    "torch-ema-multi": (dict(multi_avg_fn=T.get_ema_multi_avg_fn(0.9)), dict(multi_avg_fn=T.get_ema_multi_avg_fn(0.9))),
    "torch-swa-multi": (dict(multi_avg_fn=T.get_swa_multi_avg_fn()), dict(multi_avg_fn=T.get_swa_multi_avg_fn())),
    "ema-avg": (dict(avg_fn=wavg_ext.get_ema_avg_fn(0.75)), dict(avg_fn=T.get_ema_avg_fn(0.75))),
    "swa-avg": (dict(avg_fn=wavg_ext.get_swa_avg_fn()), dict(avg_fn=T.get_swa_avg_fn())),
    "torch-ema-avg": (dict(avg_fn=T.get_ema_avg_fn(0.75)), dict(avg_fn=T.get_ema_avg_fn(0.75))),
}


def _run_pair(model, ours_kw, torch_kw, use_buffers=False, steps=5, seed=0):
    """wavg_ext's and torch's AveragedModel of `model`, after `steps` training steps and updates."""
    gen = torch.Generator().manual_seed(seed)
    ours = wavg_ext.AveragedModel(model, use_buffers=use_buffers, **ours_kw)
    theirs = T.AveragedModel(model, use_buffers=use_buffers, **torch_kw)
    for _ in range(steps):
        _train_step(model, gen)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    return ours, theirs


def _both(fn_name, use_buffers, dtype=torch.float32, steps=5, seed=0):
    model = Net(dtype)
    ours_kw, torch_kw = FNS[fn_name]
    if use_buffers and "swa-multi" in fn_name:
        torch_kw = {}  # torch's SWA multi_avg_fn raises on integer buffers; its CPU default is the same average
    ours, theirs = _run_pair(model, ours_kw, torch_kw, use_buffers, steps, seed)
    return model, ours, theirs


def _assert_close_state(ours, theirs, dtype=torch.float32):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[a[k].dtype]
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), (k, a[k], b[k])


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("fn_name", list(FNS))
def test_same_averages_as_torch(fn_name, use_buffers):
    _, ours, theirs = _both(fn_name, use_buffers)
    assert ours.n_averaged.item() == theirs.n_averaged.item() == 5
    _assert_close_state(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn_name", ["swa-default", "ema-multi"])
def test_same_averages_as_torch_other_dtypes(fn_name, dtype):
    _, ours, theirs = _both(fn_name, True, dtype)
    _assert_close_state(ours, theirs, dtype)


@pytest.mark.parametrize("fn_name", ["swa-default", "ema-multi"])
def test_error_at_most_twice_torchs(fn_name):
    """Against a float64 average of the same float32 samples, the fused average's error is
    at most twice torch's (plus one ulp-sized term for a torch that happens to be exact)."""
    gen = torch.Generator().manual_seed(3)
    model = Net()
    ours_kw, torch_kw = FNS[fn_name]
    ours = wavg_ext.AveragedModel(model, **ours_kw)
    theirs = T.AveragedModel(model, **torch_kw)
    ref = [p.detach().double().clone() for p in model.parameters()]
    decay = 0.9
    for step in range(40):
        _train_step(model, gen)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        for r, p in zip(ref, model.parameters()):
            if step == 0:
                r.copy_(p.double())
            elif fn_name == "ema-multi":
                r.mul_(decay).add_(p.double() * (1 - decay))
            else:
                r.add_((p.double() - r) / (step + 1))
    for r, a, b in zip(ref, ours.parameters(), theirs.parameters()):
        err_ours = (a.double() - r).abs().max().item()
        err_torch = (b.double() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + 2 * torch.finfo(torch.float32).eps * r.abs().max().item()


def test_fused_path_is_one_op_call_per_device(monkeypatch):
    calls = []
    for name in ("running_mean_", "ema_", "scale_copy_"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real: (calls.append((_n, len(a[0]))), _r(*a))[1])
    model = Net()
    n_params = len(list(model.parameters()))
    for kwargs, op in (({}, "running_mean_"), (dict(multi_avg_fn=T.get_ema_multi_avg_fn(0.5)), "ema_"),
                       (dict(avg_fn=wavg_ext.get_ema_avg_fn(0.5)), "ema_")):
        calls.clear()
        avg = wavg_ext.AveragedModel(model, **kwargs)
        avg.update_parameters(model)
        avg.update_parameters(model)
        assert calls == [("scale_copy_", n_params), (op, n_params)], kwargs


def test_custom_functions_are_called_as_torch_calls_them():
    """A multi_avg_fn of the user's: one call per (device, dtype) group with n_averaged as a
    tensor, as torch makes them."""
    seen = {}

    def make(tag):
        def multi(avgs, xs, n):
            seen.setdefault(tag, []).append(([a.dtype for a in avgs], [tuple(a.shape) for a in avgs],
                                             type(n), n.dtype, int(n)))
            for a, x in zip(avgs, xs):
                a.mul_(0.5).add_(x, alpha=0.5)
        return multi

    model = Net()
    model.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))  # two dtype groups
    ours, theirs = _run_pair(model, dict(multi_avg_fn=make("ours")), dict(multi_avg_fn=make("torch")), steps=3)
    # (torch orders the groups of one update its own way: compare them as sets per update)
    per_update = [sorted(map(repr, seen[k][i:i + 2])) for k in ("ours", "torch") for i in (0, 2)]
    assert per_update[:2] == per_update[2:] and len(seen["ours"]) == len(seen["torch"]) == 4
    _assert_close_state(ours, theirs)


def test_custom_functions_get_the_device_count_like_torch():
    counts = {}

    def make(tag):
        def avg_fn(a, x, n):
            counts.setdefault(tag, []).append((type(n), n.dtype, n.device, int(n)))
            return a + (x - a) * 0.25
        return avg_fn

    model = Net()
    ours, theirs = _run_pair(model, dict(avg_fn=make("ours")), dict(avg_fn=make("torch")), steps=3)
    assert counts["ours"] == counts["torch"] and len(counts["ours"]) == 2 * len(list(model.parameters()))
    _assert_close_state(ours, theirs)


def test_state_dict_interchanges_both_ways():
    model, ours, theirs = _both("swa-default", False, steps=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # torch's checkpoint into ours, ours into torch's: both continue as the one that saved.
    ours2 = wavg_ext.AveragedModel(Net())
    ours2.load_state_dict(theirs.state_dict())
    theirs2 = T.AveragedModel(Net())
    theirs2.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        _train_step(model, gen)
        for m in (ours, theirs, ours2, theirs2):
            m.update_parameters(model)
    assert ours2.n_averaged.item() == 5
    _assert_close_state(ours2, theirs)
    _assert_close_state(ours, theirs2)


def test_a_written_count_is_followed():
    model, ours, theirs = _both("swa-default", False, steps=3)
    for m in (ours, theirs):
        m.n_averaged.zero_()  # restart the average: the next update copies
    gen = torch.Generator().manual_seed(4)
    _train_step(model, gen)
    ours.update_parameters(model)
    theirs.update_parameters(model)
    for a, p in zip(ours.parameters(), model.parameters()):
        assert torch.equal(a, p)
    ours.n_averaged = torch.tensor(7)  # replaced, not written in place
    theirs.n_averaged = torch.tensor(7)
    _train_step(model, gen)
    ours.update_parameters(model)
    theirs.update_parameters(model)
    _assert_close_state(ours, theirs)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_like_the_original(how):
    model, ours, theirs = _both("ema-multi", True, steps=2)
    clone = copy.deepcopy(ours) if how == "deepcopy" else pickle.loads(pickle.dumps(ours))
    assert isinstance(clone, T.AveragedModel) and clone.multi_avg_fn == ours.multi_avg_fn
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        _train_step(model, gen)
        for m in (ours, clone, theirs):
            m.update_parameters(model)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k]), k
    _assert_close_state(clone, theirs)


def test_is_a_torch_averaged_model_and_forwards():
    model = Net().eval()
    avg = wavg_ext.AveragedModel(model)
    assert isinstance(avg, T.AveragedModel) and isinstance(avg, nn.Module)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(avg(x), model(x))
    assert avg.n_averaged.dtype == torch.long and avg.n_averaged.item() == 0


@pytest.mark.parametrize("fn_name", ["swa-default", "ema-multi", "torch-ema-multi", "swa-avg"])
def test_no_host_read_of_the_count(h, fn_name):
    model = Net()
    ours = wavg_ext.AveragedModel(model, use_buffers=True, **FNS[fn_name][0])
    ours.update_parameters(model)  # the first may read the count once
    with h.NoHostReads():
        for _ in range(3):
            ours.update_parameters(model)
    assert ours.n_averaged.item() == 4
    theirs = T.AveragedModel(model)
    theirs.update_parameters(model)
    with pytest.raises(AssertionError, match="host read"), h.NoHostReads():
        theirs.update_parameters(model)  # the check can fail: torch reads n_averaged


def _snapshot(avg):
    return {k: v.clone() for k, v in avg.state_dict().items()}, avg._count


def _assert_unchanged(avg, snap):
    state, count = snap
    for k, v in avg.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert avg._count == count


@pytest.mark.parametrize("change", ["extra-param", "shape", "buffer-shape", "dtype-pair"])
def test_a_mismatched_model_changes_nothing(change):
    model = Net()
    avg = wavg_ext.AveragedModel(model)
    avg.update_parameters(model)
    other = copy.deepcopy(model)
    n = len(list(model.parameters()))
    error = ValueError
    if change == "extra-param":
        other.extra = nn.Parameter(torch.ones(2))
        match = f"the model has {n + 1} parameters, the averaged model {n}: not the model"
    elif change == "shape":
        other.fc = nn.Linear(5 * 4 * 4, 8)
        match = r"the model's fc.weight has shape \(8, 80\), its average \(7, 80\)"
    elif change == "buffer-shape":
        other.bn = nn.BatchNorm2d(6)
        other.conv = nn.Conv2d(3, 5, 3)
        other.bn.weight = nn.Parameter(torch.ones(5))
        other.bn.bias = nn.Parameter(torch.zeros(5))
        match = "buffer bn.running_mean has shape"
    else:
        other.fc.to(torch.float16)  # a float32 average of float16 weights is fine; the reverse is not
        avg.module.fc.to(torch.float16)
        other.fc.to(torch.float32)
        match = r"avgs\[\d\] is Half but xs\[\d\] is Float"
        error = TypeError
    snap = _snapshot(avg)
    with pytest.raises(error, match=match):
        avg.update_parameters(other)
    _assert_unchanged(avg, snap)


def test_swa_multi_avg_fn_averages_integer_buffers_where_torchs_raises():
    model = Net()
    model(torch.randn(2, 3, 6, 6))
    ours = wavg_ext.AveragedModel(model, multi_avg_fn=wavg_ext.get_swa_multi_avg_fn(), use_buffers=True)
    theirs = T.AveragedModel(model, multi_avg_fn=T.get_swa_multi_avg_fn(), use_buffers=True)
    for _ in range(2):
        model(torch.randn(2, 3, 6, 6))  # num_batches_tracked 2, then 3
        ours.update_parameters(model)
    assert ours.module.bn.num_batches_tracked.item() == 2  # 2, then 2 + (3 - 2) / 2 = 2.5, cast back
    theirs.update_parameters(model)
    with pytest.raises(RuntimeError, match="Integer division with addcdiv"):
        theirs.update_parameters(model)


def test_both_functions_is_an_error_like_torchs():
    with pytest.raises(AssertionError, match="Only one of avg_fn and multi_avg_fn"):
        wavg_ext.AveragedModel(Net(), avg_fn=wavg_ext.get_swa_avg_fn(), multi_avg_fn=wavg_ext.get_swa_multi_avg_fn())
    with pytest.raises(ValueError, match="Only one of avg_fn and multi_avg_fn"):
        wavg_ext.AveragedModel(Net(), avg_fn=wavg_ext.get_swa_avg_fn(), multi_avg_fn=wavg_ext.get_swa_multi_avg_fn())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        wavg_ext.AveragedModel([torch.ones(2)])


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_bad_decay(decay):
    for make in (wavg_ext.get_ema_multi_avg_fn, wavg_ext.get_ema_avg_fn):
        with pytest.raises(ValueError, match="Invalid decay value"):
            make(decay)


def test_functions_called_directly_match_torchs():
    gen = torch.Generator().manual_seed(6)
    avgs = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    xs = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    for ours, theirs, n in ((wavg_ext.get_swa_multi_avg_fn(), T.get_swa_multi_avg_fn(), torch.tensor(3)),
                            (wavg_ext.get_ema_multi_avg_fn(0.8), T.get_ema_multi_avg_fn(0.8), None)):
        a, b = [t.clone() for t in avgs], [t.clone() for t in avgs]
        ours(a, xs, n)
        theirs(b, xs, n)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    for ours, theirs in ((wavg_ext.get_swa_avg_fn(), T.get_swa_avg_fn()),
                         (wavg_ext.get_ema_avg_fn(0.8), T.get_ema_avg_fn(0.8))):
        assert torch.equal(ours(avgs[0], xs[0], torch.tensor(2)), theirs(avgs[0], xs[0], torch.tensor(2)))
    for fn in (wavg_ext.get_swa_multi_avg_fn(), wavg_ext.get_ema_multi_avg_fn(0.8), wavg_ext.get_swa_avg_fn(),
               wavg_ext.get_ema_avg_fn(0.8)):
        assert pickle.loads(pickle.dumps(fn)) == fn


def test_averaged_state_dict_loads_into_the_model():
    model, ours, _ = _both("swa-default", True, steps=3)
    fresh = Net()
    fresh.load_state_dict(ours.averaged_state_dict())
    for a, p in zip(ours.module.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, p)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and wavg_ext.build_info()["cuda"]),
                    reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("fn_name", ["swa-default", "ema-multi"])
def test_cuda_model_cpu_average_and_no_sync(fn_name):
    """device='cpu' keeps the average on the CPU (copies through pinned memory); on the GPU
    the fused update never synchronizes."""
    model = Net().cuda()
    on_cpu = wavg_ext.AveragedModel(model, device="cpu", **FNS[fn_name][0])
    on_gpu = wavg_ext.AveragedModel(model, **FNS[fn_name][0])
    theirs = T.AveragedModel(model, device="cpu", **FNS[fn_name][1])
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        _train_step(model.cpu(), gen)
        model.cuda()
        on_cpu.update_parameters(model)
        theirs.update_parameters(model)
        if step:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            on_gpu.update_parameters(model)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    _assert_close_state(on_cpu, theirs)
    for a, b in zip(on_gpu.parameters(), on_cpu.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
