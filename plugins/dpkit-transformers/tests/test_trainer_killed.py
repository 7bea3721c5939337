"""DPTrainer killed with SIGKILL mid-run and resumed from its last checkpoint ends where an uninterrupted run ends:
the same weights bit for bit and the same ε (docs/faults.md)."""
from __future__ import annotations

import signal
import subprocess
import sys

import torch

TRAIN = r'''
import os, signal, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
from transformers.utils import logging
from dpkit_transformers import DPTrainer, PrivacyArguments

logging.set_verbosity_error()
out, kill_at, result = sys.argv[1], int(sys.argv[2]), sys.argv[3]
VOCAB, T = 50, 8
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                   eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   attn_implementation="eager"))
ids = (torch.arange(32)[:, None] * 7 + torch.arange(T)) % VOCAB
data = [{"input_ids": r, "attention_mask": torch.ones(T, dtype=torch.long), "labels": r} for r in ids]


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):  # released, not yet saved
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                         save_strategy="steps", save_steps=2, max_steps=6, report_to=[], seed=0, use_cpu=True,
                         disable_tqdm=True)
run = DPTrainer(model=model, args=args, train_dataset=data, callbacks=[Kill()],
                privacy=PrivacyArguments(max_grad_norm=0.5, noise_multiplier=1.0, noise_seed=3))
run.train(resume_from_checkpoint=any(n.startswith("checkpoint-") for n in os.listdir(out)) if os.path.isdir(out)
          else None)
torch.save({"params": [p.detach() for p in run.model.parameters()], "epsilon": run.private.epsilon(1e-5),
            "steps": run.private.steps}, result)
'''


def _run(script, out, kill_at, result) -> int:
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at), str(result)], check=False,
                          timeout=600).returncode


def test_a_killed_trainer_resumes_the_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    assert _run(script, tmp_path / "straight", -1, tmp_path / "straight.pt") == 0
    killed, result = tmp_path / "killed", tmp_path / "resumed.pt"
    assert _run(script, killed, 3, result) == -signal.SIGKILL  # after step 3's release; checkpoint-2 is the last
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    assert _run(script, killed, -1, result) == 0
    straight, resumed = (torch.load(p, weights_only=True) for p in (tmp_path / "straight.pt", result))
    assert resumed["steps"] == straight["steps"] == 6 and resumed["epsilon"] == straight["epsilon"]
    for a, b in zip(straight["params"], resumed["params"], strict=True):
        assert torch.equal(a, b)
