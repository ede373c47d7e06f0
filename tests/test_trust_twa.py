"""wavg_ext.TWA under bad input, from the user's side: NaN/inf samples and checkpoints, atomic
from_checkpoints / load_state_dict / add_param_group. A failing call must leave the parameters,
the basis, the counters and the base optimizer (state and lr) bit-identical."""

from __future__ import annotations

import collections
import copy
import io
import warnings
from collections.abc import Mapping

import pytest
import torch

import wavg_ext
from wavg_ext import TWA, RankDeficientSampleWarning
from wavg_ext.optim.twa import NonFiniteSampleWarning

LR, MOMENTUM = 0.05, 0.9


def sgd(params, lr=LR):
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=5e-4)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same(a, b):
    """Bit for bit, NaNs included (torch.equal says NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = (t.detach().contiguous().view(_INTS[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


def assert_same(a, b, where="state"):
    """Recursive equality: tensors bit for bit, the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and same(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Snapshot:
    """Everything a failing call must leave as it was: parameters, basis, counters, base optimizer."""

    def __init__(self, model, twa=None, base=None):
        self.model, self.twa = model, twa
        self.base = base if base is not None else twa.optimizer
        self.params = [p.detach().clone() for p in model.parameters()]
        self.base_state = copy.deepcopy(self.base.state_dict())
        self.lrs = [g["lr"] for g in self.base.param_groups]
        self.momenta = {p: s["momentum_buffer"].clone() for p, s in self.base.state.items()}
        if twa is not None:
            self.basis = [b.clone() for b in twa.basis]
            self.basis_objects = twa.basis
            self.counters = (twa.num_basis, twa.num_samples, twa.in_subspace)

    def check(self):
        for i, (p, saved) in enumerate(zip(self.model.parameters(), self.params)):
            assert same(p, saved), f"parameter {i} changed"
        assert_same(self.base.state_dict(), self.base_state, "base optimizer state_dict")
        assert [g["lr"] for g in self.base.param_groups] == self.lrs
        assert set(self.base.state) == set(self.momenta)
        for p, m in self.momenta.items():
            assert same(self.base.state[p]["momentum_buffer"], m)
        if self.twa is not None:
            assert (self.twa.num_basis, self.twa.num_samples, self.twa.in_subspace) == self.counters
            assert len(self.twa.basis) == len(self.basis)
            for i, (b, saved, obj) in enumerate(zip(self.twa.basis, self.basis, self.basis_objects)):
                assert b is obj, f"basis tensor {i} was replaced"
                assert same(b, saved), f"basis tensor {i} changed"


def poison(model, position, value, index=(1, 2)):
    with torch.no_grad():
        list(model.parameters())[position][index] = value


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------- collect()


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
@pytest.mark.parametrize("first", [True, False], ids=["first-sample", "second-sample"])
def test_collect_refuses_nonfinite_weights_and_changes_nothing(h, storage, bad, kind, first):
    """The bad sample raises and leaves no mark: the run then matches, bit for bit, a twin that
    never saw it (basis, counters, and the mean that start_subspace starts from)."""
    batches = h.batches(4)
    model, twin = h.tiny_model(), h.tiny_model()
    twa = TWA(sgd(model.parameters()), capacity=4, storage_dtype=storage)
    ref = TWA(sgd(twin.parameters()), capacity=4, storage_dtype=storage)
    h.train(model, twa, batches, 3)
    h.train(twin, ref, batches, 3)
    if not first:
        assert twa.collect() and ref.collect()
    good = h.params_of(model)
    poison(model, 2, bad)
    snap = Snapshot(model, twa)
    number = 0 if first else 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RankDeficientSampleWarning either
        with pytest.raises(ValueError, match=rf"TWA sample {number}: parameter 2 \(shape \[3, 8\]\) holds "
                                             rf"{kind}; refused, nothing changed \(collect\(skip_nonfinite=True\)"):
            twa.collect()
    snap.check()
    with torch.no_grad():
        for p, g in zip(model.parameters(), good):
            p.copy_(g)
    h.train(model, twa, batches, 7, first=3)
    h.train(twin, ref, batches, 7, first=3)
    assert twa.collect() and ref.collect()
    assert (twa.num_basis, twa.num_samples) == (ref.num_basis, ref.num_samples) == (1 + (not first),) * 2
    for a, b in zip(twa.basis, ref.basis):
        h.assert_bits_equal(a, b, "basis")
    twa.start_subspace("mean")
    ref.start_subspace("mean")
    for a, b in zip(model.parameters(), twin.parameters()):
        h.assert_bits_equal(a, b, "the mean start")
    assert torch.isfinite(flat(model.parameters())).all()


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_collect_skip_nonfinite_warns_and_does_not_count(h, storage):
    batches = h.batches(4)
    model, twin = h.tiny_model(), h.tiny_model()
    twa = TWA(sgd(model.parameters()), capacity=3, storage_dtype=storage)
    ref = TWA(sgd(twin.parameters()), capacity=3, storage_dtype=storage)
    samples = []
    for t, m in ((twa, model), (ref, twin)):
        h.train(m, t, batches, 3)
        assert t.collect()
    samples.append(flat(model.parameters()))
    good = h.params_of(model)
    poison(model, 0, float("nan"), (0, 0))
    poison(model, 0, float("inf"), (2, 3))
    poison(model, 3, float("nan"), (1,))
    snap = Snapshot(model, twa)
    with pytest.warns(NonFiniteSampleWarning, match=r"TWA sample 1: parameter 0 \(shape \[8, 6\]\) holds NaN and inf; "
                                                    r"skipped \(not counted\), the basis keeps 1 vectors"):
        assert twa.collect(skip_nonfinite=True) is False
    snap.check()
    with torch.no_grad():
        for p, g in zip(model.parameters(), good):
            p.copy_(g)
    for t, m in ((twa, model), (ref, twin)):
        h.train(m, t, batches, 8, first=3)
        assert t.collect(skip_nonfinite=True)  # a finite sample: as collect()
    samples.append(flat(model.parameters()))
    assert (twa.num_basis, twa.num_samples) == (2, 2)
    twa.start_subspace("mean")
    ref.start_subspace("mean")
    for a, b in zip(model.parameters(), twin.parameters()):
        h.assert_bits_equal(a, b, "the mean start")
    expected = torch.stack(samples).mean(0)  # the two good samples only
    tol = 1e-6 if storage == torch.float32 else 2e-3  # bfloat16: the unit vectors are rounded
    assert float((flat(model.parameters()) - expected).norm() / expected.norm()) < tol


def test_collect_tells_overflow_from_nonfinite(h):
    """Finite weights whose squared norm overflows float32 are no NaN/inf sample: a ValueError
    that says so, even with skip_nonfinite=True, and nothing changes."""
    model = h.tiny_model()
    twa = TWA(sgd(model.parameters()), capacity=3)
    assert twa.collect()
    with torch.no_grad():
        list(model.parameters())[1].fill_(3e19)  # 8 * 9e38 > float32 max; every value finite
    snap = Snapshot(model, twa)
    for skip in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"TWA sample 1: its squared norm overflows torch.float32 "
                                                 r"\(parameter values too large\); refused, nothing changed"):
                twa.collect(skip_nonfinite=skip)
        snap.check()


