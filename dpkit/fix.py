"""``dpkit.fix(model)``: replace layers that mix examples with per-example equivalents."""
from __future__ import annotations

import math

from torch import nn

from dpkit.plan import MIXING


def fix(model: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm by a GroupNorm over the same channels, in place; returns ``model``.

    GroupNorm normalises within one example, so per-example gradients are defined.
    The group count is the largest divisor of the channel count up to ``max_groups``
    (gcd), as Opacus users know it.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, MIXING):
            groups = math.gcd(max_groups, child.num_features)
            norm = nn.GroupNorm(groups, child.num_features, eps=child.eps, affine=child.affine)
            norm.to(next((t.device for t in child.parameters()), None) or "cpu")
            setattr(model, name, norm)
        else:
            fix(child, max_groups)
    return model
