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
    demo.main(["--clean", "--epochs", "2", "--methods", "sgd,pwalks", "--no-progress", "--plot", str(png),
               "--json", str(out)])
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert list(saved["methods"]) == ["sgd", "pwalks"]
    assert len(saved["methods"]["pwalks"]["accuracy"]) == 2
    printed = capsys.readouterr().out
    assert "PWALKS" in printed and "environment: torch" in printed and "us per step" in printed


def test_label_noise_flips_that_share_of_the_training_labels_only():
    clean = demo.load_data(450, 0, val_size=150, train_images=600)
    noisy = demo.load_data(450, 0, val_size=150, train_images=600, label_noise=0.35)
    assert torch.equal(clean[0], noisy[0]) and torch.equal(clean[2], noisy[2]) and torch.equal(clean[3], noisy[3])
    assert len(clean[1]) == 600
    flipped = (clean[1] != noisy[1]).double().mean().item()
    assert abs(flipped - 0.35) < 0.06, flipped
    x_val, y_val = demo.load_validation(450, 0, 150, train_images=600, label_noise=0.35)
    assert len(y_val) == 150 and not any(bool((x_val[i] == clean[0]).flatten(1).all(1).any()) for i in range(5))


@pytest.fixture(scope="module")
def short_study():
    return demo.study(seeds=2, epochs=2, methods=demo.STUDY_METHODS)


def test_study_reports_every_row_over_the_seeds(short_study):
    assert short_study.seeds == [0, 1] and len(short_study.runs) == 2
    rows = {r["key"]: r for r in short_study.rows()}
    s = short_study.settings
    expected = ["sgd", "swa", "ema", "ema_warmup", "power_ema", f"power_ema_{s.sigma_rels[1]:g}",
                *(f"posthoc_{x:g}" for x in s.posthoc_sigma_rels), "lawa", "soup", "soup_epoch_average"]
    assert list(rows) == expected
    for key, row in rows.items():
        finals = [run.methods[key].final for run in short_study.runs]
        assert row["final"] == finals and abs(row["final_mean"] - sum(finals) / 2) < 1e-12, key
        deltas = [run.methods[key].final - run.methods["sgd"].final for run in short_study.runs]
        assert abs(row["delta_mean"] - sum(deltas) / 2) < 1e-12, key
        assert row["above"] == sum(d > 0 for d in deltas) and row["below"] == sum(d < 0 for d in deltas)
        assert all(len(run.methods[key].accuracy) == 2 for run in short_study.runs), key
    soup = short_study.runs[0].methods["soup"]
    assert soup.evaluated == ["greedy soup of 1 epoch averages", "greedy soup of 2 epoch averages"]
    assert short_study.runs[0].methods["lawa"].evaluated == ["LAWA mean of 1", "LAWA mean of 2"]
    table = short_study.table()
    assert "greedy soup" in table and "post-hoc" in table and "base" in table
    json.dumps(short_study.to_dict())
    assert "label" in demo.describe_study(short_study)


def test_study_cli_plot_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "study.png", tmp_path / "study.json"
    demo.main(["--seeds", "2", "--epochs", "1", "--methods", "sgd,lawa", "--no-progress", "--plot", str(png),
               "--json", str(out)])
    assert png.stat().st_size > 1000
    saved = json.loads(out.read_text())
    assert saved["seeds"] == [0, 1] and [r["key"] for r in saved["rows"]] == ["sgd", "lawa"]
    assert "seeds >/< SGD" in capsys.readouterr().out


def test_study_cli_rejects_mixed_modes(capsys):
    for argv, bad in ((["--seed", "3"], "--seed is for --clean"), (["--clean", "--seeds", "2"], "--seeds belongs"),
                      (["--full", "--seeds", "2"], "not both"), (["--label-noise", "0.95"], "label_noise"),
                      (["--train-images", "50"], "train_images")):
        with pytest.raises(SystemExit) as exc:
            demo.main(argv + ["--no-progress"])
        assert exc.value.code == 2
        assert bad in capsys.readouterr().err, argv
