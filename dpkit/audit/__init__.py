"""Privacy auditing: an empirical lower bound on epsilon from what one training run released.

An accountant's epsilon is an upper bound, proven for the mechanism as specified; an audit measures a lower bound
from what the implementation released. A bound above the accountant's epsilon proves a bug; a bound below it
proves nothing about privacy (docs/auditing.md).

- :mod:`dpkit.audit.bounds`: the statistics only, from canary scores and inclusion bits to lower bounds;
- :mod:`dpkit.audit.scoring` and :mod:`dpkit.audit.canary`: :class:`CanaryAudit`, gradient canaries in a DP-SGD
  run, typed against a small Protocol of the controller (no training code imported);
- :mod:`dpkit.audit.examples` and :mod:`dpkit.audit.premises`: example canaries, which the run's loader samples
  and its clipper clips, and checks of the accountant's premises (Poisson batches, the noise's scale);
- :mod:`dpkit.audit.estimators`: jax_privacy's estimators from held-in and held-out scores (independent canaries);
- :mod:`dpkit.audit.bundled` and :mod:`dpkit.audit.loops`: the bundled runs behind ``dpkit audit`` (both modes).
"""
from __future__ import annotations

from dpkit.audit.bounds import (
    LowerBound, ScoreAudit, approx_dp_epsilon, approx_dp_refutes, audit_in_out, audit_scores, fdp_epsilon, fdp_mu,
    fdp_refutes, gdp_epsilon, guess_counts, one_run_epsilon, one_run_p_value,
)
from dpkit.audit.bundled import bundled_audit, bundled_clip_audit, run_bundled_audit
from dpkit.audit.canary import AuditReport, CanaryAudit, Trainable
from dpkit.audit.estimators import CanaryScores
from dpkit.audit.examples import CanaryNet, ClipAuditReport, ExampleCanaries
from dpkit.audit.premises import PremiseCheck, noise_scale_check, participation_checks

__all__ = [
    "AuditReport", "CanaryAudit", "CanaryNet", "CanaryScores", "ClipAuditReport", "ExampleCanaries", "LowerBound", "PremiseCheck",
    "ScoreAudit", "Trainable", "approx_dp_epsilon", "approx_dp_refutes", "audit_in_out", "audit_scores",
    "bundled_audit", "bundled_clip_audit", "fdp_epsilon", "fdp_mu", "fdp_refutes", "gdp_epsilon", "guess_counts",
    "noise_scale_check", "one_run_epsilon", "one_run_p_value", "participation_checks", "run_bundled_audit",
]
