"""wavg_ext.ModelEMA and the compat constructors (compat.timm.ModelEmaV3,
compat.diffusers.EMAModel): the schedule, the averages against a float64 reference and
against each library's documented update (re-implemented here from their sources, and the
real library where it imports), checkpoints, the swap helpers, no host reads per update,
and bad input refused before anything changes. Public API only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import wavg_ext
from wavg_ext import ModelEMA
from wavg_ext.bench.dropin import TimmModelEmaV3Reimpl
from wavg_ext.compat.diffusers import EMAModel
from wavg_ext.compat.timm import ModelEmaV3

F64 = torch.float64


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.to(dtype)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _train_step(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * 0.1)
    model.train()
    model(torch.randn(2, 3, 6, 6, generator=gen, dtype=F64).to(model.conv.weight.dtype))


def _state(module):
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------- schedule --
def test_schedule():
    assert [wavg_ext.model_ema.ema_decay(t, 0.99) for t in (1, 2, 50)] == [0.0, 0.99, 0.99]
    assert wavg_ext.model_ema.ema_decay(3, 0.99, update_after_step=2) == 0.0
    assert wavg_ext.model_ema.ema_decay(4, 0.99, update_after_step=2) == 0.99
    warm = [wavg_ext.model_ema.ema_decay(t, 0.9999, warmup=True) for t in (2, 10, 31624, 10 ** 7)]
    assert warm[0] == 1 - 2 ** (-2 / 3) and warm[1] == 1 - 10 ** (-2 / 3)
    assert abs(warm[2] - 0.999) < 1e-6 and warm[3] == 0.9999  # @crowsonkb's numbers; capped at decay
    assert wavg_ext.model_ema.ema_decay(2, 0.99, min_decay=0.5, warmup=True, power=1.0) == 0.5


def test_update_is_an_ema_of_the_weights():
    gen = torch.Generator().manual_seed(0)
    model = Net()
    ema = ModelEMA(model, decay=0.8)
    ref = {k: v.double().clone() for k, v in model.state_dict().items()}
    for step in range(1, 6):
        _train_step(model, gen)
        ema.update(model)
        d = 0.0 if step == 1 else 0.8  # the first update copies
        for k, v in model.state_dict().items():
            ref[k] = v.double().clone() if not v.is_floating_point() else d * ref[k] + (1 - d) * v.double()
        assert ema.current_decay == d and ema.num_updates == step
    for k, v in ema.averaged_state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, ref[k].to(v.dtype)), k  # num_batches_tracked: copied
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ema(x), ema.module(x)) and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_exclusions_are_copied():
    gen = torch.Generator().manual_seed(1)
    model = Net()
    ema = ModelEMA(model, decay=0.5, exclude_buffers=True, exclude=["fc.*"])
    for _ in range(3):
        _train_step(model, gen)
        ema.update(model)
    mine = ema.averaged_state_dict()
    for k, v in model.state_dict().items():
        copied = k.startswith("fc.") or k.startswith("bn.running") or k.endswith("num_batches_tracked")
        assert torch.equal(mine[k], v) == copied, k
    with pytest.raises(ValueError, match=r"exclude: \['nope\*'\] match no parameter"):
        ModelEMA(model, exclude=["nope*"])


def _slow_ema_run(model, emas, steps, decay=0.999):
    """steps - 1 small random moves of model's weights, each followed by an update of every
    ModelEMA in emas (made with this decay); returns the float64 EMA of the same weights."""
    gen = torch.Generator().manual_seed(2)
    ref = [p.double().clone() for p in model.parameters()]
    for step in range(1, steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)
        for ema in emas:
            ema.update(model)
        d = 0.0 if step == 1 else decay
        ref = [d * r + (1 - d) * p.double() for r, p in zip(ref, model.parameters())]
    return ref


def test_float32_averages_of_a_bfloat16_model():
    model = Net(torch.bfloat16)
    ema32 = ModelEMA(model, decay=0.999, average_dtype=torch.float32)
    ema16 = ModelEMA(model, decay=0.999)
    ref = _slow_ema_run(model, [ema32, ema16], 200)
    assert all(p.dtype == torch.float32 for p in ema32.module.parameters())
    err32 = max((a.double() - r).abs().max().item() for a, r in zip(ema32.module.parameters(), ref))
    err16 = max((a.double() - r).abs().max().item() for a, r in zip(ema16.module.parameters(), ref))
    assert err32 < 1e-5 and err16 > 10 * err32  # bf16 averages stagnate at decay 0.999


def test_stochastic_rounding_keeps_bfloat16_averages_moving():
    """The same run as above with stochastic rounding: the bfloat16 averages follow the
    float64 EMA about as closely as the float32 averages (within the bfloat16 rounding
    noise, averaged over each tensor), where round-to-nearest stagnates."""
    model = Net(torch.bfloat16)
    sr = ModelEMA(model, decay=0.999, stochastic_rounding=True, seed=5)
    rn = ModelEMA(model, decay=0.999)
    ref = _slow_ema_run(model, [sr, rn], 300)
    assert all(p.dtype == torch.bfloat16 for p in sr.module.parameters())

    def mean_bias(ema):  # |mean(avg - ref)| over all elements: the drift rounding leaves
        diffs = torch.cat([(a.double() - r).flatten() for a, r in zip(ema.module.parameters(), ref)])
        return diffs.mean().abs().item(), diffs.abs().mean().item()

    bias_sr, err_sr = mean_bias(sr)
    bias_rn, err_rn = mean_bias(rn)
    # measured: mean |error| 0.0017 vs 0.0117, |mean error| 2.5e-7 vs 9.4e-4
    assert err_sr < err_rn / 3, (err_sr, err_rn)
    assert bias_sr < min(2e-5, bias_rn / 20), (bias_sr, bias_rn)


def test_stochastic_rounding_is_reproducible_and_resumes_bit_for_bit():
    gen = torch.Generator().manual_seed(7)
    model = Net(torch.bfloat16)
    models = [ModelEMA(model, decay=0.99, stochastic_rounding=True, seed=s) for s in (11, 11, 12)]
    for _ in range(3):
        _train_step(model, gen)
        for m in models:
            m.update(model)
    resumed = ModelEMA(Net(torch.bfloat16), decay=0.5)
    resumed.load_state_dict(models[0].state_dict())
    assert resumed.stochastic_rounding and resumed.seed == 11
    for _ in range(3):
        _train_step(model, gen)
        for m in models + [resumed]:
            m.update(model)
    a, b, other, c = (m.state_dict() for m in models + [resumed])
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]) and torch.equal(v, c[k]), k
    assert any(isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.equal(v, other[k])
               for k, v in a.items())


def test_stochastic_rounding_leaves_other_averages_to_ema():
    """float32 averages (here: a float32 layer of a bfloat16 model) are updated exactly as
    without stochastic rounding."""
    gen = torch.Generator().manual_seed(8)
    model = Net(torch.bfloat16)
    model.fc.float()
    sr = ModelEMA(model, decay=0.9, stochastic_rounding=True)
    rn = ModelEMA(model, decay=0.9)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)
        sr.update(model)
        rn.update(model)
    assert torch.equal(sr.module.fc.weight, rn.module.fc.weight)
    assert not torch.equal(sr.module.conv.weight, rn.module.conv.weight)


def test_stochastic_rounding_needs_bfloat16_averages():
    with pytest.raises(ValueError, match="stochastic_rounding rounds bfloat16 averages"):
        ModelEMA(Net(), stochastic_rounding=True)
    with pytest.raises(ValueError, match="stochastic_rounding rounds bfloat16 averages"):
        ModelEMA(Net(torch.bfloat16), stochastic_rounding=True, average_dtype=torch.float32)
    assert ModelEMA(Net(), stochastic_rounding=True, average_dtype=torch.bfloat16).stochastic_rounding
    with pytest.raises(TypeError, match="seed must be an int64"):
        ModelEMA(Net(torch.bfloat16), stochastic_rounding=True, seed=2.0**64)


def test_callable_decay_and_step():
    model = Net()
    ema = ModelEMA(model, decay=lambda step: 1 - 1 / (step + 1))
    ema.update(model, step=1)
    assert ema.current_decay == 0.0
    ema.update(model, step=10)
    assert ema.current_decay == 1 - 1 / 11 and ema.step == 10
    with pytest.raises(ValueError, match=r"decay\(step\) must be in \[0, 1\]"):
        ModelEMA(model, decay=lambda step: 2.0).update(model, step=5)


def test_checkpoint_resumes_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    model = Net()
    a = ModelEMA(model, decay=0.9, warmup=True, power=0.75)
    for _ in range(3):
        _train_step(model, gen)
        a.update(model)
    b = ModelEMA(Net(), decay=0.5)  # other settings: the checkpoint's win
    b.load_state_dict(a.state_dict())
    assert (b.num_updates, b.step, b.decay, b.warmup, b.power) == (3, 3, 0.9, True, 0.75)
    for _ in range(2):
        _train_step(model, gen)
        a.update(model)
        b.update(model)
    for k, v in a.state_dict().items():
        assert (v == b.state_dict()[k]) if not isinstance(v, torch.Tensor) else torch.equal(v, b.state_dict()[k]), k


def test_averaged_swaps_in_and_back_even_on_error():
    gen = torch.Generator().manual_seed(4)
    model = Net()
    ema = ModelEMA(model, decay=0.5)
    for _ in range(3):
        _train_step(model, gen)
        ema.update(model)
    before = _state(model)
    with pytest.raises(KeyError):
        with ema.averaged(model):
            for k, v in model.state_dict().items():
                assert torch.equal(v, ema.averaged_state_dict()[k]), k
            raise KeyError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="nothing stored"):
        ema.restore(model)


@pytest.mark.parametrize("change", ["shape", "names"])
def test_a_mismatched_model_changes_nothing(change):
    model = Net()
    ema = ModelEMA(model, decay=0.5)
    ema.update(model)
    other = copy.deepcopy(model)
    if change == "shape":
        other.fc = nn.Linear(64, 6)
        match = r"the model's fc.weight has shape \(6, 64\), its average \(5, 64\)"
    else:
        other.extra = nn.Linear(2, 2)
        match = "not the ones this ModelEMA was made from"
    snap = _state(ema)
    with pytest.raises(ValueError, match=match):
        ema.update(other)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, snap[k]) if isinstance(v, torch.Tensor) else v == snap[k], k
    assert ema.num_updates == 1


def test_bad_arguments():
    model = Net()
    for kwargs, err, match in ((dict(decay=1.5), ValueError, "decay must be in"),
                               (dict(decay="0.9"), TypeError, "decay must be a float"),
                               (dict(min_decay=-1.0), ValueError, "min_decay must be in"),
                               (dict(update_after_step=-1), ValueError, "update_after_step"),
                               (dict(power=0.0), ValueError, "power must be a finite number"),
                               (dict(average_dtype=torch.int32), TypeError, "average_dtype")):
        with pytest.raises(err, match=match):
            ModelEMA(model, **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ModelEMA([torch.ones(2)])


def test_no_host_reads_per_update(h):
    model = Net()
    ema = ModelEMA(model, decay=0.9, warmup=True)
    with h.NoHostReads():
        for _ in range(3):
            ema.update(model)


# --------------------------------------------------------------------------------- timm --
# timm's ModelEmaV3 as its source writes it (the benchmark's stand-in where timm does not import)
TimmModelEmaV3Reference = TimmModelEmaV3Reimpl


def _timm_classes():
    classes = [TimmModelEmaV3Reference]
    try:
        from timm.utils import ModelEmaV3 as Real  # imports torchvision, which may not import here
    except Exception:
        return classes
    return classes + [Real]


@pytest.mark.parametrize("reference", _timm_classes(), ids=lambda c: c.__module__.split(".")[0])
@pytest.mark.parametrize("kwargs,steps", [
    (dict(decay=0.9), None), (dict(decay=0.9, update_after_step=2), "given"),
    (dict(decay=0.999, use_warmup=True, min_decay=0.1), "given"), (dict(decay=0.8, exclude_buffers=True), None)])
def test_compat_timm_matches_timm(reference, kwargs, steps):
    gen = torch.Generator().manual_seed(5)
    model = Net()
    ours, theirs = ModelEmaV3(model, **kwargs), reference(model, **kwargs)
    for t in range(1, 7):
        _train_step(model, gen)
        step = t if steps == "given" else None
        ours.update(model, step=step)
        theirs.update(model, step=step)
        assert ours.get_decay(step) == theirs.get_decay(step)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)  # timm's layout: module.* only
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)
    # Checkpoints interchange: timm's into ours, ours into timm's.
    ours2, theirs2 = ModelEmaV3(Net(), **kwargs), reference(Net(), **kwargs)
    ours2.load_state_dict(theirs.state_dict())
    theirs2.load_state_dict(ours.state_dict())
    for k, v in ours2.state_dict().items():
        assert torch.equal(v, b[k]) and torch.equal(theirs2.state_dict()[k], a[k]), k


def test_compat_timm_set_and_forward():
    model = Net().eval()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.set(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ema(x), model(x))


# ---------------------------------------------------------------------------- diffusers --
class DiffusersEMAModelReference:
    """diffusers.training_utils.EMAModel's step as its source (diffusers 0.42) writes it."""

    def __init__(self, parameters, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                 inv_gamma=1.0, power=2 / 3):
        self.shadow_params = [p.clone().detach() for p in parameters]
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.optimization_step = 0

    def get_decay(self, optimization_step):
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            cur = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur = (1 + step) / (10 + step)
        return max(min(cur, self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, parameters):
        parameters = list(parameters)
        self.optimization_step += 1
        one_minus_decay = 1 - self.get_decay(self.optimization_step)
        for s, p in zip(self.shadow_params, parameters):
            if p.requires_grad:
                s.sub_(one_minus_decay * (s - p))
            else:
                s.copy_(p)


def _diffusers_classes():
    classes = [DiffusersEMAModelReference]
    try:
        from diffusers.training_utils import EMAModel as Real
    except Exception:
        return classes
    return classes + [Real]


@pytest.mark.parametrize("reference", _diffusers_classes(), ids=lambda c: c.__module__.split(".")[0])
@pytest.mark.parametrize("kwargs", [dict(decay=0.9), dict(decay=0.9, update_after_step=3),
                                    dict(decay=0.9999, use_ema_warmup=True, power=0.75, min_decay=0.2)])
def test_compat_diffusers_matches_diffusers(reference, kwargs):
    gen = torch.Generator().manual_seed(6)
    model = Net()
    model.bn.weight.requires_grad_(False)  # not trained: copied
    ours, theirs = EMAModel(model.parameters(), **kwargs), reference(model.parameters(), **kwargs)
    for _ in range(7):
        _train_step(model, gen)
        ours.step(model.parameters())
        theirs.step(model.parameters())
    assert ours.optimization_step == theirs.optimization_step == 7
    assert ours.cur_decay_value == theirs.get_decay(7)
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours.shadow_params[2], model.bn.weight)
    if hasattr(theirs, "state_dict"):  # the real library: its checkpoint loads into ours and back
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours2 = EMAModel(Net().parameters(), **kwargs)
        ours2.load_state_dict(theirs.state_dict())
        assert ours2.optimization_step == 7 and all(torch.equal(a, b) for a, b in
                                                    zip(ours2.shadow_params, theirs.shadow_params))


