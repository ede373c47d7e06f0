"""Testing helpers: run wavg_ext's CUDA kernels without a GPU, and its CPU kernels
for each vector ISA the CPU supports.

``cuda_emulation()`` routes every wavg_ext op called inside it (in this thread) with
CPU tensors through the emulated CUDA kernels: the CUDA sources (kernels, functors,
multi-tensor launcher, host grouping and launch code) compiled a second time as host
C++ against a small emulation layer (``csrc/cuda/emulation``). Validation, planning
and launching are those of a GPU; the CPU kernels are not involved. Semantics follow
the device: a one-element CPU tensor scalar is read by the kernel, as a device scalar
is on a GPU (so it is not range-checked on the host), and ``orthonormalize_many_``
takes its non-CPU path. Every launch is checked as compute-sanitizer would (global
memory bounds and alignment, shared-memory races and uninitialized reads, barrier and
shuffle rules, launch limits); a violation raises ``RuntimeError`` when the launch
ends. Outside the context nothing changes.

``build_info()["cuda_emulation"]`` says whether the emulated kernels were built (on
by default in builds without CUDA kernels on Linux; ``WAVG_EXT_CUDA_EMULATION=0``
turns them off).

``cpu_capability(name)`` runs the CPU kernels compiled for another ISA (``default``,
``avx2``, ``avx512``, ``avx512_bf16``: ``build_info()["cpu_capabilities"]`` lists the compiled ones,
:func:`supported_cpu_capabilities` those this CPU runs) for every call that starts
inside it, in every thread. At import, wavg_ext picks the best one the CPU supports;
the environment variable ``WAVG_EXT_CPU_CAPABILITY`` forces a lower one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List

from . import _C

__all__ = ["cuda_emulation", "cuda_emulation_available", "EmulationStats", "cpu_capability",
           "supported_cpu_capabilities"]


def supported_cpu_capabilities() -> List[str]:
    """The ISAs of this build's CPU kernels that this CPU supports, lowest first."""
    return list(_C._supported_cpu_capabilities())


@contextlib.contextmanager
def cpu_capability(name: str) -> Iterator[None]:
    """Runs the CPU kernels compiled for ISA ``name`` inside the block (process-wide:
    every call that starts inside it, in any thread), then restores the previous one.
    A name this build lacks or this CPU does not support raises ValueError."""
    previous = _C._set_cpu_capability(name)
    try:
        yield
    finally:
        _C._set_cpu_capability(previous)


def cuda_emulation_available() -> bool:
    """Whether this build has the emulated CUDA kernels."""
    return bool(_C.build_info()["cuda_emulation"])


@dataclass
class EmulationStats:
    """Emulated kernel launches (blocks, threads) run inside one ``cuda_emulation()``
    block, counted when it ends (all threads' launches during that time)."""

    launches: int = 0
    blocks: int = 0
    threads: int = 0


@contextlib.contextmanager
def cuda_emulation(schedule_seed: int = 0) -> Iterator[EmulationStats]:
    """Inside: ops on CPU tensors run the emulated CUDA kernels. Yields an
    ``EmulationStats`` filled in on exit. Nests; restores the previous settings.

    ``schedule_seed`` picks the order in which each block's threads run between
    barriers (0: forward, reverse, then shuffled in turn; any other value: a different
    shuffle at every sweep). Correct kernels give the same bits for every seed."""
    if not isinstance(schedule_seed, int) or isinstance(schedule_seed, bool) or not 0 <= schedule_seed < 2**64:
        raise TypeError(f"cuda_emulation: schedule_seed must be an int in [0, 2**64), got {schedule_seed!r}")
    if not cuda_emulation_available():
        raise RuntimeError(
            "wavg_ext was built without the emulated CUDA kernels (build_info()['cuda_emulation'] "
            "is False): they are built by default on Linux when the real CUDA kernels are not; "
            "rebuild with WAVG_EXT_CUDA_EMULATION=1")
    stats = EmulationStats()
    before = _C._cuda_emulation_stats()
    previous = _C._set_cuda_emulation(True)
    previous_seed = _C._set_cuda_emulation_schedule_seed(schedule_seed)
    try:
        yield stats
    finally:
        _C._set_cuda_emulation(previous)
        _C._set_cuda_emulation_schedule_seed(previous_seed)
        after = _C._cuda_emulation_stats()
        stats.launches, stats.blocks, stats.threads = (after[k] - before[k] for k in
                                                       ("launches", "blocks", "threads"))
