"""The engine: ``make_private`` builds a :class:`PrivateTraining` controller from small parts.

``make.py`` (check, sample, calibrate, build) · ``controller.py`` (the hooks, routed to the parts) ·
``guards.py`` (the fail-closed checks, by moment) · ``gate.py`` (one release per sampled batch) ·
``passes.py`` (each backward pass clipped and summed) · ``sampling.py`` · ``topology.py`` (one process,
replicas, shards) · ``checkpoint.py``. docs/design.md draws one step's path through them.
"""
from dpkit.engine.checkpoint import STATE_FORMAT, save
from dpkit.engine.controller import PrivateTraining, step_event
from dpkit.engine.make import detach, make_private, make_private_with_epsilon

__all__ = ["STATE_FORMAT", "PrivateTraining", "detach", "make_private", "make_private_with_epsilon", "save",
           "step_event"]
