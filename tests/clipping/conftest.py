"""Clipping tests: the clippers of dpkit/clipping are registered for every test here."""
from __future__ import annotations

import importlib

import pytest

from dpkit import registry

NEW_CLIPPERS = ("dpkit.clipping.automatic", "dpkit.clipping.adaptive")


@pytest.fixture(autouse=True)
def _clippers_registered():
    """Register them where BUILTIN_PLUGINS does not list them yet, and leave the registry as it was."""
    added = [name for name in NEW_CLIPPERS if name not in registry.BUILTIN_PLUGINS]
    for name in added:
        registry.register_plugin(importlib.import_module(name), name=name)
    yield
    for name in added:
        registry.unregister_plugin(name)
