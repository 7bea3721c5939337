"""The end of each backward pass, written once: admit → norms → factors → clipped sum → accumulate → observers.

Three shapes of pass reach it: per-example gradients (``hooks``, ``functorch``, ``ew``), records whose norms and
clipped sums are taken here (``bk``, ``auto``, and ``ghost``'s norm pass), and ghost's reweighted second pass,
whose parameter gradient is the clipped sum itself. ``bk``/``auto`` may also stream: clip each record as its
output gradients arrive (per-layer clipping), its sums straight into the step's buffers.
"""
from __future__ import annotations

from typing import Any, TYPE_CHECKING

import functools
import warnings

import torch
from torch import Tensor, nn

from dpkit import registry
from dpkit.errors import PrivacyUsageError
from dpkit.events import ClipEvent
from dpkit.modes import bk, ghost
from dpkit.optimizer import NonFiniteGradientError

if TYPE_CHECKING:
    from dpkit.criterion import DPLoss
    from dpkit.modes._capture import Capture

Controller = Any  # a dpkit.engine.PrivateTraining; not imported, which would close an import circle


class PassEnd:
    """What the controller does when a backward pass ends (or, streaming, when a record arrives)."""

    def __init__(self, private: Controller):
        self.private = private
        self.streamed: dict[nn.Parameter, Tensor] = {}  # norms of the layers streamed in the pass in flight
        self.streaming: bool | None = None  # whether the pass in flight streams (decided at its first record)
        self.ghost = ghost.GhostPass()

    def end_stream(self) -> None:
        self.streamed, self.streaming = {}, None

    # -- the pieces every pass shares ---------------------------------------------------------------------------
    def _check_criterion_rows(self, rows: int) -> None:
        criterion = self.private.criterion
        crit_rows = criterion.rows if criterion is not None else None
        if crit_rows is None:
            return
        criterion.rows = None  # checked once, against the backward pass it fed
        if crit_rows != rows:
            flattened = rows and crit_rows % rows == 0
            raise PrivacyUsageError(
                f"the loss has {crit_rows} rows but the model's layers saw {rows}; " + (
                    f"it looks flattened ({crit_rows // rows} rows per example, as logits.reshape(-1, V) gives): "
                    "keep one row per example, e.g. criterion(logits.transpose(1, 2), targets) with logits "
                    "[B, T, V] and targets [B, T], so that each example's loss is the mean over its tokens."
                    if flattened else "compute the loss on the same batch the model saw."))

    def _admit(self) -> object:
        """The pass's logical batch, if it may join the step."""
        p = self.private
        drawn = getattr(p.data_loader, "batches_drawn", None)
        return p.gate.admit(p.capturer.last_pass_batches, p.accumulator.backward_passes == 0, drawn)

    def _overflowed(self, per_example: dict[nn.Parameter, Tensor] | None = None, norms: Tensor | None = None
                    ) -> Tensor | None:
        """The examples of the pass whose gradient the GradScaler's scale overflowed (``[B]`` bool), or None.

        They contribute zero to the step: a function of each example alone, bounded by C, so the step stays the
        mechanism the accountant counts, and the scaler, shown no Inf, never skips or backs off on private data.
        ``per_example``: the gradients of the modes that form them outside the capture (functorch, ew);
        ``norms``: ``[P, B]``, whose squares can overflow where the records did not.
        """
        p = self.private
        rows, p.capturer.overflowed = p.capturer.overflowed, None
        if not p.scaler.guarded():
            return None
        found = [rows.view(-1, p.K).any(1)] if rows is not None else []
        found += [~torch.isfinite(g.reshape(g.shape[0], -1)).all(1) for g in (per_example or {}).values()]
        found += [~torch.isfinite(norms).all(0)] if norms is not None else []
        bad = functools.reduce(torch.logical_or, found) if found else None
        count = int(bad.sum()) if bad is not None else 0
        if not count:
            return None
        if not p.overflowed_examples:
            warnings.warn(
                f"{count} example(s) of this batch overflowed fp16 at the GradScaler's scale {p.scaler.scale:g}: "
                "each contributes zero to the step (privately: neither the step nor the scale depends on it). "
                "Use a lower, fixed scale (GradScaler(init_scale=2.0**8, growth_interval=10**9)) so that none "
                "is lost; private.overflowed_examples counts them (docs/mixed-precision.md).", stacklevel=2)
        p.overflowed_examples += count
        return bad

    def _snapshot(self) -> dict[nn.Parameter, Tensor] | None:
        """The step's sums before a pass joins them, where ``dpkit_on_clip`` observers will be shown the pass's."""
        return {q: s.clone() for q, s in self.private.accumulator.current().items()} if _observed() else None

    def _finish(self, before, norms: Tensor, factors: Tensor, per_example: dict[nn.Parameter, Tensor] | None
                ) -> None:
        """The pass has joined the step: show it to the observers, and leave the scaler its placeholder."""
        if before is not None:
            self._notify(norms, factors, per_example, before)
        self.private.scaler.show(self.private.params)

    # -- per-example gradients (hooks, functorch, ew) -----------------------------------------------------------
    def end(self, result, rows: int) -> None:
        """The capture's end-of-pass callback: per-example gradients, or the norm modes' records."""
        p = self.private
        self._check_criterion_rows(rows)
        loss_scale = p.scaler.start_pass()
        if p.norm_mode:
            self.clip_records(result, rows)
            return
        self._admit()
        if loss_scale != 1:
            for q in list(result):  # one at a time, so the scaled gradient is freed before the next is divided
                result[q] = result[q] / loss_scale
        overflowed = self._overflowed(result)
        if overflowed is not None:
            for q, g in result.items():
                result[q] = g.masked_fill(overflowed.view(-1, *[1] * (g.dim() - 1)), 0)
        before = self._snapshot()
        norms, factors, per_example = p.accumulator.add_backward(result, rows)
        for q, g in per_example.items():
            q.grad_sample = g
        self._finish(before, norms, factors, per_example)

    # -- records (bk, auto, ghost's norm pass) ------------------------------------------------------------------
    def stream(self, cap: Capture) -> bool:
        """Clip and sum one record as its output gradients arrive; False leaves it for the end of the pass.

        Admission and the finiteness check still happen at the end of the pass, over the whole norm table: a
        refused pass resets the buffers before anything is released. A pass watched by ``dpkit_on_clip``
        observers is not streamed, since they are shown the pass's sums as a difference of the buffers. ``auto``
        streams only the records it formed on arrival: the others' norms, taken at the start of the backward
        pass, would add to its peak (a convnet's last convolution: 1.10× → 1.29×).
        """
        p = self.private
        if self.streaming is None:
            self.streaming = not _observed()
        if not self.streaming or (p.mode == "auto" and cap.formed is None):
            return False
        own = list(dict.fromkeys(cap.row.params.values()))
        norms, materialised = bk.record_norms([cap], own, cap.rows // p.K, p.K, p.capturer)
        scale = cap.rows if p.loss_reduction == "mean" else 1
        factors = p.clipper.layer_factors(norms * scale, len(p.params))
        self.streamed.update(zip(own, norms))
        p.accumulator.stream(bk.record_sums([cap], own, factors * scale, p.K, materialised, p.capturer))
        return True

    def clip_records(self, records, rows: int) -> None:
        p = self.private
        batch = rows // p.K
        streamed = self.streamed
        self.end_stream()
        if p.mode == "ghost" and not self.ghost.active:
            raise PrivacyUsageError(
                "grad_sample_mode='ghost' reweights per-example losses in a second backward pass, so the loss "
                "must come from private.criterion (make_private(criterion=...)); call loss.backward() on it.")
        self._admit()
        norms, materialised = bk.record_norms(records, p.params, batch, p.K, p.capturer)
        if streamed:  # the rows of the layers already clipped and summed as they arrived
            norms = norms.to(torch.promote_types(norms.dtype, next(iter(streamed.values())).dtype))
            for i, q in enumerate(p.params):
                if q in streamed:
                    norms[i] = streamed[q]
        # The records hold the gradients of the loss as back-propagated: the mean's (times rows gives the
        # sum's) times a GradScaler's scale, divided out here, before any norm is compared with C.
        scale = (rows if p.loss_reduction == "mean" else 1) / p.scaler.scale
        overflowed = self._overflowed(norms=norms)
        if overflowed is not None:  # their records are zero from the overflow on; the factor zeroes the rest
            norms = norms.masked_fill(overflowed, 0)
        clipper_norms, factors = p.accumulator.clip_factors(norms * scale)
        if overflowed is not None:
            factors = factors.masked_fill(overflowed, 0)
        if p.mode == "ghost":
            self.ghost.factors = (clipper_norms, factors)
            return
        sums = bk.record_sums(records, p.params, factors * scale, p.K, materialised, p.capturer)
        before = self._snapshot()
        p.accumulator.add(sums, batch)
        self._finish(before, clipper_norms, factors, None)

    # -- ghost's two passes ------------------------------------------------------------------------------------
    def ghost_backward(self, loss: DPLoss) -> None:
        p = self.private
        try:
            p.capturer.check_loss_and_end_loop_trace(loss.value)
            norms, factors, sums = ghost.backward(p.capturer, p.params, p.K, self.ghost, loss)
        except PrivacyUsageError as err:
            p.on_refusal(err)
            raise
        if p.scaler.scale != 1:  # the reweighted loss was the scaled one
            sums = {q: s / p.scaler.scale for q, s in sums.items()}
            if not all(bool(torch.isfinite(s).all()) for s in sums.values()):
                err = NonFiniteGradientError(
                    "the reweighted backward pass of ghost clipping gave a non-finite clipped sum from a non-finite "
                    "loss, so nothing is released. Look for bad inputs or log(0) in the loss, then call "
                    "optimizer.zero_grad() to drop the batch and go on.")
                p.on_refusal(err)
                raise err
        before = self._snapshot()
        p.accumulator.add(sums, loss.per_row.shape[0] // p.K)
        self._finish(before, norms, factors, None)

    # -- observers ---------------------------------------------------------------------------------------------
    def _notify(self, norms, factors, per_example, before) -> None:
        p = self.private
        names = {q: n for row in p.plan for n, q in row.params.items()}
        sums = {names[q]: s - before.get(q, 0) for q, s in p.accumulator.current().items()}
        grads = clipped = None
        if per_example is not None:
            grads, clipped = {}, {}
            for i, q in enumerate(p.params):
                if q in per_example:
                    f = factors[i] if factors.dim() == 2 else factors
                    grads[names[q]] = per_example[q]
                    clipped[names[q]] = per_example[q] * f.reshape(-1, *[1] * (per_example[q].dim() - 1))
        event = ClipEvent(step=p.steps, norms=norms, factors=factors, max_grad_norm=p.max_grad_norm,
                          clipped_sum=sums, grad_samples=grads, clipped_grad_samples=clipped)
        registry.plugin_manager().hook.dpkit_on_clip(event=event)


def _observed() -> bool:
    return bool(registry.plugin_manager().hook.dpkit_on_clip.get_hookimpls())
