"""The Gaussian mechanism: a reproducible, checkpointable stream; fresh, unpredictable noise in secure mode."""
from __future__ import annotations

import os
import random

import pytest
import torch
from scipy import stats
from torch import nn

import dpkit
from dpkit import secure
from dpkit.errors import PrivacyUsageError
from dpkit.events import GaussianEvent, PoissonSampledEvent
from dpkit.noise import _streams
from dpkit.noise.gaussian import GaussianNoise


def draws(noise: GaussianNoise, n: int = 200_000, std: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return noise.add(torch.zeros(n, dtype=dtype), std=std)


def off_float32_lattice(noise: torch.Tensor) -> float:
    """The fraction of coordinates that a float32 draw could not have produced."""
    return (noise.to(torch.float32).to(torch.float64) != noise).double().mean().item()


def test_seeded_stream_is_reproducible_and_seeds_differ():
    assert torch.equal(draws(GaussianNoise(seed=3)), draws(GaussianNoise(seed=3)))
    assert not torch.equal(draws(GaussianNoise(seed=3)), draws(GaussianNoise(seed=4)))


def test_state_dict_resumes_the_stream():
    noise = GaussianNoise(seed=5)
    draws(noise, 10)
    state = noise.state_dict()
    expected = draws(noise, 10)
    resumed = GaussianNoise(seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(draws(resumed, 10), expected)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_is_gaussian_with_the_requested_std(secure_mode):
    sample = draws(GaussianNoise(seed=0, secure_mode=secure_mode), std=2.5)
    assert abs(sample.mean().item()) < 0.05
    assert sample.std().item() == pytest.approx(2.5, rel=0.02)
    assert stats.kstest(sample.numpy() / 2.5, "norm").pvalue > 1e-4


def seeded(seed: int, n: int, std: float, dtype: torch.dtype = torch.float32, call: int = 0) -> torch.Tensor:
    """The CPU stream's layout: chunk k of STREAM coordinates drawn by ``normal_`` in pieces of 2¹⁵ from chunk k's
    generator of the call (``_streams.generator`` is checked against MT19937 and Philox in test_streams.py)."""
    pieces = []
    for k, size in enumerate(torch.empty(n).split(_streams.STREAM)):
        gen = _streams.generator(seed, k, call)
        pieces += [torch.empty(len(p), dtype=dtype).normal_(0, std, generator=gen)
                   for p in torch.empty(size.numel()).split(1 << 15)]
    return torch.cat(pieces)


def test_float32_buffers_get_the_seeded_float32_stream():
    n = 2 * _streams.STREAM + 1000
    assert torch.equal(draws(GaussianNoise(seed=7), n, std=2.0), seeded(7, n, 2.0))


def test_float64_buffers_get_float64_noise():
    sample = draws(GaussianNoise(seed=7), std=2.0, dtype=torch.float64)
    assert sample.dtype == torch.float64
    assert torch.equal(sample, seeded(7, 200_000, 2.0, torch.float64))
    assert off_float32_lattice(sample) > 0.99
    assert sample.std().item() == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_buffers_get_float32_noise_rounded_once(dtype):
    assert torch.equal(draws(GaussianNoise(seed=7), 1000, std=2.0, dtype=dtype), seeded(7, 1000, 2.0).to(dtype))


def test_each_call_draws_the_next_streams_and_a_resumed_run_draws_the_same_bits():
    noise = GaussianNoise(seed=11)
    n = _streams.STREAM + 7
    first = draws(noise, n)
    state = noise.state_dict()
    assert state["cpu_calls"] == 1
    second, third = draws(noise, n), draws(noise, 100)
    assert torch.equal(first, seeded(11, n, 1.0, call=0)) and torch.equal(second, seeded(11, n, 1.0, call=1))
    resumed = GaussianNoise(seed=11)
    resumed.load_state_dict(state)
    assert torch.equal(draws(resumed, n), second) and torch.equal(draws(resumed, 100), third)


def test_a_state_saved_before_the_cpu_streams_resumes_them_at_call_zero():
    state = GaussianNoise(seed=4).state_dict()
    del state["cpu_calls"]
    noise = GaussianNoise(seed=99)
    noise.load_state_dict(state)
    assert torch.equal(draws(noise, 50), seeded(4, 50, 1.0))


def test_zero_std_adds_nothing():
    x = torch.randn(4)
    assert torch.equal(GaussianNoise(seed=0).add(x, std=0.0), x)


def test_secure_mode_ignores_the_seed():
    assert not torch.equal(draws(GaussianNoise(seed=0, secure_mode=True), 100),
                           draws(GaussianNoise(seed=0, secure_mode=True), 100))


def test_secure_float64_noise_has_the_std_and_float64_resolution():
    sample = draws(GaussianNoise(secure_mode=True), std=2.0, dtype=torch.float64)
    assert sample.std().item() == pytest.approx(2.0, rel=0.02)
    assert off_float32_lattice(sample) > 0.99


def test_secure_noise_is_four_csprng_normals_times_half_the_std(monkeypatch):
    """Replaying the OS's bytes replays the noise: it is dpkit.secure's draws, not a seeded generator's."""
    def replay_urandom():
        rng = random.Random(0)
        monkeypatch.setattr(os, "urandom", lambda n: rng.randbytes(n))

    replay_urandom()
    expected = secure.normal(4 * 1000).view(4, -1).sum(0).mul(2.5 / 2).float()
    replay_urandom()
    assert torch.equal(draws(GaussianNoise(seed=7, secure_mode=True), 1000, std=2.5), expected)


def test_secure_mode_keeps_no_noise_state():
    noise = GaussianNoise(seed=3, secure_mode=True)
    draws(noise, 10)
    noise.generator(torch.device("cpu"))  # the adaptive clipper's draw
    assert noise.state_dict() == {"secure_mode": True}


@pytest.mark.parametrize("saved, running", [(False, True), (True, False)])
def test_a_state_of_the_other_mode_is_refused(saved, running):
    state = GaussianNoise(seed=1, secure_mode=saved).state_dict()
    with pytest.raises(PrivacyUsageError, match=rf"saved with secure_mode={saved}.*this run has secure_mode={running}"):
        GaussianNoise(seed=1, secure_mode=running).load_state_dict(state)


def test_a_secure_state_loads_into_secure_mode():
    noise = GaussianNoise(secure_mode=True)
    noise.load_state_dict(GaussianNoise(secure_mode=True).state_dict())
    assert noise.state_dict() == {"secure_mode": True}


@pytest.mark.parametrize("state, key", [
    (None, "dict"),
    ({}, "'secure_mode'"),
    ({"secure_mode": 1}, "'secure_mode'"),
    ({"secure_mode": False, "generators": {}}, "'seed'"),
    ({"secure_mode": False, "seed": "3", "generators": {}}, "'seed'"),
    ({"secure_mode": False, "seed": 3}, "'generators'"),
    ({"secure_mode": False, "seed": 3, "generators": [1]}, "'generators'"),
    ({"secure_mode": False, "seed": 3, "generators": {"cpu": [1, 2]}}, "'generators' entry 'cpu'"),
    ({"secure_mode": False, "seed": 3, "generators": {"cpu": torch.zeros(3, dtype=torch.uint8)}}, "'cpu'"),
    ({"secure_mode": False, "seed": 3, "generators": {"nowhere": torch.get_rng_state()}}, "'nowhere'"),
    ({"secure_mode": False, "seed": 3, "generators": {}, "cpu_calls": True}, "'cpu_calls'"),
    ({"secure_mode": False, "seed": 3, "generators": {}, "cpu_calls": -1}, "'cpu_calls'"),
])
def test_a_malformed_state_is_refused_by_name_and_changes_nothing(state, key):
    noise, reference = GaussianNoise(seed=5), GaussianNoise(seed=5)
    with pytest.raises(ValueError, match=key):
        noise.load_state_dict(state)
    assert torch.equal(draws(noise, 10), draws(reference, 10))


def test_dp_event():
    assert GaussianNoise(seed=0).dp_event(1.5, 0.01) == PoissonSampledEvent(0.01, GaussianEvent(1.5))


def _noise_only_update(secure_mode: bool, sigma: float = 2.0, C: float = 1.5, batch: int = 4) -> torch.Tensor:
    """The gradient a private step sets when the clipped sum is 0: the noise divided by the batch size."""
    model = nn.Linear(100, 100, bias=False)
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 sample_rate=0.1, expected_batch_size=batch, noise_multiplier=sigma,
                                 max_grad_norm=C, noise_seed=0, secure_mode=secure_mode, criterion=nn.MSELoss())
    private.criterion(model(torch.zeros(batch, 100)), torch.zeros(batch, 100)).backward()
    private.optimizer.step()
    return model.weight.grad.flatten()


@pytest.mark.filterwarnings("ignore:secure_mode=True with data_loader=None")  # no loader here: only the noise
def test_engine_noise_in_secure_mode_differs_between_runs_and_has_std_sigma_c_over_b():
    first, second = _noise_only_update(True), _noise_only_update(True)
    assert not torch.equal(first, second)
    assert first.std().item() == pytest.approx(2.0 * 1.5 / 4, rel=0.05)
    assert torch.equal(_noise_only_update(False), _noise_only_update(False))


@pytest.mark.filterwarnings("ignore:secure_mode=True with data_loader=None")  # no loader here: only the noise
def test_engine_checkpoint_in_secure_mode_holds_no_noise_state():
    model = nn.Linear(3, 1)
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 sample_rate=0.1, expected_batch_size=1.0, noise_multiplier=1.0,
                                 max_grad_norm=1.0, secure_mode=True)
    assert private.state_dict()["noise"] == {"secure_mode": True}
