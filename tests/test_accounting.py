"""dpkit.accounting: epsilon without a model, the noise for a target, ledgers, and clear refusals."""
from __future__ import annotations

import math
import warnings

import pytest

from dpkit import accounting
from dpkit.errors import PluginError
from dpkit.events import ComposedEvent, GaussianEvent, Ledger, PoissonSampledEvent

ACCOUNTANTS = ["prv", "rdp", "gdp"]


@pytest.fixture(autouse=True)
def _builtins_only(fresh_registry):
    yield


def quiet(fn, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gdp warns that it approximates
        return fn(**kwargs)


def test_make_accountant_gives_fresh_builtins():
    for name in ACCOUNTANTS:
        first, second = accounting.make_accountant(name), accounting.make_accountant(name)
        assert first is not second and type(first) is type(second)
    with pytest.raises(PluginError, match="'moments'.*gdp.*prv.*rdp"):
        accounting.make_accountant("moments")


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_get_epsilon_matches_the_accountant(name):
    kwargs = {"noise_multiplier": 1.1, "sample_rate": 256 / 60000, "steps": 14063, "delta": 1e-5}
    eps = quiet(accounting.get_epsilon, accountant=name, **kwargs)
    counter = accounting.make_accountant(name).compose(PoissonSampledEvent(256 / 60000, GaussianEvent(1.1)), 14063)
    assert eps == quiet(counter.epsilon, delta=1e-5)
    assert 2.0 < eps < 3.1  # prv ~2.38, rdp ~2.60, gdp below


def test_default_is_the_tight_accountant():
    kwargs = {"noise_multiplier": 1.1, "sample_rate": 256 / 60000, "steps": 14063, "delta": 1e-5}
    assert accounting.get_epsilon(**kwargs) == accounting.get_epsilon(accountant="prv", **kwargs)
    assert accounting.get_epsilon(**kwargs) < accounting.get_epsilon(accountant="rdp", **kwargs)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"noise_multiplier": 0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"sample_rate": 1.01}, "sample_rate"),
        ({"sample_rate": "0.1"}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 10.0}, "steps"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 0}, "delta"),
    ],
)
def test_get_epsilon_names_the_bad_argument(change, named):
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5, **change}
    with pytest.raises(ValueError, match=named):
        accounting.get_epsilon(**kwargs)


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize("target", [0.5, 3.0, 8.0])
def test_noise_multiplier_round_trip_never_exceeds_the_target(name, target):
    sigma = quiet(
        accounting.get_noise_multiplier, target_epsilon=target, target_delta=1e-5, sample_rate=0.01,
        steps=2000, accountant=name,
    )
    eps = quiet(accounting.get_epsilon, accountant=name, noise_multiplier=sigma, sample_rate=0.01, steps=2000,
                delta=1e-5)
    assert target - 0.01 <= eps <= target


def test_epochs_mean_ceil_of_epochs_over_rate():
    by_epochs = accounting.get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=256 / 60000, epochs=60, accountant="rdp"
    )
    by_steps = accounting.get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=256 / 60000, steps=14063, accountant="rdp"
    )
    assert by_epochs == by_steps


def test_search_keeps_a_feasible_end_whatever_the_root_finder_returns(monkeypatch):
    # Brent's answer may land on the infeasible side of a jump; the result must not.
    monkeypatch.setattr(accounting.optimize, "brentq", lambda f, lo, hi, **kw: lo + 1e-9)
    sigma = accounting.get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp"
    )
    eps = accounting.get_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=1e-5)
    assert 2.0 - 0.01 <= eps <= 2.0


def test_tighter_tolerance_gets_closer():
    sigma = accounting.get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-6, sample_rate=0.02, steps=500, epsilon_tolerance=1e-4
    )
    eps = accounting.get_epsilon(noise_multiplier=sigma, sample_rate=0.02, steps=500, delta=1e-6)
    assert 2.0 - 1e-4 <= eps <= 2.0


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"target_epsilon": 0}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"target_delta": 1.5}, "target_delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": -0.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": None}, "exactly one of steps= and epochs="),
        ({"epochs": 3}, "exactly one of steps= and epochs="),
        ({"steps": None, "epochs": -2}, "epochs"),
        ({"epsilon_tolerance": 0}, "epsilon_tolerance"),
    ],
)
def test_get_noise_multiplier_names_the_bad_argument(change, named):
    kwargs = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "steps": 100, **change}
    with pytest.raises(ValueError, match=named):
        accounting.get_noise_multiplier(**kwargs)


def test_unreachable_target_is_explained():
    # RDP's conversion has a floor set by its largest order: no noise reaches epsilon 1e-4.
    with pytest.raises(ValueError, match="target_epsilon=0.0001 is unreachable.*rdp"):
        accounting.get_noise_multiplier(
            target_epsilon=1e-4, target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp"
        )


def test_when_any_noise_meets_the_target_the_search_stops_small(monkeypatch):
    # e.g. sample_rate far below delta: epsilon is 0 at every noise level.
    monkeypatch.setattr(accounting, "get_epsilon", lambda **kwargs: 0.0)
    sigma = accounting.get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=1e-7, steps=1)
    assert 2.0**-10 <= sigma <= 2.0**-8


def test_epsilon_of_ledger_replays_every_entry():
    step = PoissonSampledEvent(0.01, GaussianEvent(1.0))
    adaptive = ComposedEvent((step, PoissonSampledEvent(0.01, GaussianEvent(10.0))))
    ledger = Ledger()
    ledger.record(step, 300)
    ledger.record(adaptive, 200)
    for name in ("prv", "rdp"):
        counter = accounting.make_accountant(name).compose(step, 300).compose(adaptive, 200)
        assert accounting.epsilon_of_ledger(ledger, 1e-5, name) == counter.epsilon(1e-5)
    assert accounting.epsilon_of_ledger(Ledger(), 1e-5) == 0.0
    with pytest.raises(ValueError, match="delta"):
        accounting.epsilon_of_ledger(ledger, 2.0)
