"""Privacy accounting without a model: epsilon of a run, and the noise for a target epsilon.

Accountants are plugins (``dpkit_accountants``): ``"prv"`` (default; tight upper
bound), ``"rdp"`` (upper bound, looser, fast) and ``"gdp"`` (CLT approximation, can
under-report). Every argument is checked here, not only by attrs validators, so a
process that turned validators off still gets the checks.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from dpkit import registry
from dpkit.accountants._base import MAX_COUNT, check_count, check_delta, check_rate, check_sigma, real
from dpkit.events import DpEvent, GaussianEvent, Ledger, PoissonSampledEvent
from dpkit.hookspecs import Accountant

_SIGMA_RANGE = (2.0**-10, 2.0**30)  # where get_noise_multiplier searches
# The search's tolerance is also relative: an absolute 0.01 would accept any sigma for a target below it.
_RELATIVE_TOLERANCE = 0.01


def make_accountant(name: str = "prv") -> Accountant:
    """A fresh accountant from the plugin that provides ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"accountant must be a name (str), got {name!r}")
    return registry.lookup("dpkit_accountants", name, "accountant").value()


def epsilon_of_ledger(ledger: Ledger, delta: float, accountant: str = "prv") -> float:
    """Epsilon of everything recorded in ``ledger``, replayed into a fresh ``accountant``."""
    delta = check_delta(delta)
    counter = make_accountant(accountant)
    for event, count in ledger.entries:
        counter.compose(event, count)
    return float(counter.epsilon(delta))


def get_epsilon(
    *,
    accountant: str = "prv",
    noise_multiplier: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    delta: float,
) -> float:
    """Epsilon after ``steps`` DP-SGD steps with Poisson rate ``sample_rate`` and noise ``noise_multiplier``.

    ``epochs`` instead of ``steps`` means ``steps = ceil(epochs / sample_rate)``, as in
    :func:`get_noise_multiplier`, so the two answer the same question both ways. Numbers may be Python or
    numpy scalars or 0-d tensors. Every argument is checked before the accountant runs: a non-number is a
    TypeError, a value out of range a ValueError, each naming the argument.
    """
    rate = check_rate(sample_rate)
    event = PoissonSampledEvent(rate, GaussianEvent(check_sigma(noise_multiplier)))
    if epochs is not None or steps is None:  # exactly one of the two, as get_noise_multiplier asks
        steps = _steps_of(steps, epochs, rate)
    steps, delta = check_count(steps, "steps"), check_delta(delta)
    return float(make_accountant(accountant).compose(event, steps).epsilon(delta))


def _positive(value: float, name: str) -> float:
    """``value`` as a finite float > 0; a TypeError (not a number) or ValueError naming it."""
    number = real(value, name)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _steps_of(steps: int | None, epochs: float | None, sample_rate: float) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps= and epochs=, got steps={steps!r}, epochs={epochs!r}")
    if steps is not None:
        if check_count(steps, "steps") == 0:
            raise ValueError("steps must be >= 1: with no steps no noise is needed")
        return check_count(steps, "steps")
    epochs = _positive(epochs, "epochs")
    if sample_rate == 0:
        raise ValueError("sample_rate must be > 0 with epochs=: at sample_rate=0 an epoch never ends")
    n_steps = math.ceil(epochs / sample_rate)
    if n_steps > MAX_COUNT:
        raise ValueError(f"epochs={epochs!r} at sample_rate={sample_rate} is {n_steps:.3g} steps, more than 2**53")
    return n_steps


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier whose epsilon is at most ``target_epsilon`` and within ``epsilon_tolerance`` of it.

    The tolerance is at most 1% of the target: a target below the absolute tolerance (0.005) would otherwise
    be met by any noise that drives epsilon to 0. ``epochs`` means ``steps = ceil(epochs / sample_rate)``.
    Brent's method on ``log(sigma)``, then bisection that keeps a feasible end, so the result never exceeds
    the target under the same accountant.
    """
    target_epsilon = _positive(target_epsilon, "target_epsilon")
    delta = check_delta(target_delta, "target_delta")
    rate = check_rate(sample_rate)
    if rate == 0:
        raise ValueError("sample_rate must be > 0: at sample_rate=0 no privacy is spent and any noise will do")
    n_steps = _steps_of(steps, epochs, rate)
    make_accountant(accountant)  # an unknown name fails here, before any search
    return _smallest_sigma(
        lambda sigma: get_epsilon(accountant=accountant, noise_multiplier=sigma, sample_rate=rate, steps=n_steps,
                                  delta=delta),
        target_epsilon, epsilon_tolerance,
        f"with accountant={accountant!r} at target_delta={delta}, sample_rate={rate}, steps={n_steps}",
        " (the RDP accountant has a floor from its largest order; try accountant='prv')." if accountant == "rdp"
        else ", or lower the steps or sample_rate.")


def _noise_multiplier_for(event_of: Callable[[float], DpEvent], *, target_epsilon: float, target_delta: float,
                         steps: int, accountant: str = "prv") -> float:
    """:func:`get_noise_multiplier` for any step: ``event_of(sigma)`` is one step's event, run ``steps`` times."""
    target_epsilon = _positive(target_epsilon, "target_epsilon")
    delta = check_delta(target_delta, "target_delta")
    n_steps = _steps_of(steps, None, 1.0)
    make_accountant(accountant)

    def eps(sigma: float) -> float:
        return float(make_accountant(accountant).compose(event_of(sigma), n_steps).epsilon(delta))

    return _smallest_sigma(eps, target_epsilon, 0.01, f"with accountant={accountant!r} at target_delta={delta}, "
                           f"steps={n_steps}", ", or lower the steps.")


def _smallest_sigma(epsilon_of: Callable[[float], float], target_epsilon: float, epsilon_tolerance: float,
                    setting: str, advice: str) -> float:
    """The search of :func:`get_noise_multiplier`, over any ``epsilon_of(sigma)`` that decreases in sigma."""
    epsilon_tolerance = min(_positive(epsilon_tolerance, "epsilon_tolerance"), _RELATIVE_TOLERANCE * target_epsilon)
    cache: dict[float, float] = {}

    def eps(log_sigma: float) -> float:
        if log_sigma not in cache:
            cache[log_sigma] = epsilon_of(math.exp(log_sigma))
        return cache[log_sigma]

    lo, hi = 0.0, 0.0  # log sigma: eps(lo) > target >= eps(hi)
    while eps(hi) > target_epsilon:
        if hi + math.log(4) > math.log(_SIGMA_RANGE[1]):
            raise ValueError(
                f"target_epsilon={target_epsilon} is unreachable {setting}: even "
                f"noise_multiplier={math.exp(hi):.3g} gives epsilon={eps(hi):.4g}. Raise target_epsilon or "
                "target_delta" + advice)
        lo, hi = hi, hi + math.log(4)
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo - math.log(4)
        if lo < math.log(_SIGMA_RANGE[0]):
            return math.exp(hi)  # even tiny noise meets the target
    goal = target_epsilon - epsilon_tolerance / 2
    from scipy import optimize  # on use: get_epsilon and `dpkit epsilon` need none of it
    if math.isfinite(eps(lo)) and eps(lo) > goal > eps(hi):  # an infinite end: bisection alone
        guess = optimize.brentq(lambda s: eps(s) - goal, lo, hi, xtol=1e-6)
        lo, hi = (guess, hi) if eps(guess) > target_epsilon else (lo, guess)
    while target_epsilon - eps(hi) > epsilon_tolerance and hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return math.exp(hi)