def test_compat_diffusers_store_copy_restore():
    gen = torch.Generator().manual_seed(7)
    model = Net()
    ema = EMAModel(model.parameters(), decay=0.5)
    for _ in range(3):
        _train_step(model, gen)
        ema.step(model.parameters())
    before = [p.clone() for p in model.parameters()]
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    ema.restore(model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_compat_diffusers_refuses_a_foreign_state_dict():
    model = Net()
    ema = EMAModel(model.parameters(), decay=0.5)
    shadow = [s.clone() for s in ema.shadow_params]
    for foreign in (ModelEMA(model).state_dict(), wavg_ext.AveragedModel(model).state_dict()):
        with pytest.raises(ValueError, match="not an EMAModel state"):
            ema.load_state_dict(foreign)
    bad = dict(ema.state_dict(), optimization_step=2.5, decay=0.7)
    with pytest.raises(ValueError, match="Invalid optimization_step"):
        ema.load_state_dict(bad)
    assert ema.decay == 0.5 and ema.optimization_step == 0  # nothing changed
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, shadow))
    with pytest.raises(ValueError, match="step: 3 parameters given, the EMA holds"):
        ema.step(list(model.parameters())[:3])


def test_model_ema_with_warmup_matches_ema_pytorch():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    for k in (0, 3):
        gen = torch.Generator().manual_seed(8)
        model = Net()
        theirs = ema_pytorch.EMA(model, beta=0.99, update_after_step=k, update_every=1)
        ours = ModelEMA(model, decay=0.99, update_after_step=k, warmup=True)
        for _ in range(12):
            _train_step(model, gen)
            theirs.update()
            ours.update(model)
        assert abs(ours.current_decay - float(theirs.get_current_decay())) < 1e-6
        for a, b in zip(ours.module.parameters(), theirs.ema_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_load_averages_from_other_layouts():
    gen = torch.Generator().manual_seed(9)
    model = Net()
    avg_model = wavg_ext.AveragedModel(model, multi_avg_fn=wavg_ext.get_ema_multi_avg_fn(0.5), use_buffers=True)
    timm_like = ModelEmaV3(model, decay=0.5)
    diff = EMAModel(model.parameters(), decay=0.5)
    for _ in range(3):
        _train_step(model, gen)
        avg_model.update_parameters(model)
        timm_like.update(model)
        diff.step(model.parameters())
    from wavg_ext.compat.timm import checkpoint_dict

    layouts = {"averaged_model": (avg_model.state_dict(), avg_model.module, 3),
               "timm": (timm_like.state_dict(), timm_like.module, None),
               "timm_checkpoint": (checkpoint_dict(model, timm_like, epoch=1), timm_like.module, None),
               "names": (timm_like.averaged_state_dict(), timm_like.module, None)}
    for name, (state, source, count) in layouts.items():
        ema = ModelEMA(Net())
        ema.load_averages(state)
        for a, b in zip(ema.module.state_dict().values(), source.state_dict().values()):
            assert torch.equal(a, b), name
        if count is not None:
            assert ema.num_updates == count
    ema = ModelEMA(Net())
    ema.load_averages(diff.state_dict())
    assert ema.num_updates == ema.step == 3
    for a, b in zip(ema.module.parameters(), diff.shadow_params):
        assert torch.equal(a, b)
    before = _state(ema)
    with pytest.raises(ValueError, match="not this model's averages"):
        ema.load_averages(ModelEMA(nn.Linear(2, 2)).averaged_state_dict())
    bad = dict(timm_like.averaged_state_dict(), **{"fc.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"fc.weight is \(3, 3\), its average \(5, 64\)"):
        ema.load_averages(bad)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k], k
