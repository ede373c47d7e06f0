"""Drop-in optimizer wrappers for weight averaging (:mod:`wavg_ext.optim.averaging`) and TWA
(:mod:`wavg_ext.optim.twa`)."""

from .averaging import EMA, PSWA, PSWM, PWALKS, SWA, PeriodicSWA, WeightAveraging, fraction_count
from .lawa import LAWA
from .posthoc import PostHocEMA, synthesize_ema
from .power_ema import PowerEMA
from .schedules import cyclic_lr
from .twa import TWA, NonFiniteSampleWarning, RankDeficientSampleWarning
from .wrapper import find_averaging

__all__ = ["WeightAveraging", "SWA", "EMA", "PowerEMA", "PostHocEMA", "LAWA", "synthesize_ema", "PSWA", "PWALKS", "PSWM", "PeriodicSWA", "TWA",
           "RankDeficientSampleWarning", "NonFiniteSampleWarning", "cyclic_lr", "fraction_count", "find_averaging"]
