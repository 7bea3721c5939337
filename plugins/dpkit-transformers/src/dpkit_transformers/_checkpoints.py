"""Where DPTrainer keeps dpkit's privacy state, how it writes it, and which checkpoints it resumes from.

The privacy state holds the noise generator's state: whoever has it can regenerate the noise and subtract it from
the released weights. It is written atomically (a checkpoint killed mid-save never holds a truncated one), and it
never goes where Trainer can push it to the Hugging Face Hub.
"""
from __future__ import annotations

import json
import os
from typing import Any


from dpkit.engine import save
from dpkit.errors import PrivacyUsageError

PRIVACY_STATE = "dpkit_privacy.pt"  # in each checkpoint folder, or under PrivacyArguments.state_dir
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last into a checkpoint: its presence means complete


def state_path(checkpoint: str, state_dir: str | None) -> str:
    """The privacy state file of ``checkpoint``: in it, or in ``state_dir/<checkpoint's name>/``."""
    if state_dir is None:
        return os.path.join(checkpoint, PRIVACY_STATE)
    return os.path.join(state_dir, os.path.basename(os.path.normpath(checkpoint)), PRIVACY_STATE)


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that leaves either the old file or the whole new one, never a truncated one
    (dpkit's own ``dpkit.engine.save``), into a folder made if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save(obj, path)


def check_complete(checkpoint: str, state_dir: str | None) -> int:
    """Refuse a checkpoint that a killed save left empty or partial; its step count (Trainer's ``global_step``).

    Trainer writes ``trainer_state.json`` last and ``get_last_checkpoint`` picks a ``checkpoint-N/`` folder even
    when it is empty, so a save killed half way would otherwise be resumed from.
    """
    advice = ("Delete it and resume from an earlier checkpoint (train(resume_from_checkpoint=<its path>)): a save "
              "that was killed half way leaves such a folder, and transformers' get_last_checkpoint still picks it.")
    if not os.path.isdir(checkpoint):
        raise PrivacyUsageError(f"DPTrainer cannot resume from {checkpoint}: it is not a folder.")
    trainer_state = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(trainer_state):
        what = "is empty" if not os.listdir(checkpoint) else f"has no {TRAINER_STATE}, which Trainer writes last"
        raise PrivacyUsageError(f"the checkpoint {checkpoint} {what}: it is incomplete. {advice}")
    path = state_path(checkpoint, state_dir)
    if not os.path.isfile(path):
        raise PrivacyUsageError(f"the checkpoint {checkpoint} holds no dpkit privacy state ({path} is missing): "
                                "resuming from it would restart the privacy count at zero. Resume from a checkpoint "
                                "that DPTrainer saved, with the same PrivacyArguments.state_dir.")
    try:
        with open(trainer_state) as f:
            return int(json.load(f)["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        raise PrivacyUsageError(f"the checkpoint {checkpoint}'s {TRAINER_STATE} cannot be read ({err}): it is "
                                f"damaged. {advice}") from err


def check_outside(state_dir: str | None, output_dir: str, push_to_hub: bool) -> None:
    """Refuse a privacy state that Trainer could push to the Hub, or that lies in the folder it pushes."""
    if state_dir is None:
        if push_to_hub:
            raise PrivacyUsageError(
                "TrainingArguments(push_to_hub=True) with the privacy state in each checkpoint: it holds the noise "
                "generator's state, and whoever holds that can subtract the noise. Give "
                "PrivacyArguments(state_dir=...) a private folder outside output_dir; DPTrainer then keeps it "
                "there and never in a checkpoint.")
        return
    inner, outer = os.path.realpath(state_dir), os.path.realpath(output_dir)
    if os.path.commonpath([inner, outer]) in (inner, outer):
        raise PrivacyUsageError(
            f"PrivacyArguments(state_dir={state_dir!r}) overlaps TrainingArguments(output_dir={output_dir!r}): the "
            "privacy state (the noise generator's state) must stay out of the folder Trainer saves and pushes. "
            "Give a folder outside it.")

