"""The Rényi DP accountant (``accountant="rdp"``): fast, composes any ledger, a little loose.

RDP of the sampled Gaussian is exact at every order (``_rdp_math``); composition
adds it; the (ε, δ) conversion is where the slack is. ``conversion="modern"``
(default) is never looser than ``"classic"``, which is kept to reproduce published
numbers (Abadi et al. 2016, TF-Privacy, Opacus before 1.0).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from dpkit.accountants import _rdp_math
from dpkit.accountants._base import SIGMA_MIN, SampledGaussianAccountant, check_delta, real
from dpkit.hookspecs import hookimpl

_CONVERSIONS = ("modern", "classic")
_MAX_ORDER = 1e5


@functools.lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    values = _rdp_math.rdp(q, sigma, np.array(orders))
    values.flags.writeable = False  # shared through the cache
    return values


class RDPAccountant(SampledGaussianAccountant):
    """Rényi DP accountant for Poisson-subsampled Gaussian events.

    Args:
        orders: Rényi orders (> 1) to optimize over; the default is dense from 1.05
            to 11 and reaches 1024.
        conversion: ``"modern"`` (Balle et al. 2020) or ``"classic"``
            (``eps = rdp + log(1/delta)/(alpha-1)``).
    """

    def __init__(self, orders: Sequence[float] = _rdp_math.DEFAULT_ORDERS, conversion: str = "modern") -> None:
        super().__init__()
        if conversion not in _CONVERSIONS:
            raise ValueError(f"conversion must be one of {_CONVERSIONS}, got {conversion!r}")
        orders = tuple(real(a, "orders") for a in orders)
        if not orders or not all(1 < a <= _MAX_ORDER for a in orders):  # the binomial sum has one term per order
            raise ValueError(f"orders must be a non-empty sequence of numbers in (1, {_MAX_ORDER:g}], got {orders!r}")
        self.orders = orders
        self.conversion = conversion

    def rdp(self) -> np.ndarray:
        """The composed RDP epsilon at each of ``self.orders``."""
        total = np.zeros(len(self.orders))
        for (q, sigma), count in self._atoms.items():
            if sigma < SIGMA_MIN:  # a loss beyond float64 (see _base)
                return np.full(len(self.orders), np.inf)
            total += float(count) * _rdp_per_step(q, sigma, self.orders)
        return total

    def epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """(ε, the Rényi order that gives it): the order is what Opacus and TF-Privacy print."""
        delta = check_delta(delta)
        settled = self.settled(delta)  # e.g. nothing spent: the conversion's own slack would report ε > 0
        if settled is not None:
            return settled, self.orders[-1]
        return _rdp_math.epsilon(np.array(self.orders), self.rdp(), delta, self.conversion)

    def epsilon(self, delta: float) -> float:
        """The smallest ε over the orders such that the composition is (ε, delta)-DP."""
        return self.epsilon_and_order(delta)[0]


@hookimpl
def dpkit_accountants():
    return {"rdp": RDPAccountant}
