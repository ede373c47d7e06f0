"""wavg_ext.update_bn: BN recalibration on a fraction of a loader."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import wavg_ext


class Counting:
    """A loader that records how many batches were drawn from it."""

    def __init__(self, batches, with_len=True):
        self.batches, self.drawn, self.with_len = batches, 0, with_len

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b

    def __len__(self):
        if not self.with_len:
            raise TypeError("no len")
        return len(self.batches)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, image, mask=None):
        return self.bn(self.lin(image))


def xs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 6, generator=gen) * 3 + 1 for _ in range(n)]


@pytest.mark.parametrize("fraction, used", [(1.0, 10), (0.25, 3), (0.01, 1), (0.5, 5)])
def test_fraction_touches_only_that_many_batches(h, fraction, used):
    model = h.tiny_model(bn=True)
    data = xs(10)
    loader = Counting(data)
    assert wavg_ext.update_bn(loader, model, fraction=fraction) == used
    assert loader.drawn == used  # not a batch more was drawn
    bn = model[1]
    feats = torch.cat([model[0](x) for x in data[:used]]).detach()
    torch.testing.assert_close(bn.running_mean, feats.mean(0), rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == used


def test_matches_torch_update_bn_and_restores_modes_and_momenta(h):
    model, twin = h.tiny_model(bn=True), h.tiny_model(bn=True)
    model[1].momentum = 0.3
    model.eval()
    model[2].train()  # mixed modes must come back exactly
    data = [(x, torch.zeros(16, 3)) for x in xs(6)]
    wavg_ext.update_bn(data, model)
    torch_update_bn(data, twin)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert model[1].momentum == 0.3
    assert [m.training for m in model] == [False, False, True, False] and not model.training


def test_batch_forms_device_and_custom_forward():
    model = DictModel()
    data = xs(4)
    wavg_ext.update_bn([{"image": x, "label": torch.zeros(16)} for x in data], model, device="cpu")
    expected = torch.cat([model.lin(x) for x in data]).detach().mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-5, atol=1e-5)
    seen = []
    wavg_ext.update_bn([("a", x) for x in data], model, forward=lambda m, b: seen.append(m(b[1])))
    assert len(seen) == 4
    torch.testing.assert_close(model.bn.running_mean, expected, rtol=1e-5, atol=1e-5)


def test_progress_bar(h, capsys):
    model = h.tiny_model(bn=True)
    assert wavg_ext.update_bn(xs(3), model, progress=True) == 3


def test_no_batchnorm_is_a_no_op(h):
    loader = Counting(xs(3))
    assert wavg_ext.update_bn(loader, h.tiny_model(), fraction=0.5) == 0 and loader.drawn == 0


@pytest.mark.parametrize("fraction, err", [(0.0, ValueError), (1.5, ValueError), (-1, ValueError),
                                           (math.nan, TypeError), (True, TypeError), ("1", TypeError)])
def test_bad_fraction(h, fraction, err):
    model = h.tiny_model(bn=True)
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(err, match="fraction"):
        wavg_ext.update_bn(xs(2), model, fraction=fraction)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))


def test_failures_leave_statistics_unchanged(h):
    model = h.tiny_model(bn=True)
    wavg_ext.update_bn(xs(2), model)
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="no batches"):
        wavg_ext.update_bn(Counting([], with_len=False), model)
    with pytest.raises(TypeError, match="batches must be"):
        wavg_ext.update_bn([3, 4], model)
    with pytest.raises(RuntimeError):
        wavg_ext.update_bn([xs(1)[0], torch.randn(16, 5)], model)  # second batch has a wrong shape
    with pytest.raises(TypeError, match="len"):
        wavg_ext.update_bn(Counting(xs(2), with_len=False), model, fraction=0.5)
    with pytest.raises(TypeError, match="model must be"):
        wavg_ext.update_bn(xs(2), "model")
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    assert model.training
