"""DPTrainer's training batches: Poisson batches cut into micro-batches, one row per sampled example."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, IterableDataset

from dpkit import DPDataLoader, Multiplicity, PrivateTraining
from dpkit.errors import PrivacyUsageError

IGNORE_INDEX = -100  # Hugging Face's label for tokens without a loss (padding, prompts)


class PoissonMicroBatches:
    """Trainer's training "dataloader": each Poisson batch of ``loader`` as ``pieces`` micro-batches.

    The pieces of one batch are yielded inside ``private.micro_batches()``, so dpkit admits their backward passes
    into one step; Trainer draws exactly ``pieces`` of them per optimizer step. A piece left empty (a batch with
    fewer examples than pieces) becomes one all-zero row whose labels are all ``-100``: the model runs on it (many
    Hugging Face models cannot run on zero rows) and its loss, hence its gradient, is exactly zero.
    """

    def __init__(self, loader: DPDataLoader, pieces: int):
        self.loader, self.pieces = loader, pieces
        self.private: PrivateTraining | None = None  # set once make_private ran

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader) * self.pieces

    def __iter__(self) -> Iterator[Any]:
        if self.private is None:
            raise RuntimeError("PoissonMicroBatches needs the PrivateTraining (DPTrainer sets it in create_optimizer)")
        for batch in self.loader:
            with self.private.micro_batches():
                yield from (_padding_row(p) if rows(p) == 0 else p for p in split(batch, self.pieces))


class OneRowPerExample:
    """``collate`` checked to give one row per example it was handed.

    DP-SGD clips each row as one example. A collator that packs several examples into one row (Hugging Face's
    ``DataCollatorWithFlattening``), splits one into several or drops some would clip several examples as one,
    or one example several times: the sensitivity the noise is calibrated to would no longer hold.
    """

    def __init__(self, collate: Callable[[list[Any]], Any], name: str):
        self.collate, self.name = collate, name  # name: the user's collator (Trainer may wrap it)

    def __call__(self, examples: list[Any]) -> Any:
        batch = self.collate(examples)
        got = rows(batch)
        if got != len(examples):
            raise PrivacyUsageError(
                f"the data_collator ({self.name}) turned {len(examples)} sampled examples into "
                f"{got} rows: DP-SGD clips each row as one example, so the rows the model sees must be the examples "
                "the loader sampled. Use a collator that pads each example to its own row (e.g. "
                "DataCollatorWithPadding or default_data_collator), not one that packs or flattens them.")
        return batch


def check_dataset(dataset: Any) -> None:
    """Refuse a training set that Poisson sampling cannot draw from: it needs ``len()`` and indexing."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise PrivacyUsageError(
            f"DPTrainer(train_dataset=...) got a {type(dataset).__name__} without len() and indexing: Poisson "
            "sampling draws each example independently, so it needs a map-style dataset. Materialise it first "
            "(e.g. datasets.Dataset.from_generator, or .take(n) into a list).")
    if isinstance(dataset, Multiplicity):
        raise PrivacyUsageError(
            f"DPTrainer(train_dataset=...) got a dpkit.{type(dataset).__name__}, whose items are K rows of one "
            "example (or user): DPTrainer clips every row as an example of its own, so one would count K times. "
            "Train it with dpkit.make_private(augmentation_multiplicity=K) in a loop of your own.")
    if len(dataset) == 0:
        raise PrivacyUsageError("DPTrainer(train_dataset=...) is empty: there is nothing to sample from")


def split(batch: Any, pieces: int) -> list[Any]:
    """``batch`` (a pytree of tensors with examples along dim 0) cut into ``pieces`` nearly equal parts."""
    leaves, spec = pytree.tree_flatten(batch)
    parts = [t.tensor_split(pieces) if isinstance(t, Tensor) else [t] * pieces for t in leaves]
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(pieces)]


def rows(batch: Any) -> int:
    """The number of rows (dim 0 of the first tensor) of a collated batch."""
    return next((t.shape[0] for t in pytree.tree_leaves(batch) if isinstance(t, Tensor)), 0)


def _padding_row(batch: dict[str, Any]) -> dict[str, Any]:
    """One row shaped like ``batch``'s: zeros, an attention mask of ones, every label ignored."""
    fill = {"labels": IGNORE_INDEX, "attention_mask": 1}
    return {k: torch.full((1, *v.shape[1:]), fill.get(k, 0), dtype=v.dtype) if isinstance(v, Tensor) else v
            for k, v in batch.items()}
