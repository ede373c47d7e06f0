"""ModelEMA.update and AveragedModel.update_parameters keep their pairing of the model's
tensors with the averages from one update to the next (pairing by name each time costs
more than the update on models of many small tensors). These tests change the model after
some updates, in every way a user can, and check that the next updates give bit for bit
what the same wrapper pairing afresh gives (its twin, updated from a deep copy of the model
each time), or raise the same error and change nothing. Also: a dropped model is not kept
alive, and the wrappers still copy and pickle. Public API only."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

import wavg_ext
from wavg_ext import AveragedModel, ModelEMA, get_ema_multi_avg_fn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.head = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 3))


def _step(model, gen):
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen).to(t.device, t.dtype) * 0.1)


def _bits(wrapper):
    """Every tensor and counter of the wrapper."""
    state = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in wrapper.state_dict().items()}
    state["num_updates"] = getattr(wrapper, "num_updates", None)
    return state


def _same(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not (isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])):
                return False
        elif a[k] != b[k]:
            return False
    return True


class Wrapper:
    """How to make one kind of averaging wrapper and update it."""

    def __init__(self, make, update):
        self.make, self.update = make, update


WRAPPERS = {
    "ModelEMA": Wrapper(lambda m: ModelEMA(m, decay=0.9), lambda w, m: w.update(m)),
    "ModelEMA copying": Wrapper(lambda m: ModelEMA(m, decay=0.0), lambda w, m: w.update(m)),
    "ModelEMA exclude_buffers": Wrapper(lambda m: ModelEMA(m, decay=0.9, exclude_buffers=True),
                                        lambda w, m: w.update(m)),
    "AveragedModel": Wrapper(AveragedModel, lambda w, m: w.update_parameters(m)),
    "AveragedModel use_buffers": Wrapper(lambda m: AveragedModel(m, use_buffers=True),
                                         lambda w, m: w.update_parameters(m)),
    "AveragedModel ema": Wrapper(lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9)),
                                 lambda w, m: w.update_parameters(m)),
    "AveragedModel avg_fn": Wrapper(lambda m: AveragedModel(m, avg_fn=lambda a, x, n: a + (x - a) / (n + 1)),
                                    lambda w, m: w.update_parameters(m)),
}


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


FOLLOWED = {
    "data": lambda m: setattr(m.fc.weight, "data", _randn(5, 64)),
    "half": lambda m: m.half(),
    "parameter replaced": lambda m: setattr(m.fc, "weight", nn.Parameter(_randn(5, 64))),
    "submodule replaced": lambda m: setattr(m.head, "1", nn.Linear(5, 3)),
    "buffer replaced": lambda m: setattr(m.bn, "running_mean", _randn(4)),
    "parameters dict swapped": lambda m: (setattr(m.fc, "_parameters", dict(m.fc._parameters)),
                                          m.fc._parameters.__setitem__("bias", nn.Parameter(_randn(5)))),
}


def _trained(kind):
    """(how, a model, its generator, a wrapper of that kind updated three times from it)."""
    how = WRAPPERS[kind]
    gen = torch.Generator().manual_seed(0)
    model = Net()
    ours = how.make(model)
    for _ in range(3):
        _step(model, gen)
        how.update(ours, model)
    return how, model, gen, ours


def _update_both(how, ours, twin, model, gen):
    """One training step, then ours updated from the model and its twin from a deep copy
    (paired afresh): the two must agree bit for bit."""
    _step(model, gen)
    how.update(ours, model)
    how.update(twin, copy.deepcopy(model))
    assert _same(_bits(ours), _bits(twin))


@pytest.mark.parametrize("change", list(FOLLOWED))
@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_changes_between_updates_are_followed(kind, change):
    how = WRAPPERS[kind]
    gen = torch.Generator().manual_seed(0)
    model = Net()
    ours, twin = how.make(model), how.make(model)
    for _ in range(3):
        _update_both(how, ours, twin, model, gen)
    FOLLOWED[change](model)
    for _ in range(3):
        _update_both(how, ours, twin, model, gen)
    if kind == "ModelEMA copying":  # the new tensors' values reached the copy (a stale pairing misses them)
        theirs = model.state_dict()
        assert all(torch.equal(v, theirs[k].to(v.dtype)) for k, v in ours.module.state_dict().items())


REFUSED = {
    "submodule added": lambda m: setattr(m, "extra", nn.Linear(2, 2)),
    "buffer deleted": lambda m: delattr(m.bn, "running_var"),
    "parameters reordered": lambda m: (lambda w: (delattr(m.fc, "weight"), setattr(m.fc, "weight", w)))(m.fc.weight),
    # (the same object moves from the end of _parameters to the start of _buffers: the
    # entries in order are unchanged, only the dicts' lengths tell)
    "parameter made a buffer": lambda m: (lambda b: (delattr(m.head[1], "bias"), m.head[1].register_buffer("bias", b)))(
        m.head[1].bias),
    "parameters tied": lambda m: setattr(m.head[0], "bias", m.fc.bias),
    "shape of a parameter": lambda m: setattr(m.fc.weight, "data", torch.zeros(6, 64)),
    "shape of a buffer": lambda m: setattr(m.bn.running_mean, "data", torch.zeros(5)),
    "shape of an integer buffer": lambda m: setattr(m.bn.num_batches_tracked, "data", torch.zeros(2, dtype=torch.long)),
}


@pytest.mark.parametrize("change", list(REFUSED))
@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_changes_that_break_the_pairing_are_refused_before_anything_changes(kind, change):
    how, model, gen, ours = _trained(kind)
    REFUSED[change](model)
    before = _bits(ours)
    with pytest.raises(ValueError) as ours_error:
        how.update(ours, model)
    with pytest.raises(ValueError) as fresh_error:  # what a fresh pairing says
        how.update(how.make(Net()), model)
    assert str(ours_error.value) == str(fresh_error.value)
    assert _same(_bits(ours), before)


def test_an_exclusion_changed_between_updates_is_followed():
    gen = torch.Generator().manual_seed(0)
    model = Net()
    ema = ModelEMA(model, decay=0.5)
    _step(model, gen)
    ema.update(model)
    ema.update(model)
    ema.exclude_buffers = True
    _step(model, gen)
    ema.update(model)
    assert torch.equal(ema.module.bn.running_mean, model.bn.running_mean)  # copied now
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)  # still averaged


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_a_dropped_model_is_not_kept_alive(kind):
    how = WRAPPERS[kind]
    model = Net()
    ours = how.make(model)
    for _ in range(2):
        how.update(ours, model)
    weight = weakref.ref(model.fc.weight)
    module = weakref.ref(model.head)
    del model
    gc.collect()
    assert weight() is None and module() is None


@pytest.mark.parametrize("kind", [k for k in WRAPPERS if k != "AveragedModel avg_fn"])  # (a lambda: no pickle)
def test_copies_and_pickles_after_updates(kind):
    how, model, gen, ours = _trained(kind)
    for duplicate in (copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))):
        other = duplicate(ours)
        assert _same(_bits(other), _bits(ours))
        _step(model, gen)
        how.update(other, model)
        how.update(ours, model)
        assert _same(_bits(other), _bits(ours))


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_a_model_that_walks_its_own_way_is_paired_each_time(kind):
    class Custom(Net):
        def named_parameters(self, *args, **kwargs):  # (e.g. a wrapper that renames)
            yield from super().named_parameters(*args, **kwargs)

    how = WRAPPERS[kind]
    gen = torch.Generator().manual_seed(0)
    model = Custom()
    ours, twin = how.make(model), how.make(model)
    for change in (None, FOLLOWED["parameter replaced"], FOLLOWED["submodule replaced"]):
        if change is not None:
            change(model)
        _update_both(how, ours, twin, model, gen)


CUDA_WRAPPERS = {
    "ModelEMA": Wrapper(lambda m: ModelEMA(m, decay=0.9), lambda w, m: w.update(m)),
    "ModelEMA on the CPU": Wrapper(lambda m: ModelEMA(m, decay=0.9, device="cpu"), lambda w, m: w.update(m)),
    "AveragedModel": Wrapper(AveragedModel, lambda w, m: w.update_parameters(m)),
    "AveragedModel on the CPU": Wrapper(lambda m: AveragedModel(m, device="cpu"), lambda w, m: w.update_parameters(m)),
}


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and wavg_ext.build_info()["cuda"]),
                    reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("kind", list(CUDA_WRAPPERS))
def test_a_cuda_model_changed_between_updates(kind):
    """The kept pairing with a CUDA model, averaged on the GPU (one planned call) or on the
    CPU (the pairs moved each update): the same bits as a fresh pairing, through .data
    replaced, a parameter replaced and the model moved to float16."""
    how = CUDA_WRAPPERS[kind]
    gen = torch.Generator().manual_seed(0)
    model = Net().cuda()
    ours, twin = how.make(model), how.make(model)
    changes = (None, FOLLOWED["data"], FOLLOWED["parameter replaced"], FOLLOWED["half"])
    for change in changes:
        if change is not None:
            change(model)
            model.cuda()  # (the replacements were made on the CPU)
        for _ in range(2):
            _update_both(how, ours, twin, model, gen)
