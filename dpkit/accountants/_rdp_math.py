"""Rényi DP of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019) and its (ε, δ) conversions.

With mu0 = N(0, s^2), mu1 = N(1, s^2) and mu = (1-q) mu0 + q mu1, the RDP of order
alpha under add/remove adjacency is ``max(log A, log B) / (alpha - 1)`` with
``A = E_mu0[(mu/mu0)^alpha]`` and ``B = E_mu[(mu0/mu)^alpha] = E_mu0[(mu/mu0)^(1-alpha)]``.

* Integer alpha: A is a binomial sum (exact), written as ``A - 1`` over its
  positive terms so that small values keep their precision.
* Fractional alpha, and B: the defining one-dimensional integral, by the trapezoid
  rule in log space. The integrand is analytic and decays like a Gaussian, where the
  trapezoid rule converges exponentially; it matches the binomial sum at integer
  orders to ~1e-12 (tested).
* Small sigma: the rule's step must resolve sigma, so its grid grows like 1 / sigma.
  Beyond ``_GRID_BUDGET`` nodes, upper bounds replace the integrals: ``log A`` is convex
  in alpha (Hölder) with ``log A_1 = 0``, so it is at most the chord between the integer
  orders around alpha; and ``mu / mu0 >= 1 - q``, so ``log B <= (alpha - 1) log(1/(1-q))``.
"""
from __future__ import annotations

import math

import numpy as np

# scipy.special is imported where it is used: this module loads with every plugin manager (see _pld).

_GRID_BUDGET = 1 << 22  # trapezoid nodes times exponents in one integral (~32 MiB per array)

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [round(1 + i / 20, 2) for i in range(1, 20)]  # 1.05 .. 1.95
    + [round(2 + i / 10, 1) for i in range(90)]  # 2.0 .. 10.9
    + list(range(11, 65))
    + [72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024]
)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha, integer alpha >= 2: ``log(1 + sum_{k>=2} C(a,k) (1-q)^(a-k) q^k (e^{k(k-1)/(2s^2)} - 1))``.

    The binomial weights sum to 1 and the k = 0, 1 exponents are 0, so A - 1 is a sum
    of positive terms over k >= 2: no cancellation, even when A is within 1e-12 of 1.
    """
    from scipy import special

    k = np.arange(2, alpha + 1)
    c = k * (k - 1) / (2 * sigma**2)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    log_expm1 = c + np.log(-np.expm1(-c))  # log(e^c - 1), stable for small and large c
    terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + log_expm1
    return float(np.logaddexp(0.0, special.logsumexp(terms)))


def _grid(sigma: float, exponents: np.ndarray) -> np.ndarray:
    """The trapezoid nodes of ``_log_moments``, or None where they would exceed ``_GRID_BUDGET``."""
    step = min(0.1, sigma / 8)  # resolves the Gaussian (width 1) and the kink of l (width s)
    peak = max(0.0, float(np.max(exponents)) / sigma)  # the q-branch peaks near u = e / s
    if (peak + 80.0) / step * len(exponents) > _GRID_BUDGET:
        return None
    return np.arange(-40.0, peak + 40.0 + step, step)


def _log_a_chord(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Upper bounds on log A at fractional orders: the chord of the convex log A between integer orders."""
    low = np.floor(orders)
    log_a = {int(a): _log_a_integer(q, sigma, int(a)) if a >= 2 else 0.0 for a in np.union1d(low, low + 1)}
    return np.array([(a0 + 1 - a) * log_a[int(a0)] + (a - a0) * log_a[int(a0) + 1] for a, a0 in zip(orders, low)])


def _log_moments(q: float, sigma: float, exponents: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``log E_{u~N(0,1)}[exp(e * l(u))]`` per exponent e, ``l(u) = log(1 - q + q exp(u/s - 1/(2 s^2)))``.

    Near zero it integrates ``e^(e l) - 1 - e (e^l - 1) >= 0`` instead (the last term has
    mean zero), so the result keeps its relative precision rather than drowning in 1.
    """
    from scipy import special

    step = u[1] - u[0]
    loss = np.logaddexp(math.log1p(-q), math.log(q) + u / sigma - 1 / (2 * sigma**2))
    log_weight = -0.5 * u**2 - 0.5 * math.log(2 * math.pi) + math.log(step)
    e = exponents[:, None]
    direct = special.logsumexp(log_weight + e * loss, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        excess = np.exp(log_weight) * (np.expm1(e * loss) - e * np.expm1(loss))
        near_zero = np.log1p(np.sum(excess, axis=1))
    return np.where(direct > 1e-3, direct, near_zero)


def rdp(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP epsilons of one step of ``PoissonSampled(q, Gaussian(sigma))`` at each order (> 1)."""
    orders = np.asarray(orders, dtype=float)
    if q == 0:
        return np.zeros_like(orders)
    if q == 1:
        return orders / (2 * sigma**2)
    whole = orders == np.floor(orders)
    log_a = np.empty_like(orders)
    log_a[whole] = [_log_a_integer(q, sigma, int(alpha)) for alpha in orders[whole]]
    if not whole.all():
        u = _grid(sigma, orders[~whole])
        log_a[~whole] = _log_a_chord(q, sigma, orders[~whole]) if u is None else _log_moments(
            q, sigma, orders[~whole], u)
    u = _grid(sigma, 1 - orders)
    log_b = (orders - 1) * -math.log1p(-q) if u is None else _log_moments(q, sigma, 1 - orders, u)
    return np.maximum(np.maximum(log_a, log_b), 0.0) / (orders - 1)


def epsilon(orders: np.ndarray, rdp_values: np.ndarray, delta: float, conversion: str) -> tuple[float, float]:
    """(ε, best order) from RDP: the minimum over orders of the chosen conversion.

    ``"modern"`` (Balle et al. 2020, Thm 21; Canonne, Kamath, Steinke 2020):
    ``rdp + log((a-1)/a) - (log δ + log a)/(a-1)``. ``"classic"`` (Mironov 2017):
    ``rdp + log(1/δ)/(a-1)``; the modern one is smaller at every order by
    ``log(a)/(a-1) - log((a-1)/a) > 0``, so never looser.
    """
    orders = np.asarray(orders, dtype=float)
    if conversion == "classic":
        eps = rdp_values - math.log(delta) / (orders - 1)
    else:
        eps = rdp_values + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])
