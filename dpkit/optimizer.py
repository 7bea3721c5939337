"""The DP step as a visible pipeline: norms → clip factors → clipped sum → noise → scale.

Each backward pass adds its examples' clipped sum to an accumulator (virtual
steps are several backward passes); ``optimizer.step()`` privatizes the
accumulated sum once. Nothing stands between the clipped sum and the noise but
the cross-rank sum (``all_reduce``) of distributed training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpkit.hookspecs import Clipper, NoiseMechanism


def per_example_norms(grad_samples: dict[nn.Parameter, Tensor], params: Sequence[nn.Parameter], batch: int
                      ) -> Tensor:
    """``[P, B]`` L2 norms (at least float32) of each parameter's per-example gradient (0 where a parameter got none)."""
    first = next(iter(grad_samples.values()), None)
    device = first.device if first is not None else None
    dtype = torch.promote_types(first.dtype, torch.float32) if first is not None else torch.float32
    norms = torch.zeros(len(params), batch, device=device, dtype=dtype)
    for i, p in enumerate(params):
        g = grad_samples.get(p)
        if g is not None:
            norms[i] = g.reshape(batch, -1 if batch else 0).to(dtype).norm(dim=1)
    return norms


def flat_norms(norms: Tensor) -> Tensor:
    """``[P, B]`` per-parameter norms → ``[B]`` whole-model norms."""
    return norms.square().sum(0).sqrt()


def clipped_sum(grad_samples: dict[nn.Parameter, Tensor], params: Sequence[nn.Parameter], factors: Tensor
                ) -> dict[nn.Parameter, Tensor]:
    """Σ_i f_i g_i per parameter; ``factors`` is ``[B]`` or ``[P, B]`` (per-layer clipping)."""
    out = {}
    for i, p in enumerate(params):
        g = grad_samples.get(p)
        if g is None:
            continue
        f = factors[i] if factors.dim() == 2 else factors
        out[p] = torch.tensordot(f.to(g.dtype), g, dims=1)
    return out


def all_reduce(sums: dict[nn.Parameter, Tensor]) -> None:
    """Sum the clipped sums of every rank in place (no-op unless torch.distributed is running)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in sums.values():
            dist.all_reduce(t)


def privatize(sums: dict[nn.Parameter, Tensor], params: Sequence[nn.Parameter], noise: NoiseMechanism,
              std: float, denominator: float = 1) -> dict[nn.Parameter, Tensor]:
    """(clipped sum + noise) / denominator for every parameter; a parameter without examples gets noise alone.

    The sums of each device and dtype are noised as one flat tensor: one draw instead of one per parameter
    (the same distribution, coordinates being independent), and the results are views of it.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        s = sums.get(p)
        groups.setdefault((p.device, s.dtype if s is not None else p.dtype), []).append(p)
    out = {}
    for (device, dtype), group in groups.items():
        flat = torch.cat([(sums[p] if p in sums else torch.zeros_like(p, dtype=dtype)).reshape(-1) for p in group])
        noisy = noise.add(flat, std=std)
        if denominator != 1:
            noisy = noisy.div_(denominator)
        for p, view in zip(group, torch.split(noisy, [p.numel() for p in group])):
            out[p] = view.view(p.shape).to(p.dtype)
    return out


class StepAccumulator:
    """Clipped sums and example counts of the backward passes since the last step."""

    def __init__(self, params: Sequence[nn.Parameter], clipper: Clipper, K: int):
        self.params = list(params)
        self.clipper = clipper
        self.K = K
        self.sums: dict[nn.Parameter, Tensor] = {}
        self.examples = 0
        self.backward_passes = 0

    def clip_factors(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        """``[P, B]`` per-parameter norms → the clipper's norms (``[B]`` flat, or as given) and its factors."""
        clipper_norms = norms if getattr(self.clipper, "per_layer", False) else flat_norms(norms)
        factors = self.clipper.factors(clipper_norms)
        self.clipper.observe(clipper_norms)
        return clipper_norms, factors

    def add(self, sums: dict[nn.Parameter, Tensor], batch: int) -> None:
        """Add one backward pass's clipped sum over ``batch`` examples."""
        for p, s in sums.items():
            self.sums[p] = self.sums[p] + s if p in self.sums else s
        self.examples += batch
        self.backward_passes += 1

    def add_backward(self, grad_samples: dict[nn.Parameter, Tensor], rows: int
                     ) -> tuple[Tensor, Tensor, dict[nn.Parameter, Tensor]]:
        """Clip one backward pass's per-example gradients (K-summed) into the running sum.

        Returns the clipper's norms, the factors and the per-example gradients (K-averaged).
        """
        batch = rows // self.K
        if self.K != 1:
            grad_samples = {p: g / self.K for p, g in grad_samples.items()}
        norms, factors = self.clip_factors(per_example_norms(grad_samples, self.params, batch))
        self.add(clipped_sum(grad_samples, self.params, factors), batch)
        return norms, factors, grad_samples

    def reset(self) -> None:
        self.sums = {}
        self.examples = 0
        self.backward_passes = 0
