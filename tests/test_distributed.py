"""wavg_ext under torch.distributed on CPU (gloo, 2 processes started with torchrun):
DDP and FSDP2 (fully_shard) runs of SWA, EMA, PSWA and TWA against one process on the
same global batches; what sharded TWA communicates; PostHocEMA's snapshots and their synthesis; torch.distributed.checkpoint save,
load and continue (same and another world size); BN recalibration across ranks.
The work itself is in distributed_worker.py; one torchrun run serves every test."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
METHODS = ["SWA", "EMA", "PSWA", "TWA", "SWA-skip"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")


def _torchrun(nproc: int, *args: str) -> str:
    """Runs `torchrun --standalone --nproc_per_node=nproc *args` (default: the worker) and
    returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not args or not args[0].startswith("-m") and not args[0].endswith(".py"):
        args = (str(WORKER), *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"torchrun --nproc_per_node={nproc} failed ({proc.returncode}):\n{tail}")
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("world2")
    _torchrun(2, str(two))
    one = tmp_path_factory.mktemp("world1")
    _torchrun(1, str(one), "--resume-from", str(two))
    return (torch.load(two / "results.pt", weights_only=False),
            torch.load(one / "results.pt", weights_only=False))


def _rel(got, expected):
    a = torch.cat([t.reshape(-1).double() for t in got])
    b = torch.cat([t.reshape(-1).double() for t in expected])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_equals_one_process_on_the_global_batches(runs, kind, method):
    results, _ = runs
    assert results["world"] == 2
    got, ref = results[f"{kind}-{method}"], results[f"reference-{method}"]
    assert got["rank_spread"] == 0.0, "ranks disagree"
    assert _rel(got["weights"], ref["weights"]) <= 1e-6
    assert ("averages" in got) == ("averages" in ref)
    if "averages" in ref:
        assert _rel(got["averages"], ref["averages"]) <= 1e-6
    if method == "TWA":
        assert got["num_basis"] == ref["num_basis"] == 3
        torch.testing.assert_close(got["coefficients"], ref["coefficients"], rtol=1e-6, atol=1e-7)


