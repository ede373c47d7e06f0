"""Weight averaging on a real (small) task: where it matters (label noise, over seeds), and the seed papers' methods.

Run ``python -m wavg_ext.demo [--seeds N | --full] [--label-noise P] [--train-images N]
[--epochs N] [--methods ...] [--plot PATH] [--json PATH] [--threads T] [--no-progress]``
for the label-noise study (the default), or ``python -m wavg_ext.demo --clean [--epochs N]
[--seed S] [--methods ...] ...`` for the single-seed run on clean labels.

A small CNN with BatchNorm is trained on scikit-learn's embedded 8x8 digits (1797 images,
no download) once per method, each time from the same initialization, on the same
mini-batch order, with the same backbone LR schedule and epoch budget: only the
averaging differs. After every epoch the test accuracy of the model each method yields
is measured.

The study (default): 600 training images, 35% of their labels (and of 150 held-out ones)
flipped to a uniformly drawn other class, clean test labels, 3 seeds (``--full``: 5).
SGD memorizes the noise as its LR decays; the table gives each method's final accuracy
as mean ± std over the seeds and its difference from SGD's in the same seed. Rows: SGD,
SWA, EMA, EMA with the inv_gamma warmup, PowerEMA's two tracked profiles (sigma_rel 0.05,
0.28), two post-hoc EMA widths synthesized from its per-epoch snapshots, LAWA (the last 5
epoch ends) and the greedy soup (Wortsman et al.) of each epoch's average, its
ingredients chosen on the held-out (noisy) images. About 75 s on 2 cores.

The clean run (``--clean``): SGD vs SWA, EMA, PSWA, PWALKS, PSWM, periodic SWA and TWA
(SWA and EMA: their averaged weights; the periodic methods: the model, which holds the
assigned average after each period end). TWA is the paper's head-stage use: it follows the
backbone for the first 60% of the budget, collecting one sample per epoch end, then
trains a few epochs in the span of those samples from their mean (its own short,
higher-LR schedule) and stops, so it trains fewer epochs than the others; "SWA head" is
the plain average of the same samples. The table gives the final and best accuracy, the
PSWA paper's stability measures (std over the last epochs, share of epochs that improve
on the previous one) and the training time, which excludes evaluation but includes the
BatchNorm recalibrations a method needs, and the measured cost of the averaging itself
per step. Digits with clean labels is easy, so every method ends within a few test
images of the others, and such differences change with ``--seed``. TWA lands near SGD's
full-budget accuracy with ~30% fewer epochs and above SWA of the same samples. The model
has ~10k parameters, so an averaging step costs microseconds (``python -m wavg_ext.bench``
measures the fused ops on large models).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import (EMA, LAWA, PSWA, PSWM, PWALKS, SWA, TWA, PeriodicSWA, PostHocEMA, PowerEMA, WeightAveraging, build_info,
               greedy_soup, synthesize_ema, update_bn)

__all__ = ["METHODS", "CLEAN_METHODS", "STUDY_METHODS", "Settings", "MethodResult", "DemoResult", "MethodTrainer", "run",
           "format_table", "StudyResult", "study", "main"]

# CLI name -> display name, in table order.
METHODS: Dict[str, str] = {"sgd": "SGD", "swa": "SWA", "ema": "EMA", "pswa": "PSWA", "pwalks": "PWALKS",
                           "pswm": "PSWM", "periodic_swa": "PeriodicSWA", "swa_head": "SWA head", "twa": "TWA",
                           "ema_warmup": "EMA warmup", "power_ema": "PowerEMA", "lawa": "LAWA", "soup": "greedy soup"}
# The methods of the clean single-seed run (--clean) and of the label-noise study (the default).
CLEAN_METHODS = ["sgd", "swa", "ema", "pswa", "pwalks", "pswm", "periodic_swa", "swa_head", "twa"]
STUDY_METHODS = ["sgd", "swa", "ema", "ema_warmup", "power_ema", "lawa", "soup"]
SCHEDULES = ("cosine", "step")
DIGITS = 1797  # images in sklearn's digits
DEFAULT_EPOCHS = 40

Data = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """Everything that determines the results of a run (with the thread count); validated on construction."""

    epochs: int = DEFAULT_EPOCHS
    seed: int = 0  # split, initialization and batch order
    batch_size: int = 32
    test_size: int = 450  # stratified
    lr: float = 0.1
    schedule: str = "cosine"  # per iteration: "cosine" to lr·lr_min_ratio, or "step" (x0.1 at 50% and 75%)
    lr_min_ratio: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    swa_start: float = 0.55  # SWA: first sample at the end of this fraction of the epochs, then one per epoch
    ema_decay: float = 0.99  # per step: a ~100-step horizon, 2-3 epochs here
    pswa_alpha: float = 0.5  # PSWA: share alpha of each epoch's batches averaged, spread evenly
    pwalks_k: float = 0.1  # PWALKS: only the last k of each epoch's batches averaged
    pswm_m: float = 0.7  # PSWM: avg <- (1 - m)·avg + m·w; the paper finds (0.5, 0.9) good
    periodic_start: float = 0.25  # periodic SWA: the first procedure starts after about this fraction
    periodic_periods: int = 3  # SWA procedures (2: DSWA, 3: TSWA)
    bn_fraction: float = 0.2  # beta: share of the training batches used by each BN recalibration
    twa_head: float = 0.6  # TWA (and SWA head): one sample per epoch end over this fraction of the epochs
    twa_fraction: float = 0.1  # TWA: then this fraction of the epochs trained in the samples' span
    twa_lr: float = 1.0  # TWA phase LR over lr: ~3x the backbone's LR at the switch (the paper uses 20x its
    #                     initial LR on CIFAR; this small CNN diverges beyond ~3x lr in the span)
    twa_reg: float = 1e-5  # lambda of eq. (8)
    # The label-noise study (python -m wavg_ext.demo without --clean):
    label_noise: float = 0.0  # share of training (and validation) labels flipped to a random other class
    train_images: int = 0  # training images used (0: all the split leaves); a stratified subset
    val_size: int = 0  # held out of the training images (noisy labels like them): the soup's evaluation set
    ema_warmup_decay: float = 0.999  # EMA with the inv_gamma warmup (power 2/3) from the first step
    sigma_rels: Tuple[float, float] = (0.05, 0.28)  # PowerEMA's tracked profiles (EDM2's pair)
    posthoc_sigma_rels: Tuple[float, float] = (0.10, 0.20)  # synthesized from its per-epoch snapshots
    lawa_window: int = 5  # LAWA: the mean of the last this many epoch-end samples

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "test_size", "periodic_periods", "seed", "train_images", "val_size",
                     "lawa_window"):
            value = getattr(self, name)
            low = 0 if name in ("seed", "train_images", "val_size") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 10 <= self.test_size <= DIGITS - 100:  # a stratified split needs >= 1 image per class
            raise ValueError(f"test_size must be in [10, {DIGITS - 100}], got {self.test_size}")
        if self.train_images and self.train_images < 100:
            raise ValueError(f"train_images must be 0 (all) or >= 100, got {self.train_images}")
        if self.test_size + self.val_size + (self.train_images or 100) > DIGITS:
            raise ValueError(f"test_size {self.test_size} + val_size {self.val_size} + train_images "
                             f"{self.train_images or 100} exceed the {DIGITS} images")
        if self.batch_size > self.train_size:
            raise ValueError(f"batch_size {self.batch_size} exceeds the {self.train_size} training images")
        for name in ("sigma_rels", "posthoc_sigma_rels"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 2 or not all(
                    isinstance(v, float) and 0 < v < 0.28868 for v in value) or value[0] == value[1]:
                raise ValueError(f"{name} must be two different floats in (0, 0.2887), got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        ranges = {"lr": (0, math.inf, False), "lr_min_ratio": (0, 1, True), "momentum": (0, 1, False),
                  "weight_decay": (0, 1, False), "swa_start": (0, 1, True), "ema_decay": (0, 1, False),
                  "pswa_alpha": (0, 1, True), "pwalks_k": (0, 1, True), "pswm_m": (0, 1, True),
                  "periodic_start": (0, 1, False), "bn_fraction": (0, 1, True), "twa_head": (0, 1, True),
                  "twa_fraction": (0, 1, True), "twa_lr": (0, math.inf, False), "twa_reg": (0, 1, False),
                  "label_noise": (0, 0.9, False), "ema_warmup_decay": (0, 1, False)}
        for name, (low, high, high_ok) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            strict_low = name in ("lr", "pswa_alpha", "pwalks_k", "pswm_m", "bn_fraction", "twa_head",
                                  "twa_fraction", "twa_lr")
            if value < low or (strict_low and value == low) or value > high or (value == high and not high_ok):
                bounds = f"{'(' if strict_low else '['}{low}, {high}{']' if high_ok else ')'}"
                raise ValueError(f"{name} must be in {bounds}, got {value}")

    @property
    def train_size(self) -> int:
        return self.train_images or DIGITS - self.test_size - self.val_size

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.batch_size  # the last partial batch is dropped (see Batches)

    @property
    def swa_start_epoch(self) -> int:
        # At least epoch 1 (never average the random init), at most the last epoch.
        return min(self.epochs, max(1, round(self.swa_start * self.epochs)))

    @property
    def periodic_plan(self) -> Tuple[int, int, int]:
        """(start epoch, epochs per period, periods) of periodic SWA.

        Guo et al. start the first SWA procedure early in training (after epoch 40, with 20-epoch
        periods, on CIFAR) and take one sample per epoch under the backbone's own schedule.
        Scaled to this budget: ``periodic_periods`` equal periods after about ``periodic_start``
        of the epochs, placed so that the last one ends with the budget (its average is the
        final model) and, budget permitting, none starts at the random init.
        """
        period = max(1, round((1 - self.periodic_start) * self.epochs / self.periodic_periods))
        periods = max(1, min(self.periodic_periods, (self.epochs - 1) // period))
        return max(0, self.epochs - periods * period), period, periods

    @property
    def twa_plan(self) -> Tuple[int, int]:
        """(head epochs, TWA epochs): one sample per epoch end over the head epochs, then the
        TWA epochs in their span; both within the budget (a 1-epoch budget has no TWA epoch)."""
        head = max(1, min(self.epochs - 1, round(self.twa_head * self.epochs)))
        return head, min(self.epochs - head, max(1, round(self.twa_fraction * self.epochs)))

    def method_epochs(self, name: str) -> int:
        """Epochs that method ``name`` trains: the budget, except for the head-stage methods."""
        head, tail = self.twa_plan
        return {"swa_head": head, "twa": head + tail}.get(name, self.epochs)


@dataclass
class MethodResult:
    """Per-epoch results of one method; accuracies are fractions in [0, 1], times in seconds."""

    method: str
    accuracy: List[float] = field(default_factory=list)
    train_seconds: List[float] = field(default_factory=list)  # training steps + the BN recalibration it needs
    bn_seconds: List[float] = field(default_factory=list)  # the part of train_seconds spent in BN recalibration
    averaging_seconds: List[float] = field(default_factory=list)  # wrapper step() minus base step() minus BN
    monitor_bn_seconds: List[float] = field(default_factory=list)  # BN recalibration only to evaluate (not counted)
    evaluated: List[str] = field(default_factory=list)  # what was evaluated after each epoch
    steps: int = 0

    @property
    def final(self) -> float:
        return self.accuracy[-1]

    @property
    def best(self) -> float:
        return max(self.accuracy)

    def std_last(self, k: int) -> float:
        tail = self.accuracy[-k:]
        return statistics.pstdev(tail) if len(tail) > 1 else 0.0

    def _share(self, keep: Callable[[float, float], bool]) -> Optional[float]:
        pairs = list(zip(self.accuracy, self.accuracy[1:]))
        return sum(keep(a, b) for a, b in pairs) / len(pairs) if pairs else None

    @property
    def improved_share(self) -> Optional[float]:
        """Share of epochs (from the second) whose accuracy beats the previous epoch's."""
        return self._share(lambda a, b: b > a)

    @property
    def no_drop_share(self) -> Optional[float]:
        """Share of epochs (from the second) whose accuracy is not below the previous epoch's."""
        return self._share(lambda a, b: b >= a)

    @property
    def train_time(self) -> float:
        return sum(self.train_seconds)

    @property
    def averaging_us_per_step(self) -> float:
        return 1e6 * sum(self.averaging_seconds) / max(1, self.steps)


