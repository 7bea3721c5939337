"""Which sampled batch each backward pass belongs to, and whether the step may release it.

The gate holds invariant 1: **one release per sampled batch**. Every backward pass of a step must come from
the step's logical batch (a batch of the loader, or a batch declared by ``BatchMemoryManager`` or
``private.micro_batches()``); a batch is released at most once; and a mechanism whose analysis rests on
positions (BandMF's cycle, the tree's epochs) releases the loader's next batch, none skipped. Its phase is a
named state instead of flags.
"""
from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

from dpkit.errors import PrivacyUsageError


class Phase(enum.Enum):
    OPEN = "open"  # nothing pending since the last release or zero_grad()
    VIRTUAL = "virtual"  # after a virtual step (a micro-batch that is not its batch's last): zero_grad keeps the sum
    REFUSED = "refused"  # a backward pass of this step was refused: the step is refused until zero_grad()


class StepGate:
    """The logical batch of the step in flight, the declared one, and the last one released."""

    def __init__(self) -> None:
        self.phase = Phase.OPEN
        self.refused: str | None = None  # why, in REFUSED
        self.virtual = False  # set per micro-batch by BatchMemoryManager: the next step() is virtual
        self.declared: object = None  # the logical batch declared in flight (BatchMemoryManager, micro_batches)
        self.step_batch: object = None  # the logical batch the step's first backward pass came from
        self.last_released: object = None

    # -- declared batches --------------------------------------------------------------------------------------
    @contextmanager
    def batch(self, tag: object) -> Iterator[None]:
        """The backward passes inside belong to one logical batch ``tag``."""
        outer, self.declared = self.declared, tag
        try:
            yield
        finally:
            self.declared = outer

    def enter_micro_batch(self, tag: object, last: bool) -> None:
        """``BatchMemoryManager``: the next backward pass is a micro-batch of ``tag``; ``step()`` after it is
        virtual unless it is the batch's ``last``."""
        self.declared, self.virtual = tag, not last

    def leave_micro_batches(self) -> None:
        self.declared, self.virtual = None, False

    # -- backward passes ---------------------------------------------------------------------------------------
    def admit(self, read: set, first: bool, drawn: object) -> object:
        """The logical batch of a backward pass, if it may join the step. ``read``: the loader batches its forwards
        read; ``first``: whether it is the step's first pass; ``drawn``: the loader's last batch handed out."""
        # The loader's word for the tensors the forwards read, else the declared batch, else the loader's last
        # batch handed out. A declaration never overrides what the loader knows.
        if len(read) > 1:
            raise PrivacyUsageError(
                f"one backward pass through forwards of {len(read)} different batches of the data loader: an "
                "example could then be in the step several times, which the recorded sample rate does not count. "
                "Train on one batch per optimizer.step().")
        batch = next(iter(read)) if read else self.declared if self.declared is not None else drawn
        if first:
            self.step_batch = batch
        elif batch is None:
            raise PrivacyUsageError(
                "a second backward pass before optimizer.step(), and dpkit cannot tell whether it comes from the "
                "same batch (data_loader=None, or poisson_sampling='unproven'). Accumulating several sampled batches "
                "into one step is not the mechanism the accountant counts. If these are micro-batches of one "
                "batch, run them inside `with private.micro_batches():`; otherwise call optimizer.step() after "
                "each batch (and raise the batch size for a larger effective batch).")
        elif batch != self.step_batch:
            raise PrivacyUsageError(
                "backward passes from two batches of the data loader before one optimizer.step() (gradient "
                "accumulation across Poisson batches): an example could then be in the step several times, which "
                "the recorded sample rate does not count. Call optimizer.step() after each batch; for a larger "
                "effective batch raise the batch size, and use dpkit.BatchMemoryManager to split each batch into "
                "micro-batches that fit in memory.")
        if self.phase is Phase.VIRTUAL:
            self.phase = Phase.OPEN
        return batch

    def refuse(self, why: str) -> None:
        self.phase, self.refused = Phase.REFUSED, why

    def discard(self) -> bool:
        """``zero_grad()``: whether the step's sums go (not between the micro-batches of one batch)."""
        if self.phase is Phase.VIRTUAL:
            return False
        self.phase, self.refused = Phase.OPEN, None
        return True

    def forget_virtual(self) -> None:
        """A backward pass died half-way: its micro-batches' sums go with it."""
        if self.phase is Phase.VIRTUAL:
            self.phase = Phase.OPEN

    # -- the release -------------------------------------------------------------------------------------------
    def check_release(self) -> None:
        if self.phase is Phase.REFUSED:
            raise PrivacyUsageError(f"a backward pass of this step was refused ({self.refused}); nothing was "
                                    "released. Call optimizer.zero_grad() to drop the batch, then continue.")

    def check_once(self, steps: int, position: int | None, positional: str | None) -> None:
        """One release per sampled batch; where ``positional`` says why, the loader's next batch and no other."""
        batch, last = self.step_batch, self.last_released
        known = batch is not None and batch != 0  # 0: the loader has handed out nothing (the data came from elsewhere)
        repeated = known and (batch == last or (type(batch) is int and type(last) is int and batch < last))
        if repeated:
            raise PrivacyUsageError(
                "a second optimizer.step() on a batch that was already released (several steps on one sampled "
                "batch, as PPO-style inner loops or a retry do): each step releases the batch again, and the "
                "ledger, which records one sampled step per release, would under-count epsilon. Take one step per "
                "batch: draw a new batch from the data loader for every step.")
        if positional and position != steps + 1:
            raise PrivacyUsageError(
                f"{positional}, so every step must release the loader's next batch: this would be release "
                f"{steps + 1}, and the loader is at batch {position} (a batch skipped or dropped, a second step on "
                "one batch, or a new loader). Take one step per batch, resume from a checkpoint instead of skipping, "
                "and use one loader for the whole run.")

    def released(self) -> None:
        self.last_released, self.step_batch, self.phase = self.step_batch, None, Phase.OPEN

    def enter_virtual(self) -> None:
        self.phase = Phase.VIRTUAL
