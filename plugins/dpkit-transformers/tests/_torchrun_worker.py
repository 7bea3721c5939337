"""Run under torchrun by test_trainer_distributed.py: the README's example at σ = 0 (3 steps) and σ = 1 (1 step),
each rank saving its final weights, step count and ε."""
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
    for sigma, steps in ((0.0, 3), (1.0, 1)):
        run = train(os.path.join(folder, f"sigma-{sigma}"), noise_multiplier=sigma, max_steps=steps)
        results[sigma] = {"weights": {n: p.detach().clone() for n, p in run.model.named_parameters()},
                          "steps": run.private.steps, "world_size": run.args.world_size,
                          "epsilon": run.private.epsilon(1e-5) if sigma else None}
    torch.save(results, os.path.join(folder, f"rank-{run.args.process_index}.pt"))
