"""PowerEMA: power-function EMAs of the weights, several widths at once (Karras et al.
2024, EDM2), as an optimizer wrapper.

Profile k with exponent gamma_k averages the weights seen up to step t with weight
proportional to tau^gamma_k; its relative width is sigma_rel_k. A sample taken after t
steps, dt steps after the previous one, updates avg_k <- beta_k avg_k + (1 - beta_k) w
with beta_k = (1 - dt / t)^(gamma_k + 1) (:func:`wavg_ext.power_ema.power_ema_beta`):
the actual step gap, so sampling every k steps keeps the profile.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from ..distributed import like_param
from ..power_ema import gamma_to_sigma_rel, power_ema_beta, sigma_rel_to_gamma
from .averaging import WeightAveraging

__all__ = ["PowerEMA"]


def _numbers(name: str, values: Any) -> List[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    return list(values)


class PowerEMA(WeightAveraging):
    """Power-function EMAs of the weights (EDM2), one average per profile, updated at
    positions ``start, start+every, ...`` (position t: after t steps).

    Args:
        sigma_rels: the profiles' relative widths, each in (0, sqrt(1/12)) (default
            (0.05, 0.1)); or ``gammas=``: their exponents (>= 0; 0 is the running mean).
        every, start: the sample positions, as for :class:`~wavg_ext.EMA`.
        module, average_buffers, average_dtype, compensated, skip_nonfinite: as for
            :class:`~wavg_ext.WeightAveraging`, for every profile (``compensated``: each
            profile keeps its compensation; ``skip_nonfinite``: a sample holding NaN/inf
            leaves every profile untouched, with no host sync).

    A sample after t steps, dt after the previous one, uses beta_k = (1 - dt/t)^(gamma_k + 1)
    per profile (the first sample, and the one at t = dt, copy the weights). Each profile
    is one fused op per device. ``averaged_parameters(profile)``, ``averaged_buffers(profile)``,
    ``averaged_state_dict(module, profile)``, ``copy_to(target, profile)``,
    ``swap(profile)`` and ``averaged(profile)`` take the profile's index (default 0);
    ``state_dict()`` holds every profile and resumes bit for bit. ``current_betas`` are
    the last sample's betas.
    """

    method = "PowerEMA"

    def __init__(self, optimizer: Optimizer, sigma_rels: Optional[Sequence[float]] = None, every: int = 1,
                 start: int = 0, *, gammas: Optional[Sequence[float]] = None, module: Optional[nn.Module] = None,
                 average_buffers: bool = False, average_dtype: Optional[torch.dtype] = None,
                 compensated: bool = False, skip_nonfinite: bool = False) -> None:
        if gammas is not None:
            if sigma_rels is not None:
                raise ValueError("sigma_rels and gammas are exclusive: pass one of them")
            gammas = _numbers("gammas", gammas)
            for i, g in enumerate(gammas):
                if isinstance(g, bool) or not isinstance(g, numbers.Real):
                    raise ValueError(f"gammas[{i}] must be a number >= 0, got {g!r}")
            sigma_rels = [gamma_to_sigma_rel(g) for g in gammas]
            gammas = [float(g) for g in gammas]
        else:
            sigma_rels = _numbers("sigma_rels", (0.05, 0.1) if sigma_rels is None else sigma_rels)
            gammas = []
            for i, s in enumerate(sigma_rels):
                try:
                    gammas.append(sigma_rel_to_gamma(s))
                except ValueError as e:
                    raise ValueError(f"sigma_rels[{i}]: {e}") from None
            sigma_rels = [float(s) for s in sigma_rels]
        self.gammas: List[float] = gammas
        self.sigma_rels: List[float] = sigma_rels
        self.current_betas: Optional[List[float]] = None
        super().__init__(optimizer, rule="momentum", momentum=1.0, start=start, every=every, module=module,
                         average_buffers=average_buffers, average_dtype=average_dtype, compensated=compensated,
                         skip_nonfinite=skip_nonfinite)
        # Profiles 1.. (profile 0 is the engine's own averages), laid out like them (zeros under
        # skip_nonfinite, as the engine's: its gated first-sample copy reads them), and their
        # compensations.
        make = torch.zeros_like if skip_nonfinite else torch.empty_like
        self._extra: List[List[torch.Tensor]] = [
            [make(a, memory_format=torch.preserve_format) for a in self._averages] for _ in range(len(gammas) - 1)]
        self._extra_comps: List[List[torch.Tensor]] = [
            [torch.zeros_like(a) for a in self._averages] for _ in self._extra] if compensated else []

    @property
    def num_profiles(self) -> int:
        return len(self.gammas)

    # ----------------------------------------------------------------- the profiles

    def _profile(self, profile: int) -> List[torch.Tensor]:
        if isinstance(profile, bool) or not isinstance(profile, int) or not 0 <= profile < len(self.gammas):
            raise ValueError(f"profile must be an int in [0, {len(self.gammas)}), got {profile!r}")
        return self._averages if profile == 0 else self._extra[profile - 1]

    @contextlib.contextmanager
    def _as_main(self, profile: int) -> Iterator[None]:
        """The engine's read and swap-in paths, on profile ``profile``'s averages (after the
        model check, which may convert the averages and must see the real ones)."""
        values = self._profile(profile)
        if profile == 0:
            yield
            return
        main = self._averages
        self._averages = values
        try:
            yield
        finally:
            self._averages = main

    def _adopt(self, params: Optional[List[torch.Tensor]] = None) -> bool:
        changed = super()._adopt(params)
        with torch.no_grad():  # the other profiles follow profile 0's dtype and device
            for k, values in enumerate(self._extra):
                for i, a in enumerate(self._averages):
                    if values[i].device == a.device and values[i].dtype == a.dtype:
                        continue
                    if self.compensated:  # the pair's value, re-split in the new dtype (as the engine does)
                        comps = self._extra_comps[k]
                        value = values[i].to(torch.float64) + comps[i].to(torch.float64)
                        values[i] = value.to(device=a.device, dtype=a.dtype)
                        comps[i] = (value - values[i].to(torch.float64)).to(device=a.device, dtype=a.dtype)
                    else:
                        values[i] = values[i].to(device=a.device, dtype=a.dtype, memory_format=torch.preserve_format)
        return changed

    def _pick(self, k: int) -> Callable[..., tuple]:
        """Profile k's lists for a call (averages, compensations when compensated, sources)."""
        if k == 0:
            return (lambda avgs, srcs, comps, positions: (avgs, comps, srcs)) if self.compensated else \
                (lambda avgs, srcs, comps, positions: (avgs, srcs))
        values = self._extra[k - 1]
        if self.compensated:
            extra_comps = self._extra_comps[k - 1]
            return lambda avgs, srcs, comps, positions: ([values[i] for i in positions],
                                                         [extra_comps[i] for i in positions], srcs)
        return lambda avgs, srcs, comps, positions: ([values[i] for i in positions], srcs)

    def _sample(self) -> None:
        n = self._num
        t = self._position
        betas = [0.0 if n == 0 else power_ema_beta(g, t, self.every) for g in self.gammas]
        if self.skip_nonfinite:
            # Gated on the device (momentum 1: a copy; the engine copies too where no sample was
            # taken yet); one NaN/inf check and one count for all profiles.
            momenta = [1.0 - b for b in betas]
            self._sample_gated(momenta[0], [(self._pick(k), m) for k, m in enumerate(momenta) if k > 0])
        elif self.compensated:
            for k, beta in enumerate(betas):
                if beta == 0.0:
                    self._run_ops("running_mean_compensated_", 0, self._pick(k), planned=True,
                                  plan_key=f"running_mean_compensated_/{k}")
                else:
                    self._run_ops("ema_compensated_", 1.0 - beta, self._pick(k), planned=True,
                                  plan_key=f"ema_compensated_/{k}")
        elif len(betas) > 1 and all(b != 0.0 for b in betas):
            # Every profile from one read of the weights (ops.ema_many_).
            def pick_all(avgs, srcs, comps, positions):
                return [avgs] + [[values[i] for i in positions] for values in self._extra], srcs
            self._run_ops("ema_many_", [1.0 - b for b in betas], pick_all)
        else:  # the first sample copies (beta 0), or one profile: per profile
            for k, beta in enumerate(betas):
                if beta == 0.0:
                    self._run_ops("scale_copy_", 1.0, self._pick(k), planned=True, plan_key=f"scale_copy_/{k}")
                else:
                    self._run_ops("ema_", 1.0 - beta, self._pick(k), planned=True, plan_key=f"ema_/{k}")
        if self._int_slots and not self.skip_nonfinite:  # (gated samples copy them themselves)
            torch._foreach_copy_(self._int_averages, self._int_buffers_seen)
        self._num = n + 1
        self.current_betas = betas

    # ----------------------------------------------------------------- reading a profile

    def averaged_parameters(self, profile: int = 0) -> List[torch.Tensor]:
        """Profile ``profile``'s averages of the parameters (live tensors: clone to keep)."""
        with self._as_main(profile):
            return super().averaged_parameters()

    def averaged_buffers(self, profile: int = 0) -> Dict[str, torch.Tensor]:
        with self._as_main(profile):
            return super().averaged_buffers()

    def averaged_state_dict(self, module: Optional[nn.Module] = None, profile: int = 0) -> Dict[str, torch.Tensor]:
        with self._as_main(profile):
            return super().averaged_state_dict(module)

    def copy_to(self, target: Union[nn.Module, Sequence[torch.Tensor]], profile: int = 0) -> None:
        with self._as_main(profile):
            super().copy_to(target)

    def swap(self, profile: int = 0) -> None:
        """Puts profile ``profile``'s averages into the model; the next call puts the
        training weights back (its ``profile`` is not used)."""
        self._profile(profile)
        self._follow_model()
        if self._stash is not None:
            super().swap()
            return
        with self._as_main(profile):
            super().swap()

    @contextlib.contextmanager
    def averaged(self, profile: int = 0) -> Iterator[None]:
        """Profile ``profile``'s averages in the model inside, the training weights back on exit."""
        self._profile(profile)
        with self._swapped_in(lambda: self.swap(profile)):
            yield

    # ----------------------------------------------------------------- checkpoints

    def _config(self) -> Dict[str, Any]:
        return {**super()._config(), "gammas": list(self.gammas)}

    def state_dict(self, optimizer: bool = True) -> Dict[str, Any]:
        out = super().state_dict(optimizer)
        n = self._num_params
        out[self._state_key]["profiles"] = [
            [like_param(a, p) for a, p in zip(values, self._params)] + values[n:] for values in self._extra]
        if self.compensated:
            out[self._state_key]["profile_compensations"] = [
                [like_param(c, p) for c, p in zip(comps, self._params)] + comps[n:] for comps in self._extra_comps]
        return out

    def load_state_dict(self, state_dict: Dict[str, Any], optimizer: bool = True) -> None:
        """Restores a ``state_dict()``: every profile is checked before anything changes."""
        section = state_dict.get(self._state_key) if isinstance(state_dict, dict) else None
        saved = section.get("profiles") if isinstance(section, dict) else None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self._extra):
            raise ValueError(f"state dict '{self._state_key}' must hold 'profiles': a list of {len(self._extra)} "
                             "lists of tensors (the profiles after the first)")
        new = [self._saved_list(f"profiles[{k}]", tensors, values, finite=bool(section.get("num_averaged", 0)))
               for k, (tensors, values) in enumerate(zip(saved, self._extra))]
        new_comps: List[List[torch.Tensor]] = []
        if self.compensated:
            saved_comps = section.get("profile_compensations")
            if not isinstance(saved_comps, (list, tuple)) or len(saved_comps) != len(self._extra_comps):
                raise ValueError(f"state dict '{self._state_key}' must hold 'profile_compensations': a list of "
                                 f"{len(self._extra_comps)} lists of tensors")
            new_comps = [self._saved_list(f"profile_compensations[{k}]", tensors, comps, finite=True)
                         for k, (tensors, comps) in enumerate(zip(saved_comps, self._extra_comps))]
        super().load_state_dict(state_dict, optimizer)  # checks the rest; raises before any change
        with torch.no_grad():
            for tensors, values in zip(new + new_comps, self._extra + self._extra_comps):
                for t, v in zip(tensors, values):
                    v.copy_(t)
