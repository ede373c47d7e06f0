"""The CUDA emulation itself (wavg_ext.testing.cuda_emulation, csrc/cuda/emulation): the
layer's barrier, shuffle, racecheck, memcheck and launch-limit behaviour on its own test
kernels, the public switch, and that ops inside it really run the emulated CUDA kernels.
The CUDA kernels' correctness under emulation is tested by every test module through the
`device` fixture's "emulated" parameter."""

from __future__ import annotations

import pathlib
import threading

import pytest
import torch

import wavg_ext
from wavg_ext import _C, ops
from wavg_ext import testing as wtesting

BUILT = bool(wavg_ext.build_info().get("cuda_emulation"))
pytestmark = [pytest.mark.cuda_emulation,
              pytest.mark.skipif(not BUILT, reason="built without the emulated CUDA kernels")]
REPO = pathlib.Path(__file__).resolve().parents[1]


def selftest(name):
    return _C._cuda_emulation_selftest(name)


def numbers(text, prefix):
    assert text.startswith(prefix), text
    return [float(v) for v in text[len(prefix):].split(",")]


# ---- the layer on its own kernels ------------------------------------------------------

def test_build_info_says_the_emulated_kernels_are_built():
    assert wavg_ext.build_info()["cuda_emulation"] is True
    assert wtesting.cuda_emulation_available()


def test_shared_tree_reduction_with_barriers_is_exact():
    values = [i % 97 + 0.25 for i in range(512)]
    assert numbers(selftest("tree_sum"), "sums ") == [sum(values[:256]), sum(values[256:])]


def test_missing_barrier_in_a_tree_reduction_is_a_reported_race():
    out = selftest("tree_sum_missing_barrier")
    assert out.startswith("error: ") and "racecheck: shared" in out and "no __syncthreads" in out


def test_warp_shuffles_then_shared_memory_sum():
    assert numbers(selftest("shuffle_sum"), "sum ") == [sum(i * 0.5 for i in range(256))]


def test_shuffle_flavours_hand_each_lane_what_cuda_does():
    got = [int(v) for v in selftest("shuffle_kinds").split(",")]
    expected = []
    for lane in range(32):
        down = lane + 3 if lane + 3 < 32 else lane
        up = lane - 5 if lane >= 5 else lane
        xor = lane ^ 6
        width16 = lane // 16 * 16 + 7
        expected += [down, up, xor, width16]
    assert got == expected


def test_three_dimensional_grid_and_block_coordinates():
    got = [int(v) for v in selftest("coordinates").split(",")]
    blocks, threads = 2 * 3 * 2, 4 * 2 * 3
    assert got == [b * 1000 + t for b in range(blocks) for t in range(threads)]


@pytest.mark.parametrize("name,message", [
    ("shared_race", "racecheck: shared write after a write by another thread"),
    ("shared_uninitialized", "initcheck: shared read of an element no thread of the block has written"),
    ("shared_index", "memcheck: shared write with an index outside the array"),
    ("global_past_end", "memcheck: 4-byte global read at"),
    ("misaligned_vector", "memcheck: misaligned 16-byte global read"),
    ("divergent_barrier", "__syncthreads reached by 64 of 128 threads"),
    ("partial_warp_shuffle", "deadlock: 16 threads wait at __syncthreads, 16 at a warp sync"),
    ("block_too_large", "invalid configuration argument: block (1025, 1, 1)"),
    ("grid_y_too_large", "invalid configuration argument: grid (1, 65536, 1)"),
])
def test_device_bugs_are_reported(name, message):
    out = selftest(name)
    assert out.startswith("error: CUDA emulation") and message in out, out


def test_where_an_error_happened_is_named():
    out = selftest("global_past_end")
    assert "block (0,0,0), thread (63,0,0)" in out  # the last thread reads one past the end


def test_a_block_of_1024_threads_is_allowed():
    assert selftest("block_1024") == "ok"


def test_launches_carry_hundreds_of_tensors_in_the_larger_parameter_space():
    out = selftest("param_space").split()
    param_bytes = int(out[1])
    max_tensors = [int(v) for v in out[3].split(",")]
    metadata = [int(v) for v in out[5].split(",")]
    assert param_bytes == 32764  # CUDA >= 12.1
    assert all(t >= 300 for t in max_tensors), max_tensors  # was 110/64/48 in 4 KiB
    assert all(m + 512 <= param_bytes for m in metadata)


def test_unknown_selftest_names_the_known_ones():
    with pytest.raises(ValueError, match="no emulator self-test named 'nope'.*tree_sum"):
        selftest("nope")


