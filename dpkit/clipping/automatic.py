"""Automatic clipping (Bu et al. 2022, "Automatic clipping: DP deep learning made easier and stronger").

Every example is rescaled to norm just under C, instead of only the large ones:
``factor_i = C / (‖g_i‖ + γ)``. The update is then a (noisy) average of nearly
unit directions, so C stops being a hyperparameter that interacts with the
learning rate: with C = 1 the learning rate alone sets the step size. The
stability constant γ keeps small gradients from being blown up without bound
and keeps the factor finite at ‖g_i‖ = 0.
"""
from __future__ import annotations

from torch import Tensor

from dpkit.clipping import ClipperBase, check_norm
from dpkit.hookspecs import hookimpl


class AutomaticClipper(ClipperBase):
    """``factor_i = C / (‖g_i‖ + γ)``: each contribution has norm C·‖g_i‖/(‖g_i‖+γ) < C, so sensitivity C."""

    def __init__(self, max_grad_norm: float, stability: float = 0.01):
        self.max_grad_norm = check_norm(max_grad_norm)
        self.stability = check_norm(stability, "stability")

    def factors(self, norms: Tensor) -> Tensor:
        return self.max_grad_norm / (norms + self.stability)


@hookimpl
def dpkit_clippers():
    return {"automatic": AutomaticClipper}
