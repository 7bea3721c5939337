"""What a run has spent, in words: every installed accountant's ε side by side."""
from __future__ import annotations

import warnings
from typing import Any

from dpkit import registry

Controller = Any  # a dpkit.engine.PrivateTraining; not imported, which would close an import circle



def warn_past_target(private: Controller) -> None:
    """Once, when a run calibrated for a target ε takes more steps than σ was calibrated for: from then on its ε
    is above the target (the ledger keeps counting it exactly)."""
    target = private.calibrated_for
    if target is None or private.steps != target[2]:  # this release is step steps + 1: the first one past
        return
    warnings.warn(f"this run's noise was calibrated for epsilon {target[0]:g} (delta {target[1]:g}) over "
                  f"{target[2]} steps, and it now takes step {target[2] + 1}: epsilon from here on exceeds the target "
                  "(private.epsilon(delta) reports it exactly). Stop at the calibrated steps, or calibrate for more.",
                  stacklevel=4)


def privacy_report(private: Controller, delta: float) -> str:
    """ε at ``delta`` from every installed accountant, side by side (approximations labelled)."""
    lines = [f"privacy after {private.steps} steps (sample rate {private.sample_rate:.4g}, noise multiplier "
             f"{private.noise_multiplier:g}, delta {delta:g}):"]
    for name in sorted(registry.table("dpkit_accountants")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                eps = f"{private.epsilon(delta, accountant=name):.4f}"
            except Exception as err:  # one accountant failing must not hide the others
                eps = f"unavailable ({err})"
        note = "  (approximation: may under-report)" if caught else ""
        mark = "*" if name == private.accountant else " "
        lines.append(f" {mark} {name:<12} epsilon = {eps}{note}")
    return "\n".join(lines)
