"""Packaging: the CUDA toolkit search (build_backend/wavg_ext_cuda_toolkit.py), the version
(build_backend/wavg_ext_version.py) and one wheel for CPU and GPU torch: the CUDA kernels'
module (_C_cuda) is loaded only under a torch with CUDA, and a module that cannot load is a
warning with the reason, never a failed import."""

from __future__ import annotations

import importlib.machinery
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import wavg_ext

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "build_backend"))
import wavg_ext_cuda_toolkit as toolkit  # noqa: E402
import wavg_ext_version  # noqa: E402

sys.path.pop(0)


# ------------------------------------------------------------------ CUDA toolkit search --
def _fake_toolkit(root: pathlib.Path, version: int = 13000, runtime_header: bool = True) -> pathlib.Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda.h").write_text(f"#pragma once\n#define CUDA_VERSION {version}\n")
    if runtime_header:
        (root / "include" / "cuda_runtime.h").write_text("#pragma once\n")
    return root


def _which_in(path_dir: pathlib.Path):
    return lambda name, path=None: shutil.which(name, path=str(path_dir))


def test_cuda_home_is_honoured(tmp_path):
    root = _fake_toolkit(tmp_path / "cuda-12.4", 12040)
    found = toolkit.find({"CUDA_HOME": str(root), "CUDA_PATH": "/nowhere"}, which=lambda *a, **k: None)
    assert found.root == str(root.resolve()) and found.how == f"CUDA_HOME={root}"
    assert toolkit.version(found.root) == "12.4"
    found = toolkit.find({"CUDA_PATH": str(root)}, which=lambda *a, **k: None)
    assert found.root == str(root.resolve()) and found.how.startswith("CUDA_PATH=")


def test_a_wrong_cuda_home_is_reported_not_replaced(tmp_path):
    bad = _fake_toolkit(tmp_path / "local", runtime_header=False)  # like /usr/local: bin/nvcc only
    good = _fake_toolkit(tmp_path / "cuda")
    found = toolkit.find({"CUDA_HOME": str(bad)}, which=lambda *a, **k: None, usual_roots=[str(good)])
    assert found.root is None
    assert found.how == f"CUDA_HOME={bad} is not a CUDA toolkit (it has no include/cuda_runtime.h)"
    assert toolkit.check(found, "13.0") == found.how


def test_nvcc_symlink_outside_the_toolkit_is_resolved(tmp_path):
    root = _fake_toolkit(tmp_path / "cuda-13.0")
    bin_dir = tmp_path / "usr_local_bin"
    bin_dir.mkdir()
    (bin_dir / "nvcc").symlink_to(root / "bin" / "nvcc")
    found = toolkit.find({"PATH": str(bin_dir)}, which=_which_in(bin_dir), usual_roots=[])
    assert found.root == str(root.resolve()) and str(bin_dir / "nvcc") in found.how


