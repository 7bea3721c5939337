"""The truncated Poisson step (``TruncatedPoissonSampledEvent``): against dp_accounting, its parts against
direct sums, and the accountants that cannot count it refuse it by name."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from dpkit.accountants import _pld_truncated
from dpkit.accountants.gdp import GDPAccountant
from dpkit.accountants.prv import PRVAccountant
from dpkit.accountants.rdp import RDPAccountant
from dpkit.errors import UnsupportedEventError
from dpkit.events import (
    GaussianEvent,
    PoissonSampledEvent,
    TruncatedPoissonSampledEvent,
    event_from_dict,
    event_to_dict,
)

# dp_accounting 0.5 (scratch venv, never a dependency): PLDAccountant(value_discretization_interval=1e-4),
# compose(TruncatedSubsampledGaussianDpEvent(N, q, B, sigma), T), get_epsilon(1e-5). B is the expected batch size
# plus 0 to 4 standard deviations, then two extremes.
DP_ACCOUNTING = [  # (N, q, B, sigma, T, epsilon)
    (1000, 0.01, 10, 1.0, 100, 5.164377589741524),
    (1000, 0.01, 13, 1.0, 100, 4.601369021049784),
    (1000, 0.01, 16, 0.8, 300, 7.869132448924157),
    (1000, 0.01, 19, 1.5, 1000, 1.1838522629517556),
    (1000, 0.01, 23, 2.0, 1000, 0.62374852715069),
    (60000, 256 / 60000, 256, 1.0, 100, 3.871715039387214),
    (60000, 256 / 60000, 272, 1.0, 100, 3.266590382400107),
    (60000, 256 / 60000, 288, 0.8, 300, 5.65949811311899),
    (60000, 256 / 60000, 304, 1.5, 1000, 0.4007855168183408),
    (60000, 256 / 60000, 320, 2.0, 1000, 0.2458589308977762),
    (100, 0.5, 10, 2.0, 50, 7.1855389505949825),  # half the expected batch: nearly every step is cut
    # A small epsilon, where their 1e-4 grid over-reports by 0.5% (0.056410): this one is on a 1e-5 grid.
    (1000, 0.001, 3, 3.0, 2000, 0.05613669986000172),
]


def truncated(n, q, b, sigma, steps) -> float:
    return PRVAccountant().compose(TruncatedPoissonSampledEvent(n, q, b, GaussianEvent(sigma)), steps).epsilon(1e-5)


@pytest.mark.parametrize(("n", "q", "b", "sigma", "steps", "theirs"), DP_ACCOUNTING)
def test_matches_dp_accounting(n, q, b, sigma, steps, theirs):
    """Within 0.5% (measured: 1e-6 to 4e-4), and not below theirs, which also rounds pessimistically."""
    ours = truncated(n, q, b, sigma, steps)
    assert theirs * (1 - 1e-4) <= ours <= theirs * 1.005


def test_split_against_direct_sums():
    """p = P(the others fill the batch); q' = P(the record is kept | they do), summed over the others' count."""
    n, q, b = 60, 0.2, 14
    others = stats.binom(n - 1, q)
    p = sum(others.pmf(m) for m in range(b, n))
    kept = sum(others.pmf(m) * q * b / (m + 1) for m in range(b, n)) / p
    assert _pld_truncated.split(n, q, b) == pytest.approx((p, kept), rel=1e-12)
    assert _pld_truncated.split(n, q, n) == (0.0, 0.0)


def test_never_truncated_is_poisson():
    """B >= N: no batch is ever cut, and the event is the Poisson step exactly (every accountant counts it)."""
    for make in (PRVAccountant, RDPAccountant):
        a = make().compose(TruncatedPoissonSampledEvent(50, 0.1, 50, GaussianEvent(1.0)), 20).epsilon(1e-5)
        assert a == make().compose(PoissonSampledEvent(0.1, GaussianEvent(1.0)), 20).epsilon(1e-5)


def test_larger_batches_spend_less_and_approach_poisson():
    eps = [truncated(1000, 0.01, b, 1.0, 200) for b in (10, 14, 18, 30)]
    poisson = PRVAccountant().compose(PoissonSampledEvent(0.01, GaussianEvent(1.0)), 200).epsilon(1e-5)
    assert eps == sorted(eps, reverse=True) and poisson <= eps[-1] <= poisson * 1.005


@pytest.mark.parametrize("make", [RDPAccountant, GDPAccountant])
def test_other_accountants_refuse_by_name(make):
    event = TruncatedPoissonSampledEvent(100, 0.1, 5, GaussianEvent(1.0))
    counter = make()
    assert not counter.supports(event)
    with pytest.raises(UnsupportedEventError, match="TruncatedPoissonSampledEvent.*accountant='prv'"):
        counter.compose(event)


def test_event_checks_and_round_trip():
    event = TruncatedPoissonSampledEvent(100, 0.1, 5, GaussianEvent(1.0))
    assert event_from_dict(event_to_dict(event)) == event
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        PRVAccountant().compose(TruncatedPoissonSampledEvent(100, 0.1, 0, GaussianEvent(1.0)))


def test_huge_noise_settles_to_zero():
    """Past the total-variation bound epsilon is exactly 0, as for Poisson steps; a little less noise is not."""
    assert truncated(1000, 0.01, 10, 1e7, 10) == 0.0
    assert 0 < truncated(1000, 0.01, 10, 5.0, 10) < math.inf