def test_collect_bad_skip_argument(h):
    model = h.tiny_model()
    twa = TWA(sgd(model.parameters()), capacity=2)
    snap = Snapshot(model, twa)
    for value in (1, "yes", None):
        with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
            twa.collect(skip_nonfinite=value)
        snap.check()


def test_float64_nonfinite_sample(h):
    model = h.tiny_model(dtype=torch.float64)
    twa = TWA(sgd(model.parameters()), capacity=2)
    poison(model, 1, float("-inf"), (4,))
    snap = Snapshot(model, twa)
    with pytest.raises(ValueError, match=r"TWA sample 0: parameter 1 \(shape \[8\]\) holds inf"):
        twa.collect()
    snap.check()
    with pytest.raises(RuntimeError, match="the basis is empty"):
        twa.start_subspace()


# --------------------------------------------------------------------------- from_checkpoints


def checkpoints(h, n=4):
    """n state dicts of a model trained between them."""
    model = h.tiny_model()
    opt = sgd(model.parameters())
    out = []
    for i in range(n):
        h.train(model, opt, h.batches(3), 3 * (i + 1), first=3 * i)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def target(h):
    """A model and an SGD with momentum state and a changed lr: what a failing call must not touch."""
    model = h.tiny_model(seed=9)
    base = sgd(model.parameters(), lr=0.123)
    h.train(model, base, h.batches(2), 2)
    return model, base