@dataclass
class DemoResult:
    settings: Settings
    environment: Dict[str, Any]
    methods: Dict[str, MethodResult]  # keyed by CLI name, in run order
    wall_seconds: float
    model_parameters: int

    @property
    def last_k(self) -> int:
        """Epochs of the std column: a quarter of the budget, at least 2 (1 for a 1-epoch run)."""
        return min(self.settings.epochs, max(2, self.settings.epochs // 4))

    def overhead(self, name: str) -> Optional[float]:
        """Training time relative to SGD's, minus 1 (None without an SGD run)."""
        sgd = self.methods.get("sgd")
        return self.methods[name].train_time / sgd.train_time - 1 if sgd else None

    def table(self) -> str:
        return format_table(self)

    def to_dict(self) -> Dict[str, Any]:
        k = self.last_k
        methods = {name: {**asdict(r), "final": r.final, "best": r.best, "std_last_k": r.std_last(k),
                          "improved_share": r.improved_share, "no_drop_share": r.no_drop_share,
                          "train_time": r.train_time, "overhead_vs_sgd": self.overhead(name),
                          "averaging_us_per_step": r.averaging_us_per_step}
                   for name, r in self.methods.items()}
        return {"settings": asdict(self.settings), "environment": self.environment, "last_k": k,
                "wall_seconds": self.wall_seconds, "model_parameters": self.model_parameters, "methods": methods}


# --------------------------------------------------------------------------- data and model


def load_data(test_size: int, seed: int, val_size: int = 0, train_images: int = 0,
              label_noise: float = 0.0) -> Data:
    """(x_train, y_train, x_test, y_test): [N, 1, 8, 8] float32 in [0, 1], int64 labels; stratified
    split. With ``val_size``, (x_val, y_val) held out of the rest are available from
    :func:`load_validation` (same arguments); ``train_images`` keeps a stratified subset of the
    training images; ``label_noise`` flips that share of the training and validation labels
    (chosen with the seed) to a uniformly drawn other class. Test labels stay clean."""
    return _split(test_size, seed, val_size, train_images, label_noise)[0]


def load_validation(test_size: int, seed: int, val_size: int, train_images: int = 0,
                    label_noise: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_val, y_val) of :func:`load_data` with the same arguments."""
    return _split(test_size, seed, val_size, train_images, label_noise)[1]


def _split(test_size: int, seed: int, val_size: int, train_images: int,
           label_noise: float) -> Tuple[Data, Tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(digits.target).long()
    train, test = train_test_split(list(range(len(y))), test_size=test_size, stratify=digits.target,
                                   random_state=seed)
    val: List[int] = []
    if val_size:
        train, val = train_test_split(train, test_size=val_size, stratify=digits.target[train], random_state=seed)
    if train_images and train_images < len(train):
        train, _ = train_test_split(train, train_size=train_images, stratify=digits.target[train],
                                    random_state=seed)
    y_train, y_val = y[train].clone(), y[val].clone()
    if label_noise:
        g = torch.Generator().manual_seed(1000 + seed)
        for labels in (y_train, y_val):
            flip = torch.rand(len(labels), generator=g) < label_noise
            shift = torch.randint(1, 10, (len(labels),), generator=g)  # another class, uniformly
            labels[flip] = (labels[flip] + shift[flip]) % 10
    return (x[train], y_train, x[test], y[test]), (x[val], y_val)


class Batches:
    """Shuffled (inputs, targets) mini-batches with len(). Every pass draws a new permutation
    from the instance's own seeded generator: two instances with one seed give one order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y) // self.batch_size  # drop the partial batch: a tiny batch gives noisy BN statistics

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.y), generator=self.generator)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def make_model() -> nn.Sequential:
    """~10k parameters: two 3x3 conv + BN + ReLU blocks, a 2x2 max-pool, a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correctly classified images, in eval mode (the model's mode is restored)."""
    training = model.training
    model.eval()
    try:
        return int((model(x).argmax(1) == y).sum()) / len(y)
    finally:
        model.train(training)


