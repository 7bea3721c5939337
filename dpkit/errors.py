"""dpkit's exceptions: one tree, each message says what, why and what to do."""
from __future__ import annotations


class DPKitError(Exception):
    """Base of every error dpkit raises on purpose."""


class PluginError(DPKitError):
    """A plugin failed to import, misnamed a hook, or returned a malformed table."""


class UnsupportedLayerError(DPKitError):
    """A layer cannot be handled by the chosen mode; the message lists every such layer."""


class UnsupportedModuleError(DPKitError):
    """The model holds a module that breaks per-example privacy (BatchNorm mixes examples)."""


class PrivacyUsageError(DPKitError):
    """The training loop was used in a way that would leak privacy or silently compute the wrong step."""


class RowMixingError(PrivacyUsageError):
    """An operation combined examples of the batch (rows), so one example's loss depends on others: its
    clipped gradient no longer bounds what that example contributes to the step."""


class UnsupportedEventError(DPKitError):
    """An accountant was asked to count a privacy event it has no analysis for."""


class PluginOverrideWarning(UserWarning):
    """A plugin replaces one of dpkit's built-in, privacy-critical entries (a sampler, clipper, noise, accountant)."""
