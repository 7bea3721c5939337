"""BandMF: the recursion is C⁻¹z, b = 1 is DP-SGD, the loader cycles, the ledger matches independent ε, resumes are exact."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import optimize, stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit
from dpkit.accounting import epsilon_of_ledger, get_epsilon
from dpkit.data import CyclicPoissonBatchSampler, CyclicPoissonLoader, DPDataLoader
from dpkit.errors import PrivacyUsageError
from dpkit.events import Ledger
from dpkit.noise import bandmf
from dpkit.noise.bandmf import BandMF, check_loader
from dpkit.noise.gaussian import GaussianNoise
from _mechanism_runs import resume, train_until

N = 120


def _dataset(n: int = N) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen))


def _bound(bands: int = 3, seed: int = 7, **kwargs) -> BandMF:
    mechanism = BandMF(seed=seed, bands=bands, **kwargs)
    check_loader(CyclicPoissonLoader(_dataset(), 0.3, bands), mechanism)
    return mechanism


# -- the mechanism -------------------------------------------------------------------------------
def test_noise_is_c_inverse_of_the_gaussian_draws():
    steps, size, std = 9, 5, 1.7
    mechanism, gaussian = _bound(bands=4), GaussianNoise(seed=7)
    got = torch.stack([mechanism.add(torch.zeros(size), std=std) for _ in range(steps)])
    z = torch.stack([gaussian.add(torch.zeros(size), std=std) for _ in range(steps)])
    c = mechanism.coefficients
    C = sum(torch.diag(torch.full((steps - j,), c[j]), -j) for j in range(len(c)))
    torch.testing.assert_close(got, torch.linalg.solve_triangular(C, z, upper=False))


def test_one_band_is_dp_sgd():
    mechanism, gaussian = _bound(bands=1), GaussianNoise(seed=7)
    for _ in range(3):
        torch.testing.assert_close(mechanism.add(torch.ones(6), std=2.0), gaussian.add(torch.ones(6), std=2.0))
    assert mechanism.memory_bytes() == 0


@pytest.mark.parametrize("bands", [1, 2, 5])
def test_memory_is_bands_minus_one_buffers(bands):
    mechanism = _bound(bands=bands)
    for _ in range(bands + 2):
        mechanism.add(torch.zeros(1000), std=1.0)
        mechanism.add(torch.zeros(10, dtype=torch.float64), std=1.0)
    assert mechanism.memory_bytes() == (bands - 1) * (1000 * 4 + 10 * 8)


def test_coefficients_have_unit_column_norm_and_beat_dp_sgd():
    assert bandmf.sqrt_coefficients(1) == (1.0,)
    root = bandmf.sqrt_coefficients(4)
    assert math.isclose(sum(c * c for c in root), 1.0)
    assert root[1] / root[0] == pytest.approx(0.5) and root[3] / root[0] == pytest.approx(0.3125)
    steps = 500
    dp_sgd, banded = bandmf.prefix_sum_error((1.0,), steps), bandmf.prefix_sum_error(root, steps)
    tuned = bandmf.prefix_sum_error(bandmf.optimized_coefficients(4, steps), steps)
    assert tuned <= banded < dp_sgd


def test_refusals():
    with pytest.raises(PrivacyUsageError, match="cyclic Poisson"):
        BandMF(seed=1, bands=2).add(torch.zeros(3), std=1.0)
    mechanism = BandMF(seed=1, bands=4)
    for loader in (DataLoader(_dataset(), batch_size=8), DPDataLoader(_dataset(), 0.1)):
        with pytest.raises(PrivacyUsageError, match="cyclic Poisson"):
            check_loader(loader, mechanism)
    with pytest.raises(PrivacyUsageError, match="shorter than"):
        check_loader(CyclicPoissonLoader(_dataset(), 0.3, 2), mechanism)
    bound = _bound(bands=2)
    bound.add(torch.zeros(3), std=1.0)
    with pytest.raises(PrivacyUsageError, match="std changed"):
        bound.add(torch.zeros(3), std=2.0)
    with pytest.raises(PrivacyUsageError, match="sample rate"):
        bound.dp_event(1.0, 0.5)


def test_world_size_above_one_is_refused(monkeypatch):
    monkeypatch.setattr(bandmf.distributed, "world_size", lambda: 2)
    with pytest.raises(PrivacyUsageError, match="distributed"):
        BandMF(bands=2)


def test_configure_and_named_factories():
    table = dpkit.registry.table("dpkit_noise_mechanisms")
    assert table["bandmf-4"].value(seed=1, secure_mode=False).bands == 4
    before = BandMF.default
    try:
        BandMF.configure(bands=3)
        assert table["bandmf"].value(seed=1, secure_mode=False).bands == 3
    finally:
        BandMF.default = before


# -- the loader ----------------------------------------------------------------------------------
def test_cyclic_loader_visits_group_t_mod_cycle_and_resumes():
    sampler = CyclicPoissonBatchSampler(N, 0.5, 3, steps=7, generator=torch.Generator().manual_seed(2))
    groups = [set(g.tolist()) for g in sampler.groups]
    assert sorted(i for g in groups for i in g) == list(range(N)) and {len(g) for g in groups} == {N // 3}
    assert sampler.sample_rate == pytest.approx(0.5 / 3)
    first = list(sampler)
    state = sampler.state_dict()
    after = list(sampler)
    for t, batch in enumerate(first + after):  # the cycle carries over epochs of 7 batches
        assert set(batch) <= groups[t % 3]
    twin = CyclicPoissonBatchSampler(N, 0.5, 3, steps=7, generator=torch.Generator().manual_seed(99))
    twin.load_state_dict(state)
    assert list(twin) == after


# -- accounting ----------------------------------------------------------------------------------
def _ledger_of(bands: int, cycle: int, group_rate: float, sigma: float, steps: int) -> Ledger:
    mechanism = BandMF(seed=0, bands=bands)
    loader = CyclicPoissonLoader(_dataset(1000), group_rate, cycle)
    check_loader(loader, mechanism)
    ledger = Ledger()
    for _ in range(steps):
        ledger.record(mechanism.dp_event(sigma, loader.sample_rate))
    return ledger


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism at δ, exactly (Balle & Wang 2018): an independent check with no accountant."""
    def gap(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(gap, 0, 100)


def test_ledger_counts_one_event_per_cycle():
    ledger = _ledger_of(bands=4, cycle=4, group_rate=0.2, sigma=1.0, steps=10)
    assert sum(count for event, count in ledger.entries if type(event).__name__ != "NoOpEvent") == 3  # ⌈10/4⌉


def test_full_groups_match_the_exact_gaussian():
    """Setting 1: group rate 1, b = 4, T = 100, σ = 3 is 25 Gaussians, μ = 5/3 exactly."""
    ledger = _ledger_of(bands=4, cycle=4, group_rate=1.0, sigma=3.0, steps=100)
    exact = _exact_gaussian_epsilon(math.sqrt(25) / 3.0, 1e-5)
    assert epsilon_of_ledger(ledger, 1e-5, "prv") == pytest.approx(exact, rel=0.01)


def test_subsampled_matches_an_independent_rdp_computation():
    """Setting 2: b = 8, group rate 0.1, T = 1000, σ = 1.2 is 125 subsampled Gaussians. Opacus's own RDP code
    (opacus 1.6.0, compute_rdp + get_privacy_spent over orders 1.1..10.9 and 12..63) gives ε = 6.29527 at
    δ = 1e-5; run once by hand, recorded here so that the check needs no opacus install."""
    ledger = _ledger_of(bands=8, cycle=8, group_rate=0.1, sigma=1.2, steps=1000)
    theirs = 6.29527
    assert epsilon_of_ledger(ledger, 1e-5, "rdp") == pytest.approx(theirs, rel=0.03)
    assert epsilon_of_ledger(ledger, 1e-5, "prv") <= theirs


def test_one_band_is_dp_sgd_accounting():
    """Setting 3: b = 1 is DP-SGD with Poisson rate q, T events."""
    ledger = _ledger_of(bands=1, cycle=1, group_rate=0.05, sigma=0.9, steps=400)
    assert epsilon_of_ledger(ledger, 1e-5) == pytest.approx(
        get_epsilon(noise_multiplier=0.9, sample_rate=0.05, steps=400, delta=1e-5), rel=1e-9)


def test_calibrate_meets_the_target():
    mechanism = BandMF(seed=0, bands=4)
    loader = CyclicPoissonLoader(_dataset(1000), 0.2, 4)
    check_loader(loader, mechanism)
    sigma = mechanism.calibrate(target_epsilon=2.0, target_delta=1e-5, steps=200)
    ledger = Ledger()
    for _ in range(200):
        ledger.record(mechanism.dp_event(sigma, loader.sample_rate))
    assert 1.97 <= epsilon_of_ledger(ledger, 1e-5) <= 2.0


# -- through the engine --------------------------------------------------------------------------
def _train(steps: int, state=None, secure_mode: bool = False):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = CyclicPoissonLoader(_dataset(), 0.4, 4, steps=100, secure_mode=secure_mode,
                                 generator=None if secure_mode else torch.Generator().manual_seed(5))
    private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                 max_grad_norm=1.0, noise="bandmf-4", noise_seed=11, secure_mode=secure_mode)
    resume(model, private, state)
    train_until(model, private, private.steps + steps)
    return model, private


