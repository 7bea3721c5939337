"""The RDP accountant: exact RDP of the sampled Gaussian, published numbers, both conversions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from _closed_forms import gaussian_epsilon
from hypothesis import given, settings
from hypothesis import strategies as st

from dpkit.accountants import _rdp_math
from dpkit.accountants.rdp import RDPAccountant
from dpkit.events import GaussianEvent, PoissonSampledEvent

# The orders of TF-Privacy's compute_dp_sgd_privacy and of Opacus before 1.0.
TF_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def classic(q: float, sigma: float, steps: int) -> RDPAccountant:
    return RDPAccountant(orders=TF_ORDERS, conversion="classic").compose(
        PoissonSampledEvent(q, GaussianEvent(sigma)), steps
    )


@pytest.mark.parametrize(
    ("sigma", "epochs", "printed"),
    # tensorflow/privacy, tutorials/README.md, "Select Parameters" table for mnist_dpsgd_tutorial.py:
    # N=60000, batch 256, delta=1e-5. Re-derived independently with dp-accounting 0.6.0
    # (RdpAccountant on these orders, classic conversion): 1.1923, 3.0084, 7.1016.
    [(1.3, 15, 1.19), (1.1, 60, 3.01), (0.7, 45, 7.10)],
)
def test_tf_privacy_mnist_tutorial_numbers(sigma, epochs, printed):
    steps = math.ceil(epochs * 60000 / 256)  # compute_dp_sgd_privacy's step count
    assert round(classic(256 / 60000, sigma, steps).epsilon(1e-5), 2) == printed


def test_abadi_et_al_moments_accountant_example():
    # Abadi et al. 2016, Sec. 3.1: q=0.01, sigma=4, T=10000, delta=1e-5 -> eps ~ 1.26.
    assert round(classic(0.01, 4.0, 10_000).epsilon(1e-5), 2) == 1.26


def test_opacus_mnist_example_first_epoch():
    # pytorch/opacus examples/mnist_README.md: sample rate 0.004, sigma 1.3, after epoch 1
    # (250 steps) "(ε = 0.71, δ = 1e-05) for α = 18.0".
    eps, order = classic(0.004, 1.3, 250).epsilon_and_order(1e-5)
    assert (round(eps, 2), order) == (0.71, 18.0)


def test_integer_orders_match_the_quadrature_used_for_fractional_ones():
    # The binomial sum (exact) and the trapezoid integral must agree where both apply.
    for q, sigma in [(0.004, 1.1), (0.3, 2.0), (1e-5, 5.0), (0.5, 0.3)]:
        orders = np.arange(2.0, 40.0)
        exact = np.array([_rdp_math._log_a_integer(q, sigma, int(a)) for a in orders])
        quadrature = _rdp_math._log_moments(q, sigma, orders, _rdp_math._grid(sigma, orders))
        np.testing.assert_allclose(quadrature, exact, rtol=1e-9)
        # and the add direction B never exceeds A (Mironov et al. 2019), so max(A, B) = A here
        assert np.all(_rdp_math._log_moments(q, sigma, 1 - orders, _rdp_math._grid(sigma, 1 - orders)) <= exact + 1e-12)


def test_unsampled_gaussian_rdp_is_alpha_over_two_sigma_squared():
    counter = RDPAccountant().compose(GaussianEvent(2.0), 7)
    np.testing.assert_allclose(counter.rdp(), 7 * np.array(counter.orders) / 8)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (5.0, 100), (50.0, 10_000)])
def test_never_below_the_exact_gaussian_composition(sigma, steps):
    for delta in (1e-3, 1e-6, 1e-9):
        exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
        assert RDPAccountant().compose(GaussianEvent(sigma), steps).epsilon(delta) >= exact


@settings(max_examples=25, deadline=None)
@given(
    q=st.floats(1e-4, 1.0),
    sigma=st.floats(0.4, 20.0),
    steps=st.integers(0, 100_000),
    delta=st.floats(1e-12, 0.5),
)
def test_modern_conversion_never_looser_than_classic(q, sigma, steps, delta):
    event = PoissonSampledEvent(q, GaussianEvent(sigma))
    modern = RDPAccountant().compose(event, steps).epsilon(delta)
    assert modern <= RDPAccountant(conversion="classic").compose(event, steps).epsilon(delta)
    assert modern >= 0


def test_monotone_in_steps_rate_and_noise():
    def eps(q, sigma, steps):
        return RDPAccountant().compose(PoissonSampledEvent(q, GaussianEvent(sigma)), steps).epsilon(1e-5)

    base = eps(0.01, 1.0, 1000)
    assert eps(0.01, 1.0, 2000) > base and eps(0.02, 1.0, 1000) > base and eps(0.01, 1.5, 1000) < base


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="conversion"):
        RDPAccountant(conversion="tight")
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant(orders=[0.5, 2])
    with pytest.raises(ValueError, match="delta"):
        RDPAccountant().epsilon(0.0)
