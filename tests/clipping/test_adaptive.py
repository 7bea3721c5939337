"""Adaptive clipping (Andrew et al. 2021): C follows a quantile of the norms; the count it learns from is paid for."""
from __future__ import annotations

import math

import pytest
import torch
from _clip_reference import (
    assert_updates_close,
    flat_norms,
    make_batch,
    make_model,
    make_private,
    per_example_grads,
    private_update,
    reference_update,
    step,
)

import dpkit
from dpkit.clipping.adaptive import AdaptiveClipper, gradient_noise_multiplier
from dpkit.errors import PrivacyUsageError
from dpkit.events import ComposedEvent, DpEvent, GaussianEvent, PoissonSampledEvent, SelfComposedEvent
from dpkit.noise.gaussian import GaussianNoise
from dpkit.plan import MODES


def adaptive(count_noise_multiplier: float = 1.0, expected_batch_size: float = 6, **kwargs) -> dict:
    return {"clipping": "adaptive", "clipping_kwargs": {
        "count_noise_multiplier": count_noise_multiplier, "expected_batch_size": expected_batch_size, **kwargs}}


def count_noise(seed: int) -> float:
    """The count noise of the first noiseless step: the first draw of the noise mechanism's generator."""
    return torch.randn((), generator=torch.Generator().manual_seed(seed)).item()


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_first_step_is_flat_clipping_at_the_initial_bound(mode, K):
    x, y = make_batch(6, K, scale=2.0)
    grads = per_example_grads(x, y, K)
    C = flat_norms(grads).median().item()
    update, _ = private_update(x, y, mode=mode, K=K, max_grad_norm=C, **adaptive())
    assert_updates_close(update, reference_update(grads, lambda n: (C / (n + 1e-6)).clamp(max=1.0)))


@pytest.mark.parametrize(("C", "unclipped"), [(1e4, 1.0), (1e-4, 0.0)])
def test_geometric_update_from_the_noisy_centred_count(C, unclipped):
    """All norms below C: C shrinks by exp(-η(b̄-γ)); all above: it grows. b̄ is the noisy fraction."""
    x, y = make_batch(6)
    sigma_b, m, eta, gamma = 2.0, 8.0, 0.3, 0.6
    _, private = private_update(x, y, mode="hooks", max_grad_norm=C, noise_seed=7,
                                **adaptive(sigma_b, m, clip_lr=eta, target_unclipped_quantile=gamma))
    fraction = (6 * (unclipped - 0.5) + sigma_b * count_noise(7)) / m + 0.5
    assert private.clipper.max_grad_norm == pytest.approx(C * math.exp(-eta * (fraction - gamma)), rel=1e-6)
    assert (private.clipper.max_grad_norm < C) == (fraction > gamma)


def test_bound_settles_at_the_target_quantile():
    """With the model frozen (lr=0) the norms are fixed; C starting 100x too high ends near their 0.8-quantile."""
    x, y = make_batch(48, scale=2.0)
    norms = flat_norms(per_example_grads(x, y))
    private = make_private(make_model(), lr=0.0, max_grad_norm=100 * norms.max().item(), noise_seed=0,
                           **adaptive(1.0, 48, clip_lr=0.5, target_unclipped_quantile=0.8))
    for _ in range(60):
        step(private, x, y)
    unclipped = (norms <= private.clipper.max_grad_norm).float().mean().item()
    assert 0.6 <= unclipped <= 0.95


def _gaussians(event: DpEvent) -> list[float]:
    """Noise multipliers of every Gaussian in an event tree."""
    if isinstance(event, GaussianEvent):
        return [event.noise_multiplier]
    if isinstance(event, (PoissonSampledEvent, SelfComposedEvent)):
        return _gaussians(event.event)
    if isinstance(event, ComposedEvent):
        return [s for e in event.events for s in _gaussians(e)]
    return []


