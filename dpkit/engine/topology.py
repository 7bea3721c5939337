"""Where the model lives: one process, replicas (DDP, or ranks without a wrapper), or FSDP2 shards.

The controller asks its topology instead of branching on the world size: the noise seed, the checks at make
and at each release, the parameters to walk, and the ranks' part of a checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dpkit import distributed
from dpkit.errors import PrivacyUsageError, UnsupportedModuleError


class Single:
    """One process: nothing to agree on."""

    world_size, rank, sharded = 1, 0, False
    ddp: nn.Module | None = None

    def noise_seed(self, seed: int | None, secure_mode: bool) -> int | None:
        return seed

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return list(module.parameters())

    def check_at_make(self, settings: dict[str, Any], params: list[nn.Parameter]) -> None:
        """Every rank must start from the same weights and settings, or the replicas and the ledgers drift."""

    def check_call(self, arguments: dict[str, Any]) -> None:
        """Before make_private's first collective: every rank called it alike, or their collectives would pair
        up wrongly and the first one to notice would blame something else (the seeds)."""

    def check_wrapping(self, module: nn.Module) -> None:
        """Once, before the first release: the model was not wrapped for another topology behind dpkit's back."""

    def check_in_step(self, steps: int, position: int, planned: int) -> None:
        """At each release: every rank releases the same step of the same batch, for the same trainable set
        (``planned``: a digest of the planned parameters' names)."""

    def sync_gradients(self, on: bool) -> None:
        """DDP all-reduces raw gradients unless told not to; dpkit all-reduces the clipped sums itself."""

    def ranks_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def own_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state


