"""Checks you run on your own code: a layer plugin's samplers, and a whole training step.

A sampler is easy to get subtly wrong: a forgotten sum over an example's K augmented copies, a transposed
weight, a padding convention, a ``view`` that breaks on non-contiguous input, an empty Poisson batch. These
checks draw random batches shaped like your example input, run your layer, and compare your sampler's output
with per-example gradients that ``torch.func.grad`` computes through ``functional_call``, one example at a
time. They need no pytest fixture, so any plugin package's tests can call them::

    import torch
    from dpkit.testing import check_grad_sampler, check_norm_sampler

    from my_plugin import MyLayer, my_grad_sampler, my_norm_sampler

    def test_my_layer():
        layer = MyLayer(8, 6)
        check_grad_sampler(layer, torch.randn(5, 7, 8), K=2, sampler=my_grad_sampler)
        check_norm_sampler(layer, torch.randn(5, 7, 8), K=2, sampler=my_norm_sampler)

Leave ``sampler`` out to check whatever the registry resolves for ``type(layer)`` (your plugin, once installed).
A check returns ``None`` when the sampler agrees and raises :class:`AssertionError` naming the parameter, the
example, the largest difference and the shapes when it does not.

A training loop can leak too, around a correct sampler: a hook that adds an unclipped term to ``p.grad``, a
second loss backpropagated with dpkit paused, a rescaling after the noise. :func:`check_sensitivity` runs *your*
step with the noise off on a batch and on its neighbours (one example removed) and measures how far one example
moves what the optimizer applies; :func:`check_noise` runs it twice with the noise on and checks that every
coordinate got noise of the promised size.
"""
from __future__ import annotations

# ExampleInput, Setup and Step: the type aliases in the checks' signatures, importable from here as before.
from dpkit.testing._samplers import ExampleInput, check_grad_sampler, check_norm_sampler, forward_activations  # noqa: F401
from dpkit.testing._step import NoiseReport, SensitivityReport, Setup, Step, check_noise, check_sensitivity  # noqa: F401

__all__ = [
    "NoiseReport", "SensitivityReport", "check_grad_sampler", "check_noise", "check_norm_sampler",
    "check_sensitivity", "forward_activations",
]
