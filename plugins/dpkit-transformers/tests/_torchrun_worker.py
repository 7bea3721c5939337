"""Run under torchrun by test_trainer_distributed.py: the README's example at σ = 0 (3 steps) and σ = 1 (1 step,
saved), and 2 steps at σ = 1 straight and resumed from that checkpoint; each rank saves its results."""
from __future__ import annotations

import os
import sys

import torch
from transformers.utils import logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from torchrun_gpt2 import train  # noqa: E402

if __name__ == "__main__":
    logging.set_verbosity_error()
    folder, results = sys.argv[1], {}
    private = os.path.join(folder, "private")  # the privacy states, outside every output_dir
    runs = {0.0: dict(max_steps=3), 1.0: dict(max_steps=1, save_strategy="steps", save_steps=1),
            "straight": dict(max_steps=2),
            "resumed": dict(max_steps=2, resume_from_checkpoint=os.path.join(folder, "1.0", "checkpoint-1"))}
    for key, settings in runs.items():
        sigma = 0.0 if key == 0.0 else 1.0
        run = train(os.path.join(folder, str(key)), noise_multiplier=sigma, state_dir=private, **settings)
        results[key] = {"weights": {n: p.detach().clone() for n, p in run.model.named_parameters()},
                        "steps": run.private.steps, "world_size": run.args.world_size,
                        "epsilon": run.private.epsilon(1e-5) if sigma else None}
    torch.save(results, os.path.join(folder, f"rank-{run.args.process_index}.pt"))
