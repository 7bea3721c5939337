"""What the built-in accountants share: one traversal of the event tree, and argument checks.

Every event dpkit can count reduces to *atoms*: ``count`` runs of the sampled Gaussian
mechanism ``PoissonSampled(q, Gaussian(sigma))`` (``q = 1``: no sampling). Gaussian
mechanisms released together on one Poisson sample are one Gaussian: their privacy
losses add, so ``sigma_eff ** -2`` is the sum of ``sigma_i ** -2`` (exact, not a bound).

Extreme noise never reaches an accountant's arithmetic (``SampledGaussianAccountant.settled``):
where the steps' total variation is at most delta, epsilon is exactly 0; a step with
``sigma < SIGMA_MIN`` has losses beyond float64, and epsilon is reported as ``inf``;
``sigma > SIGMA_MAX`` is counted as ``SIGMA_MAX``, which errs upward (less noise never
spends less privacy).
"""
from __future__ import annotations

import math
import numbers
import operator

from dpkit.errors import UnsupportedEventError
from dpkit.events import (
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    TruncatedPoissonSampledEvent,
)

Atom = tuple[float, float]  # (sample_rate, noise_multiplier)
Truncated = tuple[int, float, int, float]  # (dataset_size, sample_rate, max_batch_size, noise_multiplier)
SIGMA_MIN = 1e-8    # below: float64 x cannot resolve grid cells of the loss ~ 1/(2 sigma^2)
SIGMA_MAX = 1e100   # above: counted as this, so that sigma^2 stays finite
MAX_COUNT = 2**53   # counts above are not exact in float64


