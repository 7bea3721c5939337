"""The wrapped loss: one loss per example row, reduced over the batch as ``loss_reduction`` says."""
from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Number

from torch import Tensor, nn

from dpkit.errors import PrivacyUsageError


class DPCriterion(nn.Module):
    """Wraps any torch loss module with a ``reduction`` attribute.

    Calls it with ``reduction="none"``, averages non-batch dimensions (tokens,
    pixels; ignored targets excluded for losses with ``ignore_index``) into one
    loss per row, and reduces over rows by ``loss_reduction``. The row count is
    remembered so the engine can check it against what the layers saw.
    """

    def __init__(self, loss: nn.Module, loss_reduction: str = "mean", batch_first: bool = True):
        super().__init__()
        if not hasattr(loss, "reduction"):
            raise TypeError(
                f"criterion {type(loss).__name__} has no `reduction` attribute; dpkit needs a torch loss "
                "module it can ask for reduction='none' (e.g. nn.CrossEntropyLoss())."
            )
        self.loss = loss
        self.loss_reduction = loss_reduction
        self.batch_first = batch_first
        self.rows: int | None = None
        self.backward_fn: Callable[[DPLoss], None] | None = None  # set by the controller

    def per_example(self, input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        """``[rows]`` losses, one per row of ``input``."""
        saved = self.loss.reduction
        self.loss.reduction = "none"
        try:
            losses = self.loss(input, target, *args, **kwargs)
        finally:
            self.loss.reduction = saved
        dim = 0 if self.batch_first else 1
        rows = input.shape[dim] if input.dim() > dim else input.shape[0]
        if losses.dim() == 0 or losses.shape[dim] != rows:
            raise PrivacyUsageError(
                f"{type(self.loss).__name__} returned losses of shape {tuple(losses.shape)} for an input with "
                f"{rows} rows along dim {dim}; dpkit needs one loss (or one per position) per row."
            )
        losses = losses.movedim(dim, 0).reshape(rows, math.prod(losses.shape[1:]))
        ignore = getattr(self.loss, "ignore_index", None)
        if ignore is not None and not target.is_floating_point() and target.numel() == losses.numel():
            valid = (target.movedim(dim, 0).reshape(losses.shape) != ignore).to(losses.dtype)
            return (losses * valid).sum(1) / valid.sum(1).clamp(min=1)
        return losses.mean(1)

    def forward(self, input: Tensor, target: Tensor, *args, **kwargs) -> DPLoss:
        losses = self.per_example(input, target, *args, **kwargs)
        self.rows = losses.shape[0]
        return DPLoss(losses, self.loss_reduction, self.backward_fn)

    def extra_repr(self) -> str:
        return f"loss_reduction={self.loss_reduction!r}"



class DPLoss:
    """A batch loss that remembers its per-example parts, so the engine can reweight them (ghost clipping).

    Behaves like the reduced loss tensor for what training loops do with one:
    ``backward()``, ``item()``, ``float()``, ``detach()``, ``+ - * /`` with numbers
    and other DPLosses of the same rows. Anything else (adding a tensor that is not
    a per-example loss, such as a weight penalty) is refused: it would break
    per-example clipping. Use ``.value`` for the plain tensor.
    """

    __slots__ = ("per_row", "reduction", "_backward")

    def __init__(self, per_row: Tensor, reduction: str, backward: Callable[[DPLoss], None] | None = None):
        self.per_row, self.reduction, self._backward = per_row, reduction, backward

    @property
    def value(self) -> Tensor:
        """The reduced loss as a tensor (0 for an empty batch under "mean", not nan)."""
        total = self.per_row.sum()
        return total if self.reduction == "sum" else total / max(self.per_row.shape[0], 1)

    def backward(self) -> None:
        if self._backward is None:
            self.value.backward()
        else:
            self._backward(self)

    def item(self) -> float:
        return self.value.item()

    def __iter__(self):
        # GradScaler.scale takes anything iterable for a list of losses: say what to do instead of its ValueError.
        raise PrivacyUsageError(
            "a dpkit loss is not a tensor, so GradScaler.scale cannot scale it on its own. Pass the scaler to "
            "make_private(grad_scaler=scaler): scaler.scale(loss) then scales the per-example losses, and dpkit "
            "divides the loss scale out before clipping (docs/mixed-precision.md).")

    def __float__(self) -> float:
        return self.item()

    def detach(self) -> Tensor:
        return self.value.detach()

    def __repr__(self) -> str:
        return f"DPLoss({self.item():.6g}, rows={self.per_row.shape[0]}, reduction={self.reduction!r})"

    def _combine(self, other, sign: float) -> DPLoss:
        if isinstance(other, DPLoss):
            if other.per_row.shape != self.per_row.shape or other.reduction != self.reduction:
                raise ValueError(f"cannot combine losses over {self.per_row.shape[0]} and {other.per_row.shape[0]} "
                                 f"rows ({self.reduction!r}/{other.reduction!r}); per-example losses must align.")
            return DPLoss(self.per_row + sign * other.per_row, self.reduction, self._backward or other._backward)
        c = _scalar(other, "add")
        rows = max(self.per_row.shape[0], 1)
        shift = sign * c / rows if self.reduction == "sum" else sign * c  # the reduced value moves by ±c
        return DPLoss(self.per_row + shift, self.reduction, self._backward)

    def __add__(self, other) -> DPLoss:
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other) -> DPLoss:
        return self._combine(other, -1.0)

    def __rsub__(self, other) -> DPLoss:
        return (-self)._combine(other, 1.0)

    def __neg__(self) -> DPLoss:
        return DPLoss(-self.per_row, self.reduction, self._backward)

    def __mul__(self, other) -> DPLoss:
        return DPLoss(self.per_row * _scalar(other, "multiply"), self.reduction, self._backward)

    __rmul__ = __mul__

    def __truediv__(self, other) -> DPLoss:
        return DPLoss(self.per_row / _scalar(other, "divide"), self.reduction, self._backward)


def _scalar(x, verb: str) -> float:
    if isinstance(x, Number):
        return float(x)
    if isinstance(x, Tensor) and x.numel() == 1 and not x.requires_grad:
        return float(x.item())
    raise TypeError(
        f"cannot {verb} a DP loss and {type(x).__name__}{' requiring grad' if getattr(x, 'requires_grad', 0) else ''}: "
        "only numbers and other per-example losses keep per-example clipping exact. Put a weight penalty in "
        "the optimizer (weight_decay), or use loss.value if you know what you are doing."
    )
