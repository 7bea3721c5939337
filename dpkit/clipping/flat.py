"""Flat clipping: one bound C on each example's whole-model gradient norm (Abadi et al. 2016)."""
from __future__ import annotations

from torch import Tensor

from dpkit.clipping import ClipperBase, check_norm
from dpkit.hookspecs import hookimpl

STABILITY = 1e-6


class FlatClipper(ClipperBase):
    """``factor_i = min(1, C / (‖g_i‖ + 1e-6))``: each example contributes at most C."""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = check_norm(max_grad_norm)

    def factors(self, norms: Tensor) -> Tensor:
        return (self.max_grad_norm / (norms + STABILITY)).clamp(max=1.0)


@hookimpl
def dpkit_clippers():
    return {"flat": FlatClipper}
