"""averaged_state_dict() on the optimizer wrappers, AveragedModel and ModelEMA: the averages
keyed by the model's own names, loadable into the model (strict)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wavg_ext


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _train(opt, model, steps=4):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("make", [
    lambda base, m: wavg_ext.SWA(base, module=m),
    lambda base, m: wavg_ext.EMA(base, decay=0.5, module=m, average_buffers=True),
    lambda base, m: wavg_ext.PeriodicSWA(base, period=100, module=m),
    lambda base, m: wavg_ext.SWA(base),  # names from the module given to the call
], ids=["swa", "ema-buffers", "periodic", "no-module"])
def test_wrapper_averaged_state_dict_loads_into_the_model(make):
    model = _model()
    opt = make(torch.optim.SGD(model.parameters(), lr=0.1), model)
    _train(opt, model)
    sd = opt.averaged_state_dict(model)
    assert list(sd) == list(model.state_dict())
    fresh = _model()
    fresh.load_state_dict(sd)  # strict
    for p, a in zip(fresh.parameters(), opt.averaged_parameters()):
        assert torch.equal(p, a)
    if getattr(opt, "average_buffers", False):
        for name, b in opt.averaged_buffers().items():
            assert torch.equal(fresh.get_buffer(name), b), name


def test_wrapper_averaged_state_dict_needs_names():
    model = _model()
    opt = wavg_ext.SWA(torch.optim.SGD(model.parameters(), lr=0.1))
    _train(opt, model, 2)
    with pytest.raises(ValueError, match="the names come from a module"):
        opt.averaged_state_dict()
    with pytest.raises(ValueError, match="averaged parameter 0 is not a parameter of the module given"):
        opt.averaged_state_dict(_model())
    with pytest.raises(RuntimeError, match="no weights have been averaged yet"):
        wavg_ext.SWA(torch.optim.SGD(_model().parameters(), lr=0.1), start=100).averaged_state_dict(model)


@pytest.mark.parametrize("cls", [wavg_ext.AveragedModel, wavg_ext.ModelEMA])
def test_model_side_averaged_state_dict(cls):
    model = _model()
    avg = cls(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    (avg.update_parameters if cls is wavg_ext.AveragedModel else avg.update)(model)
    fresh = _model()
    fresh.load_state_dict(avg.averaged_state_dict())
    assert list(avg.averaged_state_dict()) == list(model.state_dict())
