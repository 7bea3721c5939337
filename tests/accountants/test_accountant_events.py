"""What every built-in accountant counts, refuses (by name), and checks even with validators off."""
from __future__ import annotations

import re
import warnings

import attrs
import pytest

from dpkit.accountants.gdp import GDPAccountant
from dpkit.accountants.prv import PRVAccountant
from dpkit.accountants.rdp import RDPAccountant
from dpkit.errors import UnsupportedEventError
from dpkit.events import ComposedEvent, DpEvent, GaussianEvent, NoOpEvent, PoissonSampledEvent, SelfComposedEvent

ACCOUNTANTS = [PRVAccountant, RDPAccountant, GDPAccountant]
STEP = PoissonSampledEvent(0.01, GaussianEvent(1.0))


@attrs.frozen
class LaplaceEvent(DpEvent):
    scale: float


def epsilon(counter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gdp's approximation warning
        return counter.epsilon(1e-5)


@pytest.mark.parametrize("make", ACCOUNTANTS)
@pytest.mark.parametrize(
    "event",
    [
        NoOpEvent(),
        GaussianEvent(1.0),
        STEP,
        SelfComposedEvent(STEP, 3),
        ComposedEvent((STEP, PoissonSampledEvent(0.01, GaussianEvent(20.0)))),  # as adaptive clipping records it
        PoissonSampledEvent(0.01, ComposedEvent((GaussianEvent(1.0), SelfComposedEvent(GaussianEvent(9.0), 2)))),
    ],
)
def test_supported_events(make, event):
    counter = make()
    assert counter.supports(event)
    assert counter.compose(event, 2) is counter


@pytest.mark.parametrize("make", ACCOUNTANTS)
@pytest.mark.parametrize(
    ("event", "named"),
    [
        (LaplaceEvent(1.0), "LaplaceEvent"),
        (ComposedEvent((STEP, LaplaceEvent(2.0))), "LaplaceEvent(scale=2.0)"),
        (PoissonSampledEvent(0.1, STEP), "PoissonSampledEvent(sample_rate=0.01"),
        (PoissonSampledEvent(0.1, ComposedEvent((GaussianEvent(1.0), LaplaceEvent(3.0)))), "LaplaceEvent(scale=3.0)"),
    ],
)
def test_unsupported_event_is_named_and_leaves_no_trace(make, event, named):
    counter = make().compose(STEP, 10)
    before = epsilon(counter)
    assert not counter.supports(event)
    with pytest.raises(UnsupportedEventError, match=re.escape(named)):
        counter.compose(event)
    assert epsilon(counter) == before  # nothing of the refused event was counted


@pytest.mark.parametrize("make", ACCOUNTANTS)
def test_bad_counts_and_deltas_are_refused_by_name(make):
    with pytest.raises(ValueError, match="count"):
        make().compose(STEP, -1)
    with pytest.raises(ValueError, match="count"):
        make().compose(STEP, 1.5)
    for delta in (0, 1, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            make().epsilon(delta)
    for delta in (True, "1e-5", None):  # not numbers
        with pytest.raises(TypeError, match="delta"):
            make().epsilon(delta)


@pytest.mark.parametrize("make", ACCOUNTANTS)
def test_privacy_checks_hold_with_attrs_validators_off(make):
    with attrs.validators.disabled():
        bad_sigma = PoissonSampledEvent(0.01, GaussianEvent(-1.0))
        bad_rate = PoissonSampledEvent(1.5, GaussianEvent(1.0))
        bad_count = SelfComposedEvent(STEP, -3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make().compose(bad_sigma)
    with pytest.raises(ValueError, match="sample_rate"):
        make().compose(bad_rate)
    with pytest.raises(ValueError, match="count"):
        make().compose(bad_count)


@pytest.mark.parametrize("make", ACCOUNTANTS)
def test_zero_spending_forms_give_zero(make):
    for event, count in [(STEP, 0), (PoissonSampledEvent(0.0, GaussianEvent(1.0)), 100), (NoOpEvent(), 5)]:
        assert epsilon(make().compose(event, count)) == 0.0
