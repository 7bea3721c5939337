"""DPTrainer on a tiny GPT-2 built from a config (no downloads).

One DPTrainer step with gradient accumulation equals the same step written by hand with dpkit (same seeds, same
noise stream); 20 steps with a target ε calibrate the noise to Trainer's step count, log ε and lower the loss;
a checkpoint holds the privacy state and resuming from it reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments, default_data_collator
from transformers.utils import logging

import dpkit
from dpkit.errors import PrivacyUsageError
from dpkit_transformers import DPTrainer, PrivacyArguments
from dpkit_transformers.trainer import PRIVACY_STATE

logging.set_verbosity_error()
VOCAB, T, C = 50, 8, 0.5


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, attn_implementation="eager"))


class Counting(torch.utils.data.Dataset):
    """Sequences ``s, s+1, s+2, ...`` (mod VOCAB): each token predicts the next, easy to learn."""

    def __init__(self, n: int):
        self.ids = (torch.arange(n)[:, None] * 7 + torch.arange(T)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": self.ids[i]}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
                save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True)
    return TrainingArguments(**{**base, **overrides})


def trainer(tmp_path, n: int = 32, privacy: PrivacyArguments | None = None, **overrides) -> DPTrainer:
    privacy = privacy or PrivacyArguments(max_grad_norm=C, noise_multiplier=1.0, noise_seed=3)
    return DPTrainer(model=gpt2(), args=training_args(tmp_path, **overrides), train_dataset=Counting(n),
                     privacy=privacy)


class ReleasedGradients(TrainerCallback):
    """The gradient each step released: dpkit writes it at optimizer.step(), Trainer zeroes it right after."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append([p.grad.clone() for p in model.parameters()])


def test_one_step_equals_a_hand_written_dpkit_step(tmp_path):
    run, released = trainer(tmp_path, max_steps=1), ReleasedGradients()
    run.add_callback(released)
    run.train()

    model, data = gpt2(), Counting(32)
    loader = dpkit.DPDataLoader(data, 4 * 2 / 32, generator=torch.Generator().manual_seed(0),
                                collate_fn=default_data_collator)
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=loader, noise_multiplier=1.0, max_grad_norm=C, noise_seed=3,
                                 criterion=nn.CrossEntropyLoss())
    model, optimizer, loader, criterion = private
    batch = next(iter(loader))
    optimizer.zero_grad()
    with private.micro_batches():  # the logical batch in two backward passes, as gradient_accumulation_steps=2
        for half in zip(*(batch[k].tensor_split(2) for k in ("input_ids", "attention_mask", "labels"))):
            ids, mask, labels = half
            logits = model(input_ids=ids, attention_mask=mask).logits
            criterion(logits[:, :-1].transpose(1, 2), labels[:, 1:]).backward()
    optimizer.step()

    assert run.private.steps == private.steps == 1 and batch["input_ids"].shape[0] > 1
    (gradients,) = released.steps
    for (name, got), want in zip(run.model.named_parameters(), model.parameters()):
        # The same clipped, noised gradient, up to float32 rounding (BLAS kernels may round an ulp apart).
        torch.testing.assert_close(gradients.pop(0), want.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    assert run.private.epsilon(1e-5) == private.epsilon(1e-5)


def test_twenty_steps_at_a_target_epsilon_lower_the_loss(tmp_path):
    privacy = PrivacyArguments(max_grad_norm=1.0, target_epsilon=30.0, target_delta=1e-5, noise_seed=0)
    run = trainer(tmp_path, n=256, privacy=privacy, per_device_train_batch_size=16, num_train_epochs=2.5,
                  optim="adamw_torch", learning_rate=2e-2)
    run.train()  # 256 examples, expected batch 16 * 2: 8 steps an epoch, 20 in 2.5 epochs
    logs = [entry for entry in run.state.log_history if "loss" in entry and "epsilon" in entry]
    assert run.state.global_step == run.private.steps == len(logs) == 20
    epsilons = [entry["epsilon"] for entry in logs]
    assert epsilons == sorted(epsilons) and 0.8 * 30.0 < epsilons[-1] <= 30.0
    losses = [entry["loss"] for entry in logs]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_a_checkpoint_resumes_the_same_run(tmp_path):
    straight = trainer(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / PRIVACY_STATE).is_file()

    resumed = trainer(tmp_path / "b", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.private.steps == 4
    assert resumed.private.epsilon(1e-5) == straight.private.epsilon(1e-5)
    for (name, got), want in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(got, want), name

    os.remove(checkpoint / PRIVACY_STATE)
    with pytest.raises(PrivacyUsageError, match="restart the privacy count"):
        trainer(tmp_path / "c", max_steps=4).train(resume_from_checkpoint=str(checkpoint))


def test_batches_smaller_than_the_accumulation_steps(tmp_path):
    """Micro-batches left empty run as one ignored padding row: every step is taken and counted."""
    sampler = dpkit.PoissonBatchSampler(12, 0.25, generator=torch.Generator().manual_seed(0))
    assert any(len(b) < 3 for b in sampler)  # this seed draws batches with fewer examples than pieces
    run = trainer(tmp_path, n=12, per_device_train_batch_size=1, gradient_accumulation_steps=3, max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run.train()
    assert run.private.steps == 4
