"""DPTrainer on several processes: ``torchrun --nproc-per-node 2 torchrun_gpt2.py`` (CPU, gloo; GPUs: nccl).

A tiny GPT-2 built from a config learns sequences that count up. Every process runs this same script: Trainer
joins the process group, and DPTrainer draws one Poisson sample over all processes (each keeps its share),
adds the noise once to the summed clipped gradients, and reports the same ε everywhere.
"""
from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging

from dpkit_transformers import DPTrainer, PrivacyArguments

VOCAB, T = 50, 8


class Counting(torch.utils.data.Dataset):
    """Sequences ``s, s+1, s+2, ...`` (mod VOCAB): each token predicts the next."""

    def __init__(self, n: int):
        self.ids = (torch.arange(n)[:, None] * 7 + torch.arange(T)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": self.ids[i]}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)  # the same initial weights in every process (dpkit checks that they agree)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def train(output_dir: str, noise_multiplier: float = 1.0, max_steps: int = 20, batch_size: int = 2,
          accumulation: int = 2, examples: int = 64, state_dir: str | None = None,
          resume_from_checkpoint: str | None = None, **overrides) -> DPTrainer:
    """Train and return the trainer; the expected batch is ``batch_size * accumulation`` per process.

    ``overrides`` go to ``TrainingArguments`` (``save_strategy="steps"``, ...); ``state_dir`` is a private folder
    for the privacy state of each checkpoint.
    """
    settings = dict(output_dir=output_dir, per_device_train_batch_size=batch_size,
                    gradient_accumulation_steps=accumulation, max_steps=max_steps, optim="sgd", learning_rate=0.1,
                    lr_scheduler_type="constant", weight_decay=0.0, logging_steps=max(1, max_steps // 4),
                    save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
                    ddp_timeout=120)  # a finite wait for a lost process
    privacy = PrivacyArguments(max_grad_norm=0.5, noise_multiplier=noise_multiplier, noise_seed=3,
                               state_dir=state_dir)
    trainer = DPTrainer(model=gpt2(), args=TrainingArguments(**{**settings, **overrides}),
                        train_dataset=Counting(examples), privacy=privacy)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="dptrainer-torchrun")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=20)
    options = parser.parse_args()
    logging.set_verbosity_error()
    run = train(options.output_dir, options.noise_multiplier, options.max_steps)
    print(f"rank {run.args.process_index} of {run.args.world_size}: {run.private.steps} steps, "
          f"epsilon {run.private.epsilon(1e-5):.3f} at delta 1e-5")
