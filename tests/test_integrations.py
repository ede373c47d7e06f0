"""The framework callbacks on real tiny fits: wavg_ext.integrations.lightning.WeightAveraging
(Lightning Trainer, automatic and manual optimization, checkpoint resume) and
wavg_ext.integrations.transformers.WeightAveragingCallback (Hugging Face Trainer). Each
average is checked against the same wavg_ext class run by hand on the same steps. Skipped
where the framework is not installed (CI installs both)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import wavg_ext

F64 = torch.float64


def test_import_wavg_ext_needs_no_framework():
    code = ("import sys, wavg_ext, wavg_ext.integrations; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_repo()))
    assert proc.returncode == 0, proc.stderr


def _repo():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[1]


def _data(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))


# ------------------------------------------------------------------------------ Lightning --
def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _module(manual: bool):
    L = _lightning()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.automatic_optimization = not manual
            self.seen_in_validation = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = (self.net(x) - y).pow(2).mean()
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def validation_step(self, batch, batch_idx):
            self.seen_in_validation.append([p.detach().clone() for p in self.net.parameters()])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Module()


def _trainer(callbacks, epochs=2, **kwargs):
    L = _lightning()
    return L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     **{"enable_checkpointing": False, **kwargs})


def _by_hand(method, kwargs, epochs=2):
    """The same training as the LightningModule's, with the wavg_ext class run directly."""
    net = _net()
    base = torch.optim.SGD(net.parameters(), lr=0.05)
    if method == "model_ema":
        avg, opt = wavg_ext.ModelEMA(net, **kwargs), base
    else:
        avg = opt = {"ema": wavg_ext.EMA, "swa": wavg_ext.SWA}[method](base, module=net, **kwargs)
    step = 0
    for _ in range(epochs):
        net.train()
        for x, y in _data():
            opt.zero_grad()
            (net(x) - y).pow(2).mean().backward()
            opt.step()
            step += 1
            if method == "model_ema":
                avg.update(net, step=step)
    return net, avg


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("method,kwargs", [("ema", dict(decay=0.5)), ("swa", dict(start=2)),
                                           ("model_ema", dict(decay=0.5))])
def test_lightning_callback_averages_like_the_class(method, kwargs, manual):
    from wavg_ext.integrations.lightning import WeightAveraging

    module = _module(manual)
    cb = WeightAveraging(method, **kwargs)
    _trainer([cb]).fit(module, _data(), _data(32))
    net, avg = _by_hand(method, kwargs)
    ours = list(cb.engine.module.parameters()) if method == "model_ema" else cb.engine.averaged_parameters()
    theirs = list(avg.module.parameters()) if method == "model_ema" else avg.averaged_parameters()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for p, q in zip(module.net.parameters(), net.parameters()):  # training weights back after validation
        assert torch.equal(p, q)
    # The last validation ran on the averaged weights.
    for seen, a in zip(module.seen_in_validation[-1], ours):
        assert torch.equal(seen, a)


def test_lightning_pswa_with_bn_recalibration_assigns_each_epoch():
    from wavg_ext.integrations.lightning import WeightAveraging

    module = _module(False)
    cb = WeightAveraging("pswa", sample_fraction=0.5, bn_fraction=1.0)
    _trainer([cb]).fit(module, _data(), _data(32))
    assert type(cb.engine).__name__ == "PSWA" and cb.engine.period == 4 and cb.engine.period_index == 2
    # evaluated as they are: the model holds each epoch's assigned average
    assert all(torch.equal(s, p) for s, p in zip(module.seen_in_validation[-1], module.net.parameters()))


@pytest.mark.parametrize("method", ["ema", "model_ema"])
def test_lightning_checkpoint_resume_continues_the_average(tmp_path, method):
    L = _lightning()
    from wavg_ext.integrations.lightning import WeightAveraging

    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = _module(False)
    _trainer([WeightAveraging(method, decay=0.5), ckpt], epochs=1, enable_checkpointing=True).fit(first, _data())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # The optimizer entry is the base optimizer's: the checkpoint loads without the callback too.
    assert "wrapper" not in saved["optimizer_states"][0] and "state" in saved["optimizer_states"][0]
    resumed_cb = WeightAveraging(method, decay=0.5)
    resumed = _module(False)
    _trainer([resumed_cb], epochs=2).fit(resumed, _data(), ckpt_path=str(tmp_path / "last.ckpt"))
    straight_cb = WeightAveraging(method, decay=0.5)
    _trainer([straight_cb], epochs=2).fit(_module(False), _data())
    get = (lambda cb: list(cb.engine.module.parameters())) if method == "model_ema" else \
        (lambda cb: cb.engine.averaged_parameters())
    for a, b in zip(get(resumed_cb), get(straight_cb)):
        assert torch.equal(a, b)


def test_lightning_bad_arguments():
    from wavg_ext.integrations.lightning import WeightAveraging

    with pytest.raises(ValueError, match="method must be one of"):
        WeightAveraging("nope")
    with pytest.raises(ValueError, match="bn_fraction is for the per-epoch methods"):
        WeightAveraging("ema", bn_fraction=0.5)


