"""The wrapped loss: one loss per example row, reduced over the batch as ``loss_reduction`` says."""
from __future__ import annotations

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
        losses = losses.movedim(dim, 0).reshape(rows, -1)
        ignore = getattr(self.loss, "ignore_index", None)
        if ignore is not None and not target.is_floating_point() and target.numel() == losses.numel():
            valid = (target.movedim(dim, 0).reshape(rows, -1) != ignore).to(losses.dtype)
            return (losses * valid).sum(1) / valid.sum(1).clamp(min=1)
        return losses.mean(1)

    def forward(self, input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        losses = self.per_example(input, target, *args, **kwargs)
        self.rows = losses.shape[0]
        if self.loss_reduction == "sum":
            return losses.sum()
        return losses.sum() / max(losses.shape[0], 1)  # an empty Poisson batch gives 0, not nan

    def extra_repr(self) -> str:
        return f"loss_reduction={self.loss_reduction!r}"

