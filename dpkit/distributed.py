"""DP-SGD across ``torch.distributed`` ranks: one Poisson sample, one sum, noise once per coordinate.

- **Sampling.** Every rank holds the same sampler seed and draws the same global Poisson mask, then keeps the
  examples of its own shard (index ≡ rank mod world size). The union of the local batches is exactly the
  batch one process would draw, and no example is on two ranks. In secure mode each rank draws its own
  shard's mask from the OS's CSPRNG: still independent inclusion with probability q, at most once.
- **Sum and noise.** Each rank adds Gaussian noise to its own slice of the clipped-sum buffer (a contiguous
  1/W of the coordinates), then one SUM all-reduce adds the ranks' buffers: every coordinate carries exactly
  one noise draw of std σC, and every rank holds the same bits afterwards. The all-reduce is the only
  collective of a step, with the bytes of non-private DDP's gradient all-reduce. Noise streams are
  independent per rank (seeds derived from a shared seed and the rank), and so is secure mode's CSPRNG.
- **FSDP2.** The clipped sums of sharded parameters are reduce-scattered, and each rank noises only its shard.
"""
from __future__ import annotations

import gc
import hashlib
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpkit.errors import PrivacyUsageError


def world_size() -> int:
    """The number of ranks, 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def shared_seed(seed: int | None) -> int:
    """``seed``, or rank 0's fresh seed from the OS, the same on every rank (a collective when distributed).

    Ranks that were given different seeds are refused: they would sample overlapping batches.
    """
    mine = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    if world_size() == 1:
        return mine
    given = torch.tensor([mine if seed is not None else -1], dtype=torch.int64)
    seeds = [torch.zeros_like(given) for _ in range(world_size())]
    dist.all_gather(seeds, given)
    if len({int(s) for s in seeds}) > 1:
        raise PrivacyUsageError(
            f"the ranks were given different seeds {[int(s) for s in seeds]} (-1: none): their Poisson samples "
            "would overlap and the global batch would not be the one the accountant counts. Give every rank the "
            "same seed, or none (rank 0 then chooses one).")
    value = torch.tensor([mine], dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value)


def rank_seed(shared: int, rank: int) -> int:
    """Rank ``rank``'s noise seed: 63 bits derived from the shared seed, whose low 32 bits differ between ranks.

    torch's CPU generator keeps only a seed's low 32 bits, and two ranks on one stream would noise their slices
    alike, so that the noise cancels in the difference of two released coordinates: hashed seeds collide with
    probability ranks²/2³³, these never (below 2³² ranks)."""
    base = digest((shared, "noise"))
    return (base & ~0xFFFFFFFF) | ((base + rank) & 0xFFFFFFFF)


def digest(obj: object) -> int:
    """A 63-bit hash of nested dicts, lists, tensors and scalars: to check that ranks hold the same state, and
    to derive an independent stream's seed (on the CPU, whose generator keeps 32 bits of a seed, only where
    ``n²/2³³`` collisions for ``n`` streams do not matter, or with a generator that takes all 63)."""
    h = hashlib.sha256()

    def feed(x: object) -> None:
        if isinstance(x, Tensor):
            h.update(repr((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(obj)
    return int.from_bytes(h.digest()[:8], "little") >> 1


def my_slice(n: int) -> slice:
    """This rank's contiguous share of ``n`` coordinates (the shares of all ranks cover each once)."""
    w, r = world_size(), rank()
    return slice(n * r // w, n * (r + 1) // w)


def noised_sum(flat: Tensor, noise, std: float) -> Tensor:
    """Noise on this rank's slice of ``flat``, then the SUM over ranks, in place: the global noisy sum."""
    part = flat[my_slice(flat.numel())]
    noisy = noise.add(part, std=std)
    if noisy.data_ptr() != part.data_ptr():
        part.copy_(noisy)
    dist.all_reduce(flat)
    return flat


def fingerprint(tensors: list[Tensor]) -> Tensor:
    """Two float64 moments per tensor: equal across ranks when the tensors are (almost surely) equal."""
    rows = [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]).cpu() for t in tensors]
    return torch.stack(rows).flatten() if rows else torch.zeros(0, dtype=torch.float64)


def check_same(values: Tensor, what: str, fix: str) -> None:
    """Refuse unless ``values`` (a small CPU tensor) is bit-identical on every rank."""
    gathered = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(gathered, values)
    differ = [r for r, v in enumerate(gathered) if not torch.equal(v, gathered[0])]
    if differ:
        raise PrivacyUsageError(f"{what} differ between rank 0 and rank(s) {differ}. {fix}")


def is_sharded(t: Tensor) -> bool:
    """A DTensor parameter (FSDP2's ``fully_shard``): each rank holds only its shard."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reshard(module: nn.Module) -> None:
    """Put FSDP2's sharded parameters back where a forward without a backward (evaluation under no_grad) left the
    gathered ones, so that the model's parameters are the planned ones again; FSDP2 gathers them at the next
    forward."""
    wrapped = [m for m in module.modules() if type(m).__name__.startswith("FSDP")]  # no FSDP import otherwise
    if not wrapped:
        return
    from torch.distributed.fsdp import FSDPModule

    for m in wrapped:
        if isinstance(m, FSDPModule):
            m.reshard()


def reduce_scattered(full: Tensor, p: nn.Parameter) -> Tensor:
    """The sum over ranks of ``full`` (shaped like ``p``), cut to this rank's shard of ``p`` along dim 0.

    FSDP2 shards dim 0 in chunks of ceil(d0 / W) rows (the last ranks' chunks shorter or empty); the sum is
    padded to W equal chunks for one reduce-scatter, the bytes non-private FSDP2 reduce-scatters.
    """
    w = world_size()
    rows = -(-full.shape[0] // w)
    padded = full
    if rows * w != full.shape[0]:
        padded = full.new_zeros(rows * w, *full.shape[1:])
        padded[: full.shape[0]] = full
    out = full.new_empty(rows, *full.shape[1:])
    # reduce_scatter_single where this torch has it (reduce_scatter_tensor warns on every rank, deprecated).
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, padded)
    local = p.to_local()
    return out[: local.shape[0]]


def noised_shards(flat: Tensor, group: list[nn.Parameter], noise, std: float, denominator: float
                  ) -> dict[nn.Parameter, Tensor]:
    """FSDP2: each parameter's clipped sum reduce-scattered, noised on this rank's shard only, as a DTensor."""
    from torch.distributed.tensor import DTensor

    out, start = {}, 0
    for p in group:
        full = flat[start:start + p.numel()].view(p.shape)
        start += p.numel()
        local = reduce_scattered(full, p).contiguous()
        noisy = noise.add(local, std=std)
        if denominator != 1:
            noisy = noisy.div_(denominator)
        out[p] = DTensor.from_local(noisy, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return out


def ddp_of(module: nn.Module) -> nn.Module | None:
    """``module`` itself when it is a ``DistributedDataParallel``."""
    from torch.nn.parallel import DistributedDataParallel

    return module if isinstance(module, DistributedDataParallel) else None


def wrapped_after(module: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` holds ``module`` (built around it after make_private saw it bare).

    DDP keeps it in its ``_modules`` dict, which its instance dict (or the instance itself) refers to.
    """
    from torch.nn.parallel import DistributedDataParallel

    for modules in gc.get_referrers(module):
        if not isinstance(modules, dict):
            continue
        for owner in gc.get_referrers(modules):
            for candidate in gc.get_referrers(owner) if isinstance(owner, dict) else [owner]:
                if isinstance(candidate, DistributedDataParallel) and candidate.module is module:
                    return True
    return False
