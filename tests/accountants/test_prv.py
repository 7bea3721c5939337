"""The PLD accountant: never below the exact epsilon, within 0.5% of it, fast, cached per ledger."""
from __future__ import annotations

import math
import time

import pytest
from _closed_forms import gaussian_epsilon, sampled_gaussian_epsilon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpkit.accountants import prv
from dpkit.accountants.prv import PRVAccountant
from dpkit.accountants.rdp import RDPAccountant
from dpkit.events import ComposedEvent, GaussianEvent, NoOpEvent, PoissonSampledEvent, SelfComposedEvent


def sampled(q: float, sigma: float) -> PoissonSampledEvent:
    return PoissonSampledEvent(q, GaussianEvent(sigma))


def prv_eps(q: float, sigma: float, steps: int, delta: float, **kwargs) -> float:
    return PRVAccountant(**kwargs).compose(sampled(q, sigma), steps).epsilon(delta)


@pytest.mark.parametrize(("sigma", "steps"), [(0.8, 1), (2.0, 10), (10.0, 1000), (100.0, 100_000)])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_gaussian_composition_matches_closed_form(sigma, steps, delta):
    # T Gaussians with noise sigma are exactly mu-GDP with mu = sqrt(T)/sigma.
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    eps, error = PRVAccountant().compose(GaussianEvent(sigma), steps).epsilon_and_error(delta)
    assert exact <= eps <= exact * 1.005
    assert eps - error <= exact


def test_heterogeneous_gaussians_match_closed_form():
    events = [(GaussianEvent(3.0), 40), (PoissonSampledEvent(1.0, GaussianEvent(5.0)), 100), (NoOpEvent(), 9)]
    counter = PRVAccountant()
    for event, count in events:
        counter.compose(event, count)
    exact = gaussian_epsilon(math.sqrt(40 / 9 + 100 / 25), 1e-6)
    assert exact <= counter.epsilon(1e-6) <= exact * 1.005


@pytest.mark.parametrize(
    ("q", "sigma", "delta"), [(0.01, 1.0, 1e-5), (0.1, 0.8, 1e-6), (0.5, 2.0, 1e-3), (1e-3, 0.5, 1e-8)]
)
def test_single_sampled_step_matches_exact_curve(q, sigma, delta):
    # One step has a closed-form hockey-stick divergence in both directions.
    exact = sampled_gaussian_epsilon(q, sigma, delta)
    assert exact <= prv_eps(q, sigma, 1, delta) <= exact * 1.005


@pytest.mark.parametrize(("q", "sigma", "steps"), [(256 / 60000, 1.1, 14063), (0.01, 0.8, 2000), (0.001, 3.0, 100_000)])
def test_many_sampled_steps_within_half_percent_of_a_much_finer_grid(q, sigma, steps):
    # The reference runs on a grid 4x finer; its proven lower bound must not exceed our value.
    atoms = ((q, sigma, steps),)
    fine_upper, fine_lower = prv._pld.epsilon_bounds(prv._compose(atoms, 2, False), 1e-5)
    assert fine_upper - fine_lower < 0.02 * fine_upper  # the reference is itself tight
    eps = prv_eps(q, sigma, steps, 1e-5)
    assert fine_lower <= eps
    assert fine_upper * (1 - 1e-9) <= eps <= fine_upper * 1.005


def test_max_error_refines_until_the_proven_error_is_small():
    counter = PRVAccountant(max_error=0.004).compose(sampled(0.02, 1.0), 3000)
    eps, error = counter.epsilon_and_error(1e-5)
    assert 0 < error <= 0.004 * eps
    default_eps, default_error = PRVAccountant().compose(sampled(0.02, 1.0), 3000).epsilon_and_error(1e-5)
    assert default_error > error
    assert eps <= default_eps <= eps * 1.005


def test_hundred_thousand_steps_are_fast_and_cached_per_ledger():
    prv._compose.cache_clear()
    start = time.perf_counter()
    first = prv_eps(0.004, 1.1, 100_000, 1e-5)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # ~0.1 s on two cores; generous for loaded CI machines
    start = time.perf_counter()
    again = prv_eps(0.004, 1.1, 100_000, 1e-6)  # a fresh accountant, the same ledger, another delta
    assert time.perf_counter() - start < 0.1
    assert prv._compose.cache_info().hits >= 1
    assert again > first


