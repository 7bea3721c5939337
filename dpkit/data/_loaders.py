"""Poisson-sampled batches, K augmented copies, users' examples, physical micro-batches, and the samplers
correlated-noise mechanisms require (cyclic Poisson for BandMF, shuffled epochs for the tree); ``dpkit.data``
re-exports them."""
from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              Sampler, SequentialSampler, default_collate)

from dpkit.distributed import check_same, digest, shared_seed, rank as dist_rank, world_size as dist_world_size
from dpkit.modes._trace import loop_trace, remove
from dpkit.errors import PrivacyUsageError


class PoissonBatchSampler(Sampler[list[int]]):
    """Each example joins each batch independently with probability ``sample_rate``.

    Batch sizes vary and may be 0; one epoch is ``round(1/sample_rate)`` batches.
    The generator's state is the sampler's state (``state_dict``), so a resumed run
    draws the same batches. With ``secure_mode=True`` the draws come from the operating
    system's CSPRNG instead: unpredictable from any seed, and no state to save.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False, rank: int = 0,
                 world_size: int = 1):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        if secure_mode and generator is not None:
            raise ValueError("secure_mode=True samples from the OS's CSPRNG; it takes no generator")
        self.secure_mode = secure_mode
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.generator = None if secure_mode else generator if generator is not None else torch.Generator(
        ).manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's examples of each global batch: its shard (index ≡ rank mod world size) of the sample."""
        shard = torch.arange(self.rank, self.num_samples, self.world_size)
        for _ in range(self.steps):
            if self.secure_mode:  # only this shard's draws: the other ranks draw theirs, independently
                from dpkit import secure

                yield shard[secure.uniform(shard.numel()) < self.sample_rate].tolist()
            else:  # the global mask, the same on every rank (a shared generator state), cut to this shard
                mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
                yield shard[mask[shard]].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"secure_mode": True} if self.secure_mode else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("secure_mode", False)) != self.secure_mode:
            raise ValueError(f"the sampler state is from a run with secure_mode={not self.secure_mode}, this run has "
                             f"secure_mode={self.secure_mode}")
        if not self.secure_mode:
            self.generator.set_state(state["generator"])