class Replicated(Single):
    """Ranks that each hold the whole model (DDP, or replicas without a wrapper): one noise draw over them all."""

    def __init__(self, module: nn.Module):
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.ddp = distributed.ddp_of(module)
        self._wrapping_checked = self.ddp is not None

    def noise_seed(self, seed: int | None, secure_mode: bool) -> int | None:
        if secure_mode or self.world_size == 1:
            return seed
        return distributed.rank_seed(distributed.shared_seed(seed), self.rank)  # each rank noises its own slice

    def check_call(self, arguments: dict[str, Any]) -> None:
        if self.world_size > 1:
            _same_everywhere(arguments, self.world_size)

    def check_at_make(self, settings: dict[str, Any], params: list[nn.Parameter]) -> None:
        if self.world_size == 1:  # FSDP2 over one process
            return
        _same_everywhere(settings, self.world_size)
        distributed.check_same(  # sharded (FSDP2) parameters have no replicas to compare
            distributed.fingerprint([p for p in params if not distributed.is_sharded(p)]),
            "the trainable parameters",
            "Start every rank from the same weights: seed the initialisation identically, or wrap the model in "
            "DistributedDataParallel (it broadcasts rank 0's weights) and pass the wrapper to make_private.")

    def check_wrapping(self, module: nn.Module) -> None:
        if self._wrapping_checked:  # once: the scan of the garbage collector's referrers is O(heap)
            return
        self._wrapping_checked = True
        if distributed.wrapped_after(module):
            raise PrivacyUsageError(
                "the model was wrapped in DistributedDataParallel after make_private saw it bare; DDP would "
                "expect gradients dpkit keeps to itself. Wrap first and pass the wrapper: "
                "make_private(module=DistributedDataParallel(model), ...).")

    def check_in_step(self, steps: int, position: int, planned: int) -> None:
        if self.world_size == 1:
            return
        distributed.check_same(
            torch.tensor([steps, position, planned]),
            "the step count, the data loader's position or the trainable parameters",
            "A rank skipped a step or a batch (for example after a refused step, zero_grad() and go on on one "
            "rank only), so the ranks' batches would no longer form one sample, or a rank changed requires_grad "
            "on its own, so the ranks would sum different parameters; nothing was released. Every rank must call "
            "optimizer.step() once per batch, drop a batch on every rank or on none, and freeze alike.")

    def sync_gradients(self, on: bool) -> None:
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = on

    def ranks_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Every rank's noise state (each rank noises its own coordinates) and a check that the ranks agree on
        the rest. A collective: call ``state_dict()`` on every rank, save it from one."""
        if self.world_size == 1:
            return {}
        noises: list[Any] = [None] * self.world_size
        dist.all_gather_object(noises, state["noise"])
        shared = {k: v for k, v in state.items() if k not in ("noise", "optimizer")}
        distributed.check_same(torch.tensor([distributed.digest(shared)]), "the ranks' privacy states",
                               "The ranks fell out of step (a rank skipped a step or sampled on its own).")
        return {"world_size": self.world_size, "noise": noises}

    def own_state(self, state: dict[str, Any]) -> dict[str, Any]:
        if self.world_size == 1:
            return state
        return {**state, "noise": state["noise"][self.rank]}


class Sharded(Replicated):
    """FSDP2 (``fully_shard``): each rank holds a dim-0 shard of each parameter, and noises its shard."""

    sharded = True

    def __init__(self, module: nn.Module, mode: str):
        super().__init__(module)
        odd = [n for n, p in module.named_parameters() if distributed.is_sharded(p) and (
            p.device_mesh.ndim != 1 or p.device_mesh.size() != self.world_size
            or [type(x).__name__ for x in p.placements] != ["Shard"] or p.placements[0].dim != 0)]
        if odd:
            raise UnsupportedModuleError(
                f"{odd[:5]} are DTensors sharded otherwise than along dim 0 over all ranks (FSDP2's "
                "fully_shard layout): HSDP, tensor parallelism and 2-D meshes are not supported yet, since dpkit's "
                "reduce-scatter and noise split assume that layout. Use fully_shard over one mesh dimension.")
        self.mode = mode
        if mode in ("functorch", "ew"):
            self.refuse_recomputed(["every layer"])

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        distributed.reshard(module)  # FSDP2 leaves gathered parameters in place after a forward without backward
        return list(module.parameters())

    def check_plan(self, plan) -> None:
        """No unit of the plan may be recomputed from its parameters (auto's torch.func fallback)."""
        recomputed = [f"{row.name} ({row.type_name})" for row in plan if row.mode in ("functorch", "ew")]
        if recomputed:
            self.refuse_recomputed(recomputed)

    def refuse_recomputed(self, units: list[str]) -> None:
        raise UnsupportedModuleError(
            f"the model's parameters are sharded by FSDP2 (fully_shard), and {units[:5]} would be recomputed from "
            f"its parameters (grad_sample_mode={self.mode!r}), which FSDP2 has freed by then. Use "
            "grad_sample_mode='bk', 'ghost', 'hooks' or 'auto' with layers that have samplers, or register a "
            "sampler for these layers.")


def of(module: nn.Module, mode: str) -> Single:
    """The topology ``module`` runs in now."""
    if any(distributed.is_sharded(p) for p in module.parameters()):
        return Sharded(module, mode)
    return Replicated(module) if distributed.world_size() > 1 else Single()


def _same_everywhere(settings: dict[str, Any], world_size: int) -> None:
    """Refuse settings that differ between ranks, naming each that does and every rank's value."""
    try:
        distributed.check_same(torch.tensor([distributed.digest(settings)]), "make_private's arguments", "")
    except PrivacyUsageError:
        every: list[Any] = [None] * world_size
        dist.all_gather_object(every, settings)
        differ = sorted({k for theirs in every for k in settings if theirs.get(k) != settings[k]})
        values = ", ".join(f"{k}: " + " / ".join(f"rank {r} {theirs.get(k)!r}" for r, theirs in enumerate(every))
                           for k in differ)
        raise PrivacyUsageError(
            f"make_private's arguments differ between ranks ({values}). Call make_private with the same "
            "arguments (and the same data loader size) on every rank.") from None