def test_checkpoint_resumes_exactly():
    whole, _ = _train(8)
    _, first = _train(5)
    resumed, private = _train(3, state={"model": first.module.state_dict(), "private": first.state_dict()})
    torch.testing.assert_close(resumed.weight, whole.weight, rtol=0, atol=0)
    assert private.steps == 8 and private.noise.memory_bytes() == 3 * 10 * 4


def test_secure_mode_keeps_no_noise_in_checkpoints():
    _, private = _train(4, secure_mode=True)
    state = private.state_dict()
    assert "history" not in state["noise"] and state["sampler"]["position"] == 4
    _train(2, state={"model": private.module.state_dict(), "private": state}, secure_mode=True)


# -- through make_private ------------------------------------------------------------------------
def test_make_private_checks_the_loader_the_mechanism_needs():
    model = nn.Linear(4, 2)
    with pytest.raises(PrivacyUsageError, match="cyclic Poisson"):
        dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           data_loader=DPDataLoader(_dataset(), 0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           noise="bandmf-4")
    with pytest.raises(PrivacyUsageError, match="spends privacy too"):
        dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           data_loader=CyclicPoissonLoader(_dataset(), 0.4, 4), noise_multiplier=1.0,
                           max_grad_norm=1.0, noise="bandmf-4", clipping="adaptive",
                           clipping_kwargs={"count_noise_multiplier": 5.0})


