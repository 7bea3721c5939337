"""dpkit: differentially private training for PyTorch.

``dpkit.make_private(...)`` attaches DP-SGD to a model and optimizer; layer
support, clippers, noise and accountants are pluggy plugins.
"""
from __future__ import annotations

from dpkit.criterion import DPCriterion
from dpkit.data import ByUser, DPDataLoader, Multiplicity, PoissonBatchSampler
from dpkit.engine import PrivateTraining, detach, make_private, make_private_with_epsilon
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
from dpkit.micro_batches import BatchMemoryManager
from dpkit.hookspecs import hookimpl
from dpkit.registry import register_grad_sampler, register_norm_sampler

__all__ = [
    "BatchMemoryManager", "ByUser", "DPCriterion", "DPDataLoader", "DPKitError", "Multiplicity", "PluginError",
    "PluginOverrideWarning",
    "PoissonBatchSampler", "PrivacyUsageError", "PrivateTraining", "UnsupportedEventError",
    "UnsupportedLayerError", "UnsupportedModuleError", "detach", "fix", "get_epsilon", "get_noise_multiplier",
    "hookimpl", "make_private", "make_private_with_epsilon", "register_grad_sampler", "register_norm_sampler",
]


def __getattr__(name: str):
    if name == "audit":  # a submodule imported on first use (numpy, scipy)
        import importlib

        return importlib.import_module("dpkit.audit")
    if name in ("get_epsilon", "get_noise_multiplier"):
        from dpkit import accounting

        return getattr(accounting, name)
    raise AttributeError(f"module 'dpkit' has no attribute {name!r}")
