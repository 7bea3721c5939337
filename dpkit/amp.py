"""fp16 training with ``torch.amp.GradScaler`` (``make_private(grad_scaler=scaler)``; docs/mixed-precision.md).

The scaler multiplies the loss by its scale S before ``backward()`` and, in ``scaler.step(optimizer)``, divides
``p.grad`` by S and skips ``optimizer.step()`` if it finds an Inf or NaN. dpkit clips per example before any
``p.grad`` exists, so it must divide S out of the records itself, before the norms; and it writes ``p.grad``
only inside ``step()``, so the scaler would see no gradient at all. :class:`ScalerLink` closes both gaps: it
records S where the loss is scaled (exact, whatever the scaler does afterwards), and after each backward pass
leaves the scaler a placeholder gradient of zeros.

An overflow is never the scaler's business: an example whose gradient the scale pushes past fp16's range
contributes zero to the step (a function of that example alone, bounded by C), so the scaler never skips a step
or backs off its scale on private data. Its scale moves only on its growth schedule, a function of the step
count.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from dpkit.criterion import DPLoss
from dpkit.errors import PrivacyUsageError


def calling_scaler(depth: int = 12) -> torch.amp.GradScaler | None:
    """The GradScaler whose ``step``/``unscale_`` is on the call stack (the optimizer step is its call), if any."""
    frame = sys._getframe(1)
    while frame is not None and depth:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.amp.GradScaler):
            return owner
        frame, depth = frame.f_back, depth - 1
    return None


class ScalerLink:
    """The controller's side of one GradScaler: the scale of each backward pass, and what the scaler sees."""

    def __init__(self, scaler: torch.amp.GradScaler, active: Callable[[], bool]):
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self._active = active  # whether the controller is enabled: a disabled one leaves the scaler alone
        self._pending: tuple[float, bool] | None = None  # (S, loss finite) of the last scale() since a pass
        self.scale, self.loss_finite = 1.0, True  # of the backward pass in flight or just ended

    def attach(self) -> None:
        original = type(self.scaler).scale.__get__(self.scaler)
        self.scaler.__dict__["scale"] = lambda outputs: self._scale(original, outputs)

    def detach(self) -> None:
        self.scaler.__dict__.pop("scale", None)

    def _scale(self, original: Callable[[Any], Any], outputs: Any) -> Any:
        """``scaler.scale``: also a dpkit loss (its per-example losses are scaled), and S recorded for the pass."""
        if isinstance(outputs, DPLoss):
            scaled: Any = DPLoss(original(outputs.per_row), outputs.reduction, outputs._backward)
            leaves = [outputs.per_row]
        else:
            scaled = original(outputs)
            leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, Tensor)]
        if self._active():
            finite = all(bool(torch.isfinite(t.detach()).all()) for t in leaves)
            self._pending = (self.scaler.get_scale() if self.scaler.is_enabled() else 1.0, finite)
        return scaled

    def start_pass(self) -> float:
        """At the end of a backward pass: the scale its loss was multiplied by (1 if it was not scaled)."""
        self.scale, self.loss_finite = self._pending if self._pending is not None else (1.0, True)
        self._pending = None
        return self.scale

    def guards_pass(self) -> bool:
        """Whether a non-finite gradient of the backward pass in flight is the loss scale's overflow, not the data's.

        Only a scale above 1 can push a gradient that is finite unscaled past the dtype's range, and only with a
        finite loss: a NaN or Inf loss (log(0), a bad input) is the example's own, and is refused as without
        a scaler. Asked while the pass runs, before :meth:`start_pass`.
        """
        if self._pending is None or not self.scaler.is_enabled():
            return False
        scale, finite = self._pending
        return scale > 1 and finite

    def guarded(self) -> bool:
        """:meth:`guards_pass` of the pass that just ended (after :meth:`start_pass`)."""
        return self.scaler.is_enabled() and self.scale > 1 and self.loss_finite

    def show(self, params: Sequence[nn.Parameter]) -> None:
        """Leave the scaler one placeholder gradient of zeros per device, so that it steps and never backs off.

        The smallest parameter of each device carries it, so it costs next to no memory; ``step()`` writes
        every parameter's private gradient over it. Nothing of the clipped sum is in it.
        """
        if not self.scaler.is_enabled():
            return
        smallest: dict[torch.device, nn.Parameter] = {}
        for p in params:
            if p.device not in smallest or p.numel() < smallest[p.device].numel():
                smallest[p.device] = p
        for p in smallest.values():
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)


def refuse_fused(optimizer: torch.optim.Optimizer) -> None:
    """A fused optimizer divides ``p.grad`` by the scale inside its kernel and skips on its own found-inf flag:
    dpkit's gradient is unscaled already, and the skip would come after dpkit had released it."""
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        raise PrivacyUsageError(
            f"{type(optimizer).__name__} unscales gradients inside its fused kernel (GradScaler hands it "
            "grad_scale and found_inf), which dpkit cannot combine with the gradient it releases. Use the "
            "optimizer without fused=True under a GradScaler.")


def unregistered(found: torch.amp.GradScaler | None, registered: torch.amp.GradScaler | None) -> None:
    """Refuse a step through a GradScaler dpkit does not know: its backward passes were clipped scaled."""
    if found is not None and found is not registered:
        raise PrivacyUsageError(
            "optimizer.step() runs inside a GradScaler that make_private does not know: the per-example gradients "
            "of this step were clipped while still multiplied by the loss scale, so the step is not the one "
            "without a scaler, and nothing is released. Pass it to make_private(grad_scaler=scaler) "
            "(docs/mixed-precision.md).")


class NoScaler:
    """The controller's scaler link when make_private has no ``grad_scaler``: every pass unscaled, nothing shown."""

    scaler = None
    scale = 1.0

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    def start_pass(self) -> float:
        return 1.0

    def guards_pass(self) -> bool:
        return False

    def guarded(self) -> bool:
        return False

    def show(self, params: Sequence[nn.Parameter]) -> None:
        pass


def link(scaler: torch.amp.GradScaler | None, active: Callable[[], bool]) -> ScalerLink | NoScaler:
    """The controller's side of ``grad_scaler`` (or of none)."""
    return NoScaler() if scaler is None else ScalerLink(scaler, active)
