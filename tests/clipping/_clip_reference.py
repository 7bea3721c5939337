"""A loop reference for clipping: per-example gradients from micro-batches of one, clipped by hand.

The engine's clipped step (noise_multiplier=0, SGD with lr=1, so the update is the
gradient it set) is compared with this reference in every grad_sample_mode.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import dpkit


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def make_batch(examples: int, K: int = 1, scale: float = 1.0, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``examples*K`` rows, each example's K copies adjacent (distinct, as augmentations are)."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(examples * K, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (examples,), generator=gen).repeat_interleave(K)
    return x, y


def make_private(model: nn.Module, *, lr: float = 1.0, noise_multiplier: float = 0.0, **kwargs
                 ) -> dpkit.PrivateTraining:
    """``make_private`` with plain SGD and a wrapped cross-entropy; batches are fed by hand (sample_rate=0.5,
    expected batch size 4 unless given)."""
    kwargs.setdefault("sample_rate", 0.5)
    kwargs.setdefault("expected_batch_size", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns that this is not private
        return dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                  noise_multiplier=noise_multiplier, criterion=nn.CrossEntropyLoss(), **kwargs)


def step(private: dpkit.PrivateTraining, x: Tensor, y: Tensor) -> None:
    private.optimizer.zero_grad()
    private.criterion(private.module(x), y).backward()
    private.optimizer.step()


def private_update(x: Tensor, y: Tensor, *, clipping: str, mode: str, K: int = 1, max_grad_norm: float = 1.0,
                   **kwargs) -> tuple[list[Tensor], dpkit.PrivateTraining]:
    """The parameter change of one noiseless private SGD step (lr=1) on ``x, y``."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    kwargs.setdefault("expected_batch_size", max(x.shape[0] // K, 1))
    private = make_private(model, max_grad_norm=max_grad_norm, clipping=clipping, grad_sample_mode=mode,
                           augmentation_multiplicity=K, **kwargs)
    step(private, x, y)
    return [b - p.detach() for b, p in zip(before, model.parameters())], private


def flat_norms(grads: list[list[Tensor]]) -> Tensor:
    """``[B]`` whole-model norms of per-example gradients."""
    return torch.stack([torch.cat([t.flatten() for t in g]).norm() for g in grads])


def per_example_grads(x: Tensor, y: Tensor, K: int = 1) -> list[list[Tensor]]:
    """Each example's gradient, the mean over its K copies, by one backward pass per example."""
    model = make_model()
    out = []
    for i in range(x.shape[0] // K):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i * K:(i + 1) * K]), y[i * K:(i + 1) * K]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return out


def reference_update(grads: list[list[Tensor]], factor: Callable[[Tensor], Tensor], per_layer: bool = False,
                     denominator: float | None = None) -> list[Tensor]:
    """Σ_i f_i g_i / denominator, f from flat or per-parameter norms.

    The default denominator is the number of examples, the expected batch size ``private_update`` gives.
    """
    total = [torch.zeros_like(g) for g in grads[0]]
    for g in grads:
        if per_layer:
            factors = [factor(t.norm()) for t in g]
        else:
            factors = [factor(torch.cat([t.flatten() for t in g]).norm())] * len(g)
        for acc, t, f in zip(total, g, factors):
            acc += f * t
    return [t / (denominator or len(grads)) for t in total]


def assert_updates_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
