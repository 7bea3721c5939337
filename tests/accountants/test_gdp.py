"""The GDP accountant: the CLT formula, labelled an approximation that can under-report."""
from __future__ import annotations

import math

import pytest
from _closed_forms import gaussian_epsilon, sampled_gaussian_epsilon

from dpkit.accountants.gdp import GDPAccountant
from dpkit.events import GaussianEvent, PoissonSampledEvent


def test_epsilon_warns_that_it_is_a_clt_approximation():
    counter = GDPAccountant().compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)), 100)
    with pytest.warns(UserWarning, match="CLT.*under-report"):
        counter.epsilon(1e-5)
    assert "under-report" in GDPAccountant.__doc__


def test_mu_is_the_poisson_clt_formula():
    counter = GDPAccountant().compose(PoissonSampledEvent(0.01, GaussianEvent(1.2)), 5000)
    assert counter.mu() == pytest.approx(0.01 * math.sqrt(5000 * math.expm1(1 / 1.2**2)))


def test_bu_et_al_mnist_number():
    # Bu, Dong, Long, Su 2020 (Harvard Data Science Review), Fig. 4: p = 256/60000,
    # sigma = 1.06, epoch 20 -> mu_CLT = 0.35 and (1.34, 1e-5)-DP.
    counter = GDPAccountant().compose(PoissonSampledEvent(256 / 60000, GaussianEvent(1.06)), 4688)
    assert round(counter.mu(), 2) == 0.35
    with pytest.warns(UserWarning):
        assert round(counter.epsilon(1e-5), 2) == 1.34


def test_unsampled_gaussians_are_exact():
    counter = GDPAccountant().compose(GaussianEvent(2.0), 30).compose(GaussianEvent(3.0), 20)
    with pytest.warns(UserWarning):
        eps = counter.epsilon(1e-6)
    assert eps == pytest.approx(gaussian_epsilon(math.sqrt(30 / 4 + 20 / 9), 1e-6), rel=1e-9)


def test_it_can_under_report():
    # Why it warns: for one step with a large sampling rate the CLT misses the tail.
    counter = GDPAccountant().compose(PoissonSampledEvent(0.5, GaussianEvent(1.0)))
    with pytest.warns(UserWarning):
        assert counter.epsilon(1e-5) < sampled_gaussian_epsilon(0.5, 1.0, 1e-5)


def test_no_noise_at_all_is_infinite():
    counter = GDPAccountant().compose(PoissonSampledEvent(0.1, GaussianEvent(0.01)))
    with pytest.warns(UserWarning):
        assert counter.epsilon(1e-5) == math.inf
