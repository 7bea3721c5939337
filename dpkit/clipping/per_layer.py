"""Per-layer clipping: each parameter's per-example gradient is clipped to its own bound.

With P trainable parameters each bound is C/√P, so an example's whole
contribution still has norm at most C and the noise is the same as flat.
"""
from __future__ import annotations

import math

from torch import Tensor

from dpkit.clipping import ClipperBase, check_norm
from dpkit.clipping.flat import STABILITY
from dpkit.hookspecs import hookimpl


class PerLayerClipper(ClipperBase):
    """``factor_{l,i} = min(1, (C/√P) / (‖g_{l,i}‖ + 1e-6))`` for each of the P parameters."""

    per_layer = True

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = check_norm(max_grad_norm)

    def factors(self, norms: Tensor) -> Tensor:
        return self.layer_factors(norms, norms.shape[0])

    def layer_factors(self, norms: Tensor, total: int) -> Tensor:
        """The factors of some rows of the ``[total, B]`` norm table. A row's factor depends on its own norm
        alone, so bk and auto clip each layer the moment its gradient arrives (streaming)."""
        bound = self.max_grad_norm / math.sqrt(max(total, 1))
        return (bound / (norms + STABILITY)).clamp(max=1.0)


@hookimpl
def dpkit_clippers():
    return {"per_layer": PerLayerClipper}