class Multiplicity(Dataset):
    """K augmented copies of each example (De et al. 2022): item i is K transforms of ``dataset[i]``.

    Pair with :func:`collate_copies` (``DPDataLoader`` does so itself) so that a batch of B
    examples becomes ``B*K`` rows with each example's copies adjacent, the layout
    ``augmentation_multiplicity=K`` expects.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], K: int):
        if not (isinstance(K, int) and K >= 1):
            raise ValueError(f"K must be an int >= 1, got {K!r}")
        self.dataset, self.transform, self.K = dataset, transform, K

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, *rest = self.dataset[i]
        copies = torch.stack([torch.as_tensor(self.transform(x)) for _ in range(self.K)])
        return (copies, *[torch.as_tensor(r).expand(self.K, *torch.as_tensor(r).shape) for r in rest])


class ByUser(Multiplicity):
    """User-level DP: item u is user u's examples as ``max_per_user`` rows, so a user is what an example is.

    Poisson sampling then draws *users* with the loader's rate, the ledger counts users, and the engine clips
    each user's contribution to C exactly as it clips K augmented copies of an example: pass
    ``augmentation_multiplicity=max_per_user``. One mechanism, not two.

    Each item is ``(*fields, weight)``: the user's examples (at most ``max_per_user``, a fixed subset chosen at
    construction when the user has more, independent of the data), padded with copies of its first example
    whose weight is 0. Multiply each row's loss by its weight and average over the rows: the user's
    contribution is then the sum (``contribution="sum"``) or the mean (``"mean"``) of its examples' gradients.
    The engine averages the K rows of an example, which is why the weights are ``k`` and ``k / n_u``.
    """

    def __init__(self, dataset: Dataset, users: Any, max_per_user: int, contribution: str = "mean",
                 seed: int = 0):
        if isinstance(max_per_user, bool) or not isinstance(max_per_user, int) or max_per_user < 1:
            raise ValueError(f"max_per_user must be an int >= 1, got {max_per_user!r}")
        if contribution not in ("sum", "mean"):
            raise ValueError(f"contribution must be 'sum' or 'mean', got {contribution!r}")
        ids, groups = _group_by_user(users, len(dataset))
        self.rows: list[Tensor] = []
        for uid, mine in zip(ids, groups):
            if len(mine) > max_per_user:  # a fixed, data-independent subset, drawn from the seed and this user alone
                gen = torch.Generator().manual_seed(digest(("ByUser", seed, uid)))
                mine = mine[torch.randperm(len(mine), generator=gen)[:max_per_user]].sort().values
            self.rows.append(mine)
        self.dataset, self.K, self.user_ids, self.contribution = dataset, max_per_user, ids, contribution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, u: int):
        mine = self.rows[u]
        n, k = len(mine), self.K
        picked = [self.dataset[int(i)] for i in mine] + [self.dataset[int(mine[0])]] * (k - n)
        weight = torch.zeros(k)
        weight[:n] = k if self.contribution == "sum" else k / n
        fields = [torch.stack([torch.as_tensor(item[f]) for item in picked]) for f in range(len(picked[0]))]
        return (*fields, weight)


def _group_by_user(users: Any, n: int) -> tuple[list, list[Tensor]]:
    """The distinct user ids (ints, floats or strings; not NaN, which equals nothing), sorted, and their examples."""
    users = users.tolist() if isinstance(users, Tensor) else list(users)
    if len(users) != n:
        raise ValueError(f"users must give one user id per example ({n}), got {len(users)}")
    if any(isinstance(u, float) and math.isnan(u) for u in users):
        raise ValueError("users contains NaN ids: give every example a real user id (NaN equals nothing, so each "
                         "NaN would count as a user of its own).")
    groups: dict[Any, list[int]] = {}
    for i, u in enumerate(users):
        groups.setdefault(u, []).append(i)
    try:
        ids = sorted(groups)
    except TypeError as err:
        raise TypeError(f"users mixes id types that cannot be ordered ({err}); give ints or strings, not both") from err
    return ids, [torch.tensor(groups[u], dtype=torch.long) for u in ids]


def collate_copies(collate: Callable = default_collate) -> Callable:
    """A collate function that turns ``[B, K, ...]`` leaves into ``[B*K, ...]`` rows."""
    if getattr(collate, "flattens_copies", False):
        return collate

    def collate_fn(batch):
        return pytree.tree_map(lambda t: t.flatten(0, 1) if isinstance(t, torch.Tensor) else t, collate(batch))

    collate_fn.flattens_copies = True
    return collate_fn


class _EmptySafeCollate:
    """Collates an empty batch into correctly shaped empty tensors (one example collated, then sliced)."""

    def __init__(self, dataset: Dataset, collate: Callable):
        self.dataset, self.collate = dataset, collate

    def __call__(self, batch):
        if len(batch) == 0:
            one = self.collate([self.dataset[0]])
            return pytree.tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, one)
        return self.collate(batch)


class DPDataLoader(DataLoader):
    """A DataLoader over the same dataset with Poisson-sampled batches of expected size ``q·N``.

    ``batches_drawn`` counts the batches handed out (in the main process, so prefetching workers do not move
    it), and ``batch_of`` knows which batch a tensor was handed out in: the engine uses them to tell
    micro-batches of one batch from gradient accumulation across batches.
    """

    def __init__(self, dataset: Dataset, sample_rate: float, *, collate_fn: Callable | None = None,
                 generator: torch.Generator | None = None, steps: int | None = None, secure_mode: bool = False,
                 distributed: bool = False, **kwargs):
        collate = collate_fn or default_collate
        if isinstance(dataset, Multiplicity):
            collate = collate_copies(collate)
        self.sample_rate = sample_rate
        self.secure_mode = secure_mode
        self.batches_drawn = 0
        self._handed: dict[int, tuple[weakref.ref, int]] = {}  # id of a batch's tensor -> (it, its batch number)
        self.world_size, rank = (dist_world_size(), dist_rank()) if distributed else (1, 0)
        if distributed and not secure_mode:
            generator = _shared_generator(generator)
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps=steps, generator=generator,
                                      secure_mode=secure_mode, rank=rank, world_size=self.world_size)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(dataset, collate), **kwargs)

    weight_column = False  # whether each batch's last field weights its rows (0: padding), as ByUser's does

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.batches_drawn += 1
            self._handed = {k: v for k, v in self._handed.items() if v[0]() is not None}
            tensors = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
            for t in tensors:
                self._handed[id(t)] = (weakref.ref(t), self.batches_drawn)
            # Until the model's forward takes the batch over: mixing its rows in the loop (mixup) is refused there.
            weighted = (self.weight_column or isinstance(self.dataset, ByUser)) and tensors and bool(
                (tensors[-1] == 0).any())  # a batch with padding rows: the loss must be weighted
            trace = loop_trace(tensors, self.dataset.K if isinstance(self.dataset, Multiplicity) else 1, tensors[-1:]
                               if weighted else None)
            yield batch  # closed here (`next(iter(loader))`), the trace stays until the forward or the step takes it
            remove(trace)  # the loop asked for the next batch: this one's trace goes, if no forward took it

    def batch_of(self, tensors: list[torch.Tensor]) -> int | None:
        """The number of the batch the first of ``tensors`` handed out by this loader belongs to, if any."""
        for t in tensors:
            entry = self._handed.get(id(t))
            if entry is not None and entry[0]() is t:
                return entry[1]
        return None

    @classmethod
    def from_data_loader(cls, loader: DataLoader, generator: torch.Generator | None = None,
                         secure_mode: bool = False, distributed: bool = False) -> DPDataLoader:
        """The Poisson twin of ``loader``: same dataset, workers and collate, q = batch_size / N.

        ``distributed=True``: ``batch_size`` is each rank's, so q = batch_size · world size / N.
        """
        world = dist_world_size() if distributed else 1
        n = check_loader(loader, poisson=True, world_size=world)
        batch_size = loader.batch_size * world
        return cls(loader.dataset, min(1.0, batch_size / n), collate_fn=loader.collate_fn, generator=generator,
                   secure_mode=secure_mode, distributed=distributed,
                   num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                   worker_init_fn=loader.worker_init_fn, timeout=loader.timeout,
                   prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
                   persistent_workers=loader.persistent_workers)


class CyclicPoissonBatchSampler(PoissonBatchSampler):
    """Cyclic Poisson sampling (Choquette-Choo et al. 2023): the data split into ``cycle_length`` fixed groups,
    step ``t`` Poisson-samples group ``t mod cycle_length`` at ``group_sample_rate``.

    Any two batches an example can join are ``cycle_length`` steps apart, which BandMF's amplified accounting
    needs. The partition is a random permutation from a saved seed, so it is data-independent and survives a
    resume; the position in the cycle is saved too (also in secure mode, where the draws themselves are not).
    ``sample_rate`` is the expected fraction of the dataset per step, ``group_sample_rate / cycle_length``.
    """

    def __init__(self, num_samples: int, group_sample_rate: float, cycle_length: int, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False):
        if isinstance(cycle_length, bool) or not isinstance(cycle_length, int) or cycle_length < 1:
            raise ValueError(f"cycle_length must be an int >= 1, got {cycle_length!r}")
        if num_samples < cycle_length:
            raise ValueError(f"{num_samples} examples cannot form {cycle_length} groups")
        if not 0 < group_sample_rate <= 1:
            raise ValueError(f"group_sample_rate must be in (0, 1], got {group_sample_rate}")
        super().__init__(num_samples, group_sample_rate / cycle_length, steps=steps, generator=generator,
                         secure_mode=secure_mode)
        self.group_sample_rate, self.cycle_length = group_sample_rate, cycle_length
        self.position = 0  # batches drawn since the start: the next batch samples group position mod cycle_length
        self._partition(int(torch.randint(0, 2**62, (), generator=self.generator).item()) if self.generator
                        else int.from_bytes(os.urandom(8), "little") >> 2)

    def _partition(self, seed: int) -> None:
        self.partition_seed = seed
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed))
        self.groups = [order[g::self.cycle_length].sort().values for g in range(self.cycle_length)]

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            members = self.groups[self.position % self.cycle_length]
            self.position += 1
            if self.secure_mode:
                from dpkit import secure

                yield members[secure.uniform(members.numel()) < self.group_sample_rate].tolist()
            else:
                yield members[torch.rand(members.numel(), generator=self.generator) < self.group_sample_rate].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "position": self.position, "partition_seed": self.partition_seed,
                "cycle_length": self.cycle_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("cycle_length") != self.cycle_length:
            raise ValueError(f"the sampler state has cycle_length {state.get('cycle_length')!r}, this loader "
                             f"{self.cycle_length}")
        super().load_state_dict(state)
        self.position = int(state["position"])
        self._partition(int(state["partition_seed"]))


class CyclicPoissonLoader(DPDataLoader):
    """A :class:`DPDataLoader` with cyclic Poisson batches (:class:`CyclicPoissonBatchSampler`): what
    ``noise="bandmf"`` requires, with ``cycle_length`` at least its bands. Expected batch size
    ``group_sample_rate · N / cycle_length``; one process only.
    """

    def __init__(self, dataset: Dataset, group_sample_rate: float, cycle_length: int, *,
                 collate_fn: Callable | None = None, generator: torch.Generator | None = None,
                 steps: int | None = None, secure_mode: bool = False, **kwargs):
        collate = collate_fn or default_collate
        if isinstance(dataset, Multiplicity):
            collate = collate_copies(collate)
        sampler = CyclicPoissonBatchSampler(len(dataset), group_sample_rate, cycle_length, steps=steps,
                                            generator=generator, secure_mode=secure_mode)
        self.sample_rate, self.group_sample_rate, self.cycle_length = (sampler.sample_rate, group_sample_rate,
                                                                       cycle_length)
        self.secure_mode = secure_mode
        self.batches_drawn = 0
        self._handed: dict[int, tuple[weakref.ref, int]] = {}
        self.world_size = 1
        DataLoader.__init__(self, dataset, batch_sampler=sampler, collate_fn=_EmptySafeCollate(dataset, collate),
                            **kwargs)

    @classmethod
    def from_batch_size(cls, dataset: Dataset, batch_size: float, cycle_length: int, **kwargs) -> CyclicPoissonLoader:
        """Expected batch size ``batch_size``: group rate ``batch_size · cycle_length / N`` (at most 1)."""
        rate = batch_size * cycle_length / len(dataset)
        if rate > 1:
            raise ValueError(f"batch_size={batch_size} is more than a group of {len(dataset) // cycle_length} "
                             "examples holds; lower it or the cycle length.")
        return cls(dataset, rate, cycle_length, **kwargs)


class ShuffledBatchSampler(Sampler[list[int]]):
    """Fixed-size batches, one pass over the data per epoch: what tree aggregation (``noise="tree"``) requires.

    Epoch ``e`` is a permutation of the ``N`` examples (from a seed and ``e``) cut into ``⌊N/B⌋`` batches of
    ``B``; the ``N mod B`` left over sit that epoch out. Each example is in at most one batch per epoch, and the
    schedule does not depend on the data. Its order need not be secret (the tree's accounting lets the adversary
    know it), so the seed is saved with checkpoints also in secure mode, where it comes from the OS's CSPRNG.

    ``position`` counts the batches handed out since the start; the loader advances it as it hands them out, so
    batches that workers prefetched but nobody used do not count. Iterating starts at ``position`` and stops at
    the end of its epoch: a loop that breaks off resumes the same epoch instead of drawing a new permutation,
    which could put an example into one epoch twice.
    """

    def __init__(self, num_samples: int, batch_size: int, generator: torch.Generator | None = None,
                 secure_mode: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= num_samples:
            raise ValueError(f"batch_size must be an int in [1, {num_samples}] (the dataset size), got {batch_size!r}")
        if secure_mode and generator is not None:
            raise ValueError("secure_mode=True draws the order's seed from the OS's CSPRNG; it takes no generator")
        self.num_samples, self.batch_size, self.secure_mode = num_samples, batch_size, secure_mode
        self.sample_rate = batch_size / num_samples
        self.position = 0
        if secure_mode:
            self.seed = int.from_bytes(os.urandom(8), "little") >> 1
        else:
            self.seed = int(torch.randint(0, 2**62, (), generator=generator).item())

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def order(self, epoch: int) -> Tensor:
        """Epoch ``epoch``'s permutation of the examples."""
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            digest((self.seed, "epoch", epoch))))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = divmod(self.position, len(self))  # read now, not when the first batch is asked for
        order, size = self.order(epoch), self.batch_size
        return iter([order[b * size:(b + 1) * size].tolist() for b in range(first, len(self))])

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position, "num_samples": self.num_samples,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the order and the position; refuses a state of another dataset size or batch size."""
        mine = (self.num_samples, self.batch_size)
        theirs = (state.get("num_samples"), state.get("batch_size"))
        if theirs != mine:
            raise ValueError(f"the sampler state is for (num_samples, batch_size) = {theirs}, this loader has {mine}")
        seed, position = state.get("seed"), state.get("position")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (seed, position)):
            raise ValueError(f"the sampler state's seed and position must be ints >= 0, got {seed!r}, {position!r}")
        self.seed, self.position = seed, position


class ShuffledBatchLoader(DPDataLoader):
    """A :class:`DPDataLoader` of fixed-size shuffled batches (:class:`ShuffledBatchSampler`), ``len()`` the
    batches of one epoch: the loader ``noise="tree"`` requires. One process only.

    Its batches are not Poisson samples, so DP-SGD's accounting would under-report ε for them: it hands out
    nothing until a mechanism whose accounting covers them has checked it (``dpkit.noise.tree.check_loader``,
    which ``make_private(noise="tree")`` calls) and set ``accounted_for``. ``sample_rate`` is ``B/N``, so the
    engine's expected batch size is ``B``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, collate_fn: Callable | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False, **kwargs):
        collate = collate_fn or default_collate
        if isinstance(dataset, Multiplicity):
            collate = collate_copies(collate)
        sampler = ShuffledBatchSampler(len(dataset), batch_size, generator=generator, secure_mode=secure_mode)
        self.sample_rate, self.secure_mode = sampler.sample_rate, secure_mode
        self.batches_drawn = 0
        self._handed: dict[int, tuple[weakref.ref, int]] = {}
        self.world_size = 1
        self.accounted_for = False
        DataLoader.__init__(self, dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        if not self.accounted_for:
            raise PrivacyUsageError(
                "ShuffledBatchLoader hands out fixed-size shuffled batches, which DP-SGD's Poisson accounting does "
                "not cover (it would under-report epsilon). Train with make_private(..., noise='tree'), which checks "
                "the loader and accounts for it, or use dpkit.DPDataLoader for noise='gaussian'.")
        for batch in super().__iter__():
            self.batch_sampler.position += 1
            yield batch


def _shared_generator(generator: torch.Generator | None) -> torch.Generator:
    """A generator in the same state on every rank (a collective): rank 0's seed, or the given generator,
    refused unless every rank was given the same state."""
    if generator is None:
        return torch.Generator().manual_seed(shared_seed(None))
    check_same(generator.get_state(), "the DPDataLoader generators' states",
               "Give every rank a generator seeded the same, or none (rank 0 then chooses the seed).")
    return generator


def check_loader(loader: object, poisson: bool, world_size: int = 1, warn: bool = True) -> int:
    """The dataset size of a loader dpkit can sample from, or an error that names what is wrong and the fix.

    Poisson sampling draws from the whole dataset at one rate, so a loader's own choice of examples (a subset,
    weights) would be silently replaced; those are refused, and ``drop_last`` has no meaning there. With
    ``world_size`` > 1 a ``DistributedSampler`` over the same ranks is expected, and replaced.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"data_loader must be a torch.utils.data.DataLoader, got {type(loader).__name__}; wrap the "
                        "data in a Dataset (e.g. TensorDataset) and DataLoader(dataset, batch_size=...).")
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("data_loader's dataset is an IterableDataset: Poisson sampling needs to draw each example "
                        "by index with the same probability. Use a map-style Dataset (with __len__ and __getitem__).")
    try:
        n = len(loader.dataset)
    except TypeError as err:
        raise TypeError("data_loader's dataset has no len(); dpkit needs the dataset size for the sample rate.") from err
    if n == 0:
        raise ValueError("data_loader's dataset is empty: there is nothing to train on.")
    if isinstance(loader, DPDataLoader):
        return n
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(f"data_loader has its own batch sampler ({type(loader.batch_sampler).__name__}), which "
                         "Poisson sampling would replace. Give a DataLoader with batch_size= (the expected batch "
                         "size), or a dpkit.DPDataLoader.")
    if loader.batch_size is None:
        raise ValueError("data_loader has batch_size=None (no batching); give batch_size= the expected batch size.")
    sampler = loader.sampler
    plain = type(sampler) is SequentialSampler or (
        type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n) or (
        world_size > 1 and type(sampler) is DistributedSampler and sampler.num_replicas == world_size)
    if not plain:
        raise ValueError(
            f"data_loader samples with {type(sampler).__name__}, which dpkit would silently replace by Poisson "
            "sampling over the whole dataset (or, without Poisson sampling, which the accountant does not model). "
            "To train on part of the data, pass torch.utils.data.Subset(dataset, indices) with shuffle=True; to "
            "weight examples, weight their losses or resample the dataset beforehand.")
    if loader.drop_last and poisson and warn:
        warnings.warn("drop_last=True has no meaning under Poisson sampling: batch sizes vary and every batch is "
                      "used, including empty ones.", stacklevel=4)
    return n


def split_batch(batch, max_rows: int) -> list:
    """Split a batch (any pytree of tensors with rows along dim 0) into micro-batches of at most ``max_rows``."""
    leaves, spec = pytree.tree_flatten(batch)
    rows = next((t.shape[0] for t in leaves if isinstance(t, torch.Tensor)), 0)
    if rows == 0:
        return [batch]
    out = []
    for start in range(0, rows, max_rows):
        piece = [t[start:start + max_rows] if isinstance(t, torch.Tensor) else t for t in leaves]
        out.append(pytree.tree_unflatten(piece, spec))
    return out
