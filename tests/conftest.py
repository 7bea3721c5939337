"""Shared fixtures: one torch thread per test worker, a fresh plugin registry."""
from __future__ import annotations

import pytest
import torch

from dpkit import registry


@pytest.fixture(autouse=True)
def _one_thread():
    # pytest-xdist runs one worker per core; torch's own threads on top would oversubscribe them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry rebuilt from the built-ins only, dropped again after the test."""
    monkeypatch.setenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset()
    yield registry
    registry.reset()
