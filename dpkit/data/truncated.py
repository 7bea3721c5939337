"""Fixed-shape batches from Poisson sampling: every batch exactly ``max_batch_size`` rows, so a compiled model
never recompiles for a new batch size and CUDA graphs apply (truncated Poisson sampling, arXiv 2508.15089, as
VaultGemma was trained).

The rows carry the weight column that :class:`dpkit.data.ByUser` introduced: the loop multiplies each row's loss
by it, so a padding row (weight 0) contributes exactly zero. Padding rows are zeros, not copies of examples: a loop
that forgets the weight adds a public, data-independent term, never a second copy of someone's example.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, default_collate

from dpkit.data._loaders import ByUser, DPDataLoader, Multiplicity, PoissonBatchSampler, collate_copies


class TruncatedPoissonBatchSampler(PoissonBatchSampler):
    """A Poisson sample at ``sample_rate``, cut to a uniformly random ``max_batch_size`` of its examples when it
    has more (the sampler yields the kept indices; the loader pads to ``max_batch_size`` rows). The cut draws from
    the same generator as the sample (in secure mode from the OS's CSPRNG), so a resumed run cuts alike.

    ``position`` counts the batches the loader has handed out (saved with the state): the engine checks that every
    step releases the next one, since skipping batches (say, the cut ones) would change the sampling."""

    def __init__(self, num_samples: int, sample_rate: float, max_batch_size: int, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        super().__init__(num_samples, sample_rate, steps=steps, generator=generator, secure_mode=secure_mode)
        self.max_batch_size, self.position = max_batch_size, 0

    def __iter__(self) -> Iterator[list[int]]:
        for sample in super().__iter__():
            if len(sample) <= self.max_batch_size:
                yield sample
                continue
            if self.secure_mode:
                from dpkit import secure

                order = secure.uniform(len(sample)).argsort()
            else:
                order = torch.randperm(len(sample), generator=self.generator)
            yield sorted(sample[i] for i in order[: self.max_batch_size].tolist())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "position": self.position, "max_batch_size": self.max_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the generator and the position; refuses a state of another ``max_batch_size``."""
        if state.get("max_batch_size") != self.max_batch_size:
            raise ValueError(f"the sampler state has max_batch_size {state.get('max_batch_size')!r}, this loader "
                             f"{self.max_batch_size}")
        super().load_state_dict(state)
        self.position = int(state["position"])


def _zeros(leaf: Any) -> Any:
    """A data-independent stand-in for one field of an example: zeros of its shape and type."""
    if isinstance(leaf, torch.Tensor):
        return torch.zeros_like(leaf)
    if isinstance(leaf, (bool, int, float)):
        return type(leaf)(0)
    if isinstance(leaf, str):
        return ""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):  # a numpy array or scalar
        return leaf * 0
    raise TypeError(f"TruncatedPoissonLoader pads with zeros and cannot make a zero {type(leaf).__name__}; give "
                    "examples whose fields are tensors, arrays, numbers or strings.")


class _PadCollate:
    """Pads a batch to ``rows`` examples of zeros and adds the weight field (1 real, 0 padding); a ``ByUser``
    item's own weight field is zeroed instead, so each row has one weight either way."""

    def __init__(self, dataset: Dataset, collate: Callable, rows: int):
        self.dataset, self.collate, self.rows = dataset, collate, rows
        self.own_weight = isinstance(dataset, ByUser)
        self.copies = dataset.K if isinstance(dataset, Multiplicity) else None
        self._pad: Any = None

    def _weighted(self, item: Any, weight: float) -> Any:
        if self.own_weight:
            return item
        w = torch.full((self.copies,), weight) if self.copies is not None else torch.tensor(weight)
        if isinstance(item, (tuple, list)):
            return (*item, w)
        if isinstance(item, torch.Tensor):
            return (item, w)
        raise TypeError(f"TruncatedPoissonLoader adds a weight field to each example and needs examples that are "
                        f"tuples, lists or tensors, got {type(item).__name__}.")

    def __call__(self, batch: list) -> Any:
        if self._pad is None:
            self._pad = pytree.tree_map(_zeros, self.dataset[0])
        items = [self._weighted(item, 1.0) for item in batch]
        items += [self._weighted(self._pad, 0.0)] * (self.rows - len(batch))
        return self.collate(items)


class TruncatedPoissonLoader(DPDataLoader):
    """A :class:`DPDataLoader` whose batches all have ``max_batch_size`` examples: Poisson-sampled at
    ``sample_rate``, cut at random to ``max_batch_size`` when larger, padded with zero rows of weight 0 when
    smaller.

    Each item gains a last field, its weight (for a :class:`ByUser` dataset, its own weight field is used): write
    the loss as ``(weight * per_example_loss).mean()``. The ledger records a ``TruncatedPoissonSampledEvent`` per
    step, which the ``prv`` accountant counts (dp_accounting's truncated subsampled Gaussian, arXiv 2508.15089).
    The divisor of a ``"mean"`` loss is ``expected_batch_size``, the expected number of real examples,
    ``E[min(Binomial(N, q), max_batch_size)]``: a constant, so the noise scale reveals nothing. One process only.
    """

    def __init__(self, dataset: Dataset, sample_rate: float, max_batch_size: int, *,
                 collate_fn: Callable | None = None, generator: torch.Generator | None = None,
                 steps: int | None = None, secure_mode: bool = False, **kwargs):
        from scipy import special

        collate = collate_fn or default_collate
        if isinstance(dataset, Multiplicity):
            collate = collate_copies(collate)
        sampler = TruncatedPoissonBatchSampler(len(dataset), sample_rate, max_batch_size, steps=steps,
                                               generator=generator, secure_mode=secure_mode)
        self.sample_rate, self.max_batch_size, self.secure_mode = sample_rate, max_batch_size, secure_mode
        n = len(dataset)
        # E[min(X, B)] = sum over k < B of P(X > k), X ~ Binomial(N, q); bdtrc(k, N, q) = P(X > k)
        self.expected_batch_size = float(sum(special.bdtrc(k, n, sample_rate) for k in range(max_batch_size)))
        self.batches_drawn = 0
        self._handed: dict = {}
        self.world_size = 1
        super(DPDataLoader, self).__init__(dataset, batch_sampler=sampler,
                                           collate_fn=_PadCollate(dataset, collate, max_batch_size), **kwargs)

    weight_column = True

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.batch_sampler.position += 1  # as handed out: batches that workers prefetched do not count
            yield batch
