"""Flat clipping, ``min(1, C/(‖g_i‖+1e-6))`` on each example's whole-model norm, against a loop reference."""
from __future__ import annotations

import pytest
import torch
from _clip_reference import (
    assert_updates_close,
    flat_norms,
    make_batch,
    per_example_grads,
    private_update,
    reference_update,
)

from dpkit.plan import MODES  # every mode the engine offers: a new mode is covered here at once


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_step_matches_loop_reference(mode, K):
    x, y = make_batch(6, K, scale=2.0)
    grads = per_example_grads(x, y, K)
    C = flat_norms(grads).median().item()  # about half the examples are clipped
    update, _ = private_update(x, y, clipping="flat", mode=mode, K=K, max_grad_norm=C)
    assert_updates_close(update, reference_update(grads, lambda n: (C / (n + 1e-6)).clamp(max=1.0)))


@pytest.mark.parametrize("mode", MODES)
def test_one_example_contributes_at_most_the_sensitivity(mode):
    x, y = make_batch(1, scale=50.0)
    update, private = private_update(x, y, clipping="flat", mode=mode, max_grad_norm=0.1, loss_reduction="sum")
    assert private.clipper.sensitivity() == 0.1
    total = torch.cat([u.flatten() for u in update]).norm().item()
    assert total == pytest.approx(0.1, rel=1e-4)
