"""dpkit: differentially private training for PyTorch.

``dpkit.make_private(...)`` attaches DP-SGD to a model and optimizer; layer
support, clippers, noise and accountants are pluggy plugins.

The training engine, ``audit`` and ``testing`` load on first use (PEP 562): the
``dpkit`` command and accounting-only scripts should not pay for what a training
loop needs (the engine's import of torch's compiler stack alone costs more than a
second on a loaded machine).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dpkit.accounting import get_epsilon, get_noise_multiplier
from dpkit.criterion import DPCriterion
from dpkit.data import ByUser, DPDataLoader, Multiplicity, PoissonBatchSampler
from dpkit.errors import (
    DPKitError,
    PluginError,
    PluginOverrideWarning,
    PrivacyUsageError,
    UnsupportedEventError,
    UnsupportedLayerError,
    UnsupportedModuleError,
)
from dpkit.fix import fix
from dpkit.hookspecs import hookimpl
from dpkit.registry import register_grad_sampler, register_norm_sampler

if TYPE_CHECKING:
    from dpkit import audit, testing  # noqa: F401 (lazily loaded, see _SUBMODULES)
    from dpkit.engine import PrivateTraining, detach, make_private, make_private_with_epsilon
    from dpkit.micro_batches import BatchMemoryManager
    from dpkit.modes._trace import rowwise

__all__ = [
    "BatchMemoryManager", "ByUser", "DPCriterion", "DPDataLoader", "DPKitError", "Multiplicity", "PluginError",
    "PluginOverrideWarning",
    "PoissonBatchSampler", "PrivacyUsageError", "PrivateTraining", "UnsupportedEventError",
    "UnsupportedLayerError", "UnsupportedModuleError", "detach", "fix", "get_epsilon", "get_noise_multiplier",
    "hookimpl", "make_private", "make_private_with_epsilon", "register_grad_sampler", "register_norm_sampler",
    "rowwise",
]

_LAZY = {  # name -> the module that defines it, imported on first access
    "PrivateTraining": "dpkit.engine", "detach": "dpkit.engine", "make_private": "dpkit.engine",
    "make_private_with_epsilon": "dpkit.engine", "BatchMemoryManager": "dpkit.micro_batches",
    "rowwise": "dpkit.modes._trace",
}
_SUBMODULES = ("accounting", "audit", "engine", "testing")  # documented submodules, listed by dir(dpkit)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"dpkit.{name}")
    elif name == "__version__":
        value = _version()
    else:
        raise AttributeError(f"module 'dpkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    dunders = {name for name in globals() if name.startswith("__")}
    return sorted(dunders | set(__all__) | set(_SUBMODULES) | {"__version__"})


def _version() -> str:
    """The installed distribution's version; a source tree that was never installed says so."""
    from importlib import metadata

    try:
        return metadata.version("dpkit")
    except metadata.PackageNotFoundError:
        return "0+unknown"
