"""Ghost clipping (Li et al. 2022; Bu et al. 2023): norms from one backward pass, the clipped sum from a second.

The first pass differentiates the loss only down to the layer outputs, so no
parameter gradient is formed; the records give per-example norms and clip
factors. The second pass back-propagates Σ_i f_i ℓ_i, whose parameter gradient
is the clipped sum itself. It needs the per-example losses, hence the loss from
``private.criterion``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dpkit.errors import PrivacyUsageError
from dpkit.modes._capture import Capturer

if TYPE_CHECKING:
    from dpkit.criterion import DPLoss


class GhostPass:
    """Ghost's state across its two passes: whether the norm pass is in flight, and the factors the controller's
    end-of-pass step leaves here for the reweighting pass."""

    def __init__(self) -> None:
        self.active = False
        self.factors: tuple[Tensor, Tensor] | None = None  # the clipper's norms and the clip factors


def backward(capturer: Capturer, params: list[nn.Parameter], K: int, state: GhostPass, loss: DPLoss
             ) -> tuple[Tensor, Tensor, dict[nn.Parameter, Tensor]]:
    """Both passes for one loss; returns the clipper's norms, the factors and the clipped sums."""
    outputs = capturer.live_outputs()
    if outputs == []:
        raise PrivacyUsageError("this loss does not depend on a forward pass of the model since the last "
                                "backward(); run the model on the batch first.")
    state.active, state.factors = True, None
    # The planned parameters themselves get a gradient only from a use outside their module (modules run on
    # stand-ins): asking for it here makes the capture refuse such a use in this pass, before any clipping.
    targets = (outputs if outputs is not None else [t for _, t in capturer.stand_ins]) + list(params)
    try:  # the norm pass; the controller's end-of-pass step leaves the factors in state.factors
        torch.autograd.grad(loss.value, targets, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        if "use_reentrant" not in str(err):
            raise
        raise PrivacyUsageError(
            "grad_sample_mode='ghost' takes its norms with torch.autograd.grad, which reentrant activation "
            "checkpointing does not support. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or "
            "grad_sample_mode='bk' (one backward pass, the same memory savings).") from err
    finally:
        state.active = False
    if state.factors is None:
        raise PrivacyUsageError("no layer of the model received a gradient from this loss.")
    norms, factors = state.factors
    weights = (factors / K).repeat_interleave(K).to(loss.per_row.dtype)
    stash = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    capturer.enabled = False
    try:
        (loss.per_row * weights).sum().backward()
    finally:
        capturer.enabled = True
        for p in params:
            p.grad = stash[p]
    sums: dict[nn.Parameter, Tensor] = {}
    for p, stand_in in capturer.stand_ins:
        if stand_in.grad is not None:
            sums[p] = sums[p] + stand_in.grad if p in sums else stand_in.grad
    capturer.stand_ins = [(p, t) for p, t in capturer.stand_ins if t.grad is None]  # forwards not yet consumed
    return norms, factors, sums