def test_long_double_ffts_cut_the_float_noise():
    atoms = ((0.01, 1.0, 20_000),)
    plain, extended = prv._compose(atoms, 0, False), prv._compose(atoms, 0, True)
    for p, e in zip(plain, extended, strict=True):
        assert e.fp + e.inf_mass < (p.fp + p.inf_mass) / 100
    assert prv._pld.epsilon_bounds(extended, 1e-5)[0] == pytest.approx(prv._pld.epsilon_bounds(plain, 1e-5)[0])


def test_delta_beyond_floating_point_falls_back_to_rdp():
    eps = PRVAccountant().compose(GaussianEvent(1.0), 10).epsilon(1e-300)
    assert math.isfinite(eps)
    assert eps == RDPAccountant().compose(GaussianEvent(1.0), 10).epsilon(1e-300)


def test_nothing_spent_gives_zero():
    assert PRVAccountant().epsilon(1e-5) == 0.0
    assert prv_eps(0.0, 1.0, 1000, 1e-5) == 0.0
    assert prv_eps(0.01, 1.0, 0, 1e-5) == 0.0
    assert PRVAccountant().compose(PoissonSampledEvent(0.5, NoOpEvent()), 10).epsilon(1e-5) == 0.0


def test_event_forms_that_mean_the_same_give_the_same_epsilon():
    step = sampled(0.01, 1.0)
    plain = PRVAccountant().compose(step, 600).epsilon(1e-5)
    assert PRVAccountant().compose(SelfComposedEvent(step, 200), 3).epsilon(1e-5) == plain
    assert PRVAccountant().compose(ComposedEvent((step, step)), 300).epsilon(1e-5) == plain
    assert prv_eps(1.0, 2.0, 50, 1e-5) == PRVAccountant().compose(GaussianEvent(2.0), 50).epsilon(1e-5)
    # Gaussians released on one Poisson sample are one Gaussian: sigma_eff^-2 = 1^-2 + 2^-2.
    joint = PoissonSampledEvent(0.01, ComposedEvent((GaussianEvent(1.0), GaussianEvent(2.0))))
    assert PRVAccountant().compose(joint, 100).epsilon(1e-5) == pytest.approx(prv_eps(0.01, 1.25**-0.5, 100, 1e-5))


def test_monotone_in_steps_rate_and_noise():
    base = prv_eps(0.01, 1.0, 500, 1e-5)
    assert prv_eps(0.01, 1.0, 1000, 1e-5) > base
    assert prv_eps(0.02, 1.0, 500, 1e-5) > base
    assert prv_eps(0.01, 1.2, 500, 1e-5) < base
    assert prv_eps(0.01, 1.0, 500, 1e-6) > base


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.floats(1e-3, 1.0),
    sigma=st.floats(0.5, 8.0),
    delta=st.floats(1e-9, 1e-2),
)
def test_property_single_step_never_below_exact(q, sigma, delta):
    exact = sampled_gaussian_epsilon(q, sigma, delta) if q < 1 else gaussian_epsilon(1 / sigma, delta)
    eps, error = PRVAccountant().compose(sampled(q, sigma)).epsilon_and_error(delta)
    assert eps >= exact * (1 - 1e-9)
    assert eps <= exact * 1.005 + 1e-6
    assert eps - error <= exact * (1 + 1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.floats(1e-3, 0.3),
    sigma=st.floats(0.6, 5.0),
    steps=st.integers(1, 5000),
    delta=st.floats(1e-8, 1e-3),
)
def test_property_rdp_is_never_below_what_prv_proves(q, sigma, steps, delta):
    # RDP is an upper bound of the exact epsilon, which is at least prv's proven lower bound.
    eps, error = PRVAccountant().compose(sampled(q, sigma), steps).epsilon_and_error(delta)
    assert RDPAccountant().compose(sampled(q, sigma), steps).epsilon(delta) >= eps - error
