"""PEFT LoRA on a tiny GPT-2 (no downloads): only the adapters are planned and trained, exactly.

peft's LoRA ``Linear`` wraps the frozen base layer (GPT-2's ``Conv1D`` here) and owns no parameter itself; its
adapters ``lora_A``/``lora_B`` are plain ``nn.Linear`` layers, which dpkit's built-in samplers cover.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging

import dpkit

peft = pytest.importorskip("peft")
logging.set_verbosity_error()
VOCAB, T, B, C = 50, 8, 3, 0.05  # C is small enough that every example is clipped


def lora_gpt2() -> nn.Module:
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, attn_implementation="eager"))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                             fan_in_fan_out=True, init_lora_weights=False)  # random B: gradients reach A too
    return peft.get_peft_model(base, config).double()


def next_token_loss(model: nn.Module, ids: torch.Tensor, criterion: nn.Module):
    return criterion(model(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:])


def adapters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_adapters_are_planned():
    model = lora_gpt2()
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(adapters(model).values(), lr=0.1),
                                 sample_rate=0.5, expected_batch_size=2, noise_multiplier=1.0, max_grad_norm=C,
                                 grad_sample_mode="hooks")
    planned = {n for row in private.plan for n in row.params}
    assert planned == set(adapters(model)) and planned and all(".lora_" in n for n in planned)
    assert {row.provider for row in private.plan} == {"dpkit.layers.linear"}


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_one_clipped_step_matches_the_per_example_loop(mode):
    model = lora_gpt2()
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, T))
    params = list(adapters(model).values())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(B):  # Σ_i clip(∇ loss_i), each example on its own; no dpkit involved
        grads = torch.autograd.grad(next_token_loss(model, ids[i:i + 1], nn.CrossEntropyLoss()), params)
        factor = min(1.0, C / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
        expected = [e + g * factor for e, g in zip(expected, grads)]

    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(adapters(model).values(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns that the step is not private
        private = dpkit.make_private(module=model, optimizer=optimizer, sample_rate=0.5, noise_multiplier=0.0,
                                     max_grad_norm=C, grad_sample_mode=mode, loss_reduction="sum",
                                     criterion=nn.CrossEntropyLoss())
    next_token_loss(model, ids, private.criterion).backward()
    optimizer.step()
    for (name, p), want in zip(adapters(model).items(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{mode} {name}: {m}")


def test_base_weights_stay_bit_identical(tmp_path):
    """A few noisy DPTrainer steps (AdamW with weight decay) move every adapter and no base weight."""
    from dpkit_transformers import DPTrainer, PrivacyArguments
    from test_trainer import Counting

    model = lora_gpt2().float()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in adapters(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, weight_decay=0.1,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    run = DPTrainer(model=model, args=args, train_dataset=Counting(16),
                    privacy=PrivacyArguments(max_grad_norm=1.0, noise_multiplier=1.0, noise_seed=0))
    run.train()
    assert run.private.steps == 3
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(not torch.equal(p, trained[n]) for n, p in adapters(model).items())
