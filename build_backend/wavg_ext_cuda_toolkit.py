"""Finds the CUDA toolkit wavg_ext's CUDA kernels compile with, and says why when none can.

torch guesses CUDA_HOME as the folder above the first `nvcc` on PATH. On machines where
that `nvcc` is a symlink or a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc
running /usr/local/cuda-13.0/bin/nvcc), the guess is a folder without `include/`, and the
build fails deep inside a compiler log. Here a toolkit is a folder with `bin/nvcc` and
`include/cuda_runtime.h`, looked for in this order:

1. ``CUDA_HOME``, then ``CUDA_PATH``: when set, that folder and no other (a wrong one is
   reported, never silently replaced);
2. the `nvcc` on PATH, its symlinks resolved, and, when that is a wrapper, the toolkit
   root nvcc itself reports (``nvcc --dryrun`` prints ``TOP=<root>/bin/..``);
3. the usual roots: /usr/local/cuda, /usr/local/cuda-<version> (newest first), /opt/cuda.

`check(root, torch_cuda)` then tells whether it can build kernels for that torch: the
same CUDA major version (torch refuses another) and a probe compile of a tiny kernel.
setup.py imports this file (it is not part of the installed package).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass
class Toolkit:
    root: Optional[str]  # None when not found
    how: str  # how it was found, or why none was

    @property
    def nvcc(self) -> str:
        return os.path.join(self.root, "bin", "nvcc")


_MARKERS = (os.path.join("bin", "nvcc"), os.path.join("include", "cuda_runtime.h"))


def _missing(root: str) -> list:
    return [m for m in _MARKERS if not os.path.isfile(os.path.join(root, m))]


def is_toolkit(root: Optional[str]) -> bool:
    return bool(root) and not _missing(root)


def _root_nvcc_reports(nvcc: str) -> Optional[str]:
    """The toolkit root a (possibly wrapped) nvcc runs from: its `--dryrun` prints TOP=."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(found.group(1).strip()) if found else None


def _version_key(path: str):
    found = re.search(r"cuda-(\d+)\.(\d+)", path)
    return (int(found.group(1)), int(found.group(2))) if found else (-1, -1)


def find(environ: Optional[Mapping[str, str]] = None, which=shutil.which,
         usual_roots: Optional[list] = None) -> Toolkit:
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = environ.get(var)
        if root:
            if is_toolkit(root):
                return Toolkit(os.path.realpath(root), f"{var}={root}")
            return Toolkit(None, f"{var}={root} is not a CUDA toolkit (it has no "
                                 f"{' and no '.join(_missing(root))})")
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit(root):
            return Toolkit(root, f"nvcc on PATH ({nvcc})")
        root = _root_nvcc_reports(nvcc)
        if is_toolkit(root):
            return Toolkit(root, f"nvcc on PATH ({nvcc}) runs from {root}")
    if usual_roots is None:
        usual_roots = (["/usr/local/cuda"]
                       + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
                       + ["/opt/cuda"])
    for root in usual_roots:
        if is_toolkit(root):
            return Toolkit(os.path.realpath(root), f"found at {root}")
    where = f"nvcc on PATH ({nvcc}) is not in a toolkit" if nvcc else "no nvcc on PATH"
    return Toolkit(None, f"no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, {where}, none at "
                         "/usr/local/cuda*, /opt/cuda)")


def version(root: str) -> Optional[str]:
    """The toolkit's CUDA version, "major.minor", from include/cuda.h (or cuda_runtime_api.h)."""
    for header, macro in (("cuda.h", "CUDA_VERSION"), ("cuda_runtime_api.h", "CUDART_VERSION")):
        path = os.path.join(root, "include", header)
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                found = re.search(rf"#define\s+{macro}\s+(\d+)", f.read())
            if found:
                number = int(found.group(1))
                return f"{number // 1000}.{number % 1000 // 10}"
    return None


_PROBE = """
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
__global__ void probe(float* x) { x[threadIdx.x] += 1.0f; }
"""


def check(toolkit: Toolkit, torch_cuda: Optional[str], probe: bool = True) -> Optional[str]:
    """Why `toolkit` cannot build CUDA kernels for a torch built with CUDA `torch_cuda`, or
    None when it can (same major version; a tiny kernel compiles)."""
    if not torch_cuda:
        return "this torch is a CPU build (torch.version.cuda is None)"
    if toolkit.root is None:
        return toolkit.how
    found = version(toolkit.root)
    if found is None:
        return f"cannot read the CUDA version of the toolkit at {toolkit.root}"
    if found.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"the CUDA toolkit at {toolkit.root} is CUDA {found}, but torch was built with CUDA "
                f"{torch_cuda} (the major versions must match)")
    if probe:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            with open(src, "w") as f:
                f.write(_PROBE)
            try:
                out = subprocess.run([toolkit.nvcc, "-std=c++17", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                     capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as err:
                return f"{toolkit.nvcc} could not run: {err}"
            if out.returncode != 0:
                lines = (out.stderr or out.stdout).strip().splitlines()
                return f"{toolkit.nvcc} cannot compile a test kernel: {lines[0] if lines else out.returncode}"
    return None
