"""The loops and samplers the bundled clip audit can train with, by name (``dpkit audit --loop/--sampler``).

A loop or a sampler is the user's code around dpkit, which no plugin hook covers: these tables let the audit
train with any of them, and tests plant broken ones here (as broken clippers and noise are planted as plugins).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["LOOPS", "SAMPLERS", "AuditLoop", "batches", "loop", "sampler"]

Sampler = Callable[[Dataset, float, torch.Generator], "tuple[DataLoader, bool]"]


def _no_arguments(loader: DataLoader) -> Mapping[str, Any]:
    return {}


@attrs.frozen
class AuditLoop:
    """``train(private, loader, steps)`` runs ``steps`` releases; ``make_kwargs(loader)``: what it changes in
    ``make_private``'s arguments (e.g. ``loss_reduction``, or ``data_loader=None`` for a loop that samples itself)."""

    train: Callable[[Any, DataLoader, int], None]
    make_kwargs: Callable[[DataLoader], Mapping[str, Any]] = _no_arguments


def batches(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _standard(private: Any, loader: DataLoader, steps: int) -> None:
    """One backward pass and one ``step()`` per batch of the loader dpkit hands back."""
    model, optimizer, data, criterion = private
    for done, (x, y) in enumerate(batches(data)):
        if done == steps:
            return
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def _poisson(dataset: Dataset, sample_rate: float, generator: torch.Generator) -> tuple[DataLoader, bool]:
    """dpkit's Poisson sampling (the data code imported when called: importing the audit imports no training code)."""
    from dpkit.data import DPDataLoader

    return DPDataLoader(dataset, sample_rate, generator=generator), True


LOOPS: dict[str, AuditLoop] = {"standard": AuditLoop(_standard)}
SAMPLERS: dict[str, Sampler] = {"poisson": _poisson}  # (dataset, q, generator) -> (loader, poisson_sampling)


def _lookup(table: Mapping[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown audit {kind} {name!r}; known: {', '.join(sorted(table))} "
                         f"(register one in dpkit.audit.loops.{kind.upper()}S)")
    return table[name]


def loop(name: str) -> AuditLoop:
    """The loop registered as ``name``."""
    return _lookup(LOOPS, "loop", name)


def sampler(name: str) -> Sampler:
    """The sampler registered as ``name``."""
    return _lookup(SAMPLERS, "sampler", name)
