"""Builds wavg_ext._C (the ops and their CPU kernels; loads with any torch of the version it
was built for) and, when CUDA can be built, wavg_ext._C_cuda (the CUDA kernels, registered
with the dispatcher when wavg_ext loads them: only under a torch with CUDA). So one wheel
with CUDA kernels also imports and runs under a CPU-only torch of the same version.

Install with ``pip install .`` (torch installed first): the build backend
(build_backend/wavg_ext_build.py) makes this file import the torch of the environment
being installed into, even under pip's build isolation.

Environment switches:
  WAVG_EXT_CUDA=auto|0|1   auto (default): build the CUDA kernels when torch has CUDA and
                           a CUDA toolkit of the same major version compiles a test kernel;
                           otherwise build without them, saying why in one warning line
                           (and in wavg_ext.build_info()["cuda_status"]). 0: never; 1:
                           always, failing at once, with the reason, when they cannot be.
  CUDA_HOME / CUDA_PATH    the CUDA toolkit (default: found from nvcc on PATH or the usual
                           roots: build_backend/wavg_ext_cuda_toolkit.py).
  TORCH_CUDA_ARCH_LIST     CUDA archs to compile for. Default: the visible GPUs' archs,
                           or, with no GPU visible, a list up to sm_90 (+PTX).
  WAVG_EXT_CPU_CAPABILITIES  all|default,avx2,...: the vector ISAs the CPU kernels are
                           compiled for (csrc/cpu/capabilities.py); all (default) on
                           x86-64 is default, avx2, avx512 and avx512_bf16. The best one
                           the running CPU supports is picked at import, so one build runs
                           on any x86-64 CPU (WAVG_EXT_CPU_CAPABILITY=default|avx2|avx512|
                           avx512_bf16 at run time forces a lower one).
  WAVG_EXT_CUDA_EMULATION  auto|0|1   auto (default): in builds without CUDA kernels on
                           Linux, also build the CUDA sources as host C++ against the
                           emulation layer (csrc/cuda/emulation), for
                           wavg_ext.testing.cuda_emulation(); 0: never; 1: always
                           (not with WAVG_EXT_CUDA kernels).
  MAX_JOBS                 parallel compile jobs (ninja).

The version: wavg_ext/_version.py plus the git commit (build_backend/wavg_ext_version.py).
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    # Only an sdist may be made without torch (the build backend says so); a build needs it.
    if os.environ.get("WAVG_EXT_SDIST_WITHOUT_TORCH") != "1":
        raise
    torch = None

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "generated")

sys.path[:0] = [os.path.join(ROOT, "csrc", "cpu"), os.path.join(ROOT, "build_backend")]
import capabilities  # noqa: E402  (csrc/cpu/capabilities.py: the ISA table, shared with CMake)
import wavg_ext_cuda_toolkit  # noqa: E402
import wavg_ext_version  # noqa: E402

del sys.path[:2]

VERSION = wavg_ext_version.version(ROOT)


def choose_cuda():
    """(build the CUDA kernels?, one line saying how or why not). Points torch's
    cpp_extension at the toolkit found (CUDA_HOME) before it is imported."""
    mode = os.environ.get("WAVG_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"WAVG_EXT_CUDA={mode!r}: expected auto, 0 or 1")
    if mode == "0":
        return False, "WAVG_EXT_CUDA=0"
    toolkit = wavg_ext_cuda_toolkit.find()
    why_not = wavg_ext_cuda_toolkit.check(toolkit, torch.version.cuda)
    if why_not is None:
        os.environ["CUDA_HOME"] = toolkit.root
        if "torch.utils.cpp_extension" in sys.modules:  # imported earlier: its guess is fixed
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = toolkit.root
        return True, f"built with the CUDA {wavg_ext_cuda_toolkit.version(toolkit.root)} toolkit at {toolkit.root}"
    if mode == "1":
        raise SystemExit(f"WAVG_EXT_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if torch.version.cuda:  # a CPU torch builds CPU kernels: nothing to warn about
        print(f"warning: wavg_ext: building without CUDA kernels: {why_not} "
              "(set CUDA_HOME to a toolkit; WAVG_EXT_CUDA=1 makes this an error)", file=sys.stderr)
    return False, why_not


if torch is not None:
    WITH_CUDA, CUDA_NOTE = choose_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
else:
    BuildExtension = object


def choose_cuda_emulation(with_cuda: bool) -> bool:
    mode = os.environ.get("WAVG_EXT_CUDA_EMULATION", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"WAVG_EXT_CUDA_EMULATION={mode!r}: expected auto, 0 or 1")
    # ucontext fibers: Linux (glibc). The real kernels make the emulated ones moot.
    possible = platform.system() == "Linux" and not with_cuda
    if mode == "1" and not possible:
        raise SystemExit("WAVG_EXT_CUDA_EMULATION=1 needs Linux and a build without CUDA kernels "
                         "(the real kernels make the emulated ones moot)")
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


def c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_build_config(cuda_archs: str, cuda_version: str) -> None:
    os.makedirs(GENERATED, exist_ok=True)
    text = (
        "// Generated by setup.py; do not edit.\n#pragma once\n"
        f"#define WAVG_EXT_VERSION {c_string(VERSION)}\n"
        f"#define WAVG_EXT_CUDA_MODULE_BUILT {int(WITH_CUDA)}\n"
        f"#define WAVG_EXT_CUDA_NOTE {c_string(CUDA_NOTE)}\n"
        f"#define WAVG_EXT_CUDA_ARCH_LIST {c_string(cuda_archs)}\n"
        f"#define WAVG_EXT_CUDA_VERSION {c_string(cuda_version)}\n"
        f"#define WAVG_EXT_TORCH_VERSION {c_string(torch.__version__)}\n"
    )
    capabilities._write_if_changed(os.path.join(GENERATED, "wavg_ext_build_config.h"), text)


# csrc/cuda files that belong to the _C_cuda module only: its registration and Python
# face, and the shared host code compiled into it (_C has its own copy).
CUDA_MODULE_ONLY = ("register_cuda.cpp", "shared_host.cpp")


def write_emulation_unity() -> None:
    """The CUDA sources the emulated build compiles as one host C++ unit
    (csrc/cuda/emulation/kernels.cpp includes the list): every csrc/cuda/*.cu and *.cpp but
    the _C_cuda module's own files (the emulated kernels are reached from the CPU key)."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
                    if os.path.basename(p) not in CUDA_MODULE_ONLY)
    capabilities._write_if_changed(os.path.join(GENERATED, "wavg_ext_cuda_unity.inc"),
                                   "// Generated by setup.py; do not edit.\n"
                                   + "".join(f'#include "cuda/{n}"\n' for n in names))


def rel(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    cuda_archs = choose_cuda_archs() if WITH_CUDA else ""
    if WITH_CUDA:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs
    write_build_config(cuda_archs, torch.version.cuda if WITH_CUDA else "")

    csrc = os.path.join(ROOT, "csrc")
    common = dict(include_dirs=[csrc, GENERATED], extra_link_args=["-fopenmp"])
    cxx = ["-O3", "-fopenmp"]
    # _C: no CUDA code, so it links only torch's CPU libraries.
    sources = rel("csrc/*.cpp") + [os.path.join("csrc", p) for p in capabilities.baseline_sources(csrc)]
    if choose_cuda_emulation(WITH_CUDA):
        sources += rel("csrc/cuda/emulation/*.cpp")
        write_emulation_unity()
        c_cxx = cxx + ["-DWAVG_EXT_CUDA_EMULATION_BUILT"]
    else:
        c_cxx = cxx
    # The CPU kernels, once per ISA (BuildWithCpuCapabilities).
    caps = capabilities.generate(GENERATED, os.environ.get("WAVG_EXT_CPU_CAPABILITIES", "all"))
    kernel_sources = [os.path.join("csrc", p) for p in capabilities.kernel_sources(csrc)]
    ext = CppExtension(name="wavg_ext._C", sources=sources, extra_compile_args={"cxx": c_cxx},
                       depends=kernel_sources, **common)
    ext.cpu_capabilities = [(cap, kernel_sources) for cap in caps]
    if not WITH_CUDA:
        return [ext]
    # _C_cuda: the CUDA kernels, their dispatcher registration and the host code they share
    # with _C (cuda/shared_host.cpp), loaded by wavg_ext only under a torch with CUDA.
    cuda_ext = CUDAExtension(
        name="wavg_ext._C_cuda", sources=rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        **common)
    return [ext, cuda_ext]


class BuildWithCpuCapabilities(BuildExtension):
    """BuildExtension that also compiles the CPU kernel sources once per ISA, each copy
    with its own flags into a directory of its own, and links them after the other
    objects, lowest ISA first (see csrc/cpu/capabilities.py)."""

    def build_extension(self, ext):
        objects = []
        for cap, kernel_sources in getattr(ext, "cpu_capabilities", []):
            args = dict(ext.extra_compile_args)
            args["cxx"] = list(args["cxx"]) + capabilities.compile_flags(cap)
            objects += self.compiler.compile(
                kernel_sources, output_dir=os.path.join(self.build_temp, "cpu_isa", cap.name),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=args, depends=ext.depends)
        ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
        super().build_extension(ext)


setup(
    name="wavg_ext",
    version=VERSION,
    description="Fused weight averaging (SWA, EMA, periodic SWA, TWA) kernels and optimizer wrappers for PyTorch",
    packages=find_packages(include=["wavg_ext", "wavg_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"], "plot": ["matplotlib"],
                    "demo": ["scikit-learn", "tqdm", "matplotlib"]},
    ext_modules=extensions() if torch is not None else [],
    cmdclass={"build_ext": BuildWithCpuCapabilities} if torch is not None else {},
    zip_safe=False,
)