def _train(clipping_kwargs: dict, steps: int = 3) -> dpkit.PrivateTraining:
    x, y = make_batch(4)
    private = make_private(make_model(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0,
                           sample_rate=0.05, **clipping_kwargs)
    for _ in range(steps):
        step(private, x, y)
    return private


def test_the_count_enters_the_ledger_and_costs_epsilon():
    private = _train(adaptive(count_noise_multiplier=2.0))
    [(event, count)] = private.ledger.entries
    assert count == 3
    assert sorted(_gaussians(event)) == [1.0, 4.0]  # the gradient's σ, and 2σ_b: the centred count's sensitivity is ½
    flat = _train({"clipping": "flat"})
    assert private.epsilon(1e-5) > flat.epsilon(1e-5)


def test_epsilon_covers_gradient_and_count_released_on_one_sample():
    """Both go under one Poisson sample: composing two independently sampled events would under-count."""
    sigma, sigma_b = 1.0, 0.75
    private = _train(adaptive(count_noise_multiplier=sigma_b), steps=100)
    joint = (sigma**-2 + (2 * sigma_b) ** -2) ** -0.5
    exact = dpkit.get_epsilon(noise_multiplier=joint, sample_rate=0.05, steps=100, delta=1e-5)
    assert exact * (1 - 1e-3) <= private.epsilon(1e-5) <= exact * (1 + 1e-3)


def test_empty_poisson_batch_still_steps_updates_the_bound_and_is_counted():
    private = make_private(make_model(), noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0,
                           **adaptive(1.0, 6, target_unclipped_quantile=0.9))
    before = [p.detach().clone() for p in private.module.parameters()]
    x, y = make_batch(6)
    step(private, x[:0], y[:0])
    assert private.steps == 1 and private.ledger.steps == 1
    assert private.clipper.max_grad_norm != 1.0  # b̄ = noise/m + ½ < γ: the empty count still moves C
    assert all(not torch.equal(b, p) for b, p in zip(before, private.module.parameters()))


def test_state_dict_holds_the_bound():
    clipper = AdaptiveClipper(1.0, count_noise_multiplier=1.0, expected_batch_size=4)
    clipper.observe(torch.tensor([0.1, 0.2, 0.3, 5.0]))
    clipper.end_step(GaussianNoise(seed=0))
    restored = AdaptiveClipper(1.0, count_noise_multiplier=1.0, expected_batch_size=4)
    restored.load_state_dict(clipper.state_dict())
    assert restored.max_grad_norm == clipper.max_grad_norm != 1.0
    assert restored.sensitivity() == clipper.max_grad_norm


def test_expected_batch_size_from_the_engine_or_a_clear_error():
    clipper = AdaptiveClipper(1.0, count_noise_multiplier=1.0)
    clipper.observe(torch.zeros(3))
    with pytest.raises(PrivacyUsageError, match="expected_batch_size"):
        clipper.end_step(GaussianNoise(seed=0))
    clipper.end_step(GaussianNoise(seed=0), expected_batch_size=3.0)
    assert clipper.max_grad_norm < 1.0


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        AdaptiveClipper(1.0)
    with pytest.raises(ValueError, match="target_unclipped_quantile"):
        AdaptiveClipper(1.0, target_unclipped_quantile=1.5, count_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clip_lr"):
        AdaptiveClipper(1.0, clip_lr=-1, count_noise_multiplier=1.0)


def test_gradient_noise_multiplier_keeps_the_total_budget():
    """Andrew et al. Theorem 1: gradient at σ_Δ plus count at σ_b costs what the gradient alone at σ would."""
    sigma_delta = gradient_noise_multiplier(1.0, 5.0)
    assert sigma_delta > 1.0
    assert (sigma_delta**-2 + 10.0**-2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must exceed 0.5"):
        gradient_noise_multiplier(1.0, 0.5)


def test_secure_mode_draws_the_count_noise_from_the_csprng(monkeypatch):
    from dpkit import secure

    drawn = []
    real = secure.normal
    monkeypatch.setattr(secure, "normal", lambda n, **kw: drawn.append(n) or real(n, **kw))
    clipper = AdaptiveClipper(1.0, count_noise_multiplier=1.0, expected_batch_size=4)
    clipper.observe(torch.tensor([0.1, 0.2, 0.3, 5.0]))
    clipper.end_step(GaussianNoise(secure_mode=True), expected_batch_size=4)
    assert drawn == [1] and clipper.max_grad_norm != 1.0
