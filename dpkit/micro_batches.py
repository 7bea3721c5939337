"""Physical micro-batches of one logical batch: ``BatchMemoryManager``, a helper of the controller.

It lives beside the controller rather than in ``dpkit.data``: it drives the controller (each intermediate
``step()`` is virtual), so it depends on ``engine.py``, and the data helpers depend on neither.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from dpkit.data import split_batch
from dpkit.errors import PrivacyUsageError
from dpkit.modes import _trace

Controller = Any  # a dpkit.engine.PrivateTraining; not imported, which would close an import circle



def _as_many_as_every_rank(batch, pieces: list) -> list:
    """``pieces`` padded with empty ones to the most any rank has: FSDP2 gathers parameters at every forward, a
    collective that every rank must join, and the ranks' local batches differ in size."""
    most = torch.tensor([len(pieces)])
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    empty = pytree.tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, batch)
    return pieces + [empty] * (int(most) - len(pieces))


class BatchMemoryManager:
    """Split each (Poisson) batch into physical micro-batches of at most ``max_physical_batch_size`` examples.

    ``optimizer.step()`` after a micro-batch other than a batch's last is a virtual
    step: the clipped sums accumulate and nothing is updated or counted.
    """

    def __init__(self, private: Controller, max_physical_batch_size: int):
        if not (isinstance(max_physical_batch_size, int) and max_physical_batch_size >= 1):
            raise ValueError(f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}")
        if private.data_loader is None:
            raise ValueError("BatchMemoryManager needs make_private(data_loader=...)")
        self.private, self.max_rows = private, max_physical_batch_size * private.K

    def __enter__(self) -> BatchMemoryManager:
        return self

    def __exit__(self, *exc) -> None:
        self.private.gate.leave_micro_batches()

    def __len__(self) -> int:
        return len(self.private.data_loader)

    def __iter__(self) -> Iterator[Any]:
        if not self.private.attached or not self.private.enabled:
            raise PrivacyUsageError(
                "BatchMemoryManager over a controller that is detached or disabled: the steps would be neither "
                "private nor counted. Call private.enable() (or make_private again after detach()) first.")
        try:
            for index, batch in enumerate(self.private.data_loader):
                loader_trace = _trace.active_loop_trace()
                if loader_trace is not None:  # the pieces get traces of their own: cutting rows is not mixing them
                    _trace.remove(loader_trace)
                pieces = split_batch(batch, self.max_rows)
                if self.private.world_size > 1:
                    pieces = _as_many_as_every_rank(batch, pieces)
                tag = (id(self), index)  # the pieces are one logical batch, whatever the loader
                for i, piece in enumerate(pieces):
                    self.private.gate.enter_micro_batch(tag, last=i == len(pieces) - 1)
                    trace = _trace.loop_trace([t for t in pytree.tree_leaves(piece) if isinstance(t, torch.Tensor)],
                                              group=self.private.K)
                    yield piece
                    _trace.remove(trace)  # if the forward did not take it over
        finally:
            self.private.gate.leave_micro_batches()
