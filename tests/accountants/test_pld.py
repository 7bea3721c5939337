"""The discretized PLD: mass conservation, domination (never below the exact curve), FFT composition."""
from __future__ import annotations

import math

import numpy as np
import pytest
from _closed_forms import gaussian_delta, gaussian_epsilon, sampled_gaussian_delta

from dpkit.accountants import _pld

CASES = [(0.01, 1.0), (0.2, 0.7), (0.004, 2.5), (1.0, 3.0)]


def _losses(p: _pld.Pmf) -> np.ndarray:
    return (p.start + np.arange(len(p.probs))) * p.step


def _q_mass(p: _pld.Pmf) -> float:
    return float(np.sum(p.probs * np.exp(-_losses(p))))


@pytest.mark.parametrize(("q", "sigma"), CASES)
@pytest.mark.parametrize("remove", [True, False])
def test_leaf_keeps_p_and_q_mass(q, sigma, remove):
    # Connect-the-dots keeps both masses of every cell; the cut tails may only lose Q-mass.
    p = _pld.leaf(q, sigma, remove, step=1e-3, tail=1e-12)
    assert p.probs.min() >= 0
    assert p.probs.sum() + p.inf_mass == pytest.approx(1.0, abs=1e-15)
    assert 1 - 1e-7 <= _q_mass(p) <= 1 + 1e-13


@pytest.mark.parametrize(("q", "sigma"), CASES)
@pytest.mark.parametrize("remove", [True, False])
def test_leaf_dominates_the_exact_single_step_in_its_direction(q, sigma, remove):
    p = _pld.leaf(q, sigma, remove, step=0.02, tail=1e-14)
    for eps in np.linspace(0.0, 3.0, 31):
        if q == 1:
            exact = gaussian_delta(1 / sigma, eps)
        else:
            exact = sampled_gaussian_delta(q, sigma, eps, "remove" if remove else "add")
        assert exact - 1e-15 <= _pld.delta_at(p, eps) <= exact + 1e-3  # coarse grid, still close


def test_cut_tails_are_moved_up_not_down():
    # sigma = 0.1: losses ~ N(50, 10^2), so a wide cut lumps real mass at positive losses.
    p = _pld.leaf(1.0, 0.1, True, step=0.25, tail=1e-3)
    assert p.inf_mass == pytest.approx(1e-3)
    for eps in np.linspace(15.0, 25.0, 41):
        assert _pld.delta_at(p, eps) >= gaussian_delta(10.0, eps) - 1e-15


def test_coarsen_keeps_p_and_q_mass_and_adds_its_rounding_range():
    p = _pld.leaf(0.05, 1.0, True, step=1e-3, tail=1e-12)
    c = _pld.coarsen(p)
    assert c.step == 2 * p.step
    assert c.probs.sum() == pytest.approx(p.probs.sum(), abs=1e-15)
    assert _q_mass(c) == pytest.approx(_q_mass(p), rel=1e-13)
    assert c.var == pytest.approx(p.var + (2 * p.step) ** 2)


def test_convolve_sends_the_cut_noise_floor_to_infinity():
    # 1000 trailing masses of 1e-16 are below the FFT noise floor: cut, but kept as mass at +inf.
    tiny = np.full(1000, 1e-16)
    a = _pld.Pmf(0, 0.01, np.concatenate([[0.5, 0.5 - tiny.sum()], tiny]))
    point = _pld.Pmf(0, 0.01, np.array([1.0]))
    out = _pld.convolve(a, point)
    assert len(out.probs) < len(a.probs)
    assert out.inf_mass == pytest.approx(1e-13, rel=0.01)
    assert out.probs.sum() + out.inf_mass == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(("sigma", "count"), [(2.0, 3), (20.0, 1000), (200.0, 100_000)])
def test_fft_composition_of_gaussians_matches_the_closed_form(sigma, count):
    # q = 1 through the generic machinery: repeated squaring, noise cutting, coarsening.
    step = 2.0 ** math.floor(math.log2(1 / sigma / 40))
    p = _pld.power(_pld.leaf(1.0, sigma, True, step, 1e-16 / count), count, count * step**2 / 8)
    if count > 1000:
        assert p.step > step  # the grid was coarsened on the way
    for delta in (1e-3, 1e-6, 1e-9):
        exact = gaussian_epsilon(math.sqrt(count) / sigma, delta)
        upper, lower = _pld.epsilon_bounds((p,), delta)
        assert exact <= upper <= exact * 1.005
        assert lower <= exact


def test_epsilon_at_inverts_delta_at():
    p = _pld.power(_pld.leaf(0.01, 1.0, True, 2.0**-12, 1e-18), 500, 500 * 2.0**-24 / 8)
    for delta in (1e-2, 1e-5, 1e-8):
        eps = _pld.epsilon_at(p, delta)
        assert _pld.delta_at(p, eps) == pytest.approx(delta, rel=1e-9)
        assert _pld.delta_at(p, eps * (1 - 1e-6)) > delta


def test_epsilon_at_edge_cases():
    p = _pld.Pmf(start=10, step=0.1, probs=np.array([0.5, 0.5]), inf_mass=0.0)
    assert _pld.epsilon_at(p, 0.999) == 0.0  # delta(0) = 1 - 0.5 e^-1 - 0.5 e^-1.1 < 0.999
    assert _pld.epsilon_at(p, 1e-300) == pytest.approx(1.1)  # the largest finite loss
    with_inf = _pld.Pmf(start=0, step=0.1, probs=np.array([0.9]), inf_mass=0.1)
    assert _pld.epsilon_at(with_inf, 0.05) == math.inf
