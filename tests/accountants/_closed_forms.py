"""Exact privacy curves, written independently of dpkit, for the accountants to be checked against."""
from __future__ import annotations

import math

from scipy import optimize, special


def gaussian_delta(mu: float, eps: float) -> float:
    """T Gaussians with noise sigma compose to exactly mu-GDP, mu = sqrt(T)/sigma (Dong, Roth, Su)."""
    return special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)


def sampled_gaussian_delta(q: float, sigma: float, eps: float, direction: str = "both") -> float:
    """One step of PoissonSampled(q, Gaussian(sigma)), add/remove: the hockey-stick divergence.

    Remove: P = (1-q)N(0,s^2) + qN(1,s^2) vs Q = N(0,s^2); the loss exceeds eps right of a
    threshold x. Add: the reverse pair; the loss exceeds eps left of a threshold.
    ``direction="both"`` gives the worse of the two.
    """
    s = sigma

    def mix_sf(x):
        return (1 - q) * special.ndtr(-x / s) + q * special.ndtr(-(x - 1) / s)

    def mix_cdf(x):  # not 1 - mix_sf(x): exp(eps) would magnify its cancellation far above a small delta
        return (1 - q) * special.ndtr(x / s) + q * special.ndtr((x - 1) / s)

    remove = 0.0
    if math.expm1(eps) > -q:
        x = s * s * math.log1p(math.expm1(eps) / q) + 0.5
        remove = mix_sf(x) - math.exp(eps) * special.ndtr(-x / s)
    add = 0.0
    ratio = (math.exp(-eps) - 1 + q) / q
    if ratio > 0:
        x = s * s * math.log(ratio) + 0.5
        add = special.ndtr(x / s) - math.exp(eps) * mix_cdf(x)
    return {"remove": remove, "add": add, "both": max(remove, add, 0.0)}[direction]


def epsilon_of(delta_fn, delta: float) -> float:
    """The smallest eps >= 0 with delta_fn(eps) <= delta."""
    if delta_fn(0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_fn(high) > delta:
        high *= 2
    return optimize.brentq(lambda e: delta_fn(e) - delta, 0.0, high, xtol=1e-14, rtol=1e-14)


def gaussian_epsilon(mu: float, delta: float) -> float:
    return epsilon_of(lambda e: gaussian_delta(mu, e), delta)


def sampled_gaussian_epsilon(q: float, sigma: float, delta: float) -> float:
    return epsilon_of(lambda e: sampled_gaussian_delta(q, sigma, e), delta)


def gaussian_epsilon_precise(mu: float, delta: float) -> float:
    """``gaussian_epsilon`` in 60-digit arithmetic: for mu in the thousands, where e^eps overflows float64."""
    import mpmath

    with mpmath.workdps(60):
        mu, delta = mpmath.mpf(mu), mpmath.mpf(delta)

        def excess(e):
            return mpmath.ncdf(-e / mu + mu / 2) - mpmath.exp(e) * mpmath.ncdf(-e / mu - mu / 2) - delta

        if excess(0) <= 0:
            return 0.0
        high = mpmath.mpf(1)
        while excess(high) > 0:
            high *= 2
        low = high / 2 if high > 1 else mpmath.mpf(0)
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (mid, high) if excess(mid) > 0 else (low, mid)
        return float(low)


def sampled_gaussian_epsilon_lower(q: float, sigma: float, steps: int, delta: float) -> float:
    """A lower bound on the exact epsilon of ``steps`` sampled Gaussians, from tests of the remove pair.

    For any event S, ``delta(eps) >= P(S) - e^eps Q(S)``, so ``eps >= log((P(S) - delta) / Q(S))``.
    S = {at least k of the outputs exceed t}; Q(S) <= C(T, k) Q(x > t)^k (union bound), which keeps
    the bound valid where Q(S) underflows.
    """
    from scipy import stats

    best = 0.0
    for k in range(1, min(steps, 60) + 1):
        for a in (0.0, 1.0, 2.0, 3.0):
            t = 1 - a * sigma
            p_one = (1 - q) * special.ndtr(-t / sigma) + q * special.ndtr((1 - t) / sigma)
            p_s = stats.binom.sf(k - 1, steps, p_one)
            if p_s <= delta:
                continue
            log_choose = special.gammaln(steps + 1) - special.gammaln(k + 1) - special.gammaln(steps - k + 1)
            log_q_s = min(0.0, log_choose + k * special.log_ndtr(-t / sigma))
            best = max(best, math.log(p_s - delta) - log_q_s)
    return best
