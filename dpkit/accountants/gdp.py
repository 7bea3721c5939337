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

from dpkit.accountants._base import SIGMA_MIN, SampledGaussianAccountant, check_delta
from dpkit.hookspecs import hookimpl


def gdp_delta(mu: float, eps: float) -> float:
    """The δ(ε) curve of mu-GDP: ``Phi(a) - e^eps Phi(b)``, ``a = -eps/mu + mu/2``, ``b = a - mu``.

    ``e^eps phi(b) = phi(a)``, so the second term is ``phi(a) Phi(b) / phi(b)``, written with
    ``erfcx``: no ``e^eps`` to overflow, however large mu is.
    """
    from scipy import special  # on use: this module loads with every plugin manager (see _pld)

    a = -eps / mu + mu / 2
    b = a - mu
    scaled = math.exp(-0.5 * a * a) * 0.5 * special.erfcx(-b / math.sqrt(2))  # b <= -mu/2 < 0
    return float(special.ndtr(a) - scaled)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at which mu-GDP gives ``delta`` (0 if it already does at ε = 0)."""
    if not math.isfinite(mu):
        return math.inf
    if mu == 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
        if math.isinf(high):
            return math.inf
    from scipy import optimize

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
            if sigma < SIGMA_MIN or (q < 1 and sigma < 700**-0.5):  # sigma**-2 or exp overflows: no finite mu
                return math.inf
            total += float(count) / sigma**2 if q == 1 else float(count) * q**2 * math.expm1(sigma**-2)
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
        settled = self.settled(delta)  # exact 0, or inf below SIGMA_MIN (see _base)
        return gdp_epsilon(self.mu(), delta) if settled is None else settled


@hookimpl
def dpkit_accountants():
    return {"gdp": GDPAccountant}