def test_from_checkpoints_refuses_a_nonfinite_checkpoint(h, tmp_path):
    sds = checkpoints(h)
    bad = dict(sds[2], **{"2.weight": sds[2]["2.weight"].clone()})
    bad["2.weight"][0, 5] = float("nan")
    torch.save(bad, tmp_path / "bad.pt")
    model, base = target(h)
    snap = Snapshot(model, base=base)
    for ckpts, where in (([sds[0], sds[1], bad, sds[3]], r"checkpoints\[2\]"),
                         ([sds[0], tmp_path / "bad.pt"], r"checkpoints\[1\] \(.*bad\.pt\)"),
                         ([{"state_dict": {"module." + k: v for k, v in bad.items()}}], r"checkpoints\[0\]")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=rf"{where}: '2.weight' holds NaN \(skip_nonfinite=True drops such "
                                                 r"checkpoints with a warning\)"):
                TWA.from_checkpoints(model, base, ckpts)
        snap.check()
    inf = dict(sds[1], **{"0.bias": torch.full((8,), float("inf"))})
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: '0.bias' holds inf"):
        TWA.from_checkpoints(model, base, [sds[0], inf])
    snap.check()
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        TWA.from_checkpoints(model, base, sds, skip_nonfinite="no")
    snap.check()


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_from_checkpoints_skip_nonfinite_drops_them_from_the_mean(h, tmp_path, storage):
    sds = checkpoints(h)
    bad = dict(sds[1], **{"0.weight": sds[1]["0.weight"].clone()})
    bad["0.weight"][3, 3] = float("inf")
    torch.save(bad, tmp_path / "bad.pt")
    model, twin = h.tiny_model(seed=9), h.tiny_model(seed=9)
    with pytest.warns(NonFiniteSampleWarning, match=r"checkpoints\[1\] \(.*bad\.pt\): '0.weight' holds inf; dropped "
                                                    r"\(not counted in the mean\)"):
        twa = TWA.from_checkpoints(model, sgd(model.parameters()), [sds[0], tmp_path / "bad.pt", sds[2], sds[3]],
                                   storage_dtype=storage, skip_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = TWA.from_checkpoints(twin, sgd(twin.parameters()), [sds[0], sds[2], sds[3]], capacity=4,
                                   storage_dtype=storage)
    assert (twa.num_basis, twa.num_samples, twa.capacity, twa.in_subspace) == (3, 3, 4, True)
    for a, b in zip(model.parameters(), twin.parameters()):
        h.assert_bits_equal(a, b, "mean of the good checkpoints")
    for a, b in zip(twa.basis, ref.basis):
        h.assert_bits_equal(a, b, "basis")
    expected = torch.stack([flat(sd.values()) for sd in (sds[0], sds[2], sds[3])]).mean(0)
    tol = 1e-6 if storage == torch.float32 else 2e-3  # bfloat16: the unit vectors are rounded
    assert float((flat(model.parameters()) - expected).norm() / expected.norm()) < tol


def test_from_checkpoints_skip_nonfinite_still_checks_everything_first(h):
    sds = checkpoints(h, 3)
    nan = dict(sds[0], **{"2.bias": torch.full((3,), float("nan"))})
    wrong = dict(sds[2], **{"2.bias": torch.zeros(4)})
    model, base = target(h)
    snap = Snapshot(model, base=base)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"checkpoints\[2\]: '2.bias' has shape \[4\]"):
            TWA.from_checkpoints(model, base, [nan, sds[1], wrong], skip_nonfinite=True)
        with pytest.raises(ValueError, match=r"every checkpoint \(2\) holds NaN/inf values: there is nothing to "
                                             "average"):
            TWA.from_checkpoints(model, base, [nan, nan], skip_nonfinite=True)
    assert seen == []  # no warning for a call that fails
    snap.check()


