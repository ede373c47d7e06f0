"""python -m wavg_ext.demo: short runs of the digits demo (a few seconds on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install wavg_ext[demo])")

from wavg_ext import demo  # noqa: E402

# SWA, EMA, one periodic method of each kind (per-epoch PSWA, multi-epoch periodic SWA), the head-stage
# pair (TWA and the SWA of its samples) and the baseline.
METHODS = ["sgd", "swa", "ema", "pswa", "periodic_swa", "swa_head", "twa"]
EPOCHS = 3


@pytest.fixture(scope="module")
def short_run():
    threads = torch.get_num_threads()
    result = demo.run(epochs=EPOCHS, methods=",".join(METHODS), seed=0)
    assert torch.get_num_threads() == threads, "run() must restore the thread count"
    return result


def test_short_run_reports_every_method(short_run):
    assert list(short_run.methods) == METHODS
    # The head-stage methods stop early: 2 sampled epochs, then (TWA) 1 epoch in their span.
    assert short_run.settings.twa_plan == (2, 1)
    for name, r in short_run.methods.items():
        epochs = {"swa_head": 2}.get(name, EPOCHS)
        assert len(r.accuracy) == len(r.train_seconds) == len(r.evaluated) == epochs, name
        assert r.steps == epochs * short_run.settings.steps_per_epoch, name
        assert all(0.0 <= a <= 1.0 for a in r.accuracy), (name, r.accuracy)
        # Chance is 10%; 3 epochs reach ~85-90% on this split.
        assert r.final > 0.5, (name, r.accuracy)
        assert r.best == max(r.accuracy) and r.train_time > 0, name
    # Each method reports the model it yields.
    swa, ema, pswa, periodic = (short_run.methods[n] for n in ("swa", "ema", "pswa", "periodic_swa"))
    assert swa.evaluated[-1].startswith("SWA average of") and swa.bn_seconds[-1] > 0
    assert all(e == "EMA weights" for e in ema.evaluated)
    assert all(e == "model (average assigned)" for e in pswa.evaluated) and sum(pswa.bn_seconds) > 0
    assert periodic.evaluated[-1] == "model (average assigned)"
    sgd, swa_head, twa = (short_run.methods[n] for n in ("sgd", "swa_head", "twa"))
    assert swa_head.evaluated[-1] == "SWA average of 2" and swa_head.bn_seconds[-1] > 0
    assert twa.evaluated == ["model", "TWA start: mean of 2 samples", "model in the span of 2 samples"]
    assert twa.accuracy[0] == sgd.accuracy[0]  # the head stage is the backbone's own training
    assert twa.bn_seconds[1] > 0  # BN recalibrated for the samples' mean

    table = short_run.table()
    for name in METHODS:
        assert demo.METHODS[name] in table
    assert "vs SGD" in table and "base" in table and "epochs" in table
    header = demo.describe(short_run)
    assert "cpu_capability" in header and torch.__version__ in header and "TWA (head stage)" in header
    doc = short_run.to_dict()
    json.dumps(doc)  # serializable as is
    assert doc["methods"]["pswa"]["accuracy"] == pswa.accuracy


def test_same_seed_same_results(short_run):
    again = demo.run(epochs=EPOCHS, methods=METHODS, seed=0)
    for name in METHODS:
        assert again.methods[name].accuracy == short_run.methods[name].accuracy, name
    other = demo.run(epochs=EPOCHS, methods=["sgd"], seed=1)
    assert other.methods["sgd"].accuracy != short_run.methods["sgd"].accuracy  # the seed is used


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'adam'"):
        demo.run(epochs=1, methods="sgd,adam")
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        demo.run(epochs=0)
    with pytest.raises(ValueError, match="bn_fraction"):
        demo.run(epochs=1, bn_fraction=0.0)
    with pytest.raises(ValueError, match="twa_lr"):
        demo.run(epochs=1, twa_lr=0.0)
    with pytest.raises(ValueError, match="twa_head"):
        demo.run(epochs=1, twa_head=1.5)


def test_one_epoch_twa_only_averages():
    result = demo.run(epochs=1, methods="twa")
    assert result.settings.twa_plan == (1, 0)
    assert result.methods["twa"].evaluated == ["TWA start: mean of 1 samples"]


def test_cli_rejects_bad_arguments(capsys):
    for argv, bad in ((["--methods", "sgd,nope"], "'nope'"), (["--epochs", "0"], "got 0")):
        with pytest.raises(SystemExit) as exc:
            demo.main(argv + ["--no-progress"])
        assert exc.value.code == 2
        assert bad in capsys.readouterr().err


def test_cli_plot_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "curves.png", tmp_path / "results.json"
    demo.main(["--epochs", "2", "--methods", "sgd,pwalks", "--no-progress", "--plot", str(png), "--json", str(out)])
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert list(saved["methods"]) == ["sgd", "pwalks"]
    assert len(saved["methods"]["pwalks"]["accuracy"]) == 2
    printed = capsys.readouterr().out
    assert "PWALKS" in printed and "environment: torch" in printed and "us per step" in printed
