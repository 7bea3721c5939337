"""The Gaussian-DP accountant (``accountant="gdp"``): a central-limit *approximation*, not a bound.

Dong, Roth, Su (2019) and Bu et al. (2020): T steps of the Poisson-subsampled Gaussian
are close to mu-GDP with ``mu = q * sqrt(T * (exp(1/sigma^2) - 1))``; different steps
add their ``mu^2``. Unsampled Gaussians (q = 1) compose to exactly mu-GDP with
``mu^2 = T / sigma^2``. The CLT limit can under-report epsilon, most for few steps
or large q; use ``"prv"`` or ``"rdp"`` for guarantees.
"""
from __future__ import annotations

import math
import warnings

from scipy import optimize, special

from dpkit.accountants._base import SampledGaussianAccountant, check_delta
from dpkit.hookspecs import hookimpl


def gdp_delta(mu: float, eps: float) -> float:
    """The δ(ε) curve of mu-GDP: ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``."""
    return float(special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which mu-GDP gives ``delta`` (0 if it already does at ε = 0)."""
    if not math.isfinite(mu):
        return math.inf
    if mu == 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
    return optimize.brentq(lambda eps: gdp_delta(mu, eps) - delta, 0.0, high, xtol=1e-12, rtol=1e-12)


class GDPAccountant(SampledGaussianAccountant):
    """Gaussian-DP accountant (CLT approximation).

    .. warning:: An approximation that can *under-report* epsilon: the CLT limit is
       not an upper bound. ``epsilon()`` warns every time.
    """

    def mu(self) -> float:
        """The GDP parameter of everything composed so far."""
        total = 0.0
        for (q, sigma), count in self._atoms.items():
            if q < 1 and sigma**-2 > 700:  # exp overflows: the CLT gives no finite mu
                return math.inf
            total += count / sigma**2 if q == 1 else count * q**2 * math.expm1(sigma**-2)
        return math.sqrt(total)

    def epsilon(self, delta: float) -> float:
        """ε from mu-GDP at ``delta``; a CLT approximation that can under-report."""
        delta = check_delta(delta)
        warnings.warn(
            "accountant='gdp' is a central-limit (CLT) approximation that can under-report epsilon; "
            "use accountant='prv' (default) or 'rdp' for a guarantee.",
            UserWarning,
            stacklevel=2,
        )
        return gdp_epsilon(self.mu(), delta)


@hookimpl
def dpkit_accountants():
    return {"gdp": GDPAccountant}
