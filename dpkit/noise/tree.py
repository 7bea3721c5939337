"""Tree aggregation (DP-FTRL; Kairouz et al., ICML 2021): noise whose prefix sums have O(log T) terms.

**Mechanism.** Within an epoch of ``T`` steps, every dyadic interval of steps inside ``[1, T]`` is a node of a
binary tree with its own independent ``N(0, (σC)²)`` noise per coordinate. DP-FTRL releases the prefix sums
``Σ_{s≤t} g_s + N_t``, ``N_t`` the sum of the nodes that tile ``[1, t]`` (one per set bit of ``t``). For SGD that
is the same as adding ``z_t = N_t − N_{t−1}`` to each step's clipped sum, which is how the engine's per-step
``add`` serves it: if ``t`` ends in ``k`` zero bits, ``z_t`` is the new level-``k`` node ending at ``t`` minus the
``k`` lower nodes that tiled ``[1, t−1]`` beyond it.

**Memory.** Outside secure mode nothing is stored: a node is regenerated from a seed derived from (run seed,
buffer, epoch, level, index) whenever it is needed, so the state is a few integers and a checkpoint resumes
bit-exactly. The price is draws: step ``t`` draws ``1 + k`` nodes, on average 2 per step (DP-SGD: 1), at worst
``⌊log2 T⌋ + 1``. In secure mode nodes come from the OS's CSPRNG and cannot be regenerated, so the live nodes
(those tiling ``[1, t]``) are kept: at most ``⌊log2 T⌋ + 1`` buffers of the parameters' size.

**Privacy (zero-out adjacency).** Neighbouring datasets differ in one example replaced by one that contributes
a zero gradient; the schedule (which batch each example is in) is the same for both and taken as public. The
:class:`dpkit.data.ShuffledBatchLoader` puts each example in at most one step per epoch, and the tree restarts
every epoch. A leaf lies in one node per level, and only nodes inside ``[1, T]`` are ever drawn, so one example
touches at most ``L = ⌊log2 T⌋ + 1`` nodes per epoch, each a Gaussian mechanism of sensitivity ``C`` and noise
``σC``; conditioned on the past releases a node's other inputs are the same under both datasets, so adaptive
composition applies. Every release is a function of the noisy nodes (post-processing). ``E`` epochs are ``E·L``
Gaussian mechanisms of multiplier ``σ``: μ-GDP with ``μ = √(E·L)/σ``, without amplification.

**Ledger.** After ``t`` steps of an epoch the nodes drawn so far end at or before ``t``, and a leaf lies in at most
``bit_length(t)`` of those (leaf 1: ``[1,1], [1,2], [1,4], …``; the level-``j`` node holding a leaf ends at
``2^j`` or later). That count grows by one exactly at leaves ``1, 2, 4, 8, …``, so the ledger records one
``GaussianEvent(σ)`` at those steps of each epoch and ``NoOpEvent`` at the others: after any step it holds exactly
the most nodes any example has touched, a whole epoch ``L``, and a partial last epoch of ``t`` steps
``bit_length(t)``, neither more (charging ``L`` up front over-reported a partial epoch) nor less.

**Honaker's estimator** (``honaker=True``; Honaker 2015, in its streaming form). A node's refined value mixes its
own draw with the sum of its two children's refined values by inverse variance: at level ``j``
``r = v_j·n + (v_j / 2v_{j−1})·(r_left + r_right)``, ``v_j = 2^j/(2^{j+1}−1)`` the refined variance in units of
``σ²C²``, and the prefix sum uses the refined nodes that tile ``[1, t]``: the best linear unbiased estimate of it
from every node released by step ``t``. It is post-processing (same ledger). It keeps the live refined nodes
(at most ``L`` buffers of the parameters' size, in both modes); a checkpoint still holds none, a resumed run
recomputing the nodes it needs from their seeds (up to ``2T`` draws once).

Adding an example instead of zeroing one out would change ``N`` and so the whole schedule; replacing one example
by another is two zero-outs (ε doubles). A node missing from a buffer's noise (a buffer that appears mid-epoch,
or a secure-mode resume, whose nodes were not saved) is drawn afresh: the releases after that point are then
those of a new tree over the rest of the epoch, each example still in one tree per epoch, so the bound holds.

Not done: trees that span epochs, which need a harder analysis.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from dpkit import distributed
from dpkit.errors import PrivacyUsageError
from dpkit.events import DpEvent, GaussianEvent, NoOpEvent
from dpkit.hookspecs import hookimpl
from dpkit.noise.gaussian import GaussianNoise
from dpkit.noise._loaders import refuse_distributed_or_seeded

_CPU_CHUNK = 1 << 16  # coordinates of a node drawn at a time off the GPU


def levels(epoch_length: int) -> int:
    """``L = ⌊log2 T⌋ + 1``: the most nodes inside ``[1, T]`` that contain one leaf (leaf 1: one per level)."""
    if isinstance(epoch_length, bool) or not isinstance(epoch_length, int) or epoch_length < 1:
        raise ValueError(f"the epoch length must be an int >= 1, got {epoch_length!r}")
    return epoch_length.bit_length()


def step_nodes(leaf: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """For leaf ``t`` (1-based), ``z_t``'s nodes as (level, index), node ``(j, i)`` covering leaves
    ``((i−1)·2^j, i·2^j]``: the one added, ending at ``t``, and those subtracted, the lower nodes tiling
    ``[1, t−1]`` (bit ``j`` of ``t−1`` is set for each ``j`` below ``t``'s trailing zeros ``k``)."""
    k = (leaf & -leaf).bit_length() - 1
    return (k, leaf >> k), [(j, (leaf - 1) >> j) for j in range(k)]


def charged_nodes(steps: int, epoch_length: int) -> int:
    """The Gaussians the ledger holds after ``steps`` steps: ``L`` per whole epoch, ``bit_length(t)`` for a last
    epoch of ``t`` steps (the most nodes drawn so far that one leaf lies in)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    epochs, rest = divmod(steps, epoch_length)
    return epochs * levels(epoch_length) + rest.bit_length()


def honaker_weights(level: int) -> tuple[float, float]:
    """(own, children) weights of a level-``j`` node's refined value ``own·n + children·(r_left + r_right)``:
    inverse-variance weights of the draw (variance 1) and the children's sum (variance ``2v_{j−1}``), where
    ``v_j = 2^j/(2^{j+1}−1)`` is a refined node's variance in units of ``σ²C²``. Leaves keep their draw."""
    if level == 0:
        return 1.0, 0.0
    own = 2**level / (2 ** (level + 1) - 1)
    child = 2 ** (level - 1) / (2**level - 1)
    return own, own / (2 * child)


def noise_multiplier_for(*, target_epsilon: float, target_delta: float, steps: int, epoch_length: int,
                         accountant: str = "prv") -> float:
    """The smallest σ whose ε after ``steps`` steps of tree aggregation with epochs of ``epoch_length`` steps is
    at most ``target_epsilon``: the ledger's Gaussians (:func:`charged_nodes`), searched by dpkit's own accountant."""
    from dpkit.accounting import get_noise_multiplier

    gaussians = charged_nodes(steps, epoch_length)
    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=1.0,
                                steps=gaussians, accountant=accountant)


