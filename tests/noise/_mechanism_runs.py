"""Engine runs shared by the correlated mechanisms' tests: a run resumed from a checkpoint and trained on, and the
positional refusal (a step on a batch already released, or after a skipped one)."""
from __future__ import annotations

import pytest
from torch import nn

from dpkit.errors import PrivacyUsageError


def resume(model: nn.Module, private, state: dict | None) -> None:
    """Load ``state`` (the model's, dpkit's and, where saved, the optimizer's) if there is one."""
    if state is None:
        return
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        private.optimizer.load_state_dict(state["optimizer"])
    private.load_state_dict(state["private"])


def train_until(model: nn.Module, private, steps: int) -> None:
    """Plain DP-SGD steps on the loader's batches, across epochs, until ``private.steps == steps``."""
    while private.steps < steps:
        for x, y in private.data_loader:
            nn.functional.cross_entropy(model(x), y).backward()
            private.optimizer.step()
            private.optimizer.zero_grad()
            if private.steps == steps:
                break


def assert_next_batch_only(private, match: str = "one step per batch") -> None:
    """After 2 steps: a second step on a released batch, and a step after a skipped batch, are both refused."""
    model, optimizer = private.module, private.optimizer
    x, y = next(iter(private.data_loader))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # a second step on the same batch
    with pytest.raises(PrivacyUsageError, match=match):
        optimizer.step()
    optimizer.zero_grad()
    batches = iter(private.data_loader)
    next(batches)  # a batch skipped
    x, y = next(batches)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(PrivacyUsageError, match=match):
        optimizer.step()
    assert private.steps == 3
