"""pytest-benchmark suite over the TWA kernels (``python -m wavg_ext.bench --suite twa``).

Each test first checks its method's result once (the projection against the paper's
dense way, the orthonormalization's orthogonality), then benchmarks it. With
``--benchmark-disable`` (CI) each body runs once, as a smoke test. No test asserts
anything about timings.
"""

from __future__ import annotations

import pytest
import torch

from wavg_ext import build_info, ops
from wavg_ext.bench import common
from wavg_ext.bench import twa as bench_twa

CUDA_OK = torch.cuda.is_available() and build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")])]
SHAPES = common.SHAPE_SETS["resnet50"]()


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def projection_setup(request):
    storage = torch.float32 if request.param == "fp32" else torch.bfloat16
    basis = bench_twa.orthonormal_basis(SHAPES, 10, storage, torch.device("cpu"))
    return request.param, basis


@pytest.mark.parametrize("method", ["project_", "paper"])
def test_projection(benchmark, projection_setup, method):
    storage, basis = projection_setup
    benchmark.group = f"project-resnet50-k10-{storage}"
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    p = torch.cat([b.reshape(10, -1).float() for b in basis], dim=1)
    g = torch.cat([x.reshape(-1) for x in grads])
    expected = (p @ g) @ p

    if method == "project_":
        def run():
            ops.project_(grads, basis, 10)
    else:
        def run():
            bench_twa.paper_project(p, grads)
    run()
    got = torch.cat([x.reshape(-1) for x in grads])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["orthonormalize_many_", "sequential_cgs2"])
def test_orthonormalize(benchmark, device, method):
    case = bench_twa.OrthoCase("resnet50", 16, limit=600_000)
    benchmark.group = f"{case.id}-{device}"
    snaps = [torch.randn(case.n, *s, device=device) for s in case.shape_list()]
    basis = ops.new_basis([torch.empty(s, device=device) for s in case.shape_list()], case.n)

    def run():
        for b, s in zip(basis, snaps):
            b.copy_(s)
        if method == "orthonormalize_many_":
            assert ops.orthonormalize_many_(basis, 0, case.n).accepted == case.n
        else:
            for j in range(case.n):
                ops.orthonormalize_(basis, j)

    run()
    gram = sum(b.reshape(case.n, -1).double() @ b.reshape(case.n, -1).double().T for b in basis)
    assert (gram - torch.eye(case.n, dtype=torch.float64, device=device)).abs().max() <= 1e-5
    benchmark(run)


def test_from_checkpoints(benchmark, tmp_path):
    """TWA.from_checkpoints end to end on saved checkpoints (the suite's from_checkpoints
    case, small): the model starts at the checkpoints' mean, in a basis of all of them."""
    from wavg_ext.bench.common import ParamHolder
    from wavg_ext.optim import TWA

    case = bench_twa.CheckpointsCase("resnet50", 6, limit=300_000)
    benchmark.group = case.id
    shapes = case.shape_list()
    g = torch.Generator().manual_seed(0)
    ckpts = [[torch.randn(s, generator=g) for s in shapes] for _ in range(case.n)]
    paths = []
    for j, tensors in enumerate(ckpts):
        paths.append(str(tmp_path / f"c{j}.pt"))
        torch.save({f"params.{i}": t for i, t in enumerate(tensors)}, paths[-1])

    def run():
        model = ParamHolder([torch.zeros(s) for s in shapes])
        twa = TWA.from_checkpoints(model, torch.optim.SGD(model.parameters(), lr=0.1), paths)
        return model, twa

    model, twa = run()
    assert twa.num_basis == case.n
    for i, p in enumerate(model.parameters()):
        mean = torch.stack([c[i].double() for c in ckpts]).mean(0)
        torch.testing.assert_close(p.double(), mean, rtol=1e-5, atol=1e-5)
    benchmark(run)
