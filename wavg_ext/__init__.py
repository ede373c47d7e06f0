"""wavg_ext: fused weight averaging (SWA, EMA and friends) for PyTorch.

``wavg_ext.optim`` holds the drop-in optimizer wrappers (``SWA``, ``EMA``, ``PSWA``,
``PWALKS``, ``PSWM``, ``PeriodicSWA``, ``TWA``, re-exported here), ``wavg_ext.update_bn`` the
BatchNorm recalibration, ``wavg_ext.ops`` the fused in-place ops they use, and
``wavg_ext.build_info()`` says what was compiled into this installation.
"""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries)

try:
    from . import _C
except ImportError as err:  # e.g. importing the source checkout, which has no compiled _C
    raise ImportError(
        f"wavg_ext's compiled extension (_C) was not found next to {__file__}. Build it with "
        "`bash scripts/install.sh` (pip install --no-build-isolation . and an in-place build), "
        "or run from outside the source checkout so the installed package is imported."
    ) from err
from . import ops  # noqa: E402
from . import optim  # noqa: E402
from .bn import update_bn  # noqa: E402
from .optim import (EMA, PSWA, PSWM, PWALKS, SWA, TWA, NonFiniteSampleWarning, PeriodicSWA,  # noqa: E402
                    RankDeficientSampleWarning, WeightAveraging, cyclic_lr)

__version__ = "0.1.0"

__all__ = ["ops", "optim", "build_info", "update_bn", "cyclic_lr", "WeightAveraging", "SWA", "EMA", "PSWA",
           "PWALKS", "PSWM", "PeriodicSWA", "TWA", "RankDeficientSampleWarning", "NonFiniteSampleWarning",
           "__version__"]


def build_info() -> dict:
    """What this installation was built with.

    Keys: ``version``, ``cpu`` (always True), ``cpu_capability`` (vector ISA the CPU
    kernels were compiled for), ``openmp`` (whether the CPU kernels run threaded),
    ``num_threads``, ``cuda`` (CUDA kernels compiled), ``cuda_version`` (toolkit the
    kernels were compiled with), ``cuda_archs`` (TORCH_CUDA_ARCH_LIST used),
    ``torch_version`` (the torch the extension was compiled against).
    """
    info = dict(_C.build_info())
    info["version"] = __version__
    info["num_threads"] = torch.get_num_threads()
    return info
