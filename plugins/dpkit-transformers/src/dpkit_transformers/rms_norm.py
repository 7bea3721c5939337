"""Per-example gradients and norms for the RMS norms of Llama (``LlamaRMSNorm``) and T5 (``T5LayerNorm``).

Both compute ``y = w ⊙ n(x)`` with ``n(x) = x / sqrt(mean(x²) + eps)`` over the last dimension, so the weight
gradient of one example is ``Σ_t g_t ⊙ n(x_t)`` over its positions and K copies. They differ in where they
cast (Llama normalises in float32 and casts back to the input dtype; T5 takes only the variance in float32),
and the sampler recomputes ``n`` exactly as each ``forward`` does, so that low-precision runs agree too.

Other families' RMS norms are *not* registered, though many look alike: Gemma's scales by ``1 + w``, and
resolution is by exact type precisely so that a look-alike never gets a wrong formula. Register a class
whose ``forward`` is Llama's with ``dpkit.register_grad_sampler(Cls)(rms_norm.grad_sampler)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dpkit.layers import sum_examples, upcast


def _normalized(layer: nn.Module, x: Tensor) -> Tensor:
    if type(layer).__name__ == "T5LayerNorm":
        n = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)
        return n.to(layer.weight.dtype) if layer.weight.dtype in (torch.float16, torch.bfloat16) else n
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon)).to(x.dtype)


def grad_sampler(layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example weight gradients ``[B, hidden]``."""
    if not layer.weight.requires_grad:
        return {}
    return {layer.weight: sum_examples(backprops * _normalized(layer, activations[0]), K, keep=1)}


def norm_sampler(layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
                 ) -> dict[nn.Parameter, Tensor]:
    """Per-example weight-gradient norms ``[B]``: the gradient is only ``[B, hidden]``, so it is formed."""
    if not layer.weight.requires_grad:
        return {}
    g = upcast(backprops) * upcast(_normalized(layer, activations[0]))
    return {layer.weight: sum_examples(g, K, keep=1).norm(dim=1)}
