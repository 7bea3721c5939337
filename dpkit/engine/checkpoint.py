"""The controller's checkpoint: everything a resumed run needs to report the same ε and draw the same noise.

Loading checks the whole checkpoint first (its format, its digest, that it belongs to this run's
configuration, that its step count matches its ledger), then restores every part or none. Corruption and a
wrong file are the threat the digest answers, not a forger who recomputes it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from dpkit import distributed
from dpkit.data import PoissonBatchSampler
from dpkit.errors import PrivacyUsageError
from dpkit.events import Ledger

Controller = Any  # a dpkit.engine.PrivateTraining; not imported, which would close an import circle


STATE_FORMAT = 4  # 1 had no "config"; 2 no digest, no σ, C or q in "config"; 3 counted skipped overflows
_PARTS = ("format", "config", "ledger", "steps", "unbounded_steps", "noise", "clipper", "optimizer",
          "overflowed_examples", "digest")


def config(private: Controller) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that loads it: its ledger was counted under them."""
    return {"clipping": private.clipping, "noise": private.noise_name, "accountant": private.accountant,
            "secure_mode": private.secure_mode, "noise_multiplier": private.noise_multiplier,
            "max_grad_norm": private.max_grad_norm, "sample_rate": private.sample_rate,
            "augmentation_multiplicity": private.K, "dataset_size": _dataset_size(private.data_loader)}


def _dataset_size(loader) -> int | None:
    """A cyclic or shuffled loader's partition is drawn over the dataset: another size redraws it."""
    try:
        return len(loader.dataset) if loader is not None else None
    except TypeError:
        return None


_DIGESTED = ("format", "config", "ledger", "steps", "unbounded_steps", "noise", "clipper", "overflowed_examples",
             "sampler", "world_size")  # the optimizer's state is the user's to adjust (a learning rate)


def digest(state: dict[str, Any]) -> int:
    """Of dpkit's own parts only: a caller may keep more in the same dict (the model's state)."""
    return distributed.digest({k: state[k] for k in _DIGESTED if k in state})


def state_dict(private: Controller) -> dict[str, Any]:
    """Outside secure mode this holds the noise generator's state: whoever holds the checkpoint can regenerate
    the noise and subtract it from the released model. Keep checkpoints as private as the data."""
    state = {"format": STATE_FORMAT, "config": config(private), "ledger": private.ledger.state_dict(),
             "steps": private.steps, "unbounded_steps": private.unbounded_steps,
             "noise": private.noise.state_dict(), "clipper": private.clipper.state_dict(),
             "optimizer": private.optimizer.state_dict(), "overflowed_examples": private.overflowed_examples}
    sampler = getattr(private.data_loader, "batch_sampler", None)
    if isinstance(sampler, PoissonBatchSampler):
        state["sampler"] = sampler.state_dict()
    state.update(private.topology.ranks_state(state))
    state["digest"] = digest(state)
    return state


def load_state_dict(private: Controller, state: dict[str, Any]) -> None:
    _check_whole(private, state)
    if state.get("world_size", 1) != private.topology.world_size:
        raise PrivacyUsageError(
            f"the checkpoint was made with torch.distributed world size {state.get('world_size', 1)}, this run "
            f"has {private.topology.world_size}: each rank's noise stream belongs to its rank. Resume with the "
            "same number of ranks.")
    state = private.topology.own_state(state)
    theirs, mine = state["config"], config(private)
    differ = {k: (theirs.get(k) if isinstance(theirs, dict) else None, v) for k, v in mine.items()
              if not isinstance(theirs, dict) or theirs.get(k) != v}
    if differ:
        raise PrivacyUsageError(
            "the checkpoint was made with another configuration: " + ", ".join(
                f"{k}={a!r} there, {b!r} here" for k, (a, b) in differ.items())
            + ". Resume with the make_private arguments (and the data loader) the checkpoint was made with.")
    ledger = Ledger()
    try:
        ledger.load_state_dict(state["ledger"])
        steps, unbounded = int(state["steps"]), int(state["unbounded_steps"])
        overflowed = int(state["overflowed_examples"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the checkpoint's ledger or step count is malformed ({err!r}).") from err
    if unbounded < 0 or overflowed < 0 or ledger.steps + unbounded != steps:
        raise PrivacyUsageError(
            f"the checkpoint says {steps} steps, but its ledger records {ledger.steps} (+{unbounded} without "
            "noise): it was altered or assembled from two runs, and its epsilon cannot be trusted.")
    if ("sampler" in state) != isinstance(getattr(private.data_loader, "batch_sampler", None), PoissonBatchSampler):
        raise PrivacyUsageError("the checkpoint's data sampling (Poisson loader or not) differs from this run's.")
    parts = [(private.noise, "noise"), (private.clipper, "clipper"), (private.optimizer, "optimizer")]
    if "sampler" in state:
        parts.append((private.data_loader.batch_sampler, "sampler"))
    saved = [(part, part.state_dict()) for part, _ in parts]
    try:
        for part, key in parts:
            part.load_state_dict(state[key])
    except Exception:
        for part, before in saved:  # all or nothing: a half-loaded run would draw or count wrongly
            part.load_state_dict(before)
        raise
    private.ledger, private.steps, private.unbounded_steps = ledger, steps, unbounded
    private.overflowed_examples = overflowed


def _check_whole(private: Controller, state: dict[str, Any]) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"a dpkit checkpoint is a dict from private.state_dict(), got {type(state).__name__}")
    if isinstance(state.get("format"), int) and state["format"] != STATE_FORMAT:
        raise ValueError(f"this checkpoint has state format {state['format']}; this dpkit reads format "
                         f"{STATE_FORMAT}. Load it with the dpkit version that wrote it.")
    missing = [k for k in _PARTS if k not in state]
    if missing:
        raise ValueError(f"this checkpoint lacks {missing}: it was not made by private.state_dict() of this dpkit "
                         f"version (state format {STATE_FORMAT}), or it was truncated.")
    if state["digest"] != digest(state):
        raise PrivacyUsageError(
            "the checkpoint's content does not match its digest: it was corrupted or edited after it was saved "
            "(a changed ledger or noise state would misreport epsilon or reuse noise). Load an intact copy.")


def save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file: written beside ``path``, flushed to disk, then renamed
    over it in one step, so that a process killed mid-save leaves the previous checkpoint whole."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".dpkit-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # the rename itself durable too
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
