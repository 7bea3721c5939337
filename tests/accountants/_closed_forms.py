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
