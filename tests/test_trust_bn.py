"""wavg_ext.update_bn with device= and structured batches (namedtuples, lists, nested dicts): the
batches keep their types and the statistics are exactly those of torch's update_bn on the
plain input tensors."""

from __future__ import annotations

import collections
from typing import NamedTuple, Optional

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn as torch_update_bn

import wavg_ext

Pair = collections.namedtuple("Pair", ["x", "y"])


class Sample(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    index: int  # non-tensor fields pass through untouched
    name: str
    extra: Optional[torch.Tensor] = None


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, image, extra=None):
        out = self.lin(image)
        if extra is not None:
            out = out + extra["shift"] * extra["info"]["scale"]
        return self.bn(out)


def xs(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 6, generator=gen) * 2 + 0.5 for _ in range(n)]


def expected_buffers(model_fn, inputs):
    """torch's update_bn on the plain input tensors of a fresh twin."""
    twin = model_fn()
    torch_update_bn(inputs, twin)
    return [b.clone() for b in twin.buffers()]


def assert_buffers(model, expected):
    got = list(model.buffers())
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


BATCH_FORMS = {
    "namedtuple": lambda x, i: Pair(x, torch.zeros(16, 3)),
    "NamedTuple": lambda x, i: Sample(x, torch.zeros(16, 3), i, f"b{i}"),
    "list": lambda x, i: [x, torch.zeros(16, 3), f"b{i}"],
    "tuple": lambda x, i: (x, torch.zeros(16, 3)),
}


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
@pytest.mark.parametrize("form", list(BATCH_FORMS))
def test_sequence_batches_with_device_match_torch(h, form, device):
    data = xs()
    batches = [BATCH_FORMS[form](x, i) for i, x in enumerate(data)]
    model = h.tiny_model(bn=True)
    model[1].momentum = 0.2
    expected = expected_buffers(lambda: h.tiny_model(bn=True), data)
    assert wavg_ext.update_bn(batches, model, device=device) == 5
    assert_buffers(model, expected)
    assert model[1].momentum == 0.2 and model.training


@pytest.mark.parametrize("form", list(BATCH_FORMS))
def test_moved_batches_keep_their_types_and_fields(h, form):
    data = xs(3)
    batches = [BATCH_FORMS[form](x, i) for i, x in enumerate(data)]
    seen = []
    wavg_ext.update_bn(batches, h.tiny_model(bn=True), device="cpu",
                       forward=lambda m, b: (seen.append(b), m(b[0])))
    assert len(seen) == 3
    for got, sent in zip(seen, batches):
        assert type(got) is type(sent) and len(got) == len(sent)
        for a, b in zip(got, sent):
            if isinstance(b, torch.Tensor):
                assert a.device.type == "cpu" and torch.equal(a, b)
            else:
                assert a == b and type(a) is type(b)
    if form == "NamedTuple":
        assert seen[2].index == 2 and seen[2].name == "b2" and seen[2].extra is None


def test_nested_dict_batches_with_device_match_a_manual_pass():
    gen = torch.Generator().manual_seed(4)
    data = xs(4)
    shifts = [torch.randn(8, generator=gen) for _ in data]
    batches = [{"image": x, "extra": {"shift": s, "info": collections.OrderedDict(scale=torch.tensor(0.5))},
                "label": torch.zeros(16)} for x, s in zip(data, shifts)]
    model = KwModel()
    seen = []
    assert wavg_ext.update_bn(batches, model, device="cpu",
                              forward=lambda m, b: (seen.append(b), m(**{k: v for k, v in b.items()
                                                                         if k != "label"}))) == 4
    got = [b.clone() for b in model.buffers()]
    assert type(seen[0]["extra"]) is dict and type(seen[0]["extra"]["info"]) is collections.OrderedDict
    assert torch.equal(seen[1]["extra"]["shift"], shifts[1])
    # The default forward: keyword arguments without the label; the same statistics.
    assert wavg_ext.update_bn(batches, model, device="cpu") == 4
    assert_buffers(model, got)
    # Reference: the model in train mode with momentum None over the same inputs, by hand.
    ref = KwModel()
    ref.load_state_dict(model.state_dict())
    ref.bn.reset_running_stats()
    ref.bn.momentum = None
    ref.train()
    with torch.no_grad():
        for x, s in zip(data, shifts):
            ref(x, {"shift": s, "info": {"scale": torch.tensor(0.5)}})
    assert_buffers(model, list(ref.buffers()))
    assert int(model.bn.num_batches_tracked) == 4
    feats = torch.cat([model.lin(x) + 0.5 * s for x, s in zip(data, shifts)]).detach()
    torch.testing.assert_close(model.bn.running_mean, feats.mean(0), rtol=1e-5, atol=1e-6)


def test_dict_subclasses_keep_their_type():
    model = KwModel()
    data = xs(2)
    batches = [collections.defaultdict(list, image=x) for x in data]
    seen = []
    wavg_ext.update_bn(batches, model, device="cpu", forward=lambda m, b: (seen.append(b), m(b["image"])))
    assert type(seen[0]) is collections.defaultdict and seen[0].default_factory is list
    assert seen[0]["missing"] == [] and "missing" not in batches[0]  # a copy, not the user's batch
    ref = KwModel()  # (its init is random: the same weights by hand)
    ref.load_state_dict(model.state_dict())
    torch_update_bn(data, ref)
    assert_buffers(model, list(ref.buffers()))


def test_failed_device_batches_restore_the_statistics(h):
    """A namedtuple batch that fails inside the model after the move: the old statistics stay."""
    model = h.tiny_model(bn=True)
    wavg_ext.update_bn(xs(2), model)
    before = [b.clone() for b in model.buffers()]
    batches = [Pair(xs(1)[0], None), Pair(torch.randn(16, 5), None)]  # the second has a wrong width
    with pytest.raises(RuntimeError):
        wavg_ext.update_bn(batches, model, device="cpu")
    assert_buffers(model, before)
