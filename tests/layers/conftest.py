"""Shared fixtures for the layer-plugin tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def builtin_table(fresh_registry):
    """``table(hook)`` of a fresh registry holding the built-in plugins only (no installed entry points)."""
    return fresh_registry.table
