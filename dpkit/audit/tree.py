"""Canaries for tree aggregation (``noise="tree"``, ``"tree-honaker"``): on the tree's participation schedule,
scored after whitening by the tree's noise covariance.

The tree restarts every epoch of ``T`` steps, and within one its releases' prefix sums are
``P = Σ_{s≤t} x_s + A·n``: ``n`` the tree's nodes (every dyadic interval of ``[1, T]``, i.i.d. ``N(0, σ²C²)``),
row ``t`` of ``A`` summing the nodes that tile ``[1, t]`` (one per set bit of ``t``), or with Honaker's estimator
their refined values, each ``own·n + children·(r_left + r_right)``. The prefix sums are an invertible map of the
releases (differences give them back), so the likelihood ratio is the same in either, and ``P``'s noise has
covariance ``σ²C²·AAᵀ``.

An example of a :class:`dpkit.data.ShuffledBatchLoader` joins exactly one step of each epoch, at a position the
adversary knows (the order is public in the tree's accounting). So a canary here joins one uniformly random step
of each epoch with one gradient ``±C·e_j`` throughout, and its score is the Gaussian log-likelihood ratio of the
epoch's prefix sums, ``(uᵀK⁻¹P − uᵀK⁻¹u/2)/σ²`` in units of ``C`` (``u`` its signed prefix signal, ``1`` from
its step on, ``K = AAᵀ``), summed over epochs: the optimal test. Its power ``uᵀK⁻¹u`` is at most the number of
nodes that hold the leaf, at most ``L = ⌊log2 T⌋ + 1``, what the tree's ledger charges per epoch (exactly ``L``
at leaf 1 without Honaker).
"""
from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from dpkit.audit.correlated import CHUNK, WhitenedTape, is_tree
from dpkit.errors import PrivacyUsageError

__all__ = ["TreeSchedule", "TreeTape", "prefix_matrix", "tree_schedule"]


def prefix_matrix(epoch_length: int, honaker: bool = False) -> np.ndarray:
    """``A`` (steps x nodes): the prefix sums' noise ``A·n`` over one epoch, nodes ``(j, i)`` covering leaves
    ``((i−1)·2^j, i·2^j]``; with ``honaker`` a level-``j`` node's refined value is
    ``v_j·n + (v_j/2v_{j−1})·(r_l + r_r)``, ``v_j = 2^j/(2^{j+1}−1)`` (Honaker's inverse-variance weights; the
    module docstring of dpkit.noise.tree)."""
    T = epoch_length
    nodes = [(j, i) for j in range(T.bit_length()) for i in range(1, (T >> j) + 1)]
    refined: dict[tuple[int, int], np.ndarray] = {}
    for column, (j, i) in enumerate(nodes):  # children come first: levels ascend
        value, own = np.zeros(len(nodes)), 1.0
        if honaker and j:
            own = 2**j / (2 ** (j + 1) - 1)
            value = own / (2 * 2 ** (j - 1) / (2**j - 1)) * (refined[(j - 1, 2 * i - 1)] + refined[(j - 1, 2 * i)])
        value[column] += own
        refined[(j, i)] = value
    A = np.zeros((T, len(nodes)))
    for t in range(1, T + 1):
        for j in range(t.bit_length()):
            if t >> j & 1:
                A[t - 1] += refined[(j, t >> j)]
    return A


@attrs.frozen
class TreeSchedule:
    """Each canary's step in each epoch (uniform, public, drawn per epoch from ``seed``) and its sign."""

    epoch_length: int
    honaker: bool
    signs: Tensor  # per canary, ±1: its gradient at its step of every epoch
    seed: int
    _positions: dict[int, Tensor] = attrs.field(factory=dict, eq=False, repr=False)
    rate = 1.0  # every included canary joins its step of every epoch: the sign is fixed, the score exact

    def positions(self, epoch: int) -> Tensor:
        """The step (0-based, within the epoch) each canary joins in ``epoch``."""
        if epoch not in self._positions:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._positions[epoch] = torch.randint(0, self.epoch_length, (self.signs.numel(),), generator=gen)
        return self._positions[epoch]

    def joins(self, step: int, rows: Tensor, generator: torch.Generator) -> Tensor:
        """Which of ``rows`` join ``step``: those whose step of its epoch it is."""
        epoch, leaf = divmod(step, self.epoch_length)
        return self.positions(epoch)[rows] == leaf

    def tape(self, canaries: int) -> TreeTape:
        return TreeTape(canaries, self)


def tree_schedule(mechanism: Any, loader: Any, canaries: int, generator: torch.Generator) -> TreeSchedule:
    """The schedule of a tree run on ``loader``, its :class:`dpkit.data.ShuffledBatchLoader`."""
    if not is_tree(mechanism):
        raise TypeError(f"tree_schedule is for tree aggregation, got {type(mechanism).__name__}")
    sampler = getattr(loader, "batch_sampler", None)
    if not hasattr(sampler, "batch_size") or not hasattr(sampler, "position"):
        raise PrivacyUsageError(
            f"CanaryAudit on {type(mechanism).__name__} needs the run's dpkit.data.ShuffledBatchLoader "
            "(private.data_loader): the canaries follow its epochs, one step each, as the tree's accounting does.")
    signs = torch.randint(0, 2, (canaries,), generator=generator).to(torch.float64) * 2 - 1
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return TreeSchedule(len(sampler), bool(mechanism.honaker), signs, seed)


class TreeTape(WhitenedTape):
    """Every step's released values at the canaries, scored per epoch after whitening by the tree's covariance."""

    families = ("whitened by the tree",)

    def threshold(self) -> float:
        """The sign of an exact log-likelihood ratio."""
        return 0.0

    def scores(self) -> Tensor:
        """(1, m): each canary's log-likelihood ratio of its epochs' prefix sums (module docstring)."""
        steps = self.checked_steps()
        T = self.schedule.epoch_length
        scale = {self._scale[t] for t in steps}
        if len(scale) != 1:
            raise PrivacyUsageError(f"the tree's steps had clip norms and noise stds {sorted(scale)}; its noise and "
                                    "accounting assume one of each, and so does this audit.")
        (C, std), = scale
        A = torch.as_tensor(prefix_matrix(T, self.schedule.honaker))
        chol = torch.linalg.cholesky(A @ A.T)
        total = torch.zeros(self._canaries, dtype=torch.float64)
        for start in range(0, len(steps), T):
            epoch = steps[start:start + T]
            L = chol[: len(epoch), : len(epoch)]  # a partial epoch's prefix sums: the leading block
            mine = self.schedule.positions(start // T)[:, None] == torch.arange(len(epoch))[None, :]
            for first in range(0, self._canaries, CHUNK):
                rows = slice(first, first + CHUNK)
                shown = torch.stack([self._shown[t][rows] for t in epoch], 1).double()
                signs = self.schedule.signs[rows, None]
                u = torch.cumsum(mine[rows] * signs, 1)  # signed prefix signal, in units of C
                p = torch.linalg.solve_triangular(L, torch.cumsum(shown, 1).T, upper=False)
                v = torch.linalg.solve_triangular(L, u.T, upper=False)
                total[rows] += ((p * v).sum(0) - C * (v * v).sum(0) / 2) * C / std**2
        return total[None, :]
