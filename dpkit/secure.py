"""Randomness from the operating system's CSPRNG (``os.urandom``), for ``secure_mode=True``.

A seeded PRNG (Mersenne Twister, Philox) is predictable from its state or a few outputs, and its state ends up
in checkpoints; these draws have no state to leak and cannot be replayed.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

_BITS = 53  # a float64 mantissa: every value k * 2**-53 in [0, 1) is exact


def uniform(n: int, *, device: torch.device | str | None = None) -> Tensor:
    """``n`` float64 values in [0, 1), each a multiple of 2**-53 drawn uniformly (53 random bits)."""
    if n == 0:
        return torch.empty(0, dtype=torch.float64, device=device)
    words = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64).to(device)
    return (words & ((1 << _BITS) - 1)).to(torch.float64).mul_(2.0 ** -_BITS)


def normal(n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` standard normals by Box-Muller in float64, both outputs of each pair used.

    ``1 - u`` lies in (0, 1], so the logarithm never sees 0; the radius is at most sqrt(106 ln 2) ≈ 8.57.
    """
    pairs = (n + 1) // 2
    u = uniform(2 * pairs, device=device)
    radius = torch.log1p(-u[:pairs]).mul_(-2.0).sqrt_()
    angle = u[pairs:].mul_(2 * math.pi)
    return torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:n].to(dtype)
