"""Every built-in accountant at the edges: tiny and huge noise, many steps, q = 0 and q = 1.

Each answer is an upper bound (never below the exact epsilon; inf is one) or a clear
error, and none allocates more than the grids it needs.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from _closed_forms import gaussian_epsilon, gaussian_epsilon_precise, sampled_gaussian_epsilon_lower

from dpkit import accounting
from dpkit.accountants import _base, _pld, prv
from dpkit.events import GaussianEvent, PoissonSampledEvent

ACCOUNTANTS = ["prv", "rdp", "gdp"]


@pytest.fixture(autouse=True)
def _builtins_only(fresh_registry):
    yield


def epsilon(name: str, sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gdp warns that it approximates
        return accounting.get_epsilon(accountant=name, noise_multiplier=sigma, sample_rate=q, steps=steps,
                                      delta=delta)


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize("sigma", [0.1, 0.03, 0.01, 0.003, 1e-3, 1e-6])
def test_tiny_noise_is_an_upper_bound_and_cheap(name, sigma):
    # Was: prv put every loss above ~709 at 709 (5e3 for the exact ~4e4 at sigma=0.01); at sigma <= 0.003
    # prv and rdp tried to allocate up to 65 GiB.
    start = time.perf_counter()
    eps = epsilon(name, sigma, 0.01, 100)
    assert time.perf_counter() - start < 5
    assert eps >= sampled_gaussian_epsilon_lower(0.01, sigma, 100, 1e-5)


def test_tiny_noise_prv_is_tight():
    for sigma in (0.01, 0.003, 1e-6):
        lower = sampled_gaussian_epsilon_lower(0.01, sigma, 100, 1e-5)
        assert lower <= epsilon("prv", sigma, 0.01, 100) <= 1.1 * lower


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1000), (0.05, 10), (0.003, 100), (1e-4, 100), (1e-7, 3)])
def test_unsampled_steps_match_one_gaussian_with_sigma_over_sqrt_steps(name, sigma, steps):
    exact = gaussian_epsilon_precise(math.sqrt(steps) / sigma, 1e-5)
    eps = epsilon(name, sigma, 1.0, steps)
    if name == "gdp":  # exact at q = 1
        assert eps == pytest.approx(exact, rel=1e-9)
    else:
        assert exact * (1 - 1e-12) <= eps <= exact * (1.005 if name == "prv" else 1.2)
    assert epsilon(name, sigma / math.sqrt(steps), 1.0, 1) == pytest.approx(eps, rel=1e-9)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_noise_below_what_float64_resolves_is_reported_as_inf(name):
    assert epsilon(name, 1e-10, 0.01, 100) == math.inf
    assert epsilon(name, 1e-300, 1.0, 1) == math.inf
    assert epsilon(name, 1e-10, 1e-9, 100) == 0.0  # total variation 1e-7 <= delta: exactly 0


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_huge_noise_does_not_overflow(name):
    assert epsilon(name, 1e300, 0.01, 100) == 0.0  # total variation ~1e-299 <= delta: exact
    assert epsilon(name, 1e300, 1.0, 100) == 0.0
    tiny_delta = epsilon(name, 1e300, 1.0, 10**6, delta=1e-300)  # not settled: counted at SIGMA_MAX, a bound
    assert 0 <= tiny_delta < 1 and math.isfinite(tiny_delta)
    assert _base.SIGMA_MAX**-2 > 0


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_zero_sample_rate_spends_nothing(name):
    for sigma in (1e-300, 1e-3, 1.0, 1e300):
        assert epsilon(name, sigma, 0.0, 10**6) == 0.0


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_a_million_steps(name):
    start = time.perf_counter()
    eps = epsilon(name, 1.0, 0.01, 10**6)
    assert time.perf_counter() - start < 5
    assert 100 < eps < 200  # prv 139.0, rdp 144.8, gdp 141.0
    assert epsilon(name, 0.003, 0.01, 10**6) >= sampled_gaussian_epsilon_lower(0.01, 0.003, 10**6, 1e-5)


def test_prv_is_never_below_rdp_minus_its_error_at_small_noise():
    for sigma in (0.05, 0.02):
        eps, error = prv.PRVAccountant().compose(
            PoissonSampledEvent(0.01, GaussianEvent(sigma)), 100).epsilon_and_error(1e-5)
        assert eps - error <= epsilon("rdp", sigma, 0.01, 100)


def test_leaf_places_losses_beyond_exp_overflow_where_they_are():
    # sigma = 0.01: an included example has loss ~5000 (e^5000 overflows); its mass must sit there.
    leaf = _pld.leaf(0.01, 0.01, True, 8.0, 1e-18)
    losses = (leaf.start + np.arange(len(leaf.probs))) * leaf.step
    assert leaf.probs[losses > 4000].sum() == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("sigma", [1e-3, 1e-7])
def test_leaf_cost_does_not_grow_like_one_over_sigma(sigma):
    start = time.perf_counter()
    leaf = _pld.leaf(0.01, sigma, True, _pld.loss_std(0.01, sigma, True) / 40, 1e-18)
    assert time.perf_counter() - start < 1
    assert leaf.probs.sum() + leaf.inf_mass == pytest.approx(1.0, abs=1e-12)


def test_gaussian_epsilon_helper_agrees_with_the_precise_one():
    assert gaussian_epsilon_precise(10.0, 1e-5) == pytest.approx(gaussian_epsilon(10.0, 1e-5), rel=1e-12)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_subnormal_delta_is_answered(name):
    # Was: prv divided by delta / 10, which underflows to 0 at the smallest subnormal (ZeroDivisionError).
    eps = epsilon(name, 1.0, 0.01, 100, delta=5e-324)
    assert math.isfinite(eps) and eps >= epsilon(name, 1.0, 0.01, 100, delta=1e-300)