def lr_factor(s: Settings, i: int, total: int) -> float:
    """Multiplier of the base LR for iteration i of ``total`` (the backbone schedule, same for all methods)."""
    if s.schedule == "cosine":
        return s.lr_min_ratio + (1 - s.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    return 0.1 ** ((i >= total // 2) + (i >= 3 * total // 4))


def twa_lr_factor(i: int, total: int) -> float:
    """Multiplier of the TWA phase's LR for its iteration i of ``total``: the paper's condensed
    schedule (10 epochs, x0.1 after the 5th and the 8th), i.e. x0.1 at 50% and 80%."""
    return 0.1 ** ((i >= total // 2) + (i >= 4 * total // 5))


# --------------------------------------------------------------------------- the methods


def parse_methods(methods: Union[None, str, Sequence[str]]) -> List[str]:
    """CLI names in the given order without repeats (None: the clean run's); ValueError names an unknown one."""
    if methods is None:
        return list(CLEAN_METHODS)
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names: List[str] = []
    for item in items:
        name = item.strip().lower().replace("-", "_") if isinstance(item, str) else None
        if name not in METHODS:
            raise ValueError(f"unknown method {item!r}; choose from {', '.join(METHODS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    return names


def make_optimizer(name: str, sgd: torch.optim.SGD, model: nn.Module, s: Settings,
                   recalibrate: Callable[[], Any], directory: Optional[str] = None) -> Optional[Union[WeightAveraging, TWA]]:
    """The averaging wrapper of method ``name`` around ``sgd`` (None for plain SGD); ``directory``:
    where power_ema's snapshots go."""
    steps = s.steps_per_epoch
    if name == "sgd":
        return None
    if name == "ema_warmup":
        # diffusers'/timm's schedule: decay min(d, 1 - (1 + t)^(-2/3)) from the first step, BN averaged.
        return EMA(sgd, decay=s.ema_warmup_decay, warmup="inv_gamma", module=model, average_buffers=True)
    if name == "power_ema":
        # Both profiles tracked (BN buffers too), a snapshot of them at every epoch end for post-hoc synthesis.
        return PostHocEMA(sgd, sigma_rels=s.sigma_rels, snapshot_every=steps, directory=directory,
                          snapshot_dtype=torch.float32, module=model, average_buffers=True)
    if name == "lawa":
        # The mean of the last lawa_window epoch-end weights (BN buffers averaged alike).
        return LAWA(sgd, window=s.lawa_window, every=steps, start=steps, module=model, average_buffers=True)
    if name == "soup":
        # The ingredients: each epoch's own average of its steps' weights (the model trains as SGD;
        # MethodTrainer resets the average at every epoch start and recalibrates BN for each).
        return SWA(sgd, every=1, module=model)
    if name == "swa":
        # One sample per epoch end from swa_start on. module= makes averaged() restore the BN
        # buffers that update_bn recomputes for the average, so training continues untouched.
        return SWA(sgd, start=s.swa_start_epoch * steps, every=steps, module=model)
    if name == "ema":
        # average_buffers: the BN running statistics are averaged too, so the EMA model needs no
        # update_bn. No warm-up: the first sample is copied, and starting after epoch 1 keeps the
        # random init and its untrained BN statistics from dominating the early average.
        return EMA(sgd, decay=s.ema_decay, start=steps, module=model, average_buffers=True)
    if name == "pswa":
        return PSWA(sgd, steps, sample_fraction=s.pswa_alpha, on_assign=recalibrate)
    if name == "pwalks":
        return PWALKS(sgd, steps, last_fraction=s.pwalks_k, on_assign=recalibrate)
    if name == "pswm":
        return PSWM(sgd, steps, momentum=s.pswm_m, on_assign=recalibrate)
    if name == "periodic_swa":
        # Each procedure starts from the previous one's average (its first sample), adds one sample
        # per epoch end (every=steps) and puts its average into the model at its end.
        start, period, periods = s.periodic_plan
        return PeriodicSWA(sgd, period=period * steps, start=start * steps, every=steps, periods=periods,
                           on_assign=recalibrate)
    if name == "swa_head":
        # The samples TWA collects (the end of each head epoch), averaged with equal weights; it
        # trains only the head epochs.
        return SWA(sgd, start=steps, every=steps, module=model)
    if name == "twa":
        # MethodTrainer collects a sample at each head epoch end and then starts the subspace.
        return TWA(sgd, capacity=s.twa_plan[0], reg=s.twa_reg)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


class MethodTrainer:
    """One method's model, optimizer and data order; ``epoch()`` trains one epoch and evaluates.

    ``run`` advances all methods' trainers in lockstep, one epoch each in turn, so that
    changes in the machine's load over the run affect every method's timings alike.
    """

    def __init__(self, name: str, s: Settings, data: Data, init: Dict[str, torch.Tensor],
                 val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        self.name, self.settings = name, s
        x_train, y_train, self.x_test, self.y_test = data
        self.val = val
        self.model = make_model()
        self.model.load_state_dict(init)
        self.model.train()
        self.train_batches = Batches(x_train, y_train, s.batch_size, seed=s.seed)
        # Its own generator: BN recalibration must not change the training data order.
        self.bn_batches = Batches(x_train, y_train, s.batch_size, seed=s.seed + 1)
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        # Timing harness: the base step() is timed at its outermost call (a wrapper calls it as
        # self.optimizer.step()), so a wrapper's step() minus it minus BN is the averaging itself.
        self.base_seconds = 0.0
        self.bn_seconds = 0.0  # in the periodic methods' on_assign recalibrations
        base_step = self.sgd.step

        def timed_step(closure: Optional[Callable[[], Any]] = None) -> Any:
            t0 = time.perf_counter()
            try:
                return base_step(closure)
            finally:
                self.base_seconds += time.perf_counter() - t0

        self.sgd.step = timed_step  # type: ignore[method-assign]
        self.iteration = 0
        self._directory = tempfile.TemporaryDirectory(prefix="wavg-demo-") if name == "power_ema" else None
        self.opt = make_optimizer(name, self.sgd, self.model, s, self._recalibrate,
                                  self._directory.name if self._directory else None)
        self.step_opt = self.opt if self.opt is not None else self.sgd
        self.epochs = s.method_epochs(name)
        steps = self.epochs * s.steps_per_epoch
        self.result = MethodResult(METHODS[name], steps=steps)
        # Further rows this trainer's run yields (key -> result): PowerEMA's second profile and
        # the post-hoc syntheses; the soup's ingredients (PSWA's averages).
        self.extra: Dict[str, MethodResult] = {}
        self.ingredients: List[Dict[str, torch.Tensor]] = []
        if name == "power_ema":
            a, b = s.sigma_rels
            self.result.method = f"PowerEMA {a:g}"
            self.extra[f"power_ema_{b:g}"] = MethodResult(f"PowerEMA {b:g}", steps=steps)
            for sigma in s.posthoc_sigma_rels:
                self.extra[f"posthoc_{sigma:g}"] = MethodResult(f"post-hoc {sigma:g}", steps=steps)
        elif name == "soup":
            self.extra["soup_epoch_average"] = MethodResult("epoch average", steps=steps)
            if val is None or not len(val[1]):
                raise ValueError("the soup needs held-out images to choose its ingredients: val_size > 0")
        # Evaluates what is synthesized or merged (never trained).
        self.scratch = make_model() if name in ("power_ema", "soup") else None

    def close(self) -> None:
        """Removes the trainer's snapshot directory (power_ema)."""
        if self._directory is not None:
            if isinstance(self.opt, PostHocEMA):
                self.opt.wait()
            self._directory.cleanup()
            self._directory = None

    def _scratch_accuracy(self, state: Optional[Dict[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor) -> float:
        if state is not None:
            self.scratch.load_state_dict(state)
        return accuracy(self.scratch, x, y)

    def _extra_epoch(self) -> Dict[str, float]:
        """The accuracies of this epoch's further rows (evaluation only: not timed)."""
        out: Dict[str, float] = {}
        opt = self.opt
        if isinstance(opt, PowerEMA):
            with opt.averaged(1):
                out[f"power_ema_{self.settings.sigma_rels[1]:g}"] = accuracy(self.model, self.x_test, self.y_test)
            opt.wait()  # the epoch's snapshot on disk
            for sigma in self.settings.posthoc_sigma_rels:
                synthesize_ema(self._directory.name, sigma, into=self.scratch)
                out[f"posthoc_{sigma:g}"] = self._scratch_accuracy(None, self.x_test, self.y_test)
        elif self.name == "soup":
            with opt.averaged():  # this epoch's average, BN recalibrated for it: an ingredient
                update_bn(self.bn_batches, self.model, fraction=self.settings.bn_fraction)
                out["soup_epoch_average"] = accuracy(self.model, self.x_test, self.y_test)
                self.ingredients.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return out

    def _soup_accuracy(self) -> float:
        """Test accuracy of the greedy soup of the ingredients so far, chosen on the (noisy) held-out images."""
        x_val, y_val = self.val
        soup = greedy_soup(self.ingredients, lambda sd: self._scratch_accuracy(sd, x_val, y_val))
        return self._scratch_accuracy(soup, self.x_test, self.y_test)

    def _recalibrate(self) -> None:
        t0 = time.perf_counter()
        update_bn(self.bn_batches, self.model, fraction=self.settings.bn_fraction)
        self.bn_seconds += time.perf_counter() - t0

    @property
    def finished(self) -> bool:
        return len(self.result.accuracy) >= self.epochs

    def _lr(self) -> float:
        """The LR of the next iteration: the backbone schedule over the whole budget (the head
        stage follows it too), or in TWA's subspace phase its own condensed schedule."""
        s = self.settings
        if isinstance(self.opt, TWA) and self.opt.in_subspace:
            head, tail = s.twa_plan
            i = self.iteration - head * s.steps_per_epoch
            return s.lr * s.twa_lr * twa_lr_factor(i, tail * s.steps_per_epoch)
        return s.lr * lr_factor(s, self.iteration, s.epochs * s.steps_per_epoch)

    def _twa_epoch_end(self) -> float:
        """TWA's work at a head epoch end: collect the sample; after the last head epoch start the
        subspace at the samples' mean and recalibrate BN for it. Returns the time taken without BN."""
        t0 = time.perf_counter()
        self.opt.collect()
        seconds = time.perf_counter() - t0
        if len(self.result.accuracy) + 1 == self.settings.twa_plan[0]:
            t0 = time.perf_counter()
            self.opt.start_subspace("mean")  # also clears the momentum (full-space directions)
            seconds += time.perf_counter() - t0
            self._recalibrate()
        return seconds

    def epoch(self) -> float:
        """Trains one epoch, evaluates the model the method yields, records both; returns the accuracy."""
        opt, model, r = self.opt, self.model, self.result
        if self.name == "soup" and opt.num_averaged > 0:
            opt.reset()  # each epoch's average is a new ingredient
        base0, bn0, step_s = self.base_seconds, self.bn_seconds, 0.0
        periods0 = getattr(opt, "period_index", 0)
        t_epoch = time.perf_counter()
        for xb, yb in self.train_batches:
            lr = self._lr()
            for group in self.sgd.param_groups:  # the schedule, per iteration
                group["lr"] = lr
            self.step_opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            t0 = time.perf_counter()
            self.step_opt.step()  # periodic methods assign the average and recalibrate BN in a period's last step
            step_s += time.perf_counter() - t0
            self.iteration += 1
        averaging_s = step_s - (self.base_seconds - base0) - (self.bn_seconds - bn0)
        if isinstance(opt, TWA) and not opt.in_subspace:
            averaging_s += self._twa_epoch_end()
        train_s = time.perf_counter() - t_epoch
        bn_s = self.bn_seconds - bn0

        monitor_s = 0.0
        if self.name == "soup":
            acc, what = 0.0, ""  # (the soup of this epoch's ingredients, below)
        elif isinstance(opt, SWA) and opt.num_averaged > 0:
            with opt.averaged():
                t0 = time.perf_counter()
                update_bn(self.bn_batches, model)  # SWA recomputes BN on all the training data
                monitor_s = time.perf_counter() - t0
                acc, what = accuracy(model, self.x_test, self.y_test), f"SWA average of {opt.num_averaged}"
        elif isinstance(opt, EMA) and opt.num_averaged > 0:
            with opt.averaged():
                acc, what = accuracy(model, self.x_test, self.y_test), "EMA weights"
        elif isinstance(opt, PowerEMA) and opt.num_averaged > 0:
            with opt.averaged(0):
                acc, what = accuracy(model, self.x_test, self.y_test), "PowerEMA profile 0"
        elif isinstance(opt, LAWA) and opt.num_averaged > 0:
            with opt.averaged():
                acc, what = accuracy(model, self.x_test, self.y_test), f"LAWA mean of {opt.num_averaged}"
        elif isinstance(opt, TWA) and opt.in_subspace:
            started = len(r.accuracy) + 1 == self.settings.twa_plan[0]
            what = f"TWA start: mean of {opt.num_samples} samples" if started else \
                f"model in the span of {opt.num_basis} samples"
            acc = accuracy(model, self.x_test, self.y_test)
        else:
            assigned = opt is not None and getattr(opt, "period_index", 0) > periods0
            acc, what = accuracy(model, self.x_test, self.y_test), "model (average assigned)" if assigned else "model"
        last_epoch = len(r.accuracy) + 1 == self.epochs
        if isinstance(opt, SWA) and last_epoch and opt.num_averaged > 0 and self.name != "soup":
            # Using SWA takes one BN recalibration after training: part of its cost. The earlier
            # ones only drew its curve and stay out of the training time.
            train_s, bn_s, monitor_s = train_s + monitor_s, bn_s + monitor_s, 0.0
        extra = self._extra_epoch()
        if self.name == "soup":
            acc, what = self._soup_accuracy(), f"greedy soup of {len(self.ingredients)} epoch averages"
        for row, row_acc, row_what in [(r, acc, what)] + [(self.extra[k], a, k) for k, a in extra.items()]:
            row.accuracy.append(row_acc)
            row.train_seconds.append(train_s)
            row.bn_seconds.append(bn_s)
            row.averaging_seconds.append(averaging_s)
            row.monitor_bn_seconds.append(monitor_s)
            row.evaluated.append(row_what)
        return acc


def environment() -> Dict[str, Any]:
    info = build_info()
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "wavg_ext": info["version"], "cpu_capability": info["cpu_capability"], "openmp": info["openmp"],
            "machine": platform.machine()}


def run(epochs: int = DEFAULT_EPOCHS, methods: Union[None, str, Sequence[str]] = None, seed: int = 0,
        progress: bool = False, batch_size: int = 32, threads: Optional[int] = 1,
        **overrides: Any) -> DemoResult:
    """Trains every method in ``methods`` (None: all of METHODS) and returns their per-epoch results.

    ``overrides`` are further :class:`Settings` fields (lr, schedule, ema_decay, bn_fraction, ...).
    ``threads``: torch intra-op threads for the run (restored afterwards; None: leave as is).
    The default is 1: a ~10k-parameter CNN gains little from a second thread, and on a
    shared machine OpenMP threads spin-waiting for a preempted peer made epochs ~100x slower.
    Results are deterministic for a given seed and thread count.
    """
    names = parse_methods(methods)
    settings = Settings(epochs=epochs, seed=seed, batch_size=batch_size, **overrides)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    previous_threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        split = dict(val_size=settings.val_size, train_images=settings.train_images, label_noise=settings.label_noise)
        data = load_data(settings.test_size, settings.seed, **split)
        val = load_validation(settings.test_size, settings.seed, **split) if settings.val_size else None
        with torch.random.fork_rng():  # the caller's global RNG is left as it was
            torch.manual_seed(settings.seed)
            model = make_model()
            init = {k: v.clone() for k, v in model.state_dict().items()}
        trainers = [MethodTrainer(name, settings, data, init, val) for name in names]
        bars = []
        if progress:
            from tqdm.auto import tqdm
            bars = [tqdm(total=t.epochs, desc=f"{METHODS[t.name]:<11}", unit="epoch", position=i,
                         file=sys.stderr) for i, t in enumerate(trainers)]
        try:
            for _ in range(settings.epochs):
                for i, trainer in enumerate(trainers):
                    if trainer.finished:  # the head-stage methods stop early
                        continue
                    acc = trainer.epoch()
                    if bars:
                        bars[i].set_postfix(acc=f"{acc:.2%}", refresh=False)
                        bars[i].update(1)
        finally:
            for bar in bars:
                bar.close()
            for trainer in trainers:
                trainer.close()
        results = {}
        for t in trainers:
            results[t.name] = t.result
            results.update(t.extra)
        env = environment()
    finally:
        torch.set_num_threads(previous_threads)
    n_params = sum(p.numel() for p in model.parameters())
    return DemoResult(settings, env, results, time.perf_counter() - started, n_params)


# --------------------------------------------------------------------------- reporting


def _pct(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def format_table(result: DemoResult) -> str:
    """One row per method: accuracy, stability, training time and averaging cost."""
    k = result.last_k
    columns = [("method", 14), ("epochs", 6), ("final", 7), ("best", 7), (f"std last {k}", 11), ("improved", 8),
               ("no drop", 7), ("train s", 7), ("vs SGD", 7), ("BN s", 5), ("avg us/step", 11)]
    header = " ".join(f"{title:<{w}}" if i == 0 else f"{title:>{w}}" for i, (title, w) in enumerate(columns))
    lines = [header, "-" * len(header)]
    for name, r in result.methods.items():
        overhead = result.overhead(name)
        cells = [r.method, str(len(r.accuracy)), _pct(r.final), _pct(r.best), _pct(r.std_last(k)),
                 _pct(r.improved_share, 0), _pct(r.no_drop_share, 0), f"{r.train_time:.2f}",
                 "base" if name == "sgd" else "n/a" if overhead is None else f"{100 * overhead:+.1f}%",
                 f"{sum(r.bn_seconds):.2f}", f"{r.averaging_us_per_step:.1f}"]
        lines.append(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                              for i, (c, (_, w)) in enumerate(zip(cells, columns))))
    return "\n".join(lines)


def describe(result: DemoResult) -> str:
    """The environment and settings of a run, as printed above the table."""
    s, env = result.settings, result.environment
    start, period, periods = s.periodic_plan
    head, tail = s.twa_plan
    schedule = (f"cosine per step to {s.lr * s.lr_min_ratio:g}" if s.schedule == "cosine"
                else "x0.1 at 50% and 75% of the steps")
    return "\n".join([
        f"environment: torch {env['torch']}, {env['threads']} thread(s), wavg_ext {env['wavg_ext']} "
        f"(cpu_capability {env['cpu_capability']}, openmp {env['openmp']}), python {env['python']} {env['machine']}",
        f"data: sklearn digits, {s.train_size} train / {s.test_size} test images (stratified, seed {s.seed}); "
        f"one test image = {1 / s.test_size:.2%}",
        f"backbone (all methods): SGD lr {s.lr:g} momentum {s.momentum:g} weight decay {s.weight_decay:g}, "
        f"{schedule}; {s.epochs} epochs x {s.steps_per_epoch} steps of {s.batch_size} images",
        f"SWA: a sample at each epoch end from the end of epoch {s.swa_start_epoch}, BN recomputed on all "
        f"training data | EMA: decay {s.ema_decay:g} per step from the end of epoch 1, BN buffers averaged",
        f"PSWA alpha {s.pswa_alpha:g} | PWALKS k {s.pwalks_k:g} | PSWM m {s.pswm_m:g} | PeriodicSWA: {periods} "
        f"procedure(s) of {period} epochs from the end of epoch {start}, a sample per epoch",
        f"periodic methods (PSWA, PWALKS, PSWM, PeriodicSWA): BN recalibrated on beta = {s.bn_fraction:g} of the "
        f"training batches after each assignment of the average",
        f"TWA (head stage): a sample at each of the first {head} epoch ends (backbone schedule), then {tail} "
        f"epoch(s) in their span from their mean (BN recalibrated on beta) at lr {s.lr * s.twa_lr:g} x0.1 at 50% "
        f"and 80%, reg {s.twa_reg:g}; {head + tail} epochs in all | SWA head: SWA of the same {head} samples",
    ])


NOTES = """\
final/best: test accuracy of the model each method yields; std last K: std of the last K epochs'
accuracy; improved / no drop: share of epochs whose accuracy is above / not below the previous epoch's
(the PSWA paper's stability measures). Differences of a few test images change with --seed.
train s: training steps only, no evaluation, but with the BN recalibrations a method needs (periodic
methods: after every assignment; SWA: once at the end), shown in BN s. vs SGD: training time over
SGD's. avg us/step: the wrapper's own time per step (its step() minus the base SGD step() minus
BN recalibration), i.e. the averaging itself; for SGD, the timing harness's floor. TWA: the projection
per step plus collect() and start_subspace(). epochs: epochs trained (the head-stage methods stop early)."""


def cost_note(result: DemoResult) -> str:
    """What the measured times say about the cost of averaging on this model (from this run's numbers)."""
    ref = result.methods.get("sgd") or next(iter(result.methods.values()))
    step_ms = 1e3 * ref.train_time / ref.steps
    averaging = [r.averaging_us_per_step for name, r in result.methods.items() if name != "sgd"]
    if not averaging:
        return f"{ref.method}: {step_ms:.2f} ms per training step."
    share = max(averaging) / (1e3 * step_ms)
    return (f"This model has {result.model_parameters} parameters: the averaging takes "
            f"{min(averaging):.1f}-{max(averaging):.1f} us per step, at most {share:.1%} of the {step_ms:.2f} ms\n"
            f"per {ref.method} training step; the rest of 'vs SGD' is timing noise plus the BN recalibration "
            f"forward passes (BN s).")


# --------------------------------------------------------------------------- the label-noise study

STUDY_DEFAULTS: Dict[str, Any] = {"label_noise": 0.35, "train_images": 600, "val_size": 150}
STUDY_SEEDS, FULL_SEEDS = 3, 5


@dataclass
class StudyResult:
    """One :class:`DemoResult` per seed of the same settings (but the seed)."""

    seeds: List[int]
    runs: List[DemoResult]
    wall_seconds: float

    @property
    def settings(self) -> Settings:
        return self.runs[0].settings

    def rows(self) -> List[Dict[str, Any]]:
        """Per row (method): final and best accuracy over the seeds (mean, std), and the final's
        difference from SGD's in the same seed (mean, std, seeds above / below SGD)."""
        out = []
        for key, first in self.runs[0].methods.items():
            finals = [run.methods[key].final for run in self.runs]
            bests = [run.methods[key].best for run in self.runs]
            row = {"key": key, "method": first.method, "final": finals, "best": bests,
                   "final_mean": statistics.fmean(finals), "final_std": _std(finals),
                   "best_mean": statistics.fmean(bests), "best_std": _std(bests)}
            if all("sgd" in run.methods for run in self.runs):
                deltas = [run.methods[key].final - run.methods["sgd"].final for run in self.runs]
                row.update(delta_mean=statistics.fmean(deltas), delta_std=_std(deltas),
                           above=sum(d > 0 for d in deltas), below=sum(d < 0 for d in deltas))
            out.append(row)
        return out

    def table(self) -> str:
        n = len(self.runs)
        columns = [("method", 14), (f"final (mean ± std of {n})", 24), ("best", 16), ("final - SGD", 16),
                   ("seeds >/< SGD", 13)]
        header = " ".join(f"{t:<{w}}" if i == 0 else f"{t:>{w}}" for i, (t, w) in enumerate(columns))
        lines = [header, "-" * len(header)]
        for row in self.rows():
            delta = "n/a" if "delta_mean" not in row else \
                "base" if row["key"] == "sgd" else f"{100 * row['delta_mean']:+.2f} ± {100 * row['delta_std']:.2f}"
            wins = "" if "above" not in row or row["key"] == "sgd" else f"{row['above']}/{row['below']}"
            cells = [row["method"], f"{100 * row['final_mean']:.2f} ± {100 * row['final_std']:.2f}%",
                     f"{100 * row['best_mean']:.2f} ± {100 * row['best_std']:.2f}%", delta, wins]
            lines.append(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                  for i, (c, (_, w)) in enumerate(zip(cells, columns))))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"seeds": self.seeds, "wall_seconds": self.wall_seconds, "rows": self.rows(),
                "runs": [run.to_dict() for run in self.runs]}


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def study(seeds: Union[int, Sequence[int]] = STUDY_SEEDS, epochs: int = DEFAULT_EPOCHS,
          methods: Union[None, str, Sequence[str]] = None, progress: bool = False,
          threads: Optional[int] = 1, **overrides: Any) -> StudyResult:
    """The label-noise study: :func:`run` once per seed (``seeds``: a count, seeds 0..n-1, or the
    seeds), every run with the same settings but the seed. ``methods`` default to STUDY_METHODS,
    the settings to STUDY_DEFAULTS (35% of the labels of 600 training images flipped, 150 held out
    for the soup), both overridable."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    names = parse_methods(STUDY_METHODS if methods is None else methods)
    settings = {**STUDY_DEFAULTS, **overrides}
    Settings(epochs=epochs, **settings)  # every setting checked before the first run
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        runs.append(run(epochs=epochs, methods=names, seed=seed, threads=threads, **settings))
        if progress:
            print(f"seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return StudyResult(seeds, runs, time.perf_counter() - started)


def describe_study(result: StudyResult) -> str:
    s, env = result.settings, result.runs[0].environment
    return "\n".join([
        f"environment: torch {env['torch']}, {env['threads']} thread(s), wavg_ext {env['wavg_ext']} "
        f"(cpu_capability {env['cpu_capability']}), python {env['python']} {env['machine']}",
        f"data: sklearn digits, {s.train_size} training images with {s.label_noise:.0%} of their labels flipped to "
        f"another class, {s.val_size} held out (noisy too) for the soup, {s.test_size} clean test images; "
        f"seeds {', '.join(map(str, result.seeds))} (split, noise, init, batch order)",
        f"backbone (all methods): SGD lr {s.lr:g} momentum {s.momentum:g} weight decay {s.weight_decay:g}, cosine "
        f"per step; {s.epochs} epochs x {s.steps_per_epoch} steps of {s.batch_size} images",
        f"SWA: one sample per epoch end from epoch {s.swa_start_epoch} | EMA: decay {s.ema_decay:g} from epoch 1 | "
        f"EMA warmup: decay {s.ema_warmup_decay:g} with the inv_gamma warmup from step 0 | PowerEMA: sigma_rel "
        f"{s.sigma_rels[0]:g} and {s.sigma_rels[1]:g} tracked, post-hoc {s.posthoc_sigma_rels[0]:g} and "
        f"{s.posthoc_sigma_rels[1]:g} synthesized from their per-epoch snapshots | LAWA: mean of the last "
        f"{s.lawa_window} epoch ends | greedy soup: of each epoch's average of its steps (BN recalibrated), "
        f"ingredients chosen on the held-out images",
    ])


STUDY_NOTES = """final: test accuracy after the last epoch of the model each method yields (averages with their BN
statistics averaged or recalibrated); best: the best epoch's (not selectable without test labels).
final - SGD: the difference from SGD's final accuracy in the same seed, in points; seeds >/< SGD:
seeds where the method ends above / below SGD. One test image = {image:.2f} points."""


def _plot_curves(path: str, epochs: int, series: Sequence[Tuple[str, List[float], Optional[List[float]]]],
                 title: str) -> None:
    """Writes a PNG of test-accuracy curves (percent; (label, values, std band or None) per row):
    all epochs, and the second half, where the curves differ by a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first_zoomed = epochs // 2
    colors = plt.get_cmap("tab20").colors  # (more rows than tab10's colors)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, first in zip(axes, (0, first_zoomed)):
        for c, (label, values, band) in enumerate(series):
            x = list(range(first + 1, len(values) + 1))
            color = colors[2 * c % 20 + c // 10]
            ax.plot(x, values[first:], label=label, linewidth=1.2, color=color, marker=None if band else ".")
            if band:
                ax.fill_between(x, [v - b for v, b in zip(values[first:], band[first:])],
                                [v + b for v, b in zip(values[first:], band[first:])], color=color, alpha=0.12,
                                linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("all epochs")
    axes[1].set_title(f"epochs {first_zoomed + 1}-{epochs}")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_study(result: StudyResult, path: str) -> None:
    """Writes a PNG of every row's test-accuracy curve: the mean over the seeds, with a band of
    one standard deviation."""
    series = []
    for key, row in result.runs[0].methods.items():
        curves = torch.tensor([run.methods[key].accuracy for run in result.runs], dtype=torch.float64) * 100
        std = curves.std(0) if len(result.runs) > 1 else torch.zeros(curves.shape[1], dtype=torch.float64)
        series.append((row.method, curves.mean(0).tolist(), std.tolist()))
    s = result.settings
    _plot_curves(path, s.epochs, series, f"sklearn digits, {s.label_noise:.0%} label noise on {s.train_size} "
                                         f"training images: mean and std over {len(result.runs)} seeds")


def plot(result: DemoResult, path: str) -> None:
    """Writes a PNG of every method's test-accuracy curve."""
    _plot_curves(path, result.settings.epochs,
                 [(r.method, [100 * a for a in r.accuracy], None) for r in result.methods.values()],
                 f"sklearn digits, small CNN with BatchNorm, {result.settings.test_size} test images, "
                 f"seed {result.settings.seed}")


def main(argv: Optional[Sequence[str]] = None) -> Union[StudyResult, DemoResult]:
    parser = argparse.ArgumentParser(prog="python -m wavg_ext.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true",
                        help="the single-seed run on clean labels with the seed papers' methods (default: the "
                             "label-noise study over seeds)")
    parser.add_argument("--seeds", type=int, default=None, help=f"study: seeds 0..N-1 (default {STUDY_SEEDS})")
    parser.add_argument("--full", action="store_true", help=f"study: {FULL_SEEDS} seeds")
    parser.add_argument("--label-noise", type=float, default=STUDY_DEFAULTS["label_noise"],
                        help="study: share of the training labels flipped to another class")
    parser.add_argument("--train-images", type=int, default=STUDY_DEFAULTS["train_images"],
                        help="study: training images (a stratified subset)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epoch budget of every method")
    parser.add_argument("--seed", type=int, default=None, help="--clean: train/test split, initialization and "
                                                              "batch order (default 0)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(STUDY_METHODS)}; "
                             f"with --clean: {','.join(CLEAN_METHODS)})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the ~10k-parameter model gains little from more, "
                             "and OpenMP threads stall when another process takes a core)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the test-accuracy curves (the study: mean "
                                                       "and std band over the seeds)")
    parser.add_argument("--json", metavar="PATH", help="write all per-epoch results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:  # bad values are usage errors, reported before any training
        if args.clean:
            for flag, given in (("--seeds", args.seeds is not None), ("--full", args.full)):
                if given:
                    raise ValueError(f"{flag} belongs to the study, not to --clean")
            methods = parse_methods(args.methods or CLEAN_METHODS)
            Settings(epochs=args.epochs, seed=args.seed or 0, batch_size=args.batch_size)
        else:
            if args.seed is not None:
                raise ValueError("--seed is for --clean; the study runs seeds 0..N-1 (--seeds N)")
            if args.full and args.seeds is not None:
                raise ValueError("--full runs 5 seeds: give --full or --seeds, not both")
            seeds = FULL_SEEDS if args.full else STUDY_SEEDS if args.seeds is None else args.seeds
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {seeds}")
            methods = parse_methods(args.methods or STUDY_METHODS)
            Settings(epochs=args.epochs, batch_size=args.batch_size, label_noise=args.label_noise,
                     train_images=args.train_images, val_size=STUDY_DEFAULTS["val_size"])
        if args.threads < 1:
            raise ValueError(f"threads must be >= 1, got {args.threads}")
    except ValueError as err:
        parser.error(str(err))
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail now, not after training)
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")
    result: Union[StudyResult, DemoResult]
    if args.clean:
        result = run(epochs=args.epochs, methods=methods, seed=args.seed or 0, progress=not args.no_progress,
                     batch_size=args.batch_size, threads=args.threads)
        print(describe(result), "", result.table(), "", NOTES, cost_note(result), sep="\n")
        print(f"\ndemo wall time: {result.wall_seconds:.1f} s (data loading, training, evaluation)")
    else:
        result = study(seeds, epochs=args.epochs, methods=methods, progress=not args.no_progress,
                       threads=args.threads, batch_size=args.batch_size, label_noise=args.label_noise,
                       train_images=args.train_images)
        print(describe_study(result), "", result.table(), "",
              STUDY_NOTES.format(image=100 / result.settings.test_size), sep="\n")
        print(f"\ndemo wall time: {result.wall_seconds:.1f} s ({len(result.seeds)} seeds; the seed papers' methods "
              "on clean labels: --clean)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        (plot if args.clean else plot_study)(result, args.plot)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main()
