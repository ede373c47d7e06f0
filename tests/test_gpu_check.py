"""scripts/gpu_check.sh, the one-shot GPU check, cannot run here without a GPU: its shell
syntax, its summary table (scripts/gpu_summary.py) on a benchmark JSON made on the CPU
by the same command it runs, and the project_ case it asks the benchmark for."""

from __future__ import annotations

import json
import pathlib
import runpy
import subprocess

import torch

from wavg_ext.bench import dropin as bench_dropin
from wavg_ext.bench import ops as bench_ops
from wavg_ext.bench import twa as bench_twa
from wavg_ext.bench.__main__ import main as bench_main

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], check=True)


def test_its_benchmark_cases_exist():
    ids = [c.id for c in bench_ops.all_cases()]
    assert any(i.startswith("ema_-gpt2") for i in ids) and any(i.startswith("ema_-many_small") for i in ids)
    cuda_ids = [c.id for c in bench_twa.all_cases(False, torch.device("cuda"))]
    assert "project_-gpt2-k10-fp32" in cuda_ids and "project_-gpt2-k10-bf16" in cuda_ids
    assert not any("gpt2" in c.id for c in bench_twa.all_cases(False, torch.device("cpu")))
    assert sum("gpt2" in c.id for c in bench_dropin.all_cases()) == 10  # gpu_check.sh: --suite dropin --cases gpt2


def test_summary_table_from_a_benchmark_run(tmp_path):
    bench_main(["--suite", "ops", "--device", "cpu", "--cases", "ema_-many_small-fp32", "--quick",
                "--repeats", "2", "--json", str(tmp_path / "bench_ops.json")])
    rows = [dict(case="project_-gpt2-k10-fp32", method="project_", median_ms=12.5, gbps=812.0),
            dict(case="project_-gpt2-k10-fp32", method="paper", median_ms=40.0, gbps=254.0)]
    (tmp_path / "bench_project.json").write_text(json.dumps(dict(env={}, twa_rows=rows)))
    bench_main(["--suite", "dropin", "--device", "cpu", "--cases", "averaged_model-ema-resnet50-fp32", "--quick",
                "--repeats", "2", "--json", str(tmp_path / "bench_dropin.json")])
    (tmp_path / "stages.txt").write_text(
        "build              ok               71s  /out/build.log\n"
        "memcheck           FAILED rc=9      40s  /out/memcheck.log\n")
    text = runpy.run_path(str(REPO / "scripts" / "gpu_summary.py"))["summary"](str(tmp_path))
    lines = text.splitlines()
    assert "| build | ok | 71 |" in lines and "| memcheck | FAILED rc=9 | 40 |" in lines
    row = next(line for line in lines if line.startswith("| ema_-many_small-fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    floor, fused = float(cells[1]), float(cells[2])
    assert 0 < floor and 0 < fused and cells[4] != "-" and cells[5] != "-"  # lerp and AveragedModel timed
    assert "| project_-gpt2-k10-fp32 | project_ | 12.500 | 812 |" in lines
    assert any(line.startswith("copy ceiling") for line in lines)
    dropin = [line for line in lines if line.startswith("| averaged_model-ema-resnet50-fp32 |")]
    assert [line.split("|")[2].strip() for line in dropin] == ["torch_averaged_model", "wavg_ext_averaged_model"]
