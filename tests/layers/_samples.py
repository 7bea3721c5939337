"""The comparison every sampler test ends with: per-example gradients and norms against a reference."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def assert_samples(layer: nn.Module, got: dict, norms: dict, expected: dict[nn.Parameter, Tensor]) -> None:
    """``got`` (grad sampler) equals ``expected`` per parameter, and ``norms`` (norm sampler) its row norms."""
    names = {p: n for n, p in layer.named_parameters()}
    assert got.keys() == expected.keys() == norms.keys()
    for p, want in expected.items():
        torch.testing.assert_close(got[p], want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{names[p]}: {m}")
        torch.testing.assert_close(norms[p], want.flatten(1).norm(dim=1), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"norm of {names[p]}: {m}")
