"""Shared fixtures for the layer-plugin tests."""
from __future__ import annotations

import pytest
import torch

from dpkit import registry


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and with pytest-xdist on few cores they oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def builtin_table(monkeypatch):
    """``table(hook)`` of a fresh registry holding the built-in plugins only (no installed entry points)."""
    monkeypatch.setenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset()
    yield registry.table
    registry.reset()
