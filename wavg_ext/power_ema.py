"""The math of power-function EMA and post-hoc EMA (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", EDM2, section 3 and appendix C).

A power-function EMA with exponent gamma averages the weights theta(tau) seen up to time
t with the profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its relative
width is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Tracking it needs
only an EMA whose decay at an update that moves time from t - dt to t is
beta = (1 - dt / t)^(gamma + 1) (the first update, at t = dt, copies).

Post-hoc EMA: profiles saved at times t_i with exponents gamma_i span other profiles; the
least-squares combination of them closest (in L2 over tau) to a target profile
(t_r, gamma_r) solves A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_r>, where
<p_a, p_b> = (gamma_a + 1)(gamma_b + 1) min(t_a, t_b)^(gamma_a + gamma_b + 1) /
((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)). Everything here is float64
on the host.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch

__all__ = ["sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_ema_beta", "posthoc_coefficients"]

# sigma_rel of gamma -> 0 (the widest profile, a uniform average): sqrt(1 / 12).
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


def _real(name: str, value, low: float = -math.inf, high: float = math.inf, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if (value <= low if open_low else value < low) or value >= high:
        raise ValueError(f"{name} must be in {'(' if open_low else '['}{low:g}, {high:g}), got {value!r}")
    return value


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent gamma (>= 0)."""
    g = _real("gamma", gamma, 0.0, open_low=False)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile with relative width sigma_rel, in (0, sqrt(1/12)):
    the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0,
    polished by Newton steps on sigma_rel(gamma) itself."""
    s = _real("sigma_rel", sigma_rel, 0.0, MAX_SIGMA_REL)
    c = s ** -2
    coeffs = torch.tensor([1.0, 7.0, 16.0 - c, 12.0 - c], dtype=torch.float64)
    # Companion matrix of the monic cubic: its eigenvalues are the roots.
    comp = torch.zeros(3, 3, dtype=torch.float64)
    comp[0, :] = -coeffs[1:]
    comp[1, 0] = comp[2, 1] = 1.0
    roots = torch.linalg.eigvals(comp)
    g = max(r.real.item() for r in roots if abs(r.imag.item()) <= 1e-9 * max(1.0, abs(r.real.item())))
    for _ in range(3):  # Newton on f(g) = (g + 1) - s^2 (g + 2)^2 (g + 3)
        f = (g + 1.0) - s * s * (g + 2.0) ** 2 * (g + 3.0)
        df = 1.0 - s * s * (2.0 * (g + 2.0) * (g + 3.0) + (g + 2.0) ** 2)
        if df == 0.0:
            break
        g -= f / df
    return g


def power_ema_beta(gamma: float, t_next: float, t_delta: float) -> float:
    """The decay of the update that moves time from t_next - t_delta to t_next:
    (1 - t_delta / t_next)^(gamma + 1); 0 (a copy) when t_next <= t_delta. gamma = 0 is
    the running mean."""
    g = _real("gamma", gamma, 0.0, open_low=False)
    t_delta = _real("t_delta", t_delta, 0.0)
    t_next = _real("t_next", t_next, 0.0)
    if t_next <= t_delta:
        return 0.0
    return (1.0 - t_delta / t_next) ** (g + 1.0)


def _profile_dot(t_a: torch.Tensor, g_a: torch.Tensor, t_b: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """<p_a, p_b> over tau (broadcast), written to stay finite for large t and gamma:
    (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) max(t_a, t_b)) * (min/max ratio)^(exponent of the later one)."""
    later_b = t_a <= t_b
    ratio = torch.where(later_b, t_a / t_b, t_b / t_a)
    exponent = torch.where(later_b, g_b, g_a) + 0.0
    # min^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)) = ratio^(g_later) / max(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * torch.maximum(t_a, t_b)) * ratio ** exponent


def posthoc_coefficients(snapshot_times: Sequence[float], snapshot_sigma_rels: Sequence[float],
                         target_time: float, target_sigma_rel: Union[float, Sequence[float]]) -> torch.Tensor:
    """The float64 coefficients x (one per snapshot; a column per target sigma_rel when a
    list is given) whose combination sum_i x_i theta_i of the saved power-function EMAs
    (snapshot i: taken at time t_i, width sigma_rel_i) is the least-squares best
    approximation of the power-function EMA of width ``target_sigma_rel`` at
    ``target_time`` (EDM2, appendix C.3). Times are in steps (any unit, all the same)."""
    ts = [_real(f"snapshot_times[{i}]", t, 0.0) for i, t in enumerate(snapshot_times)]
    ss = [_real(f"snapshot_sigma_rels[{i}]", s, 0.0, MAX_SIGMA_REL) for i, s in enumerate(snapshot_sigma_rels)]
    if not ts:
        raise ValueError("posthoc_coefficients: there are no snapshots")
    if len(ts) != len(ss):
        raise ValueError(f"posthoc_coefficients: {len(ts)} snapshot times but {len(ss)} sigma_rels")
    many = not isinstance(target_sigma_rel, numbers.Real)
    targets = list(target_sigma_rel) if many else [target_sigma_rel]
    if not targets:
        raise ValueError("posthoc_coefficients: target_sigma_rel is an empty list")
    tr = _real("target_time", target_time, 0.0)
    gr = torch.tensor([sigma_rel_to_gamma(_real("target_sigma_rel", s, 0.0, MAX_SIGMA_REL)) for s in targets],
                      dtype=torch.float64)
    t = torch.tensor(ts, dtype=torch.float64)
    g = torch.tensor([sigma_rel_to_gamma(s) for s in ss], dtype=torch.float64)
    a = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _profile_dot(t[:, None], g[:, None], torch.full_like(gr, tr)[None, :], gr[None, :])
    # Least squares (A may be singular: the same profile saved twice); minimum-norm solution.
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return x if many else x[:, 0]