@attrs.frozen
class _Binding:
    """What the checked loader tells the mechanism: the epoch's steps and the loader's sample rate."""

    epoch_length: int
    batch_size: int
    num_samples: int
    sample_rate: float


class TreeAggregation:
    """Tree-aggregation noise; a fresh instance per ``make_private``. Refuses to noise until :func:`check_loader`
    has bound it to a :class:`dpkit.data.ShuffledBatchLoader`, whose epoch length is the tree's.

    Each step must use the loader's next batch: ``add`` refuses a step whose batch is not the one the tree is at
    (a batch skipped, a second step on one batch), since the tree's position is what bounds an example's nodes.
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False, honaker: bool = False):
        if not isinstance(honaker, bool):
            raise TypeError(f"honaker must be True or False, got {honaker!r}")
        if distributed.world_size() > 1:
            raise PrivacyUsageError("noise='tree' does not support torch.distributed yet (world size "
                                    f"{distributed.world_size()}): train on one process, or use noise='gaussian'.")
        self.secure_mode, self.honaker = secure_mode, honaker
        self.seed = None if secure_mode else seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._secure_draws = GaussianNoise(secure_mode=True) if secure_mode else None
        self._stored: dict[str, dict[tuple[int, int], Tensor]] = {}  # live nodes per buffer (secure or Honaker)
        self._stored_epoch = 0
        self._occurrences: dict[str, int] = {}  # buffers of one device, dtype and size seen in this step
        self._std: float | None = None
        self._released = 0
        self._binding: _Binding | None = None
        self._sampler: Any = None

    def check_loader(self, loader: object) -> None:
        check_loader(loader, self)

    def memory_bytes(self) -> int:
        """Bytes of noise held between steps: 0 outside secure mode (nodes are regenerated), else the live nodes."""
        return sum(t.numel() * t.element_size() for nodes in self._stored.values() for t in nodes.values())

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        """Adds ``z_t`` (the new node minus the lower nodes it replaces) in place; see the module docstring."""
        binding = self._checked_step(std)
        out = clipped_sum.contiguous().view(-1)
        base = f"{out.device}|{out.dtype}|{out.numel()}"
        occurrence = self._occurrences[base] = self._occurrences.get(base, -1) + 1
        key = f"{base}|{occurrence}"  # two buffers alike in one step must not share nodes
        epoch, leaf = divmod(self._released, binding.epoch_length)
        if epoch != self._stored_epoch:
            self._stored, self._stored_epoch = {}, epoch
        if self.honaker:
            last = leaf + 1 == binding.epoch_length
            self._add_refined(out, key, epoch, leaf + 1, std, keep=not last)
            if last:  # the epoch's tree is done: its live nodes are never used again
                self._stored.pop(key, None)
            return out.view(clipped_sum.shape)
        added, subtracted = step_nodes(leaf + 1)
        for node in subtracted:
            self._apply(out, key, epoch, node, std, sign=-1, keep=False)
        self._apply(out, key, epoch, added, std, sign=1, keep=leaf + 1 < binding.epoch_length)
        if self.secure_mode and leaf + 1 == binding.epoch_length:
            self._stored.pop(key, None)
        return out.view(clipped_sum.shape)

    def _checked_step(self, std: float) -> _Binding:
        """The binding, once the loader, the noise std and the batch are what the tree's accounting assumes."""
        binding = self._binding
        if binding is None:
            raise PrivacyUsageError(
                "noise='tree' is private only when each example joins at most one step per epoch: build the "
                "loader with dpkit.data.ShuffledBatchLoader(dataset, batch_size) and call "
                "dpkit.noise.tree.check_loader(loader, mechanism) (make_private does) before the first step.")
        if std <= 0:
            raise PrivacyUsageError("noise='tree' needs noise_multiplier > 0: the engine does not count steps "
                                    "without noise, and the tree's position is a step count. Debug with "
                                    "noise='gaussian' instead.")
        if self._std is not None and std != self._std:
            raise PrivacyUsageError(f"the noise std changed from {self._std:g} to {std:g} during a tree-aggregation "
                                    "run; its accounting assumes one noise multiplier and clip norm throughout.")
        handed = self._sampler.position
        if handed != self._released + 1:
            raise PrivacyUsageError(
                f"this step would be step {self._released + 1} of the tree, but the loader has handed out {handed} "
                "batches: every step must use the loader's next batch, one step per batch (a skipped batch, a "
                "second step on one batch, or batches from elsewhere would let an example touch more tree nodes "
                "than the accounting counts).")
        self._std = std
        return binding

    def _add_refined(self, out: Tensor, key: str, epoch: int, leaf: int, std: float, *, keep: bool) -> None:
        """Honaker: ``out += r_new − Σ r_left``, ``r_new`` the refined node ending at ``leaf``, built up its left
        spine from the refined left children (the nodes that tiled ``[1, leaf−1]`` beyond it)."""
        (level, index), lefts = step_nodes(leaf)
        stored = self._stored.setdefault(key, {})
        left = [self._refined(out, stored, key, epoch, node, std) for node in lefts]
        value = self._combined(None, None, out, key, epoch, (0, leaf), std)
        for j in range(1, level + 1):
            value = self._combined(value, left[j - 1], out, key, epoch, (j, leaf >> j), std)  # left kept
        for node in left:
            out.sub_(node)
        out.add_(value)
        if keep:
            stored[(level, index)] = value

    def _refined(self, like: Tensor, stored: dict, key: str, epoch: int, node: tuple[int, int], std: float) -> Tensor:
        """A refined node: kept from its step; else recomputed from its subtree's seeds (a resume, a buffer new
        this epoch), or in secure mode, where nothing can be regenerated, a fresh draw of its variance (pure
        noise: the leaves it covers are in no later step of the epoch, so the data's nodes are unchanged)."""
        value = stored.pop(node, None)
        if value is not None:
            return value
        level, index = node
        if self.secure_mode:
            own, _ = honaker_weights(level)
            return self._secure_draws.add(torch.zeros_like(like), std=std * math.sqrt(own))
        if level == 0:
            return self._combined(None, None, like, key, epoch, node, std)
        return self._combined(self._refined(like, stored, key, epoch, (level - 1, 2 * index - 1), std),
                              self._refined(like, stored, key, epoch, (level - 1, 2 * index), std),
                              like, key, epoch, node, std)

    def _combined(self, into: Tensor | None, other: Tensor | None, like: Tensor, key: str, epoch: int,
                  node: tuple[int, int], std: float) -> Tensor:
        """``own·n + children·(into + other)`` (a leaf: its draw), in ``into``'s memory; the same operations on
        every path (float addition commutes), so a recomputed node equals the streamed one bit for bit."""
        own, children = honaker_weights(node[0])
        if into is None:
            into = torch.zeros_like(like)
        else:
            into.add_(other).mul_(children)
        if self.secure_mode:
            into.add_(self._secure_draws.add(torch.zeros_like(like), std=std), alpha=own)
        else:
            self._draw(into, key, epoch, node, std, own)
        return into

    def _apply(self, out: Tensor, key: str, epoch: int, node: tuple[int, int], std: float, *, sign: int,
               keep: bool) -> None:
        """``out += sign · node``: regenerated from its seed, or (secure mode) the stored node or a fresh one."""
        if self.secure_mode:
            nodes = self._stored.setdefault(key, {})
            value = nodes.pop(node, None)
            if value is None:
                value = self._secure_draws.add(torch.zeros_like(out), std=std)
            out.add_(value, alpha=sign)
            if keep:
                nodes[node] = value
            return
        self._draw(out, key, epoch, node, std, sign)

    def _draw(self, out: Tensor, key: str, epoch: int, node: tuple[int, int], std: float, alpha: float) -> None:
        """``out += alpha · node``, the node regenerated from its seed (run seed, buffer, epoch, node)."""
        seed = distributed.digest((self.seed, "tree", key, epoch, node))
        dtype = torch.promote_types(out.dtype, torch.float32)
        if out.device.type == "cuda":  # Philox keys on all 64 bits of the seed
            gen = torch.Generator(device=out.device).manual_seed(seed)
            draw = torch.empty(out.shape, device=out.device, dtype=dtype).normal_(0, std, generator=gen)
            out.add_(draw, alpha=alpha)
            return
        # torch's CPU generator keeps the low 32 bits of a seed: among the ~10⁵ nodes of a long run two would then
        # draw the same noise (birthday bound n²/2³³), correlated noise the accounting does not allow. PCG64 is
        # seeded with all 63 bits.
        rng = np.random.Generator(np.random.PCG64(seed))
        kind = np.float64 if dtype == torch.float64 else np.float32
        for part in out.split(_CPU_CHUNK):  # the same chunks every time, so a regenerated node is the same draw
            draw = torch.from_numpy(rng.standard_normal(part.numel(), dtype=kind))
            part.add_(draw.to(part.device).mul_(std), alpha=alpha)

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent:
        """One Gaussian at leaves ``1, 2, 4, …`` of each epoch, nothing at the others (module docstring)."""
        binding = self._binding
        if binding is None or sample_rate != binding.sample_rate:
            raise PrivacyUsageError(
                f"the tree was asked for the event of sample rate {sample_rate}, but its checked loader has "
                f"{None if binding is None else binding.sample_rate}: the accounting would not match the sampling.")
        leaf = self._released % binding.epoch_length + 1
        self._released += 1
        self._occurrences = {}
        if leaf & (leaf - 1):  # not a power of two: no leaf lies in more nodes than before
            return NoOpEvent()
        return GaussianEvent(noise_multiplier)

    def calibrate(self, *, target_epsilon: float, target_delta: float, steps: int, accountant: str = "prv") -> float:
        """The smallest noise multiplier whose ε after ``steps`` steps of this tree is at most the target."""
        if self._binding is None:
            raise PrivacyUsageError("calibrate needs the tree's epoch length: call check_loader(loader, mechanism) "
                                    "with its ShuffledBatchLoader first.")
        return noise_multiplier_for(target_epsilon=target_epsilon, target_delta=target_delta, steps=steps,
                                    epoch_length=self._binding.epoch_length, accountant=accountant)

    def state_dict(self) -> dict[str, Any]:
        """The seed, the step count and the loader's order: a resumed run draws the noise and batches an
        uninterrupted one would. Secure mode saves no noise (see load_state_dict), only the order's seed."""
        if self._binding is None:
            raise PrivacyUsageError("state_dict of an unbound tree: call check_loader(loader, mechanism) first.")
        return {"mechanism": "tree", "secure_mode": self.secure_mode, "honaker": self.honaker, "seed": self.seed,
                "released": self._released,
                "std": self._std, "epoch_length": self._binding.epoch_length, "order": self._sampler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes the tree and the loader's order at the step after the last released one (a batch handed out
        but not stepped on is handed out again). A secure-mode checkpoint holds no nodes: the ones still needed
        are drawn afresh, a new tree over the rest of the epoch, which the accounting covers (module docstring)."""
        if self._binding is None:
            raise PrivacyUsageError("load_state_dict of an unbound tree: check the loader first (make_private does).")
        if not isinstance(state, Mapping) or state.get("mechanism") != "tree":
            raise ValueError("noise state is not a state_dict() of TreeAggregation")
        if state.get("secure_mode") != self.secure_mode:
            raise PrivacyUsageError(f"the tree's checkpoint was saved with secure_mode={state.get('secure_mode')}, "
                                    f"this run has secure_mode={self.secure_mode}; resume in the same mode.")
        if state.get("honaker", False) != self.honaker:
            raise PrivacyUsageError(f"the tree's checkpoint was saved with honaker={state.get('honaker', False)}, this "
                                    f"run has honaker={self.honaker}; resume with the same estimator.")
        order, mine = state.get("order"), self._sampler.state_dict()
        if state.get("epoch_length") != self._binding.epoch_length or not isinstance(order, Mapping) or any(
                order.get(k) != mine[k] for k in ("num_samples", "batch_size")):
            raise PrivacyUsageError(
                f"the checkpoint's tree has epochs of {state.get('epoch_length')} steps over "
                f"{order.get('num_samples') if isinstance(order, Mapping) else None} examples in batches of "
                f"{order.get('batch_size') if isinstance(order, Mapping) else None}; this run's loader has "
                f"{self._binding.epoch_length} over {mine['num_samples']} in {mine['batch_size']}. Resume with the "
                "dataset and batch size the checkpoint was made with.")
        released, seed, std = state.get("released"), state.get("seed"), state.get("std")
        if isinstance(released, bool) or not isinstance(released, int) or released < 0:
            raise ValueError(f"noise state: 'released' must be an int >= 0, got {released!r}")
        if not self.secure_mode and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"noise state: 'seed' must be an int, got {seed!r}")
        if std is not None and not (isinstance(std, float) and std > 0):
            raise ValueError(f"noise state: 'std' must be a float > 0 or None, got {std!r}")
        self._sampler.load_state_dict({**order, "position": released})
        self.seed, self._released, self._std = seed, released, std
        self._stored, self._occurrences = {}, {}


def check_loader(loader: object, mechanism: TreeAggregation) -> None:
    """Raise unless ``loader`` samples as ``mechanism``'s accounting requires, then bind them.

    The loader must be a :class:`dpkit.data.ShuffledBatchLoader` (each example at most once per epoch, a
    data-independent order) on one process, secure if the mechanism is, that has handed out as many batches as
    the mechanism has released steps (a fresh loader for a fresh run); a bound mechanism keeps its epoch length.
    """
    from dpkit.data import ShuffledBatchLoader

    if not isinstance(mechanism, TreeAggregation):
        raise TypeError(f"check_loader checks a TreeAggregation mechanism, got {type(mechanism).__name__}")
    if not isinstance(loader, ShuffledBatchLoader):
        raise PrivacyUsageError(
            f"noise='tree' needs shuffled fixed-size batches, and the data loader is a {type(loader).__name__}: its "
            "privacy analysis (Kairouz et al. 2021, with a tree restarted every epoch) holds only when each example "
            "joins at most one step per epoch in a data-independent order, which Poisson sampling does not "
            "guarantee. Use dpkit.data.ShuffledBatchLoader(dataset, batch_size).")
    refuse_distributed_or_seeded(loader, mechanism, "tree")
    sampler = loader.batch_sampler
    binding = _Binding(len(sampler), sampler.batch_size, sampler.num_samples, sampler.sample_rate)
    if mechanism._binding not in (None, binding):
        raise PrivacyUsageError(
            f"this tree is bound to a loader with epochs of {mechanism._binding.epoch_length} steps (batches of "
            f"{mechanism._binding.batch_size} from {mechanism._binding.num_samples}); the new one has "
            f"{binding.epoch_length} ({binding.batch_size} from {binding.num_samples}).")
    if sampler.position != mechanism._released:
        raise PrivacyUsageError(
            f"the loader has handed out {sampler.position} batches and the tree has released "
            f"{mechanism._released} steps: they would be out of step. Use a fresh ShuffledBatchLoader for a new run.")
    mechanism._binding, mechanism._sampler = binding, sampler
    loader.accounted_for = True


@hookimpl
def dpkit_noise_mechanisms():
    return {"tree": TreeAggregation, "tree-honaker": _honaker}


def _honaker(seed: int | None = None, secure_mode: bool = False) -> TreeAggregation:
    return TreeAggregation(seed=seed, secure_mode=secure_mode, honaker=True)
