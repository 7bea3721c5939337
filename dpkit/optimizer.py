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
    """``[P, B]`` float32 L2 norms of each parameter's per-example gradient (0 where a parameter got none)."""
    device = next((g.device for g in grad_samples.values()), None)
    norms = torch.zeros(len(params), batch, device=device)
    for i, p in enumerate(params):
        g = grad_samples.get(p)
        if g is not None:
            norms[i] = g.reshape(batch, -1).float().norm(dim=1)
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
              std: float) -> dict[nn.Parameter, Tensor]:
    """The clipped sum of every parameter plus noise; a parameter without examples gets noise alone."""
    return {p: noise.add(sums[p] if p in sums else torch.zeros_like(p), std=std) for p in params}


class StepAccumulator:
    """Clipped sums and example counts of the backward passes since the last step."""

    def __init__(self, params: Sequence[nn.Parameter], clipper: Clipper, K: int):
        self.params = list(params)
        self.clipper = clipper
        self.K = K
        self.sums: dict[nn.Parameter, Tensor] = {}
        self.examples = 0
        self.backward_passes = 0

    def add_backward(self, grad_samples: dict[nn.Parameter, Tensor], rows: int
                     ) -> tuple[Tensor, Tensor, dict[nn.Parameter, Tensor]]:
        """Clip one backward pass's per-example gradients (K-summed) into the running sum.

        Returns the norms, the factors and the per-example gradients (K-averaged).
        """
        batch = rows // self.K
        if self.K != 1:
            grad_samples = {p: g / self.K for p, g in grad_samples.items()}
        norms = per_example_norms(grad_samples, self.params, batch)
        clipper_norms = norms if getattr(self.clipper, "per_layer", False) else flat_norms(norms)
        factors = self.clipper.factors(clipper_norms)
        observe = getattr(self.clipper, "observe", None)
        if observe is not None:
            observe(clipper_norms)
        for p, s in clipped_sum(grad_samples, self.params, factors).items():
            self.sums[p] = self.sums[p] + s if p in self.sums else s
        self.examples += batch
        self.backward_passes += 1
        return clipper_norms, factors, grad_samples

    def reset(self) -> None:
        self.sums = {}
        self.examples = 0
        self.backward_passes = 0