# ---- the public switch --------------------------------------------------------------

def _lists(n=3, numel=1000):
    gen = torch.Generator().manual_seed(n)
    return ([torch.randn(numel, generator=gen) for _ in range(n)],
            [torch.randn(numel, generator=gen) for _ in range(n)])


def test_ops_inside_the_context_launch_emulated_kernels_and_outside_do_not():
    avgs, xs = _lists()
    before = _C._cuda_emulation_stats()["launches"]
    ops.ema_(avgs, xs, 0.5)
    assert _C._cuda_emulation_stats()["launches"] == before
    with wtesting.cuda_emulation() as stats:
        ops.ema_(avgs, xs, 0.5)
    assert stats.launches == 1 and stats.blocks == 3 and stats.threads == 3 * 512


@pytest.mark.parametrize("call", ["running_mean_", "ema_", "accumulate_", "scale_copy_",
                                  "running_mean_compensated_", "ema_compensated_", "nonfinite_flag",
                                  "ema_stochastic_", "ema_many_", "window_push_", "dots", "combine_", "project_",
                                  "orthonormalize_",
                                  "orthonormalize_many_"])
def test_every_op_runs_on_the_emulator(call):
    xs = [torch.randn(5, 7), torch.randn(300)]
    avgs = [x.clone() for x in xs]
    comps = [torch.zeros_like(x) for x in xs]
    basis = ops.new_basis(xs, 4)
    for j in range(3):
        for b, x in zip(basis, xs):
            b[j].copy_(torch.randn(x.shape))
    run = {
        "running_mean_": lambda: ops.running_mean_(avgs, xs, 2),
        "ema_": lambda: ops.ema_(avgs, xs, 0.1),
        "accumulate_": lambda: ops.accumulate_(avgs, xs, 0.5),
        "scale_copy_": lambda: ops.scale_copy_(avgs, xs, 2.0),
        "running_mean_compensated_": lambda: ops.running_mean_compensated_(avgs, comps, xs, 2),
        "ema_compensated_": lambda: ops.ema_compensated_(avgs, comps, xs, 0.1),
        "nonfinite_flag": lambda: ops.nonfinite_flag(xs),
        "ema_stochastic_": lambda: ops.ema_stochastic_([x.bfloat16() for x in xs], xs, 0.1, 3),
        "ema_many_": lambda: ops.ema_many_([avgs, comps], xs, [0.1, 0.2]),
        "window_push_": lambda: ops.window_push_([a.double() for a in avgs], comps, xs),
        "dots": lambda: ops.dots(basis, xs, 3),
        "combine_": lambda: ops.combine_(avgs, basis, torch.ones(3), 1.0, 0.0),
        "project_": lambda: ops.project_(avgs, basis, 3),
        "orthonormalize_": lambda: ops.orthonormalize_(basis, 2),
        "orthonormalize_many_": lambda: ops.orthonormalize_many_(basis, 0, 3),
    }[call]
    with wtesting.cuda_emulation() as stats:
        run()
    if call == "orthonormalize_many_":
        assert stats.launches == 0  # its GPU path is float64 matmuls, not our kernels
    else:
        assert stats.launches >= 1


def test_the_context_nests_and_restores():
    assert not _C._cuda_emulation_enabled()
    with wtesting.cuda_emulation():
        assert _C._cuda_emulation_enabled()
        with wtesting.cuda_emulation():
            assert _C._cuda_emulation_enabled()
        assert _C._cuda_emulation_enabled()
    assert not _C._cuda_emulation_enabled()


def test_the_context_is_restored_after_an_exception():
    with pytest.raises(KeyError):
        with wtesting.cuda_emulation():
            raise KeyError("x")
    assert not _C._cuda_emulation_enabled()


def test_the_switch_is_per_thread():
    seen = []
    with wtesting.cuda_emulation():
        t = threading.Thread(target=lambda: seen.append(_C._cuda_emulation_enabled()))
        t.start()
        t.join()
    assert seen == [False]


def test_without_the_emulated_build_the_context_refuses(monkeypatch):
    monkeypatch.setattr(wtesting, "cuda_emulation_available", lambda: False)
    with pytest.raises(RuntimeError, match="built without the emulated CUDA kernels"):
        with wtesting.cuda_emulation():
            pass


