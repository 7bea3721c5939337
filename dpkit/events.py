"""What was done, kept apart from how it is counted.

Privacy events are frozen values; the :class:`Ledger` records them with their
counts; accountants (``dpkit.accountants``) read the ledger. Rules, so that old
ledgers stay readable: events and fields are never removed, new fields are
optional, meanings never change.
"""
from __future__ import annotations

import math
from typing import Any

import attrs
from torch import Tensor


def _positive(_, attribute, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"'{attribute.name}' must be a finite number > 0, got {value!r}")


def _probability(_, attribute, value):
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"'{attribute.name}' must be a probability in [0, 1], got {value!r}")


def _count(_, attribute, value):
    if not (isinstance(value, int) and value >= 0):
        raise ValueError(f"'{attribute.name}' must be an int >= 0, got {value!r}")


class DpEvent:
    """Base of privacy events."""

    __slots__ = ()


@attrs.frozen
class NoOpEvent(DpEvent):
    """Spends no privacy (a clipper that learns nothing from data)."""


@attrs.frozen
class GaussianEvent(DpEvent):
    """The Gaussian mechanism with L2 sensitivity 1 and noise std ``noise_multiplier``."""

    noise_multiplier: float = attrs.field(converter=float, validator=_positive)


@attrs.frozen
class PoissonSampledEvent(DpEvent):
    """``event`` run on a Poisson subsample: each record joins with probability ``sample_rate``."""

    sample_rate: float = attrs.field(converter=float, validator=_probability)
    event: DpEvent


@attrs.frozen
class TruncatedPoissonSampledEvent(DpEvent):
    """``event`` (Gaussians) run on a Poisson subsample of ``dataset_size`` records at ``sample_rate``, cut to a
    uniformly random ``max_batch_size`` of them when it has more: dp_accounting's
    ``TruncatedSubsampledGaussianDpEvent`` (arXiv 2508.15089), with the noise as a sub-event."""

    dataset_size: int = attrs.field(validator=_count)
    sample_rate: float = attrs.field(converter=float, validator=_probability)
    max_batch_size: int = attrs.field(validator=_count)
    event: DpEvent


@attrs.frozen
class SelfComposedEvent(DpEvent):
    """``event`` repeated ``count`` times."""

    event: DpEvent
    count: int = attrs.field(validator=_count)


@attrs.frozen
class ComposedEvent(DpEvent):
    """Every event in ``events``, one after another."""

    events: tuple[DpEvent, ...] = attrs.field(converter=tuple)


_EVENT_TYPES = {cls.__name__: cls for cls in (NoOpEvent, GaussianEvent, PoissonSampledEvent,
                                               SelfComposedEvent, ComposedEvent, TruncatedPoissonSampledEvent)}


def event_to_dict(event: DpEvent) -> dict[str, Any]:
    """A plain, JSON-able form of an event (for checkpoints)."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        if isinstance(value, DpEvent):
            value = event_to_dict(value)
        elif isinstance(value, tuple):
            value = [event_to_dict(v) for v in value]
        out[field.name] = value
    return out


def event_from_dict(data: dict[str, Any]) -> DpEvent:
    """Inverse of :func:`event_to_dict`."""
    data = dict(data)
    cls = _EVENT_TYPES.get(data.pop("type"))
    if cls is None:
        raise ValueError(f"unknown privacy event type in checkpoint: {data!r}")
    for key, value in data.items():
        if isinstance(value, dict):
            data[key] = event_from_dict(value)
        elif isinstance(value, list):
            data[key] = tuple(event_from_dict(v) for v in value)
    return cls(**data)


@attrs.define
class Ledger:
    """The privacy history: ``(event, count)`` pairs, a repeated event merged into its predecessor."""

    entries: list[tuple[DpEvent, int]] = attrs.field(factory=list)

    def record(self, event: DpEvent, count: int = 1) -> None:
        if self.entries and self.entries[-1][0] == event:
            self.entries[-1] = (event, self.entries[-1][1] + count)
        else:
            self.entries.append((event, count))

    @property
    def steps(self) -> int:
        return sum(count for _, count in self.entries)

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [(event_to_dict(e), c) for e, c in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [(event_from_dict(e), int(c)) for e, c in state["entries"]]


@attrs.frozen(eq=False)
class ClipEvent:
    """One step's clipping, as ``dpkit_on_clip`` observers see it.

    ``norms``/``factors`` are ``[B]`` (flat clipping) or ``[L, B]`` (per layer).
    ``grad_samples``/``clipped_grad_samples`` map parameter names to ``[B, ...]``
    tensors, present where the mode materialised them (``hooks``, ``functorch``,
    ``ew``) and ``None`` otherwise (``ghost``, ``bk``). ``clipped_sum`` is the
    summed clipped gradient before noise.
    """

    step: int
    norms: Tensor
    factors: Tensor
    max_grad_norm: float
    clipped_sum: dict[str, Tensor]
    grad_samples: dict[str, Tensor] | None = None
    clipped_grad_samples: dict[str, Tensor] | None = None
