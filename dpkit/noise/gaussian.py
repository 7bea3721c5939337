"""The Gaussian mechanism: N(0, (σC)²) on every coordinate of the clipped sum."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dpkit.events import DpEvent, GaussianEvent, PoissonSampledEvent
from dpkit.hookspecs import hookimpl

_CPU_CHUNK = 1 << 16  # floats drawn at a time on the CPU: 256 KiB, reused


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
        """Adds the noise in place (the engine hands over a flat temporary it owns) and returns the tensor.

        Drawn in float32 whatever the sum's dtype. On the CPU the draw goes through a small reused buffer,
        chunk by chunk: a fresh parameter-sized draw would cost more in page faults than the drawing itself.
        """
        if std == 0:
            return clipped_sum
        out = clipped_sum.contiguous().view(-1)  # in place when contiguous, as the engine's buffers are
        gen = self.generator(out.device)
        chunk = _CPU_CHUNK if out.device.type == "cpu" else max(out.numel(), 1)
        buffer = torch.empty(min(chunk, out.numel()), device=out.device, dtype=torch.float32)
        for part in out.split(chunk):
            draw = buffer[: part.numel()]
            if not self.secure_mode:
                part.add_(draw.normal_(0, std, generator=gen))
                continue
            total = torch.zeros_like(draw)
            for _ in range(4):
                total += draw.normal_(generator=gen)
            part.add_(total.mul_(std / 2))
        return out.view(clipped_sum.shape)

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
