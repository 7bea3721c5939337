"""Built-in clippers: each turns per-example norms into clip factors."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from dpkit.events import DpEvent, NoOpEvent


class ClipperBase:
    """Defaults for the optional parts of the clipper protocol: no state, no privacy spent."""

    per_layer = False  # True: factors() gets [P, B] norms, one row per parameter
    max_grad_norm: float

    def sensitivity(self) -> float:
        return self.max_grad_norm

    def dp_event(self, sample_rate: float) -> DpEvent:
        return NoOpEvent()

    def observe(self, norms: Tensor) -> None:
        """Sees each backward pass's per-example norms (adaptive clippers learn from them)."""

    def end_step(self, noise: Any, expected_batch_size: float | None = None) -> None:
        """Called once per optimizer step, after noise (adaptive clippers update here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check_norm(value: float, name: str = "max_grad_norm") -> float:
    """A clipping bound must be a finite positive number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value
