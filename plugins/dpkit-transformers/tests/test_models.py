"""Tiny randomly initialised GPT-2, BERT and Llama models (no downloads) trained with dpkit.

One clipped step without noise must equal a loop over examples (micro-batches of one), in every mode that
covers the model: it checks Conv1D and the RMS norms inside real models, GPT-2's tied ``wte``/``lm_head``
(the per-example gradient is the sum of both uses), and position embeddings looked up with a batch of one
and broadcast. Then a few noisy steps check that fine-tuning runs and is counted.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.utils import logging

import dpkit

logging.set_verbosity_error()
VOCAB, T, B, C = 100, 8, 3, 0.1  # C is small enough that every example is clipped
SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": VOCAB, "max_position_embeddings": T, "attn_implementation": "eager"}


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"))


def bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        **SMALL, num_labels=3, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=1, attention_dropout=0.0, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0))


def next_token(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    """Language modelling: logits as [N, V, T-1] for CrossEntropyLoss, targets the next tokens."""
    return model(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:]


def classify(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    return model(input_ids=ids).logits, labels


# name: (factory, loss head, relative tolerance). LlamaRMSNorm normalises in float32 even in a float64 model,
# so ghost's reweighted second backward rounds differently from the loop there: float32-level agreement.
MODELS = {"gpt2": (gpt2, next_token, 1e-9), "bert": (bert, classify, 1e-9), "llama": (llama, next_token, 1e-5)}
MODES = ["hooks", "ghost", "bk", "auto", "functorch"]


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name][0]().double()
    return model, torch.randint(1, VOCAB, (B, T)), torch.randint(0, 3, (B,))


def loop_reference(model: nn.Module, head, ids, labels) -> list[torch.Tensor]:
    """Σ_i clip(∇ loss_i), each example in its own forward and backward pass; no dpkit involved."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(ids.shape[0]):
        loss = nn.functional.cross_entropy(*head(model, ids[i:i + 1], labels[i:i + 1]))
        grads = [torch.zeros_like(p) if g is None else g
                 for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]
        factor = min(1.0, C / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads)]
    return total


def private_gradient(model: nn.Module, head, ids, labels, mode: str) -> list[torch.Tensor]:
    """The gradient dpkit hands the optimizer: one batch, noise 0, sum reduction, learning rate 0."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns that the step is not private
        private = dpkit.make_private(module=model, optimizer=opt, sample_rate=0.5, noise_multiplier=0.0,
                                     max_grad_norm=C, grad_sample_mode=mode, loss_reduction="sum",
                                     criterion=nn.CrossEntropyLoss())
    private.criterion(*head(model, ids, labels)).backward()
    opt.step()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    private.detach()
    return grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_one_clipped_step_matches_the_loop(name, mode):
    model, ids, labels = build(name)
    head, rtol = MODELS[name][1], MODELS[name][2]
    expected = loop_reference(model, head, ids, labels)
    got = private_gradient(model, head, ids, labels, mode)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, g, e in zip(names, got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * 1e-2, msg=lambda m: f"{name} {mode} {n}: {m}")


def test_gpt2_tied_embedding_gets_both_uses():
    """The loop check above would pass if only one use counted and the head were untied: pin the tie first."""
    model, _, _ = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    private = dpkit.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                 sample_rate=0.5, expected_batch_size=2, noise_multiplier=1.0, max_grad_norm=C,
                                 grad_sample_mode="hooks")
    tied = [row.name for row in private.plan if any(p is model.lm_head.weight for p in row.params.values())]
    assert sorted(tied) == ["lm_head", "transformer.wte"]
    assert {row.provider for row in private.plan if row.name.endswith("c_attn")} == {"transformers"}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_noisy_steps(name):
    model, _, _ = build(name)
    torch.manual_seed(1)
    ids, labels = torch.randint(1, VOCAB, (16, T)), torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    private = dpkit.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                 max_grad_norm=1.0, grad_sample_mode="auto", criterion=nn.CrossEntropyLoss(),
                                 noise_seed=0)
    model, opt, loader, criterion = private
    head = MODELS[name][1]
    for x, y in loader:
        opt.zero_grad()
        criterion(*head(model, x, y)).backward()
        opt.step()
    assert private.steps == 4
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed)
    assert 0 < private.epsilon(delta=1e-5) < float("inf")
