"""The f-DP recursion on the (ε, δ) curve: an assumption-free test, checked against mechanisms that are exactly
(ε, δ)-DP and against Steinke et al.'s test."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from dpkit import audit

ALPHA = 0.05


def _smallest_refuted(m: int, eps: float, delta: float) -> int:
    """The fewest right guesses of m that refute (ε, δ)-DP (the refuted counts are those from there up)."""
    lo, hi = 0, m + 1  # refuted(hi) holds by convention, refuted(lo) does not (0 right refutes nothing)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if audit.approx_dp_refutes(m, m, mid, eps, delta) else (mid, hi)
    return hi


@pytest.mark.parametrize(("m", "eps", "delta"), [(1000, 1.0, 1e-3), (1000, 2.0, 1e-2), (300, 0.5, 1e-2),
                                                 (2000, 3.0, 1e-4)])
def test_refutes_an_exactly_eps_delta_dp_mechanism_at_most_alpha_of_the_time(m, eps, delta):
    """Each canary revealed with probability δ, else randomized response with ε: exactly (ε, δ)-DP. Every canary
    guessed: v ~ Binomial(m, δ + (1-δ)e^ε/(1+e^ε)), so the exact probability of a refutation is a binomial tail.
    So too when one coin reveals all canaries at once (still (ε, δ)-DP for each)."""
    v = _smallest_refuted(m, eps, delta)
    rr = special.expit(eps)
    independent = stats.binom.sf(v - 1, m, delta + (1 - delta) * rr)
    joint = delta + (1 - delta) * stats.binom.sf(v - 1, m, rr)
    assert independent <= ALPHA and joint <= ALPHA
    assert independent > 1e-3  # and it is not vacuous (close to α where mδ is small)


def test_at_delta_zero_it_is_steinke_et_al_and_with_delta_it_pays_less():
    for m, r, v in [(1000, 1000, 1000), (1000, 200, 190), (100, 20, 20), (10_000, 1000, 995)]:
        steinke, recursion = audit.one_run_epsilon(m, r, v, 0.0), audit.approx_dp_epsilon(m, r, v, 0.0)
        assert recursion == pytest.approx(steinke, rel=0.01)
        for delta in (1e-5, 1e-3):
            assert audit.approx_dp_epsilon(m, r, v, delta) >= 0.99 * audit.one_run_epsilon(m, r, v, delta)


def test_the_bound_is_refuted_and_just_above_it_is_not():
    eps = audit.approx_dp_epsilon(5000, 625, 620, 1e-5)
    assert eps > 0
    assert audit.approx_dp_refutes(5000, 625, 620, eps, 1e-5)
    assert not audit.approx_dp_refutes(5000, 625, 620, eps * 1.01, 1e-5)


def test_sign_guessing_reaches_every_canary():
    """Guessing by the side of the threshold, not half in and half out: with perfect scores every canary is
    right, whatever the split of the coins (here 300 of 1000 in), so the best guess count is all of them."""
    included = np.arange(1000) < 300
    bounds = audit.audit_scores(np.where(included, 5.0, -5.0), included, delta=1e-5, threshold=0.0)
    for bound in (bounds.one_run, bounds.approx_dp, bounds.fdp):
        assert bound.guesses == bound.correct == 1000


@pytest.mark.parametrize(("m", "r", "eps", "delta"), [(400, 100, 1.0, 1e-2), (1000, 250, 2.0, 1e-3), (1000, 250, 1.0, 1e-5)])
def test_with_abstentions_it_refutes_a_true_claim_at_most_alpha_of_the_time(m, r, eps, delta):
    """The same mechanism, guessed by an attacker that abstains: the k revealed canaries are guessed first (all
    right), then r - k of the randomized ones. The exact law of the right guesses mixes binomials over k."""
    refuted = np.array([audit.approx_dp_refutes(m, r, v, eps, delta) for v in range(r + 1)])
    rr, total = special.expit(eps), 0.0
    for k in range(m + 1):
        revealed = min(k, r)
        right = revealed + np.arange(r - revealed + 1)
        total += stats.binom.pmf(k, m, delta) * stats.binom.pmf(right - revealed, r - revealed, rr)[refuted[right]].sum()
    assert total <= ALPHA and (total > 0.01 or m * delta > 1)  # tight unless the canaries share a lot of δ