def test_from_checkpoints_all_zero_is_a_value_error_before_anything_changes(h):
    sds = checkpoints(h, 2)
    zeros = [{k: torch.zeros_like(v) for k, v in sd.items()} for sd in sds]
    model, base = target(h)
    snap = Snapshot(model, base=base)
    for init in ("mean", "current"):
        with pytest.raises(ValueError, match="every checkpoint's parameters are zero: there is no subspace"):
            TWA.from_checkpoints(model, base, zeros, init=init)
        snap.check()
    # A zero checkpoint among others is only rank deficient.
    with pytest.warns(RankDeficientSampleWarning, match="1 of 3 checkpoints"):
        twa = TWA.from_checkpoints(model, base, [zeros[0]] + sds)
    assert (twa.num_basis, twa.num_samples) == (2, 3)
    expected = (flat(sds[0].values()) + flat(sds[1].values())) / 3
    assert float((flat(model.parameters()) - expected).norm() / expected.norm()) < 1e-6


def test_from_checkpoints_underflowing_norms_restore_everything(h):
    """Tiny but nonzero weights pass the checks; their float32 norms underflow to 0 in the
    bfloat16 path's Gram-Schmidt, which the load then refuses with a ValueError."""
    tiny = [{k: torch.full_like(v, 1e-30 * (i + 1)) for k, v in sd.items()} for i, sd in enumerate(checkpoints(h, 2))]
    model, base = target(h)
    snap = Snapshot(model, base=base)
    with pytest.warns(RankDeficientSampleWarning):
        with pytest.raises(ValueError, match="every checkpoint's parameters are zero or too small to normalize"):
            TWA.from_checkpoints(model, base, tiny, storage_dtype=torch.bfloat16)
    snap.check()


class ReadOnce(Mapping):
    """A state dict whose entries can be read once: the second read fails, as a file replaced or
    lost between from_checkpoints' check and its load would."""

    def __init__(self, sd):
        self.sd, self.reads = sd, collections.Counter()

    def __getitem__(self, key):
        value = self.sd[key]  # KeyError for absent keys (Mapping.get's default)
        self.reads[key] += 1
        if self.reads[key] > 1:
            raise OSError(f"read error on {key!r}")
        return value

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)


