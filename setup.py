"""Builds wavg_ext._C: C++ CPU kernels always, CUDA kernels when possible.

Install with ``pip install --no-build-isolation .`` (build isolation would pull
another torch than the one the extension must link against).

Environment switches:
  WAVG_EXT_CUDA=auto|0|1   auto (default): build CUDA kernels when torch.version.cuda
                           and CUDA_HOME are both set; 0: never; 1: always, failing
                           loudly if CUDA cannot be built.
  TORCH_CUDA_ARCH_LIST     CUDA archs to compile for. Default: the visible GPUs' archs,
                           or, with no GPU visible, a list up to sm_90 (+PTX).
  WAVG_EXT_CPU_CAPABILITY  auto|avx512|avx2|default: vector ISA of the CPU kernels.
                           auto (default) takes the best the build machine supports;
                           use avx2 or default to build for other machines.
  WAVG_EXT_CUDA_EMULATION  auto|0|1   auto (default): in builds without CUDA kernels on
                           Linux, also build the CUDA sources as host C++ against the
                           emulation layer (csrc/cuda/emulation), for
                           wavg_ext.testing.cuda_emulation(); 0: never; 1: always
                           (not with WAVG_EXT_CUDA kernels).
  MAX_JOBS                 parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "generated")

# ISA name -> (cpuinfo flags it needs, compiler flags). The macros select ATen's
# Vectorized implementation for that ISA, as torch's own kernels do.
CPU_CAPABILITIES = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
    "avx2": ({"avx2", "fma", "f16c"},
             ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "default": (set(), ["-DCPU_CAPABILITY=DEFAULT"]),
}


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_cpu_capability() -> str:
    wanted = os.environ.get("WAVG_EXT_CPU_CAPABILITY", "auto").lower()
    if wanted not in ("auto", *CPU_CAPABILITIES):
        raise SystemExit(f"WAVG_EXT_CPU_CAPABILITY={wanted!r}: expected auto, avx512, avx2 or default")
    if wanted != "auto":
        return wanted
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"  # e.g. aarch64: ATen picks NEON/SVE by itself
    have = cpu_flags()
    for name in ("avx512", "avx2"):
        if CPU_CAPABILITIES[name][0] <= have:
            return name
    return "default"


def choose_cuda() -> bool:
    mode = os.environ.get("WAVG_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"WAVG_EXT_CUDA={mode!r}: expected auto, 0 or 1")
    # torchao's gate: a CUDA build of torch and a toolkit, GPU or not.
    possible = bool(torch.version.cuda) and CUDA_HOME is not None
    if mode == "1" and not possible:
        raise SystemExit(
            "WAVG_EXT_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} "
            "(install a CUDA build of torch and the CUDA toolkit, or set CUDA_HOME)")
    return possible if mode == "auto" else mode == "1"


def choose_cuda_emulation(with_cuda: bool) -> bool:
    mode = os.environ.get("WAVG_EXT_CUDA_EMULATION", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"WAVG_EXT_CUDA_EMULATION={mode!r}: expected auto, 0 or 1")
    # ucontext fibers: Linux (glibc). The real kernels make the emulated ones moot.
    possible = platform.system() == "Linux" and not with_cuda
    if mode == "1" and not possible:
        raise SystemExit("WAVG_EXT_CUDA_EMULATION=1 needs Linux and a build without CUDA kernels "
                         "(the emulated kernels share the CUDA kernels' symbols)")
    return possible if mode == "auto" else mode == "1"


def choose_cuda_archs() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in caps)
        return archs + "+PTX"
    # No GPU visible (e.g. a build machine): Turing to Hopper, PTX for newer GPUs.
    # CUDA 13 dropped sm_70, so start at 7.5 there.
    major = int(torch.version.cuda.split(".")[0])
    return ("7.5;8.0;8.6;8.9;9.0+PTX" if major >= 13 else "7.0;7.5;8.0;8.6;8.9;9.0+PTX")


def write_build_config(cpu_capability: str, cuda_archs: str, cuda_version: str) -> None:
    os.makedirs(GENERATED, exist_ok=True)
    text = (
        "// Generated by setup.py; do not edit.\n#pragma once\n"
        f'#define WAVG_EXT_CPU_CAPABILITY "{cpu_capability}"\n'
        f'#define WAVG_EXT_CUDA_ARCH_LIST "{cuda_archs}"\n'
        f'#define WAVG_EXT_CUDA_VERSION "{cuda_version}"\n'
        f'#define WAVG_EXT_TORCH_VERSION "{torch.__version__}"\n'
    )
    path = os.path.join(GENERATED, "wavg_ext_build_config.h")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # keep the mtime when unchanged, so ninja does not rebuild
        with open(path, "w") as f:
            f.write(text)


def extension():
    cpu_capability = choose_cpu_capability()
    with_cuda = choose_cuda()
    cuda_archs = choose_cuda_archs() if with_cuda else ""
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs
    write_build_config(cpu_capability, cuda_archs, torch.version.cuda if with_cuda else "")

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", *CPU_CAPABILITIES[cpu_capability][1]]
    if choose_cuda_emulation(with_cuda):
        sources += rel("csrc/cuda/emulation/*.cpp")
        cxx.append("-DWAVG_EXT_CUDA_EMULATION_BUILT")
    kwargs = dict(
        name="wavg_ext._C",
        include_dirs=[os.path.join(ROOT, "csrc"), GENERATED],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DWAVG_EXT_WITH_CUDA"]
    return CUDAExtension(sources=sources,
                         extra_compile_args={"cxx": cxx + ["-DWAVG_EXT_WITH_CUDA"], "nvcc": nvcc},
                         **kwargs)


setup(
    name="wavg_ext",
    version="0.1.0",
    description="Fused weight averaging (SWA, EMA, periodic SWA, TWA) kernels and optimizer wrappers for PyTorch",
    packages=find_packages(include=["wavg_ext", "wavg_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"], "plot": ["matplotlib"],
                    "demo": ["scikit-learn", "tqdm", "matplotlib"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
