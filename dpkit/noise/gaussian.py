"""The Gaussian mechanism: N(0, (σC)²) on every coordinate of the clipped sum."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dpkit import secure
from dpkit.errors import PrivacyUsageError
from dpkit.events import DpEvent, GaussianEvent, PoissonSampledEvent
from dpkit.hookspecs import hookimpl
from dpkit.noise import _streams

_SECURE_CHUNK = 1 << 18  # coordinates per os.urandom call in secure mode: 8 MiB of random bytes


class GaussianNoise:
    """Draws a reproducible stream from the seed, so checkpoints can restore it.

    On the CPU each ``add`` draws its chunks of coordinates from independent generators on torch's threads
    (``dpkit/noise/_streams.py``: Philox-keyed from the seed, numbered by chunk and call), the same values at any
    thread count; on an accelerator from one ``torch.Generator`` per device, whose draw is parallel already.

    ``secure_mode=True`` draws from the OS's CSPRNG instead (``dpkit.secure``) and keeps no state, so
    neither a checkpoint nor the seed can replay the noise. Each coordinate is the sum of four standard
    normals times std/2: the same std, with the lattice of floating-point Gaussian samples that attacks on
    naive samplers exploit blurred (Mironov 2012; Jin et al. 2022).
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False):
        self.secure_mode = secure_mode
        if secure_mode:
            self.seed = None
        else:
            self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._generators: dict[torch.device, torch.Generator] = {}
        self._cpu_calls = 0  # CPU draws so far: the next one's streams are numbered by it

    def generator(self, device: torch.device) -> torch.Generator:
        """A seeded ``torch.Generator`` of ``device`` (the noise itself on accelerators, adaptive clipping's count
        noise everywhere); in secure mode a fresh OS-seeded generator that is never kept."""
        if self.secure_mode:
            return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor:
        """Adds the noise in place (the engine hands over a flat temporary it owns) and returns the tensor.

        Drawn at the sum's precision, at least float32: float64 sums get float64 noise, whose values a
        float32 draw would leave on a coarser lattice than the sum's. On the CPU the draw goes through small
        reused buffers, chunk by chunk: a fresh parameter-sized draw would cost more in page faults than the
        drawing itself.
        """
        if std == 0:
            return clipped_sum
        out = clipped_sum.contiguous().view(-1)  # in place when contiguous, as the engine's buffers are
        dtype = torch.promote_types(out.dtype, torch.float32)
        if self.secure_mode:
            for part in out.split(_SECURE_CHUNK):
                draws = secure.normal(4 * part.numel(), device=out.device).view(4, -1)
                part.add_(draws.sum(0).mul_(std / 2).to(dtype))
            return out.view(clipped_sum.shape)
        if out.device.type == "cpu":
            call, self._cpu_calls = self._cpu_calls, self._cpu_calls + 1  # counted before drawing: never reused
            _streams.add(out, std=std, seed=self.seed, call=call, dtype=dtype)
        else:
            out.add_(torch.empty_like(out, dtype=dtype).normal_(0, std, generator=self.generator(out.device)))
        return out.view(clipped_sum.shape)

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent:
        return PoissonSampledEvent(sample_rate, GaussianEvent(noise_multiplier))

    def state_dict(self) -> dict[str, Any]:
        if self.secure_mode:
            return {"secure_mode": True}
        return {"seed": self.seed, "secure_mode": False, "cpu_calls": self._cpu_calls,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the stream; refuses a state of the other mode, which would silently switch modes.

        A state saved before the CPU streams (no ``cpu_calls``) resumes them at call 0: its CPU noise came from the
        seed's ``torch.Generator``, which these streams never repeat."""
        secure_mode = _field(state, "secure_mode", bool)
        if secure_mode != self.secure_mode:
            raise PrivacyUsageError(
                f"the noise state was saved with secure_mode={secure_mode}, but this run has "
                f"secure_mode={self.secure_mode}; loading it would switch secure mode "
                f"{'on' if secure_mode else 'off'} silently. Resume with make_private(..., "
                f"secure_mode={secure_mode}), or start the new mode afresh from the model's weights alone.")
        if self.secure_mode:
            return
        seed = _field(state, "seed", int)
        cpu_calls = _field(state, "cpu_calls", int) if "cpu_calls" in state else 0
        if cpu_calls < 0:
            raise ValueError(f"noise state: 'cpu_calls' must be >= 0, got {cpu_calls}")
        generators = {}
        for name, gen_state in _field(state, "generators", Mapping).items():
            try:
                gen = torch.Generator(device=torch.device(name))
                gen.set_state(gen_state)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"noise state: 'generators' entry {name!r} is not a generator state "
                                 f"of that device ({err})") from err
            generators[gen.device] = gen
        self.seed, self._generators, self._cpu_calls = seed, generators, cpu_calls


def _field(state: Mapping[str, Any], key: str, kind: type) -> Any:
    """``state[key]``, or a ValueError naming the key when it is missing or of the wrong type."""
    if not isinstance(state, Mapping):
        raise ValueError(f"noise state must be a dict, got {type(state).__name__}")
    if key not in state:
        raise ValueError(f"noise state has no {key!r}: not a state_dict() of GaussianNoise")
    value = state[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"noise state: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


@hookimpl
def dpkit_noise_mechanisms():
    return {"gaussian": GaussianNoise}
