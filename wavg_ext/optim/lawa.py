"""LAWA: the mean of the latest samples (Kaddour 2022, "Stop Wasting My Time! Saving Days
of ImageNet and BERT Training with Latest Weight Averaging"; Sanyal et al. 2023, "Early
Weight Averaging meets High Learning Rates for LLM Pre-training").

The average is the mean of the last ``window`` samples, taken every ``every`` steps. The
samples live in a ring of ``window`` slots (in the weights' own dtypes, on the weights'
device or on ``storage_device``, e.g. pinned CPU memory); a float64 running sum moves by
``new - oldest`` at each sample in one fused pass (:func:`wavg_ext.ops.window_push_`: the
slots start at zero, so the window's first samples use the same op), and is re-summed
from the slots every ``resum_every`` samples so that its rounding cannot drift.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..distributed import like_param
from .averaging import WeightAveraging
from .wrapper import _check_int


class LAWA(WeightAveraging):
    """Latest weight averaging: the mean of the last ``window`` samples, taken every ``every`` steps.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its parameters are averaged.
        window: k >= 1, the samples in the average (fewer while the window fills).
        every: c >= 1, steps between samples; samples at ``start, start + every, ...``.
        start: the first position that can be sampled (>= 0).
        storage_device: where the ring of samples lives: the weights' device (None, the
            default) or another one, e.g. ``"cpu"`` for CUDA weights (pinned memory: the
            copies run asynchronously); the running sum stays with the weights.
        resum_every: samples between exact re-sums of the running sum from the ring
            (float64; default ``64 * window``, about 2% more traffic). The sum itself is
            float64, so its drift between re-sums is at float64's rounding.
        module, average_buffers, average_dtype: as for :class:`~wavg_ext.WeightAveraging`.

    ``averaged_parameters()`` are the window's mean (float32 for float16/bfloat16 weights
    by default); ``num_averaged`` is the samples in it (at most ``window``). ``state_dict()``
    holds the ring, the sum and the position, and resumes bit for bit. ``reset()`` empties
    the window. Memory: ``window`` copies of the weights in their dtype, plus a float64
    sum and the averages.
    """

    method = "LAWA"

    def __init__(self, optimizer: Optimizer, window: int, every: int = 1, start: int = 0, *,
                 storage_device: Optional[Union[str, torch.device]] = None, resum_every: Optional[int] = None,
                 module: Optional[nn.Module] = None, average_buffers: bool = False,
                 average_dtype: Optional[torch.dtype] = None) -> None:
        window = _check_int("window", window, 1)
        if resum_every is None:
            resum_every = 64 * window
        resum_every = _check_int("resum_every", resum_every, 1)
        if storage_device is not None:
            if not isinstance(storage_device, (str, torch.device)):
                raise TypeError(f"storage_device must be a torch.device or a string, got "
                                f"{type(storage_device).__name__}")
            try:
                storage_device = torch.device(storage_device)
            except RuntimeError as e:
                raise ValueError(f"storage_device: {e}") from None
            if storage_device.type == "meta":
                raise ValueError("storage_device cannot be 'meta': the samples must be kept")
        self.window = window
        self.resum_every = resum_every
        self.storage_device = storage_device
        super().__init__(optimizer, rule="mean", start=start, every=every, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype)
        sources = self._current_sources()
        # The float64 running sum beside each average, and the ring (zeros: an empty slot
        # adds nothing when the window fills through the same op).
        self._sums: List[torch.Tensor] = [torch.zeros_like(s, dtype=torch.float64) for s in sources]
        self._ring: List[List[torch.Tensor]] = [[self._new_slot(s) for s in sources] for _ in range(window)]
        self._pushed = 0  # samples pushed into the ring since the window was last emptied

    # ----------------------------------------------------------------- the ring

    def _slot_device(self, source: torch.Tensor) -> torch.device:
        return self.storage_device if self.storage_device is not None else source.device

    def _new_slot(self, source: torch.Tensor) -> torch.Tensor:
        device = self._slot_device(source)
        pin = device.type == "cpu" and source.device.type == "cuda"
        slot = torch.zeros_like(source, device=device)
        return slot.pin_memory() if pin else slot

    def _offloaded(self, i: int) -> bool:
        return self._ring[0][i].device != self._sums[i].device

    def _adopt(self, params: Optional[List[torch.Tensor]] = None) -> bool:
        changed = super()._adopt(params)
        sources = self._current_sources()
        resum = False
        with torch.no_grad():  # the sums follow the weights' device; the slots their dtype too
            for i, s in enumerate(sources):
                if self._sums[i].device != s.device:
                    self._sums[i] = self._sums[i].to(s.device)
                for slots in self._ring:
                    o = slots[i]
                    if o.dtype != s.dtype or o.device != self._slot_device(s):
                        resum |= o.dtype != s.dtype
                        o = o.to(dtype=s.dtype, device=self._slot_device(s))
                        slots[i] = o.pin_memory() if o.device.type == "cpu" and s.device.type == "cuda" else o
        if resum:  # samples rounded to a new dtype: the sum must hold what will leave the window
            self._resum()
        return changed

    def _sums_and_ring_of(self, positions: List[int], slot: int):
        return [self._sums[i] for i in positions], [self._ring[slot][i] for i in positions]

    def _resum(self) -> None:
        """sum <- the float64 sum of the ring's slots (exact re-sum: bounds the drift)."""
        with torch.no_grad():
            for i, total in enumerate(self._sums):
                total.zero_()
                for slots in self._ring:
                    total.add_(slots[i].to(device=total.device, dtype=torch.float64, non_blocking=True))

    def _sample(self) -> None:
        slot = self._pushed % self.window
        offloaded = [i for i in range(len(self._sums)) if self._offloaded(i)]
        staged: Dict[int, torch.Tensor] = {}
        if offloaded:  # the leaving samples come to the weights' device, the new ones go back
            staged = {i: self._ring[slot][i].to(self._sums[i].device, non_blocking=True) for i in offloaded}

        def pick(avgs, srcs, comps, positions):
            sums, slots = self._sums_and_ring_of(positions, slot)
            return sums, [staged.get(i, o) for i, o in zip(positions, slots)], srcs

        self._run_ops("window_push_", None, pick)
        with torch.no_grad():
            for i, t in staged.items():
                self._ring[slot][i].copy_(t, non_blocking=True)
        self._pushed += 1
        if self._pushed % self.resum_every == 0:
            self._resum()
        self._num = min(self._pushed, self.window)
        self._write_mean()
        if self._int_slots:
            torch._foreach_copy_(self._int_averages, self._int_buffers_seen)

    def _write_mean(self) -> None:
        """averages <- sums / num (cast to the averages' dtype)."""
        scale = 1.0 / self._num
        self._run_ops("scale_copy_", scale, lambda avgs, srcs, comps, positions: (
            avgs, [self._sums[i] for i in positions]))

    def _reset_count(self) -> None:
        super()._reset_count()
        self._pushed = 0
        with torch.no_grad():
            for t in self._sums:
                t.zero_()
            for slots in self._ring:
                for o in slots:
                    o.zero_()

    # ----------------------------------------------------------------- checkpoints

    def _config(self) -> Dict[str, Any]:
        return {**super()._config(), "window": self.window, "resum_every": self.resum_every}

    def state_dict(self, optimizer: bool = True) -> Dict[str, Any]:
        out = super().state_dict(optimizer)
        n = self._num_params

        def shard_like(values: List[torch.Tensor]) -> List[torch.Tensor]:
            return [like_param(a, p) for a, p in zip(values, self._params)] + values[n:]

        out[self._state_key]["window"] = {
            "pushed": self._pushed,
            "sums": shard_like(self._sums),
            # (the ring as the slots hold it: maybe on storage_device)
            "ring": [shard_like(slots) for slots in self._ring],
        }
        return out

    def load_state_dict(self, state_dict: Dict[str, Any], optimizer: bool = True) -> None:
        """Restores a ``state_dict()``: the ring, the sum and the position are checked before
        anything changes."""
        section = state_dict.get(self._state_key) if isinstance(state_dict, dict) else None
        saved = section.get("window") if isinstance(section, dict) else None
        if not isinstance(saved, dict):
            raise ValueError(f"state dict '{self._state_key}' must hold 'window' (the ring, the sum and the "
                             "position) for LAWA")
        pushed = saved.get("pushed")
        if isinstance(pushed, bool) or not isinstance(pushed, int) or pushed < 0:
            raise ValueError(f"state dict window 'pushed' must be an int >= 0, got {pushed!r}")
        num = section.get("num_averaged")
        if num != min(pushed, self.window):
            raise ValueError(f"state dict 'num_averaged' ({num!r}) must be min(pushed, window) = "
                             f"{min(pushed, self.window)}")
        ring = saved.get("ring")
        if not isinstance(ring, (list, tuple)) or len(ring) != self.window:
            raise ValueError(f"state dict window 'ring' must be a list of window = {self.window} lists of tensors")
        new_sums = self._saved_list("window sums", saved.get("sums"), self._sums, finite=True)
        new_ring = [self._saved_list(f"window ring[{j}]", tensors, slots, finite=True)
                    for j, (tensors, slots) in enumerate(zip(ring, self._ring))]
        super().load_state_dict(state_dict, optimizer)  # checks the rest; raises before any change
        with torch.no_grad():
            for t, s in zip(new_sums, self._sums):
                s.copy_(t)
            for tensors, slots in zip(new_ring, self._ring):
                for t, o in zip(tensors, slots):
                    o.copy_(t)
        self._pushed = pushed
