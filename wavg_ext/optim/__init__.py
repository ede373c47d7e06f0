"""Drop-in optimizer wrappers for weight averaging (see :mod:`wavg_ext.optim.averaging`)."""

from .averaging import EMA, PSWA, PSWM, PWALKS, SWA, PeriodicSWA, WeightAveraging, fraction_count
from .schedules import cyclic_lr

__all__ = ["WeightAveraging", "SWA", "EMA", "PSWA", "PWALKS", "PSWM", "PeriodicSWA", "cyclic_lr",
           "fraction_count"]
