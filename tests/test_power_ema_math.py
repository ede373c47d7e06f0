"""The power-function EMA math (EDM2): sigma_rel <-> gamma, the update's beta, and the
post-hoc least-squares coefficients against numerical integration of the profiles."""

from __future__ import annotations

import math

import pytest
import torch

from wavg_ext.power_ema import gamma_to_sigma_rel, posthoc_coefficients, power_ema_beta, sigma_rel_to_gamma


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28, 0.2886])
def test_sigma_rel_and_gamma_round_trip(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g > 0
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)


def test_known_values():
    # EDM2: sigma_rel 0.10 <-> gamma ~ 6.94; sigma_rel = sqrt(1/12) is gamma -> 0 (uniform)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert gamma_to_sigma_rel(1e-12) == pytest.approx(math.sqrt(1 / 12), rel=1e-9)


def test_beta_gives_the_power_profile():
    """Updates every step (dt = 1) with beta_t = (1 - 1/t)^(gamma + 1), the first a copy:
    gamma = 0 is the running mean exactly; gamma = 2 weights sample tau about like
    (gamma + 1) tau^gamma / T^(gamma + 1)."""
    for gamma, rtol in ((0.0, 1e-12), (2.0, 2e-2)):
        T = 400
        weights = torch.zeros(T + 1, dtype=torch.float64)  # of the samples at t = 1..T
        for t in range(1, T + 1):
            b = power_ema_beta(gamma, t, 1)
            weights *= b
            weights[t] = 1 - b
        assert power_ema_beta(gamma, 1, 1) == 0.0 and weights.sum().item() == pytest.approx(1.0, rel=1e-12)
        tau = torch.arange(1, T + 1, dtype=torch.float64)
        want = (gamma + 1) * tau ** gamma / T ** (gamma + 1)
        torch.testing.assert_close(weights[T // 4:], want[T // 4 - 1:], rtol=rtol, atol=0)


def _profile(tau, t, g):
    # (the grid's last point, e^log(t), may round just above t)
    return torch.where(tau <= t * (1 + 1e-12), (g + 1) * tau ** g / t ** (g + 1), torch.zeros_like(tau))


def _integral(f, t_max):
    """int_0^t_max f(tau) dtau by the trapezoid rule on a log grid (tau = e^u): smooth in u."""
    u = torch.linspace(math.log(t_max) - 40, math.log(t_max), 400_001, dtype=torch.float64)
    tau = u.exp()
    return torch.trapezoid(f(tau) * tau, u).item()


def test_posthoc_coefficients_solve_the_normal_equations_numerically():
    times = [2000.0, 4000.0, 6000.0, 8000.0, 10000.0] * 2
    sigmas = [0.05] * 5 + [0.10] * 5
    target_t, target_s = 10000.0, 0.08
    x = posthoc_coefficients(times, sigmas, target_t, target_s)
    gammas = [sigma_rel_to_gamma(s) for s in sigmas]
    gr = sigma_rel_to_gamma(target_s)
    n = len(times)
    a = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            a[i, j] = _integral(lambda tau: _profile(tau, times[i], gammas[i]) * _profile(tau, times[j], gammas[j]),
                                min(times[i], times[j]))
        b[i] = _integral(lambda tau: _profile(tau, times[i], gammas[i]) * _profile(tau, target_t, gr),
                         min(times[i], target_t))
    # the closed form against the quadrature, through the residual of the normal equations
    assert (a @ x - b).abs().max().item() < 1e-6 * b.abs().max().item()
    # the synthesized profile is close to the target where it matters
    tau = torch.linspace(1, target_t, 2001, dtype=torch.float64)
    synth = sum(x[i] * _profile(tau, times[i], gammas[i]) for i in range(n))
    target = _profile(tau, target_t, gr)
    assert ((synth - target).norm() / target.norm()).item() < 0.05


def test_posthoc_many_targets_and_exact_reproduction():
    times, sigmas = [1000.0, 2000.0, 3000.0], [0.1, 0.1, 0.1]
    x = posthoc_coefficients(times, sigmas, 3000.0, [0.1, 0.05])
    assert x.shape == (3, 2) and x.dtype == torch.float64
    # a target that is one of the snapshots is that snapshot
    torch.testing.assert_close(x[:, 0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: sigma_rel_to_gamma(0.3), r"sigma_rel must be in \(0, 0.288675\)"),
    (lambda: sigma_rel_to_gamma(0.0), r"sigma_rel must be in \(0"),
    (lambda: sigma_rel_to_gamma(float("nan")), "sigma_rel must be a finite number"),
    (lambda: gamma_to_sigma_rel(-1.0), r"gamma must be in \[0"),
    (lambda: power_ema_beta(1.0, 10, 0), r"t_delta must be in \(0"),
    (lambda: posthoc_coefficients([], [], 1.0, 0.1), "there are no snapshots"),
    (lambda: posthoc_coefficients([1.0, 2.0], [0.1], 2.0, 0.1), "2 snapshot times but 1 sigma_rels"),
    (lambda: posthoc_coefficients([1.0], [0.1], 2.0, []), "target_sigma_rel is an empty list"),
    (lambda: posthoc_coefficients([1.0], [0.5], 2.0, 0.1), r"snapshot_sigma_rels\[0\] must be in"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