# --------------------------------------------------------------------------- transformers --
def _hf():
    return pytest.importorskip("transformers")


class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.seen_in_eval = []

    def forward(self, x, labels=None):
        out = self.net(x)
        if not self.training:
            self.seen_in_eval.append([p.detach().clone() for p in self.net.parameters()])
        loss = (out - labels).pow(2).mean() if labels is not None else None
        return {"loss": loss, "logits": out}


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_transformers_callback_averages_evaluates_and_saves(tmp_path):
    transformers = _hf()
    from wavg_ext.integrations.transformers import STATE_FILE, WeightAveragingCallback

    class Recorder(transformers.TrainerCallback):
        """The model's weights after each optimizer step (before ours runs: added first)."""

        def __init__(self):
            self.weights = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights.append([p.detach().double().clone() for p in model.net.parameters()])

    model = _Regressor()
    recorder, cb = Recorder(), WeightAveragingCallback(decay=0.5)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          eval_strategy="steps", eval_steps=3, save_steps=3, report_to=[],
                                          use_cpu=True, learning_rate=0.01, logging_steps=100, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dicts(48), eval_dataset=_Dicts(8),
                                   callbacks=[recorder, cb])
    trainer.train()
    # The EMA of the recorded weights (the first update copies), in float64.
    ref = None
    for i, w in enumerate(recorder.weights):
        ref = w if i == 0 else [0.5 * r + 0.5 * x for r, x in zip(ref, w)]
    for a, r in zip(cb.average.module.net.parameters(), ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-6, atol=1e-6)
    # The evaluation at step 6 ran on the averages; training weights are back after.
    assert all(torch.equal(s, a) for s, a in zip(model.seen_in_eval[-1], cb.average.module.net.parameters()))
    assert all(torch.equal(p.double(), w) for p, w in zip(model.net.parameters(), recorder.weights[-1]))
    # Checkpoints hold the averages as the model's weights, and the average's own state.
    ckpt = tmp_path / "checkpoint-6"
    assert (ckpt / STATE_FILE).exists()
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    for (name, a) in cb.average.module.named_parameters():
        assert torch.equal(saved[name], a), name


# ------------------------------------------------------------------------ optimizer proxies --
def _trained_ema(steps=3):
    net = _net()
    ema = wavg_ext.EMA(torch.optim.SGD(net.parameters(), lr=0.05), decay=0.5, module=net)
    for x, y in list(_data())[:steps]:
        ema.zero_grad()
        (net(x) - y).pow(2).mean().backward()
        ema.step()
    return net, ema


def test_lightning_optimizer_proxy_reaches_the_wrapper_state():
    """Through LightningOptimizer (what self.optimizers() returns), swap/reset/averaged act on
    the wrapper itself: its swapped-state guards hold for every caller."""
    _lightning()
    from lightning.pytorch.core.optimizer import LightningOptimizer

    net, ema = _trained_ema()
    proxy = LightningOptimizer(ema)
    assert isinstance(proxy, wavg_ext.EMA) and proxy.num_averaged == ema.num_averaged == 4
    training = [p.detach().clone() for p in net.parameters()]
    proxy.swap()
    assert ema.swapped and proxy.swapped
    assert all(torch.equal(p, a) for p, a in zip(net.parameters(), ema.averaged_parameters()))
    with pytest.raises(RuntimeError, match="swap"):
        ema.step()  # the wrapper knows it is swapped
    with pytest.raises(RuntimeError, match="reset"):
        proxy.reset()
    proxy.swap()
    assert not ema.swapped and all(torch.equal(p, t) for p, t in zip(net.parameters(), training))
    proxy.reset()
    assert ema.num_averaged == 0 and proxy.num_averaged == 0
    assert "_stash" not in proxy.__dict__ and "_num" not in proxy.__dict__  # nothing written on the proxy
    assert wavg_ext.optim.find_averaging(proxy) is ema


def test_accelerate_proxy_and_find_averaging():
    accelerate = pytest.importorskip("accelerate")
    net = _net()
    ema = wavg_ext.EMA(torch.optim.SGD(net.parameters(), lr=0.05), decay=0.5, module=net)
    accelerator = accelerate.Accelerator(cpu=True)
    net, opt = accelerator.prepare(net, ema)
    for x, y in list(_data())[:3]:
        opt.zero_grad()
        accelerator.backward((net(x) - y).pow(2).mean())
        opt.step()
    with pytest.raises(AttributeError, match="averaged"):
        opt.averaged  # accelerate forwards no wrapper method: loud, and find_averaging reaches it
    found = wavg_ext.optim.find_averaging(opt)
    assert found is ema and ema.num_averaged == 4
    with found.averaged():
        assert all(torch.equal(p, a) for p, a in zip(net.parameters(), ema.averaged_parameters()))
    with pytest.raises(TypeError, match="no wavg_ext averaging optimizer behind SGD"):
        wavg_ext.optim.find_averaging(torch.optim.SGD(_net().parameters(), lr=0.1))
