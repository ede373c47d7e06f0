"""The PEP 517 build backend of wavg_ext: setuptools, built against the torch that will
import the extension.

The extension links against libtorch and must be compiled with the very torch that
later imports it (another version, or a CUDA build instead of a CPU one, fails at import
with undefined symbols). With build isolation (plain ``pip install .``), pip builds in a
fresh environment that holds only the build requirements of pyproject.toml, and listing
torch there would make pip fetch some other torch into it. So torch is not a build
requirement: this backend puts the target environment's site-packages (the interpreter
pip runs for, where torch is installed) *after* the isolated ones on sys.path, and
setup.py imports that torch. Without isolation (``--no-build-isolation``) nothing changes.
`python -m build` (pypa/build) isolates differently: it runs the backend in a virtualenv of
its own (build-env-*), made from the interpreter that ran it; there the target is that
interpreter's environment: an active virtualenv ($VIRTUAL_ENV), an active conda env
($CONDA_PREFIX), else the base installation (`python -m build --no-isolation` from the
environment with torch works everywhere). Without torch, the build stops at once with one
line that says what to do (an sdist, sources only, is made without it).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools

_NO_TORCH = ("wavg_ext is compiled against the installed PyTorch, and none is installed for "
             f"{sys.executable}: install torch first (e.g. `pip install torch`), then `pip install .` again")


def _target_site_packages():
    """The target environment's site-packages: the interpreter's own (a virtualenv's, a
    conda env's, the system's) and, when enabled, the user's."""
    paths = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p and p not in paths:
            paths.append(p)
    # (pip's isolation turns the user site off; a torch installed with --user is still the
    # target's)
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user:
        paths.append(user)
    if os.path.basename(sys.prefix).startswith("build-env-"):  # pypa/build's own virtualenv
        for prefix in (os.environ.get("VIRTUAL_ENV"), os.environ.get("CONDA_PREFIX"), sys.base_prefix):
            if prefix and os.path.realpath(prefix) != os.path.realpath(sys.prefix):
                for key in ("purelib", "platlib"):
                    p = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix}).get(key)
                    if p and p not in paths:
                        paths.append(p)
    return [p for p in paths if os.path.isdir(p)]


def _use_target_torch():
    """Makes `import torch` find the target environment's torch; exits with one clear
    line when there is none."""
    try:
        import torch  # noqa: F401  (already importable: no isolation, or torch next to us)
        return
    except ImportError:
        pass
    for p in _target_site_packages():
        if p not in sys.path:
            sys.path.append(p)  # after the isolated build requirements
    try:
        import torch  # noqa: F401
    except ImportError:
        if os.path.basename(sys.prefix).startswith("build-env-"):
            raise SystemExit("wavg_ext is compiled against the installed PyTorch, and `python -m build` found "
                             "none (it looks in $VIRTUAL_ENV, $CONDA_PREFIX and the base installation): run "
                             "`python -m build --no-isolation` with the interpreter that has torch") from None
        raise SystemExit(_NO_TORCH) from None


def get_requires_for_build_wheel(config_settings=None):
    _use_target_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _use_target_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def _sdist_without_torch_if_needed():
    """An sdist holds sources only: made without torch when none can be found (e.g. by
    `python -m build`, whose isolated environment is a separate virtualenv)."""
    try:
        _use_target_torch()
    except SystemExit:
        os.environ["WAVG_EXT_SDIST_WITHOUT_TORCH"] = "1"


def get_requires_for_build_sdist(config_settings=None):
    _sdist_without_torch_if_needed()
    return _setuptools.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    _sdist_without_torch_if_needed()
    return _setuptools.build_sdist(sdist_directory, config_settings)
