"""The Gaussian mechanism: a reproducible, checkpointable stream; fresh, unpredictable noise in secure mode."""
from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

import dpkit
from dpkit.events import GaussianEvent, PoissonSampledEvent
from dpkit.noise.gaussian import GaussianNoise


def draws(noise: GaussianNoise, n: int = 200_000, std: float = 1.0) -> torch.Tensor:
    return noise.add(torch.zeros(n), std=std)


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


def test_zero_std_adds_nothing():
    x = torch.randn(4)
    assert torch.equal(GaussianNoise(seed=0).add(x, std=0.0), x)


def test_secure_mode_ignores_the_seed():
    assert not torch.equal(draws(GaussianNoise(seed=0, secure_mode=True), 100),
                           draws(GaussianNoise(seed=0, secure_mode=True), 100))


def test_dp_event():
    assert GaussianNoise(seed=0).dp_event(1.5, 0.01) == PoissonSampledEvent(0.01, GaussianEvent(1.5))


def _noise_only_update(secure_mode: bool, sigma: float = 2.0, C: float = 1.5, batch: int = 4) -> torch.Tensor:
    """The gradient a private step sets when the clipped sum is 0: the noise divided by the batch size."""
    model = nn.Linear(100, 100, bias=False)
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                 sample_rate=0.1, noise_multiplier=sigma, max_grad_norm=C, noise_seed=0,
                                 secure_mode=secure_mode, criterion=nn.MSELoss())
    private.criterion(model(torch.zeros(batch, 100)), torch.zeros(batch, 100)).backward()
    private.optimizer.step()
    return model.weight.grad.flatten()


def test_engine_noise_in_secure_mode_differs_between_runs_and_has_std_sigma_c_over_b():
    first, second = _noise_only_update(True), _noise_only_update(True)
    assert not torch.equal(first, second)
    assert first.std().item() == pytest.approx(2.0 * 1.5 / 4, rel=0.05)
    assert torch.equal(_noise_only_update(False), _noise_only_update(False))