def test_twa_from_checkpoints_sharded(runs):
    """TWA.from_checkpoints under FSDP2 (each rank orthonormalizes its shards of the three
    snapshots, Gram matrices summed over ranks) equals one process."""
    results, _ = runs
    got, ref = results["from-checkpoints-fsdp"], results["reference-from-checkpoints"]
    assert got["num_basis"] == ref["num_basis"] == 3
    assert _rel(got["weights"], ref["weights"]) <= 1e-6
    torch.testing.assert_close(got["coefficients"], ref["coefficients"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_posthoc_ema_snapshots_and_synthesis(runs, kind):
    """PostHocEMA under DDP writes whole snapshots from rank 0; under FSDP2 every rank writes its
    shards. synthesize_ema puts them into a model sharded alike (each rank its own files) and
    into a whole model in one process: both equal one process's synthesis."""
    results, _ = runs
    got, ref = results[f"posthoc-{kind}"], results["reference-posthoc"]
    snapshots = len(ref["files"])
    assert snapshots == 12 and all(f.startswith("posthoc-ema-") for f in ref["files"])  # 24 steps, every 2
    if kind == "fsdp":
        assert len(got["files"]) == 2 * snapshots
        assert sum(".rank00001-of-00002.pt" in f for f in got["files"]) == snapshots
    else:
        assert got["files"] == ref["files"]
    torch.testing.assert_close(got["coefficients"], ref["coefficients"], rtol=0, atol=0)
    assert _rel(got["sharded"], ref["sharded"]) <= 1e-6
    assert _rel(got["whole"], ref["sharded"]) <= 1e-6


def test_sharded_twa_all_reduces_k_floats_per_step(runs):
    """Under FSDP2 a TWA step communicates one all-reduce of k = 3 values (the dots),
    not a D-float vector; under DDP none at all (replicas are whole)."""
    results, _ = runs
    comm = results["fsdp-TWA"]["comm_per_step"]
    assert len(comm) == 12 and all(c == (1, 3) for c in comm), comm


@pytest.mark.parametrize("method", ["SWA", "TWA"])
def test_checkpoint_resume_is_bit_identical(runs, method):
    results, _ = runs
    ck = results[f"ckpt-{method}"]
    for key in ("weights", "averages"):
        for a, b in zip(ck["straight"].get(key, []), ck["resumed"].get(key, [])):
            assert torch.equal(a, b), f"{method} {key} differ after resuming"
    if method == "TWA":
        assert torch.equal(ck["straight"]["coefficients"], ck["resumed"]["coefficients"])


@pytest.mark.parametrize("method", ["SWA", "TWA"])
def test_checkpoint_loads_into_another_world_size(runs, method):
    """Saved on 2 ranks (FSDP2 shards), loaded and continued on 1: the same as continuing on 2."""
    results, resumed = runs
    assert resumed["world"] == 1
    straight, got = results[f"ckpt-{method}"]["straight"], resumed[f"resume-{method}"]
    assert _rel(got["weights"], straight["weights"]) <= 1e-6
    if "averages" in straight:
        assert _rel(got["averages"], straight["averages"]) <= 1e-6


def test_update_bn_across_ranks(runs):
    """update_bn(process_group=...) leaves every rank the statistics one process computes
    over all ranks' batches."""
    results, _ = runs
    bn = results["bn"]
    assert bn["spread"] == 0.0
    assert bn["used"] == 24 and bn["num_batches_tracked"] == 48
    torch.testing.assert_close(bn["stats"], bn["reference"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,wrap", [("swa", "fsdp"), ("twa", "fsdp"), ("twa", "ddp")])
def test_readme_example_runs(tmp_path, method, wrap):
    """The README's torchrun example (examples/distributed.py), shortened."""
    out = _torchrun(2, str(HERE.parent / "examples" / "distributed.py"), "--method", method, "--wrap", wrap,
                    "--epochs", "4", "--checkpoint", str(tmp_path / "ckpt"))
    assert f"{wrap} on 2 ranks" in out and "test accuracy" in out
    assert any(tmp_path.joinpath("ckpt").iterdir())


def test_distributed_benchmark_runs():
    out = _torchrun(2, "-m", "wavg_ext.bench.distributed", "--shapes", "many_small", "--k", "3", "--repeats", "2")
    lines = [line for line in out.splitlines() if line.strip().startswith(("project:", "collect:"))]
    assert len(lines) == 4
    sharded = lines[0].split()
    assert sharded[-2] == "3" and sharded[-1] == "12"  # one all-reduce of k = 3 floats


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_skip_nonfinite_skips_on_every_rank(runs, kind):
    """The poisoned sample (a NaN in one rank's shard under FSDP2) is skipped by every rank,
    as by one process: one skip, the same count, and finite averages equal to the reference."""
    results, _ = runs
    got, ref = results[f"{kind}-SWA-skip"], results["reference-SWA-skip"]
    assert (got["num_skipped"], got["num_averaged"]) == (ref["num_skipped"], ref["num_averaged"])
    assert ref["num_skipped"] == 1
    assert all(bool(torch.isfinite(a).all()) for a in got["averages"])


def test_sharded_vectors_describes_plain_tensors():
    """One process, plain tensors: nothing sharded, every tensor whole; the description
    (what wavg_ext.ops.basis reads) is public and read-only."""
    from wavg_ext.distributed import ShardedVectors

    vectors = ShardedVectors([torch.zeros(3), torch.zeros(2, 2), torch.zeros(5)])
    assert vectors.group is None and vectors.world == 1 and not vectors.is_sharded
    assert vectors.sharded == (False, False, False)
    assert vectors.sharded_indices == () and vectors.whole_indices == (0, 1, 2)
    for name in ("group", "world", "is_sharded", "sharded", "sharded_indices", "whole_indices"):
        with pytest.raises(AttributeError):
            setattr(vectors, name, None)
    empty = ShardedVectors([])
    assert empty.sharded == () and empty.sharded_indices == () and empty.whole_indices == ()
