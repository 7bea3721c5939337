"""The Gaussian mechanism: N(0, (σC)²) on every coordinate of the clipped sum."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dpkit.events import DpEvent, GaussianEvent, PoissonSampledEvent
from dpkit.hookspecs import hookimpl


class GaussianNoise:
    """Draws from its own ``torch.Generator`` per device, so checkpoints can restore the stream.

    ``secure_mode=True`` reseeds from ``os.urandom`` at every step (not reproducible by
    design) and returns the mean-preserving sum of four draws halved, which keeps the
    std and blurs the lattice of floating-point Gaussian samples that attacks on naive
    samplers exploit (Mironov 2012; Holohan and Braghin 2021).
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False):
        self.secure_mode = secure_mode
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        gen = self._generators[device]
        if self.secure_mode:
            gen.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        return gen

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        if std == 0:
            return clipped_sum
        gen = self.generator(clipped_sum.device)
        draw = torch.randn(clipped_sum.shape, generator=gen, device=clipped_sum.device, dtype=torch.float32)
        if self.secure_mode:
            for _ in range(3):
                draw += torch.randn(draw.shape, generator=gen, device=draw.device)
            draw /= 2
        return clipped_sum + (std * draw).to(clipped_sum.dtype)

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent:
        return PoissonSampledEvent(sample_rate, GaussianEvent(noise_multiplier))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "secure_mode": self.secure_mode,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.secure_mode = state["seed"], state["secure_mode"]
        for device, gen_state in state["generators"].items():
            self.generator(torch.device(device)).set_state(gen_state)


@hookimpl
def dpkit_noise_mechanisms():
    return {"gaussian": GaussianNoise}
