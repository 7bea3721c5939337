"""What every correlated-noise mechanism asks of its loader beyond its own sampling rule."""
from __future__ import annotations

from dpkit import distributed
from dpkit.errors import PrivacyUsageError


def refuse_distributed_or_seeded(loader, mechanism, noise: str) -> None:
    """One process only (the mechanisms' positions are not split across ranks yet), and in secure mode a loader
    whose order comes from the OS's CSPRNG too: a seeded order would let its holder replay the participation."""
    kind = type(loader).__name__
    if loader.world_size != 1 or distributed.world_size() > 1:
        raise PrivacyUsageError(f"noise={noise!r} with a {kind} runs on one process only for now.")
    if mechanism.secure_mode and not loader.secure_mode:
        raise PrivacyUsageError(f"secure_mode=True with a {kind} that samples from a seeded generator; build it "
                                f"with {kind}(..., secure_mode=True).")
