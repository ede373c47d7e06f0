"""wavg_ext: fused weight averaging (SWA, EMA and friends) for PyTorch.

``wavg_ext.optim`` holds the drop-in optimizer wrappers (``SWA``, ``EMA``, ``PSWA``,
``PWALKS``, ``PSWM``, ``PeriodicSWA``, ``TWA``, re-exported here), ``wavg_ext.update_bn`` the
BatchNorm recalibration, ``wavg_ext.ops`` the fused in-place ops they use, and
``wavg_ext.build_info()`` says what was compiled into this installation.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from typing import Optional

import torch  # noqa: F401  (the extension links against torch's libraries)


def _torch_built_for() -> Optional[str]:
    """The torch version the compiled extension next to this file was built against, read
    from the file itself (python_module.cpp embeds it), or None when there is none."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_C.*so")) + glob.glob(os.path.join(here, "_C.*pyd"))):
        with open(path, "rb") as f:
            found = re.search(rb"wavg_ext built for torch ([^;\x00]{1,64});", f.read())
        if found:
            return found.group(1).decode("ascii", "replace")
    return None


def _import_failure_message(built_for: Optional[str], running: str) -> str:
    if built_for is None:  # e.g. importing the source checkout, which has no compiled _C
        return (f"wavg_ext's compiled extension (_C) was not found next to {__file__}. Build it with "
                "`bash scripts/install.sh` (pip install . and an in-place build), or run from outside "
                "the source checkout so the installed package is imported.")
    if built_for != running:
        return (f"wavg_ext's compiled extension was built for torch {built_for}, but torch {running} is "
                "installed: reinstall wavg_ext with this torch (`pip install .` from its source) or "
                f"install torch {built_for}.")
    return (f"wavg_ext's compiled extension (built for this torch, {running}) failed to load; see the "
            "error above.")


try:
    from . import _C
except ImportError as err:
    raise ImportError(_import_failure_message(_torch_built_for(), torch.__version__)) from err

if _C.build_info()["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
    warnings.warn(f"wavg_ext was built for torch {_C.build_info()['torch_version']} and loaded with torch "
                  f"{torch.__version__}; if anything fails, reinstall wavg_ext with this torch",
                  RuntimeWarning, stacklevel=2)


def _load_cuda_kernels(built: dict, torch_version: str, torch_cuda: Optional[str], load) -> tuple:
    """Loads the CUDA kernels' module (_C_cuda: `load()` imports it, which registers its
    kernels with the dispatcher) when this build has it and torch has CUDA. Returns
    (loaded, one line saying so or why not). A module that fails to load is a warning, not an
    error: the CPU kernels work, and ops on CUDA tensors run the plain-PyTorch reference."""
    if not built["cuda_built"]:
        return False, f"no CUDA kernels in this build: {built['cuda_build_note']}"
    if not torch_cuda:
        return False, (f"CUDA kernels built (CUDA {built['cuda_version']}) but not loaded: torch "
                       f"{torch_version} has no CUDA")
    try:
        load()
    except ImportError as err:
        why = (f"CUDA kernels built (CUDA {built['cuda_version']}, torch {built['torch_version']}) but failed "
               f"to load under torch {torch_version} (CUDA {torch_cuda}): {err}")
        warnings.warn(f"wavg_ext: {why}. Ops on CUDA tensors fall back to plain PyTorch (slower); reinstall "
                      "wavg_ext with this torch (`pip install .` from its source)", RuntimeWarning, stacklevel=3)
        return False, why
    return True, f"CUDA kernels loaded (CUDA {built['cuda_version']}, archs {built['cuda_archs']})"


def _import_cuda_module():
    from . import _C_cuda  # noqa: F401


_cuda_loaded, _cuda_status = _load_cuda_kernels(_C.build_info(), torch.__version__, torch.version.cuda,
                                                _import_cuda_module)
__version__ = _C.build_info()["version"]  # the version built: wavg_ext/_version.py and the git commit

from . import ops  # noqa: E402
from . import optim  # noqa: E402
from .bn import update_bn  # noqa: E402
from .model_ema import ModelEMA  # noqa: E402
from .merge import greedy_soup, merge_checkpoints  # noqa: E402
from . import compat  # noqa: E402
from .swa_utils import (AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn, get_swa_avg_fn,  # noqa: E402
                        get_swa_multi_avg_fn)
from .optim import (EMA, LAWA, PSWA, PSWM, PWALKS, SWA, TWA, NonFiniteSampleWarning, PeriodicSWA, PostHocEMA, PowerEMA,  # noqa: E402
                    RankDeficientSampleWarning, WeightAveraging, cyclic_lr, synthesize_ema)

__all__ = ["ops", "optim", "build_info", "update_bn", "cyclic_lr", "AveragedModel", "ModelEMA", "compat", "get_ema_multi_avg_fn",
           "get_swa_multi_avg_fn", "get_ema_avg_fn", "get_swa_avg_fn", "WeightAveraging", "SWA", "EMA", "PowerEMA", "PostHocEMA", "synthesize_ema", "LAWA", "PSWA",
           "PWALKS", "PSWM", "PeriodicSWA", "TWA", "RankDeficientSampleWarning", "NonFiniteSampleWarning",
           "merge_checkpoints", "greedy_soup", "__version__"]


def build_info() -> dict:
    """What this installation was built with, and what it loaded.

    Keys: ``version``; ``cpu`` (always True); ``cpu_capability`` (the vector ISA whose CPU
    kernels run: the best this CPU supports, or the one ``WAVG_EXT_CPU_CAPABILITY`` asks
    for); ``cpu_capabilities`` (the ISAs compiled, lowest first); ``openmp`` (whether the CPU
    kernels run threaded); ``num_threads``; ``cuda`` (the CUDA kernels are loaded: ops on
    CUDA tensors run them); ``cuda_built`` (this installation has them: the module
    ``wavg_ext._C_cuda``, loaded only under a torch with CUDA); ``cuda_status`` (one line:
    how they were built and loaded, or why not); ``cuda_version`` (toolkit the kernels were
    compiled with); ``cuda_archs`` (TORCH_CUDA_ARCH_LIST used); ``torch_version`` (the torch
    the extension was compiled against).
    """
    info = dict(_C.build_info())
    del info["cuda_build_note"]  # part of cuda_status
    info["cuda"] = _cuda_loaded
    info["cuda_status"] = _cuda_status
    info["num_threads"] = torch.get_num_threads()
    return info
