"""Automatic clipping (Bu et al. 2022): ``C/(‖g_i‖+γ)`` for every example, against a loop reference."""
from __future__ import annotations

import pytest
import torch
from _clip_reference import assert_updates_close, make_batch, per_example_grads, private_update, reference_update

from dpkit.clipping.automatic import AutomaticClipper
from dpkit.plan import MODES


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_step_matches_loop_reference(mode, K):
    x, y = make_batch(6, K, scale=2.0)
    grads = per_example_grads(x, y, K)
    update, _ = private_update(x, y, clipping="automatic", mode=mode, K=K, max_grad_norm=0.7,
                               clipping_kwargs={"stability": 0.05})
    assert_updates_close(update, reference_update(grads, lambda n: 0.7 / (n + 0.05)))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_every_example_is_normalised_just_under_the_bound(scale):
    """Small gradients are scaled up, large ones down: C·‖g‖/(‖g‖+γ) < C, so the sensitivity is C."""
    x, y = make_batch(1, scale=scale)
    (norm,) = [torch.cat([t.flatten() for t in g]).norm().item() for g in per_example_grads(x, y)]
    update, private = private_update(x, y, clipping="automatic", mode="hooks", max_grad_norm=2.0,
                                     loss_reduction="sum")
    total = torch.cat([u.flatten() for u in update]).norm().item()
    assert private.clipper.sensitivity() == 2.0
    assert total == pytest.approx(2.0 * norm / (norm + 0.01), rel=1e-4)
    assert total < 2.0


def test_default_stability_and_bad_arguments():
    assert AutomaticClipper(1.0).stability == 0.01
    with pytest.raises(ValueError, match="stability"):
        AutomaticClipper(1.0, stability=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        AutomaticClipper(-1.0)