def _real(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None.

    Numbers come as Python and numpy scalars, and as one-element tensors or arrays (``torch.tensor(1.0)``,
    ``np.float32(1.0)``, a value read back from a config); each is a number, and is accepted as one.
    """
    if isinstance(value, (bool, str, bytes)):
        return None
    if not isinstance(value, numbers.Real):
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        if shape is None or len(shape) != 0 or getattr(value, "requires_grad", False) or str(dtype) in (
                "bool", "torch.bool") or getattr(dtype, "is_complex", False) or "complex" in str(dtype):
            return None
        try:
            value = value.item()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
    return float(value)


def real(value: object, name: str) -> float:
    """``value`` as a float (see ``_real``), or a TypeError naming the argument."""
    out = _real(value)
    if out is None:
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return out


def check_delta(delta: float, name: str = "delta") -> float:
    """``delta`` as a float in (0, 1); a TypeError (not a number) or ValueError naming it."""
    value = real(delta, name)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")
    return value


def check_count(count: int, name: str = "count") -> int:
    """``count`` as an int in [0, 2**53], or a ValueError naming it (numpy and 0-d tensor ints count as ints)."""
    try:
        value = None if isinstance(count, (bool, str, bytes)) else operator.index(count)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be an int in [0, 2**53], got {count!r}")
    return value


def check_sigma(sigma: float, name: str = "noise_multiplier") -> float:
    """``sigma`` as a finite float > 0; a TypeError (not a number) or ValueError naming it."""
    value = real(sigma, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {sigma!r}")
    return value


def check_rate(rate: float, name: str = "sample_rate") -> float:
    """``rate`` as a float in [0, 1]; a TypeError (not a number) or ValueError naming it."""
    value = real(rate, name)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {rate!r}")
    return value


def _inverse_variance(event: DpEvent) -> float | DpEvent:
    """``sum sigma_i ** -2`` of the Gaussians in ``event``, or the sub-event that is not made of Gaussians."""
    if isinstance(event, NoOpEvent):
        return 0.0
    if isinstance(event, GaussianEvent):
        sigma = check_sigma(event.noise_multiplier, "GaussianEvent.noise_multiplier")
        return math.inf if sigma < SIGMA_MIN else min(sigma, SIGMA_MAX) ** -2  # sigma ** -2 would overflow
    if isinstance(event, SelfComposedEvent):
        inner = _inverse_variance(event.event)
        return inner if isinstance(inner, DpEvent) else check_count(event.count, "SelfComposedEvent.count") * inner
    if isinstance(event, ComposedEvent):
        total = 0.0
        for sub in event.events:
            inner = _inverse_variance(sub)
            if isinstance(inner, DpEvent):
                return inner
            total += inner
        return total
    return event


def _joint_sigma(event: DpEvent) -> float | None | DpEvent:
    """The one Gaussian equivalent to ``event`` run on one sample (None: no noise, no loss)."""
    if isinstance(event, GaussianEvent):  # the common case keeps the user's float exactly
        return check_sigma(event.noise_multiplier, "GaussianEvent.noise_multiplier")
    inverse_variance = _inverse_variance(event)
    if isinstance(inverse_variance, DpEvent):
        return inverse_variance
    return inverse_variance**-0.5 if inverse_variance else None


class SampledGaussianAccountant:
    """Base of the built-in accountants: ``supports`` and ``compose`` share ``_maybe_compose``.

    Subclasses read ``self._atoms``: ``{(q, sigma): count}``, and, where ``TRUNCATED`` says they count truncated
    Poisson steps, ``self._truncated``: ``{(N, q, B, sigma): count}`` (a step that can never be truncated,
    ``B >= N``, is a Poisson step and goes to ``_atoms``). ``compose`` checks the whole event before it counts
    any of it, so a refused event leaves no trace.
    """

    TRUNCATED = False

    def __init__(self) -> None:
        self._atoms: dict[Atom, int] = {}
        self._truncated: dict[Truncated, int] = {}

    def supports(self, event: DpEvent) -> bool:
        """Whether ``compose(event)`` would succeed."""
        return self._maybe_compose(event, 1, do_compose=False) is None

    def compose(self, event: DpEvent, count: int = 1) -> SampledGaussianAccountant:
        """Count ``event`` ``count`` times; raise ``UnsupportedEventError`` naming what cannot be counted."""
        check_count(count)
        unsupported = self._maybe_compose(event, count, do_compose=False)
        if unsupported is not None:
            raise UnsupportedEventError(
                f"{type(self).__name__} cannot count {unsupported!r}"
                + ("" if unsupported is event else f" (inside {event!r})")
                + ". It counts NoOpEvent, GaussianEvent, PoissonSampledEvent of Gaussians, "
                "and SelfComposedEvent/ComposedEvent of those"
                + ("; and TruncatedPoissonSampledEvent." if self.TRUNCATED else
                   " (TruncatedPoissonSampledEvent: use accountant='prv').")
            )
        self._maybe_compose(event, count, do_compose=True)
        return self

    def _maybe_compose(self, event: DpEvent, count: int, do_compose: bool) -> DpEvent | None:
        """Walk ``event``; add its atoms if ``do_compose``. Returns the first unsupported sub-event, else None."""
        if isinstance(event, NoOpEvent):
            return None
        if isinstance(event, SelfComposedEvent):
            inner_count = check_count(event.count, "SelfComposedEvent.count")
            return self._maybe_compose(event.event, count * inner_count, do_compose)
        if isinstance(event, ComposedEvent):
            for sub in event.events:
                unsupported = self._maybe_compose(sub, count, do_compose)
                if unsupported is not None:
                    return unsupported
            return None
        if isinstance(event, GaussianEvent):
            rate, sigma = 1.0, _joint_sigma(event)
        elif isinstance(event, PoissonSampledEvent):
            rate = check_rate(event.sample_rate, "PoissonSampledEvent.sample_rate")
            sigma = _joint_sigma(event.event)
            if isinstance(sigma, DpEvent):
                return sigma
        elif isinstance(event, TruncatedPoissonSampledEvent):
            return self._maybe_compose_truncated(event, count, do_compose)
        else:
            return event
        if do_compose and count and rate and sigma is not None:
            atom = (rate, min(sigma, SIGMA_MAX))
            self._atoms[atom] = self._atoms.get(atom, 0) + count
        return None

    def _maybe_compose_truncated(self, event: TruncatedPoissonSampledEvent, count: int,
                                 do_compose: bool) -> DpEvent | None:
        n = check_count(event.dataset_size, "TruncatedPoissonSampledEvent.dataset_size")
        b = check_count(event.max_batch_size, "TruncatedPoissonSampledEvent.max_batch_size")
        if n < 1 or b < 1:
            raise ValueError(f"a truncated Poisson step needs dataset_size and max_batch_size >= 1, got {event!r}")
        rate = check_rate(event.sample_rate, "TruncatedPoissonSampledEvent.sample_rate")
        if b >= n:  # never truncated: a Poisson step
            return self._maybe_compose(PoissonSampledEvent(rate, event.event), count, do_compose)
        if not self.TRUNCATED:
            return event
        sigma = _joint_sigma(event.event)
        if isinstance(sigma, DpEvent):
            return sigma
        if do_compose and count and rate and sigma is not None:
            key = (n, rate, b, min(sigma, SIGMA_MAX))
            self._truncated[key] = self._truncated.get(key, 0) + count
        return None

    def settled(self, delta: float) -> float | None:
        """Epsilon where it needs no composing: 0 (exact) or inf (an honest bound); else None.

        ``delta(0)`` is the total variation of the composition, at most the sum over
        steps of ``q * TV(N(1, s^2), N(0, s^2)) = q * erf(1 / (2 sqrt(2) s))``; where
        that is at most ``delta``, epsilon is 0. A step with ``sigma < SIGMA_MIN`` has a
        loss beyond what float64 carries: inf.

        A truncated step keeps the record with probability at most q, and then moves the sum by at most 2:
        ``q * erf(2 / (2 sqrt(2) s))`` bounds its variation.
        """
        tiny = any(s < SIGMA_MIN for _, s in self._atoms) or any(k[3] < SIGMA_MIN for k in self._truncated)
        if tiny:
            tv = sum(float(n) * q for (q, s), n in self._atoms.items())  # erf <= 1
            tv += sum(float(n) * k[1] for k, n in self._truncated.items())
        else:
            tv = sum(float(n) * q * math.erf(0.5**1.5 / s) for (q, s), n in self._atoms.items())
            tv += sum(float(n) * k[1] * math.erf(2 * 0.5**1.5 / k[3]) for k, n in self._truncated.items())
        if tv * (1 + 1e-9) <= delta:
            return 0.0
        return math.inf if tiny else None