@pytest.mark.parametrize("init", ["mean", "current"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_from_checkpoints_failing_after_writing_restores_model_and_optimizer(h, init, storage, monkeypatch):
    sds = checkpoints(h, 3)
    model, base = target(h)
    snap = Snapshot(model, base=base)
    if storage == torch.bfloat16:  # checked in one pass, loaded in a second: a second read can fail
        with pytest.raises(OSError, match="read error on '0.weight'"):  # checkpoint 0 is already written by then
            TWA.from_checkpoints(model, base, [sds[0], sds[1], ReadOnce(sds[2])], init=init, storage_dtype=storage)
    else:  # each checkpoint is read once; what can fail after writing is the start of the subspace
        start = TWA.start_subspace

        def start_then_fail(self, *args):
            start(self, *args)
            raise OSError("read error on '0.weight'")

        monkeypatch.setattr(TWA, "start_subspace", start_then_fail)
        with pytest.raises(OSError, match="read error on '0.weight'"):
            TWA.from_checkpoints(model, base, [sds[0], sds[1], ReadOnce(sds[2])], init=init, storage_dtype=storage)
        monkeypatch.undo()
    snap.check()
    # The same model and optimizer still work, as if the failed call never happened.
    twin, twin_base = target(h)
    twa = TWA.from_checkpoints(model, base, sds, init=init, storage_dtype=storage)
    ref = TWA.from_checkpoints(twin, twin_base, sds, init=init, storage_dtype=storage)
    assert (twa.num_basis, twa.num_samples) == (3, 3) and len(base.state) == 0
    for a, b in zip(model.parameters(), twin.parameters()):
        h.assert_bits_equal(a, b, "after the failed call")


def test_from_checkpoints_reads_each_checkpoint_once(h):
    """A float32 basis: names, shapes and values are checked on the one read that loads the
    checkpoint into its basis row."""
    sds = checkpoints(h, 3)
    model, base = target(h)
    twin, twin_base = target(h)
    once = [ReadOnce(sd) for sd in sds]
    twa = TWA.from_checkpoints(model, base, once)
    ref = TWA.from_checkpoints(twin, twin_base, sds)
    assert all(set(r.reads.values()) == {1} for r in once)
    assert (twa.num_basis, twa.num_samples) == (ref.num_basis, ref.num_samples) == (3, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        h.assert_bits_equal(a, b, "read once")


def test_from_checkpoints_float64_beyond_the_float32_basis(h):
    """A float64 checkpoint value that a float32 basis cannot hold is refused as non-finite,
    naming the entry (or dropped with skip_nonfinite=True)."""
    sds = checkpoints(h, 3)
    big = {k: v.double() for k, v in sds[1].items()}
    big["0.bias"] = big["0.bias"].clone()
    big["0.bias"][0] = 1e300
    model, base = target(h)
    snap = Snapshot(model, base=base)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: '0.bias' holds values beyond the range of the "
                                         r"basis' torch.float32"):
        TWA.from_checkpoints(model, base, [sds[0], big, sds[2]])
    snap.check()
    with pytest.warns(NonFiniteSampleWarning, match=r"checkpoints\[1\]: '0.bias' holds values beyond"):
        twa = TWA.from_checkpoints(model, base, [sds[0], big, sds[2]], skip_nonfinite=True)
    assert (twa.num_basis, twa.num_samples) == (2, 2)
    expected = (flat(sds[0].values()) + flat(sds[2].values())) / 2
    got = flat(model.parameters())
    assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_from_checkpoints_rejects_tensors_without_data(h):
    sds = checkpoints(h, 2)
    meta = dict(sds[1], **{"0.bias": torch.empty(8, device="meta")})
    model, base = target(h)
    snap = Snapshot(model, base=base)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]: '0.bias' is a torch.strided meta tensor, not a dense one"):
        TWA.from_checkpoints(model, base, [sds[0], meta])
    snap.check()


# --------------------------------------------------------------------------- load_state_dict


def trained_twa(h, seed=0, samples=2, lr=LR):
    model = h.tiny_model(seed=seed)
    twa = TWA(sgd(model.parameters(), lr=lr), capacity=4)
    batches = h.batches(3, seed=seed + 1)
    for i in range(samples):
        h.train(model, twa, batches, 3 * (i + 1), first=3 * i)
        assert twa.collect()
    return model, twa


def damaged(good, mutate):
    sd = copy.deepcopy(good)
    mutate(sd["twa"])
    return sd


def nan_in(t, row):
    t = t.clone()
    t[row].view(-1)[0] = float("nan")
    return t


LOAD_CASES = [
    ("missing num_basis", lambda s: s.pop("num_basis"), r"state dict\['twa'\] has no 'num_basis'"),
    ("missing num_samples", lambda s: s.pop("num_samples"), r"has no 'num_samples'"),
    ("missing in_subspace", lambda s: s.pop("in_subspace"), r"has no 'in_subspace'"),
    ("missing coefficient_sum", lambda s: s.pop("coefficient_sum"), r"has no 'coefficient_sum'"),
    ("negative num_basis", lambda s: s.__setitem__("num_basis", -1), r"num_basis -1 is not an int in \[0, 4\]"),
    ("negative num_samples", lambda s: s.__setitem__("num_samples", -3), r"num_samples -3 is not an int >= num_basis"),
    ("str num_basis", lambda s: s.__setitem__("num_basis", "2"), r"num_basis '2' is not an int"),
    ("str num_samples", lambda s: s.__setitem__("num_samples", "7"), r"num_samples '7' is not an int"),
    ("bool num_basis", lambda s: s.__setitem__("num_basis", True), r"num_basis True is not an int"),
    ("bool num_samples", lambda s: s.__setitem__("num_samples", True), r"num_samples True is not an int"),
    ("float num_samples", lambda s: s.__setitem__("num_samples", 2.0), r"num_samples 2.0 is not an int"),
    ("num_samples < num_basis", lambda s: s.__setitem__("num_samples", 1),
     r"num_samples 1 is not an int >= num_basis \(2\)"),
    ("in_subspace not bool", lambda s: s.__setitem__("in_subspace", 1), r"in_subspace 1 is not a bool"),
    ("basis shape", lambda s: s["basis"].__setitem__(2, torch.zeros(4, 8, 3)),
     r"basis\[2\] is \[4, 8, 3\] torch.float32, expected \[4, 3, 8\] torch.float32"),
    ("basis dtype", lambda s: s["basis"].__setitem__(0, s["basis"][0].double()),
     r"basis\[0\] is \[4, 8, 6\] torch.float64, expected \[4, 8, 6\] torch.float32"),
    ("basis not a tensor", lambda s: s["basis"].__setitem__(1, [0.0] * 8), r"basis\[1\] is list"),
    ("NaN in a basis row", lambda s: s["basis"].__setitem__(3, nan_in(s["basis"][3], 1)),
     r"basis\[3\] holds NaN in its rows \[0, 2\)"),
    ("inf in coefficient_sum", lambda s: s["coefficient_sum"].__setitem__(0, float("inf")),
     r"coefficient_sum holds inf"),
    ("coefficient_sum dtype", lambda s: s.__setitem__("coefficient_sum", s["coefficient_sum"].float()),
     r"coefficient_sum\[0\] is \[4\] torch.float32"),
    ("meta basis", lambda s: s["basis"].__setitem__(1, torch.empty(4, 8, device="meta")),
     r"basis\[1\] is a torch.strided meta tensor"),
]


@pytest.mark.parametrize("case, mutate, match", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_state_dict_damaged_field_changes_nothing(h, case, mutate, match):
    _, src = trained_twa(h)
    good = save_load(src.state_dict())
    model, twa = trained_twa(h, seed=5, samples=1, lr=0.123)  # momentum, a basis vector, another lr
    snap = Snapshot(model, twa)
    with pytest.raises(ValueError, match=match):
        twa.load_state_dict(damaged(good, mutate))
    snap.check()
    if case != "NaN in a basis row":
        return
    twa.load_state_dict(good)  # the undamaged one loads, bit for bit
    assert (twa.num_basis, twa.num_samples, twa.in_subspace) == (2, 2, False)
    assert twa.param_groups[0]["lr"] == LR
    for a, b in zip(twa.basis, src.basis):
        h.assert_bits_equal(a, b, "loaded basis")
    assert_same(twa.optimizer.state_dict(), src.optimizer.state_dict())


def test_load_state_dict_nonfinite_rows_past_num_basis_are_not_loaded(h):
    _, src = trained_twa(h)
    sd = save_load(src.state_dict())
    sd["twa"]["basis"][0][3, 0, 0] = float("nan")  # row 3 is not in use (num_basis 2)
    _, twa = trained_twa(h, seed=5, samples=1)
    twa.load_state_dict(sd)
    for a, b in zip(twa.basis, src.basis):
        h.assert_bits_equal(a, b, "rows in use loaded, the others zero")


def test_load_state_dict_bad_optimizer_section_loads_nothing(h):
    _, src = trained_twa(h)
    good = save_load(src.state_dict())
    model, twa = trained_twa(h, seed=5, samples=1, lr=0.123)
    snap = Snapshot(model, twa)
    bad = copy.deepcopy(good)
    bad["optimizer"]["param_groups"].append(dict(bad["optimizer"]["param_groups"][0]))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        twa.load_state_dict(bad)
    snap.check()


def test_load_state_dict_restores_the_base_when_a_later_step_fails(h):
    """The base optimizer is loaded and then something fails (here a load_state_dict post hook
    of the base that raises once): the base's state and lr come back."""
    _, src = trained_twa(h)
    good = save_load(src.state_dict())
    model, twa = trained_twa(h, seed=5, samples=1, lr=0.123)
    calls = []

    def hook(optimizer):
        calls.append(optimizer.param_groups[0]["lr"])
        if len(calls) == 1:
            raise RuntimeError("post hook failed")

    twa.optimizer.register_load_state_dict_post_hook(hook)
    snap = Snapshot(model, twa)
    with pytest.raises(RuntimeError, match="post hook failed"):
        twa.load_state_dict(good)
    assert calls == [LR, 0.123]  # loaded, then restored
    snap.check()


# --------------------------------------------------------------------------- add_param_group


class AppendThenRaise(torch.optim.SGD):
    """A base optimizer whose add_param_group appends the group and then fails."""

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if param_group.get("lr") == 0.5:
            raise RuntimeError("refused after appending")


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_add_param_group_failures_change_nothing(h, storage):
    model, twin = h.tiny_model(), h.tiny_model()
    head, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    base = AppendThenRaise(head, lr=LR, momentum=MOMENTUM)
    twa = TWA(base, capacity=3, storage_dtype=storage)
    groups = [dict(g) for g in base.param_groups]
    snap = Snapshot(model, twa)
    cases = [
        ({"params": [head[0]]}, ValueError, "some parameters appear in more than one parameter group"),  # torch's
        ({"params": [torch.zeros(3, dtype=torch.long)]}, TypeError, "parameter 2 has dtype torch.int64"),
        ({"params": [torch.zeros(3, device="meta", requires_grad=True)]}, ValueError, "parameter 2 is on meta"),
        ({"params": rest, "lr": 0.5}, RuntimeError, "refused after appending"),  # the base appended it
    ]
    for group, err, match in cases:
        with pytest.raises(err, match=match):
            twa.add_param_group(group)
        assert len(base.param_groups) == 1 and all(dict(g) == s for g, s in zip(base.param_groups, groups))
        snap.check()
    # Still the TWA it was: it matches, bit for bit, one that never saw the failed calls.
    twa.add_param_group({"params": rest, "lr": 0.01})
    twin_params = list(twin.parameters())
    ref = TWA(torch.optim.SGD(twin_params[:2], lr=LR, momentum=MOMENTUM), capacity=3, storage_dtype=storage)
    ref.add_param_group({"params": twin_params[2:], "lr": 0.01})
    batches = h.batches(3)
    for t, m in ((twa, model), (ref, twin)):
        for i in range(2):
            h.train(m, t, batches, 3 * (i + 1), first=3 * i)
            assert t.collect()
        t.start_subspace("mean")
        h.train(m, t, batches, 12, first=6)
    for a, b in zip(model.parameters(), twin.parameters()):
        h.assert_bits_equal(a, b, "after the failed add_param_group calls")


def test_add_param_group_after_a_skipped_sample(h):
    """A skipped NaN sample is not counted, so groups can still be added; the next sample spans
    the new parameters too (bfloat16: the float32 scratch is remade for them)."""
    model, twin = h.tiny_model(), h.tiny_model()
    params, twin_params = list(model.parameters()), list(twin.parameters())
    twa = TWA(torch.optim.SGD(params[:2], lr=LR), capacity=2, storage_dtype=torch.bfloat16)
    ref = TWA(torch.optim.SGD(twin_params[:2], lr=LR), capacity=2, storage_dtype=torch.bfloat16)
    good = h.params_of(model)
    poison(model, 1, float("nan"), (0,))
    with pytest.warns(NonFiniteSampleWarning, match="parameter 1"):
        assert twa.collect(skip_nonfinite=True) is False
    assert twa.num_samples == 0
    with torch.no_grad():
        for p, g in zip(params, good):
            p.copy_(g)
    twa.add_param_group({"params": params[2:]})
    ref.add_param_group({"params": twin_params[2:]})
    assert len(twa.basis) == 4
    assert twa.collect() and ref.collect()
    for a, b in zip(twa.basis, ref.basis):
        h.assert_bits_equal(a, b, "basis")
    assert twa.basis[3][0].abs().sum() > 0  # the new parameters are in the sample


# --------------------------------------------------------------------------- TWA follows the model


def test_twa_follows_storage_and_replaced_parameters():
    m = torch.nn.Linear(2, 2)
    opt = wavg_ext.TWA(torch.optim.SGD(m.parameters(), lr=0.1), capacity=3)
    opt.collect()
    new = torch.nn.Parameter(torch.full((2, 2), 3.0))
    opt.param_groups[0]["params"][0] = new  # the optimizer now trains `new` at position 0
    with torch.no_grad():
        m.bias.data = torch.full((2,), 5.0)  # new storage under the same parameter
    opt.collect()
    assert opt.num_basis == 2
    # The second sample is (new, the bias' new storage): it lies in the span of the basis.
    sample = torch.cat([new.detach().reshape(-1), m.bias.detach()]).double()
    rows = torch.cat([b[:2].reshape(2, -1) for b in opt.basis], dim=1).double()
    assert (rows.T @ (rows @ sample) - sample).abs().max().item() < 1e-5


def test_twa_refuses_changes_it_cannot_follow_and_changes_nothing():
    m = torch.nn.Linear(2, 2)
    opt = wavg_ext.TWA(torch.optim.SGD(m.parameters(), lr=0.1), capacity=3)
    opt.collect()
    basis = [b.clone() for b in opt.basis]
    opt.param_groups[0]["params"][1] = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"parameter 1 was replaced in param_groups by one of shape \[3\]"):
        opt.collect()
    opt.param_groups[0]["params"][1] = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError):
        opt.collect()
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(RuntimeError, match="added or removed behind the wrapper"):
        opt.step()
    assert opt.num_basis == 1 and opt.num_samples == 1
    assert all(torch.equal(a, b) for a, b in zip(basis, opt.basis))
