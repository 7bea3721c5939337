"""The fail-closed suite runs on dpkit's built-in plugins only: what is under test is dpkit's behaviour, not that of
whatever plugin packages the environment has installed (whose import is also slow). The process-wide registry of
other tests is left as it was: each test here gets its own manager, restored afterwards."""
from __future__ import annotations

import functools

import pytest

from dpkit import registry


@pytest.fixture(autouse=True)
def _builtin_plugins_only(monkeypatch):
    monkeypatch.setenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setattr(registry, "plugin_manager", functools.cache(registry.plugin_manager.__wrapped__))
    yield