def test_a_cpu_tensor_scalar_is_read_by_the_kernel_as_on_a_device():
    # On the CPU kernels a host scalar is range-checked; a device scalar is read by the
    # kernel without a host sync, so a negative count is not caught there (as on a GPU).
    avgs, xs = _lists(1, 10)
    count = torch.tensor(-3.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="count must be >= 0"):
        ops.running_mean_([a.clone() for a in avgs], xs, count)
    with wtesting.cuda_emulation() as stats:
        ops.running_mean_(avgs, xs, count)
    assert stats.launches == 1


def test_emulated_results_equal_the_cpu_kernels_bit_for_bit_for_float32_lerp():
    avgs, xs = _lists(4, 70001)
    cpu = [a.clone() for a in avgs]
    ops.ema_(cpu, xs, 0.3)
    emu = [a.clone() for a in avgs]
    with wtesting.cuda_emulation():
        ops.ema_(emu, xs, 0.3)
    for a, b in zip(emu, cpu):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("depth_op", ["ema_", "ema_compensated_", "nonfinite_flag"])
def test_more_tensors_than_one_launch_holds_split_into_launches(depth_op):
    n = 700  # > 320 tensors per launch
    xs = [torch.randn(3) for _ in range(n)]
    avgs = [x.clone() for x in xs]
    comps = [torch.zeros(3) for _ in range(n)]
    with wtesting.cuda_emulation() as stats:
        if depth_op == "ema_":
            ops.ema_(avgs, xs, 0.5)
        elif depth_op == "ema_compensated_":
            ops.ema_compensated_(avgs, comps, xs, 0.5)
        else:
            ops.nonfinite_flag(xs)
    assert stats.launches == 3 and stats.blocks == n


def test_the_sanitizer_workload_of_gpu_check_passes_on_the_emulated_kernels():
    import runpy
    module = runpy.run_path(str(REPO / "scripts" / "device_cases.py"))
    with wtesting.cuda_emulation() as outer:
        pass
    assert outer.launches == 0
    assert module["main"](["--emulate"]) == 0


def test_row_reductions_give_the_same_bits_whatever_the_thread_order():
    # dots over k = 10 rows (two passes of the 8-row block reduction, warp shuffles and
    # the ordered cleanup kernel), under other thread orders and OS-thread counts.
    gen = torch.Generator().manual_seed(5)
    shapes = [(70001,), (3,), (65536 * 2 + 9,)]
    basis = ops.new_basis([torch.empty(s) for s in shapes], 10)
    for b in basis:
        b.copy_(torch.randn(b.shape, generator=gen))
    xs = [torch.randn(s, generator=gen) for s in shapes]
    results = []
    for seed, threads in [(0, torch.get_num_threads()), (1, 1), (12345, torch.get_num_threads())]:
        torch.set_num_threads(threads)
        with wtesting.cuda_emulation(schedule_seed=seed):
            results.append((ops.dots(basis, xs, 10), ops.orthonormalize_([b.clone() for b in basis], 9)))
    for dots, norm in results[1:]:
        assert torch.equal(dots, results[0][0]) and torch.equal(norm, results[0][1])


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_schedule_seed_is_checked(seed):
    with pytest.raises(TypeError, match="schedule_seed must be an int"):
        with wtesting.cuda_emulation(schedule_seed=seed):
            pass
    assert not _C._cuda_emulation_enabled()


def test_the_schedule_seed_is_restored():
    with wtesting.cuda_emulation(schedule_seed=99):
        assert _C._set_cuda_emulation_schedule_seed(99) == 99
    assert _C._set_cuda_emulation_schedule_seed(0) == 0


def test_device_code_keeps_to_the_seam():
    """What the emulator checks, the kernels must route through platform.cuh: launches via
    launch_kernel (no <<<...>>> elsewhere), shared arrays as SharedArray (racecheck), no
    c10 CUDA stream or guard calls outside it."""
    cuda_dir = REPO / "csrc" / "cuda"
    offenders = []
    for path in sorted([*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cuh"), *cuda_dir.glob("*.cpp")]):
        if path.name in ("platform.cuh", "register_cuda.cpp"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            if ("<<<" in code or ("__shared__" in code and "SharedArray" not in code)
                    or "getCurrentCUDAStream" in code or "CUDAGuard" in code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_injected_faults_still_apply():
    """scripts/emulation_faults.sh proves the emulated tests can fail by patching bugs into the
    kernels; a patch that no longer applies (the code moved) proves nothing. Each must apply
    to this checkout."""
    import shutil
    import subprocess

    repo = pathlib.Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout (the patches are applied with git apply)")
    patches = sorted((repo / "scripts" / "faults").glob("*.patch"))
    assert len(patches) >= 6
    for patch in patches:
        done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, f"{patch.name} no longer applies: {done.stderr}"