def test_make_private_with_epsilon_calibrates_for_bandmf_and_noise_kwargs_reach_the_factory():
    model = nn.Linear(4, 2)
    private = dpkit.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=CyclicPoissonLoader(_dataset(), 0.4, 4), max_grad_norm=1.0, target_epsilon=2.0,
        target_delta=1e-5, steps=40, noise="bandmf", noise_kwargs={"bands": 4})
    assert private.noise.coefficients == BandMF(bands=4).coefficients
    # The ledger after 40 steps holds one event per cycle: ε just under the target, not DP-SGD's calibration.
    ledger = _ledger_of(4, 4, 0.4, private.noise_multiplier, 40)
    assert 1.9 <= epsilon_of_ledger(ledger, 1e-5, "prv") <= 2.0
    dp_sgd = dpkit.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.1, steps=40)
    assert abs(private.noise_multiplier - dp_sgd) > 0.05
    private.detach()


@pytest.mark.parametrize("noise", ["gaussian", "bandmf"])
def test_a_mechanisms_own_loader_is_refused_by_the_other_mechanisms(noise):
    """A cyclic loader samples each example at rate q·L every L steps; DP-SGD's ledger would record rate q at
    every step and under-report ε. A shuffled tree loader is likewise no Poisson sampler."""
    from dpkit.data import ShuffledBatchLoader

    dataset = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loaders = [ShuffledBatchLoader(dataset, 8)]
    if noise == "gaussian":
        loaders.append(CyclicPoissonLoader.from_batch_size(dataset, 8, 4))
    for loader in loaders:
        model = nn.Linear(4, 2)
        with pytest.raises(PrivacyUsageError, match=type(loader).__name__):
            dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, noise=noise)


def test_coefficients_given_unnormalised_are_scaled_with_a_warning():
    # Was: rescaled without a word, so a user's coefficients were not the ones the noise used.
    with pytest.warns(UserWarning, match=r"scaled by 0\.5 to sum of squares 1"):
        scaled = BandMF(coefficients=[2.0, 0.0]).coefficients
    assert scaled == (1.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BandMF(coefficients=[0.6, 0.8]).coefficients == pytest.approx((0.6, 0.8))
