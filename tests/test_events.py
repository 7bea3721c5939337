"""Privacy events are frozen values with checked fields; the ledger merges repeats and round-trips."""
from __future__ import annotations

import json

import attrs
import pytest

from dpkit.events import (
    ComposedEvent,
    GaussianEvent,
    Ledger,
    NoOpEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    event_from_dict,
    event_to_dict,
)

STEP = PoissonSampledEvent(0.01, GaussianEvent(1.1))
ADAPTIVE = ComposedEvent((STEP, PoissonSampledEvent(0.01, GaussianEvent(20.0))))


def test_events_are_frozen_and_compare_by_value():
    assert PoissonSampledEvent(0.01, GaussianEvent(1.1)) == STEP
    assert hash(ComposedEvent([STEP, NoOpEvent()])) == hash(ComposedEvent((STEP, NoOpEvent())))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        STEP.sample_rate = 0.5


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: GaussianEvent(0.0), "noise_multiplier"),
        (lambda: GaussianEvent(float("inf")), "noise_multiplier"),
        (lambda: PoissonSampledEvent(1.5, GaussianEvent(1.0)), "sample_rate"),
        (lambda: PoissonSampledEvent(-0.1, GaussianEvent(1.0)), "sample_rate"),
        (lambda: SelfComposedEvent(STEP, -1), "count"),
        (lambda: SelfComposedEvent(STEP, 2.5), "count"),
    ],
)
def test_invalid_fields_are_refused_by_name(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize("event", [NoOpEvent(), STEP, ADAPTIVE, SelfComposedEvent(ADAPTIVE, 7)])
def test_dict_form_round_trips_through_json(event):
    data = json.loads(json.dumps(event_to_dict(event)))
    assert event_from_dict(data) == event


def test_unknown_event_type_in_a_checkpoint_is_refused():
    with pytest.raises(ValueError, match="unknown privacy event type"):
        event_from_dict({"type": "LaplaceEvent", "scale": 1.0})


def test_ledger_merges_consecutive_repeats_only():
    ledger = Ledger()
    for event in (STEP, STEP, ADAPTIVE, STEP):
        ledger.record(event)
    ledger.record(STEP, count=3)
    assert ledger.entries == [(STEP, 2), (ADAPTIVE, 1), (STEP, 4)]
    assert ledger.steps == 7


def test_ledger_state_dict_round_trips():
    ledger = Ledger()
    ledger.record(STEP, 100)
    ledger.record(ADAPTIVE, 5)
    restored = Ledger()
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.entries == ledger.entries
