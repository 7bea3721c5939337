"""dpkit.accounting: epsilon without a model, the noise for a target, ledgers, and clear refusals."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

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
    monkeypatch.setattr("scipy.optimize.brentq", lambda f, lo, hi, **kw: lo + 1e-9)  # imported on use
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


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_unreachable_target_is_explained(name):
    # A million unsampled steps at delta 1e-10: even noise 2**30 spends more than epsilon 1e-6.
    with pytest.raises(ValueError, match=f"target_epsilon=1e-06 is unreachable with accountant='{name}'"):
        accounting.get_noise_multiplier(
            target_epsilon=1e-6, target_delta=1e-10, sample_rate=1.0, steps=10**6, accountant=name
        )


def test_a_target_below_rdps_floor_is_met_where_the_total_variation_is_below_delta():
    # RDP's conversion has a floor (~0.01 here) from its largest order, but where the steps' total
    # variation is at most delta epsilon is exactly 0: the search finds that noise.
    sigma = accounting.get_noise_multiplier(
        target_epsilon=1e-4, target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp"
    )
    assert accounting.get_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=0.01, steps=100,
                                  delta=1e-5) <= 1e-4
    assert sigma < 1e5


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


NUMBERS = [np.float64, np.float32, lambda v: np.array(v), torch.tensor, lambda v: torch.tensor(v, dtype=torch.float64)]


@pytest.mark.parametrize("wrap", NUMBERS)
def test_numpy_scalars_and_0d_tensors_are_numbers(wrap):
    plain = accounting.get_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)
    wrapped = accounting.get_epsilon(noise_multiplier=wrap(1.0), sample_rate=wrap(0.01), steps=np.int64(100),
                                     delta=wrap(1e-5))
    assert wrapped == pytest.approx(plain, rel=1e-5)  # float32 rounds the inputs
    sigma = accounting.get_noise_multiplier(target_epsilon=wrap(2.0), target_delta=wrap(1e-5), sample_rate=wrap(0.01),
                                            steps=torch.tensor(100), accountant="rdp")
    assert sigma == pytest.approx(accounting.get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp"), rel=1e-3)


@pytest.mark.parametrize("argument", ["noise_multiplier", "sample_rate", "delta"])
@pytest.mark.parametrize("bad", ["0.1", None, True, torch.tensor([0.1, 0.2]), torch.tensor(0.1, requires_grad=True)])
def test_get_epsilon_refuses_non_numbers_by_name(argument, bad):
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5, argument: bad}
    with pytest.raises(TypeError, match=argument):
        accounting.get_epsilon(**kwargs)


@pytest.mark.parametrize("argument", ["target_epsilon", "target_delta", "sample_rate", "epochs", "epsilon_tolerance"])
def test_get_noise_multiplier_refuses_non_numbers_by_name(argument):
    kwargs = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "epochs": 1, argument: "1"}
    with pytest.raises(TypeError, match=argument):
        accounting.get_noise_multiplier(**kwargs)


@pytest.mark.parametrize(
    ("change", "error", "named"),
    [
        ({"sample_rate": 1.5}, ValueError, "sample_rate"),
        ({"sample_rate": -0.1}, ValueError, "sample_rate"),
        ({"delta": 1.5}, ValueError, "delta"),
        ({"delta": 0.0}, ValueError, "delta"),
        ({"delta": math.nan}, ValueError, "delta"),
        ({"steps": -5}, ValueError, "steps"),
        ({"steps": 2.5}, ValueError, "steps"),
        ({"steps": 2**53 + 1}, ValueError, "steps"),
        ({"noise_multiplier": math.inf}, ValueError, "noise_multiplier"),
        ({"accountant": "moments"}, PluginError, "accountant='moments'"),
        ({"accountant": None}, TypeError, "accountant"),
        ({"accountant": accounting.make_accountant}, TypeError, "accountant"),
    ],
)
def test_accounting_misuse_is_refused_by_name(change, error, named):
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5, **change}
    with pytest.raises(error, match=named):
        accounting.get_epsilon(**kwargs)


def test_edge_values_that_have_an_answer():
    kwargs = {"noise_multiplier": 1.0, "delta": 1e-5}
    assert accounting.get_epsilon(sample_rate=0.01, steps=0, **kwargs) == 0.0
    assert accounting.get_epsilon(sample_rate=0.0, steps=100, **kwargs) == 0.0
    full = accounting.get_epsilon(sample_rate=1.0, steps=100, **kwargs)
    assert full == accounting.get_epsilon(noise_multiplier=0.1, sample_rate=1.0, steps=1, delta=1e-5)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": math.inf}, "epochs"),
        ({"epochs": 1e300}, "epochs"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"target_delta": 0.0}, "target_delta"),
    ],
)
def test_get_noise_multiplier_misuse_is_refused_by_name(change, named):
    kwargs = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "epochs": 1, **change}
    with pytest.raises(ValueError, match=named):
        accounting.get_noise_multiplier(**kwargs)
