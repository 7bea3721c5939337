"""A registry with the built-ins and this package's entry point only, rebuilt for each test."""
from __future__ import annotations

import pytest
import torch

from dpkit import registry


@pytest.fixture(autouse=True)
def plugin_registry(monkeypatch):
    monkeypatch.delenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("DPKIT_LOAD_PLUGINS", "dpkit-timm")  # other installed plugins stay out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset()
    yield
    registry.reset()
    torch.set_num_threads(threads)
