"""wavg_ext's version: the release in wavg_ext/_version.py (the one place it is written),
plus, in a git checkout, which commit was built.

- HEAD is the release's tag (v<release>) and the tree is clean: ``<release>``;
- any other commit: ``<release>+g<commit>`` (a PEP 440 local label), ``.dirty`` appended
  when tracked files are modified;
- no git (an unpacked sdist): the version recorded in its PKG-INFO, else ``<release>``.

setup.py stamps the result into the package metadata and into the compiled extension
(wavg_ext.__version__ reads it from there). Not part of the installed package.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Optional


def release(root: str) -> str:
    with open(os.path.join(root, "wavg_ext", "_version.py")) as f:
        found = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    if not found:
        raise RuntimeError("wavg_ext/_version.py: no __version__ = \"...\" line")
    return found.group(1)


def _git(root: str, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _from_pkg_info(root: str) -> Optional[str]:
    path = os.path.join(root, "PKG-INFO")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        found = re.search(r"^Version:\s*(\S+)", f.read(), re.MULTILINE)
    return found.group(1) if found else None


def version(root: str) -> str:
    base = release(root)
    # Only a checkout whose top is root (not some repository root happens to lie in).
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(root):
        return _from_pkg_info(root) or base
    described = _git(root, "describe", "--tags", "--long", "--dirty", "--always", "--abbrev=7",
                     "--match", "v[0-9]*")
    if not described:
        return base
    dirty = described.endswith("-dirty")
    described = described[: -len("-dirty")] if dirty else described
    found = re.fullmatch(r"v(.+)-(\d+)-g([0-9a-f]+)", described)
    if found and found.group(1) == base and found.group(2) == "0" and not dirty:
        return base
    commit = found.group(3) if found else described  # --always: just the abbreviated hash
    return f"{base}+g{commit}" + (".dirty" if dirty else "")
