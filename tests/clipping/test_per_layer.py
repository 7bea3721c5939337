"""Per-layer clipping: each of the P parameters' per-example gradients clipped to C/√P, against a loop reference."""
from __future__ import annotations

import math

import pytest
import torch
from _clip_reference import assert_updates_close, make_batch, per_example_grads, private_update, reference_update

from dpkit.plan import MODES

PER_LAYER_MODES = [m for m in MODES if m != "ghost"]  # ghost's single reweighted pass cannot clip per parameter


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", PER_LAYER_MODES)
def test_step_matches_loop_reference(mode, K):
    x, y = make_batch(6, K, scale=2.0)
    grads = per_example_grads(x, y, K)
    P = len(grads[0])
    bound = torch.stack([t.norm() for g in grads for t in g]).median().item()
    C = bound * math.sqrt(P)
    update, _ = private_update(x, y, clipping="per_layer", mode=mode, K=K, max_grad_norm=C)
    expected = reference_update(grads, lambda n: (bound / (n + 1e-6)).clamp(max=1.0), per_layer=True)
    assert_updates_close(update, expected)


@pytest.mark.parametrize("mode", PER_LAYER_MODES)
def test_sensitivity_is_the_whole_bound(mode):
    """One example clipped in every parameter contributes exactly C/√P per parameter, C in all."""
    C = 0.3
    x, y = make_batch(1, scale=50.0)
    update, private = private_update(x, y, clipping="per_layer", mode=mode, max_grad_norm=C, loss_reduction="sum")
    assert private.clipper.sensitivity() == C
    per_param = torch.stack([u.norm() for u in update])
    assert torch.all(per_param <= C / math.sqrt(len(update)) * (1 + 1e-5))
    assert per_param.square().sum().sqrt().item() <= C * (1 + 1e-5)


def test_ghost_mode_is_refused_with_the_way_out():
    x, y = make_batch(2)
    with pytest.raises(ValueError, match="grad_sample_mode='bk'"):
        private_update(x, y, clipping="per_layer", mode="ghost")