def test_nvcc_wrapper_script_reports_its_toolkit(tmp_path):
    """A wrapper script (as /usr/local/bin/nvcc on our machines) is no symlink: the root is
    the one nvcc itself reports with --dryrun."""
    root = _fake_toolkit(tmp_path / "cuda-13.0")
    bin_dir = tmp_path / "wrappers"
    bin_dir.mkdir()
    wrapper = bin_dir / "nvcc"
    wrapper.write_text(f"#!/bin/sh\necho '#$ _HERE_={root}/bin' >&2\necho '#$ TOP={root}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    found = toolkit.find({"PATH": str(bin_dir)}, which=_which_in(bin_dir), usual_roots=[])
    assert found.root == str(root.resolve()) and "runs from" in found.how


def test_usual_roots_and_nothing_found(tmp_path):
    root = _fake_toolkit(tmp_path / "cuda")
    empty = tmp_path / "empty"
    empty.mkdir()
    found = toolkit.find({"PATH": str(empty)}, which=_which_in(empty), usual_roots=[str(tmp_path / "no"), str(root)])
    assert found.root == str(root.resolve()) and found.how == f"found at {root}"
    found = toolkit.find({"PATH": str(empty)}, which=_which_in(empty), usual_roots=[])
    assert found.root is None and found.how.startswith("no CUDA toolkit found") and "no nvcc on PATH" in found.how


def test_check_says_why_a_toolkit_cannot_build(tmp_path):
    tk = toolkit.Toolkit(str(_fake_toolkit(tmp_path / "cuda", 12080)), "test")
    assert toolkit.check(tk, None) == "this torch is a CPU build (torch.version.cuda is None)"
    assert toolkit.check(tk, "13.0") == (f"the CUDA toolkit at {tk.root} is CUDA 12.8, but torch was built "
                                         "with CUDA 13.0 (the major versions must match)")
    # Same major version: the probe compile runs the fake nvcc, which makes no object file
    # but exits 0; one that fails is reported with its first line.
    assert toolkit.check(tk, "12.6") is None
    (pathlib.Path(tk.root) / "bin" / "nvcc").write_text("#!/bin/sh\necho 'nvcc fatal : no host compiler' >&2\nexit 1\n")
    assert toolkit.check(tk, "12.6") == f"{tk.nvcc} cannot compile a test kernel: nvcc fatal : no host compiler"


@pytest.mark.skipif(toolkit.find().root is None, reason="no CUDA toolkit on this machine")
def test_this_machines_toolkit_compiles_a_kernel():
    found = toolkit.find()
    cuda = toolkit.version(found.root)
    assert toolkit.check(found, cuda) is None, found


# -------------------------------------------------------------------------------- version --
def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_version_is_the_release_plus_the_commit(tmp_path):
    repo = tmp_path / "repo"
    (repo / "wavg_ext").mkdir(parents=True)
    (repo / "wavg_ext" / "_version.py").write_text('__version__ = "1.2.3"\n')
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert wavg_ext_version.version(str(repo)) == f"1.2.3+g{commit}"
    (repo / "wavg_ext" / "_version.py").write_text('__version__ = "1.2.3"  # edited\n')
    assert wavg_ext_version.version(str(repo)) == f"1.2.3+g{commit}.dirty"
    _git(repo, "commit", "-q", "-am", "second")
    _git(repo, "tag", "v1.2.3")
    assert wavg_ext_version.version(str(repo)) == "1.2.3"  # the release itself
    (repo / "x").write_text("untracked files do not make it dirty")
    assert wavg_ext_version.version(str(repo)) == "1.2.3"


def test_version_of_an_unpacked_sdist(tmp_path):
    (tmp_path / "wavg_ext").mkdir()
    (tmp_path / "wavg_ext" / "_version.py").write_text('__version__ = "1.2.3"\n')
    assert wavg_ext_version.version(str(tmp_path)) == "1.2.3"
    (tmp_path / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: wavg_ext\nVersion: 1.2.3+gabcdef0\n")
    assert wavg_ext_version.version(str(tmp_path)) == "1.2.3+gabcdef0"


def test_the_package_version_is_the_release_built():
    from wavg_ext import _version

    release = _version.__version__
    assert wavg_ext.__version__ == wavg_ext.build_info()["version"]
    assert wavg_ext.__version__ == release or wavg_ext.__version__.startswith(release + "+g"), wavg_ext.__version__


def test_the_installed_version_matches_its_metadata(h):
    proc = h.run_python("import importlib.metadata as m, wavg_ext; print(wavg_ext.__version__, m.version('wavg_ext'))")
    assert proc.returncode == 0, proc.stderr
    built, metadata = proc.stdout.split()
    assert built == metadata


# ---------------------------------------------------------- one wheel, CPU and CUDA torch --
BUILT_WITH_CUDA = {"cuda_built": True, "cuda_build_note": "built with the CUDA 13.0 toolkit at /usr/local/cuda",
                   "cuda_version": "13.0", "cuda_archs": "9.0+PTX", "torch_version": "2.11.0+cu130"}


def test_cuda_module_is_not_loaded_under_a_cpu_torch():
    def load():
        raise AssertionError("must not be imported under a CPU torch")

    assert wavg_ext._load_cuda_kernels(BUILT_WITH_CUDA, "2.11.0+cpu", None, load) == (
        False, "CUDA kernels built (CUDA 13.0) but not loaded: torch 2.11.0+cpu has no CUDA")


def test_cuda_module_loads_under_a_cuda_torch():
    loaded = []
    assert wavg_ext._load_cuda_kernels(BUILT_WITH_CUDA, "2.11.0+cu130", "13.0", lambda: loaded.append(1)) == (
        True, "CUDA kernels loaded (CUDA 13.0, archs 9.0+PTX)")
    assert loaded == [1]


def test_a_build_without_cuda_says_why():
    built = dict(BUILT_WITH_CUDA, cuda_built=False, cuda_build_note="WAVG_EXT_CUDA=0")
    assert wavg_ext._load_cuda_kernels(built, "2.11.0+cu130", "13.0", None) == (
        False, "no CUDA kernels in this build: WAVG_EXT_CUDA=0")


def test_a_cuda_module_that_fails_to_load_is_a_warning():
    def load():
        raise ImportError("libc10_cuda.so: cannot open shared object file: No such file or directory")

    with pytest.warns(RuntimeWarning, match=r"failed to load under torch 2\.11\.0\+cu126 \(CUDA 12\.6\): "
                                            r"libc10_cuda\.so: cannot open .* fall back to plain PyTorch"):
        loaded, status = wavg_ext._load_cuda_kernels(BUILT_WITH_CUDA, "2.11.0+cu126", "12.6", load)
    assert not loaded and status.startswith("CUDA kernels built (CUDA 13.0, torch 2.11.0+cu130) but failed")


def test_build_info_says_what_loaded():
    info = wavg_ext.build_info()
    assert "cuda_build_note" not in info
    if info["cuda"]:
        assert info["cuda_built"] and info["cuda_status"].startswith("CUDA kernels loaded")
    elif not info["cuda_built"]:
        assert info["cuda_status"].startswith("no CUDA kernels in this build: ")
    if torch.version.cuda is None:
        assert not info["cuda"]


_STUB = "int wavg_ext_stub(void) { return 0; }\n"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to make a stand-in _C_cuda")
@pytest.mark.parametrize("torch_cuda", [None, "13.0"])
def test_a_wheel_with_cuda_kernels_imports_under_any_torch(h, tmp_path, torch_cuda):
    """The installed package, given a _C_cuda that needs libc10_cuda.so (which a CPU torch
    lacks) and a _C that says it was built with CUDA: under a CPU torch it imports without a
    word and runs; under a torch with CUDA it tries the module, warns why it failed, and the
    CPU kernels still run."""
    pkg = tmp_path / "site" / "wavg_ext"
    proc = h.run_python("import wavg_ext; print(wavg_ext.__file__)")
    assert proc.returncode == 0, proc.stderr
    shutil.copytree(pathlib.Path(proc.stdout.strip()).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "stub.c").write_text(_STUB)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(libs / "libc10_cuda.so"), str(libs / "stub.c")], check=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(pkg / ("_C_cuda" + suffix)), str(libs / "stub.c"),
                    f"-L{libs}", "-Wl,--no-as-needed", "-lc10_cuda"], check=True)
    (libs / "libc10_cuda.so").unlink()  # as under a CPU torch
    code = f"""
import sys, warnings
sys.path.insert(0, {str(pkg.parent)!r})
import torch
torch.version.cuda = {torch_cuda!r}
import glob, importlib.util
# wavg_ext's _C, loaded ahead of the package (whose `from . import _C` then finds it), its
# build_info saying CUDA was built.
spec = importlib.util.spec_from_file_location("wavg_ext._C", glob.glob({str(pkg)!r} + "/_C.*")[0])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
sys.modules["wavg_ext._C"] = C
real = C.build_info
C.build_info = lambda: dict(real(), cuda_built=True, cuda_build_note="test", cuda_version="13.0", cuda_archs="9.0")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import wavg_ext
    from wavg_ext import ops
assert wavg_ext.__file__.startswith({str(pkg)!r}), wavg_ext.__file__
avgs = [torch.zeros(5)]
ops.ema_(avgs, [torch.ones(5)], 0.25)
assert torch.equal(avgs[0], torch.full((5,), 0.25))
info = wavg_ext.build_info()
print("STATUS", info["cuda"], info["cuda_status"])
for w in caught:
    print("WARNING", w.message)
"""
    proc = h.run_python(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    status = [ln for ln in lines if ln.startswith("STATUS")]
    warned = [ln for ln in lines if ln.startswith("WARNING")]
    if torch_cuda is None:
        assert status == [f"STATUS False CUDA kernels built (CUDA 13.0) but not loaded: torch {torch.__version__} "
                          "has no CUDA"], proc.stdout
        assert warned == [], proc.stdout
    else:
        assert len(status) == 1 and "but failed to load" in status[0] and "libc10_cuda.so" in status[0], proc.stdout
        assert len(warned) == 1 and "fall back to plain PyTorch" in warned[0], proc.stdout
