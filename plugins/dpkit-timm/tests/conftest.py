"""A registry with the built-ins and this package's entry point only, rebuilt for each test.

Where timm cannot be imported the tests that need it skip, unless ``DPKIT_REQUIRE_TIMM=1`` (``make test-timm``
sets it): CI must not pass on skipped tests, so there a missing or broken timm fails the run before any test.
"""
from __future__ import annotations

import os

import pytest

REQUIRE_TIMM = os.environ.get("DPKIT_REQUIRE_TIMM") or "0"  # set but empty: as unset
if REQUIRE_TIMM not in ("0", "1"):
    raise ValueError(f"DPKIT_REQUIRE_TIMM={REQUIRE_TIMM!r}: set it to 1 (timm must import) or 0 (skip without it)")
if REQUIRE_TIMM == "1":
    try:
        import timm  # noqa: F401
    except Exception as err:  # a torchvision built for another torch raises RuntimeError, not ImportError
        raise ImportError(
            f"DPKIT_REQUIRE_TIMM=1 but timm cannot be imported ({type(err).__name__}: {err}). Install it with "
            "`pip install -e 'plugins/dpkit-timm[test]'` beside a torchvision built for this torch (make test-timm "
            "builds such a venv), or unset DPKIT_REQUIRE_TIMM to skip the timm tests.") from err


@pytest.fixture(autouse=True)
def plugin_registry(monkeypatch):
    import torch  # here, not above: a run that fails on timm, or skips without it, never pays torch's import

    from dpkit import registry

    monkeypatch.delenv("DPKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("DPKIT_LOAD_PLUGINS", "dpkit-timm")  # other installed plugins stay out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.reset()
    yield
    registry.reset()
    torch.set_num_threads(threads)
