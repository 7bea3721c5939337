"""Benchmark models, written with plain ``torch.nn`` layers only.

* ``GPT``: a GPT-2-shaped decoder. Token and position ``nn.Embedding``s, pre-LayerNorm blocks whose causal
  attention is ``nn.Linear`` (qkv, proj) around ``F.scaled_dot_product_attention``, an ``nn.Linear`` MLP with
  tanh-GELU, a final LayerNorm and an LM head whose weight *is* the token embedding's (tied, as in GPT-2).
  At ``n_layer=12, d=768, heads=12, vocab=50257, ctx=1024`` it has 124.4M parameters, like GPT-2 small.
* ``hf-gpt2``: Hugging Face's ``GPT2LMHeadModel`` at GPT-2 small's default config (124M parameters, tied head,
  transformers' ``Conv1D`` layers), built from the config without a download; dropout off so that every mode does
  the same work. Needs ``transformers`` (dpkit's samplers for ``Conv1D`` come from the dpkit-transformers plugin).
* ``hf-bert``: transformers' ``BertForSequenceClassification`` at BERT-base's default config (110M parameters,
  two classes), from the config, dropout off; one label per sequence.
* ``ConvNet``: a CIFAR-10-sized (3x32x32 in, 10 classes) network of 3x3 ``nn.Conv2d`` + ``nn.GroupNorm`` +
  ReLU stages with average pooling and a linear classifier.

Positions are looked up as a ``[B, T]`` index tensor (the arange repeated over the batch, contiguous) rather than a
broadcast ``[1, T]`` lookup, so that every library benchmarked (Opacus included) sees a batch dimension on
every layer. dpkit would expand a broadcast lookup itself; this keeps the comparison on equal terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    d: int
    heads: int
    vocab: int
    ctx: int


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, tie: bool = True):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d)
        self.wpe = nn.Embedding(cfg.ctx, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg.d, cfg.heads) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.head = nn.Linear(cfg.d, cfg.vocab, bias=False)
        if tie:
            self.head.weight = self.wte.weight  # tied, as GPT-2 does
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).repeat(B, 1)  # [B, T], contiguous (Opacus views it)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, vocab]


class ConvNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 256), groups: int = 16, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(min(groups, c), c), nn.ReLU()]
            if i > 0:
                layers.append(nn.AvgPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class HFGPT2(nn.Module):
    """GPT-2 small from transformers' default config, returning ``[B, T, vocab]`` logits."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.gpt = GPT2LMHeadModel(GPT2Config(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=idx).logits


class HFBert(nn.Module):
    """BERT-base from transformers' default config as a two-class sequence classifier, returning ``[B, 2]`` logits."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.bert = BertForSequenceClassification(
            BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=idx).logits


# name -> (kind, constructor kwargs, default batch, default seq)
SPECS: dict[str, tuple[str, dict, int, int]] = {
    "gpt2-small": ("gpt", {"n_layer": 12, "d": 768, "heads": 12, "vocab": 50257, "ctx": 1024}, 16, 256),
    "gpt2-tiny": ("gpt", {"n_layer": 4, "d": 256, "heads": 4, "vocab": 50257, "ctx": 1024}, 16, 128),
    "gpt2-cpu": ("gpt", {"n_layer": 2, "d": 128, "heads": 2, "vocab": 2048, "ctx": 64}, 16, 64),
    "hf-gpt2": ("hf", {"vocab": 50257}, 4, 128),
    "hf-bert": ("hf-cls", {"vocab": 30522}, 32, 128),
    "convnet": ("conv", {"widths": (64, 128, 256, 256), "groups": 16}, 256, 0),
    "convnet-cpu": ("conv", {"widths": (16, 32, 64, 64), "groups": 8}, 32, 0),
}
# what ``--model`` accepts; each expands to one or more entries of SPECS
GROUPS = {
    "gpt2-small": ["gpt2-small"],
    "gpt2-tiny": ["gpt2-tiny"],
    "convnet": ["convnet"],
    "cpu-small": ["gpt2-cpu", "convnet-cpu"],
    **{name: [name] for name in ("gpt2-cpu", "convnet-cpu", "hf-gpt2", "hf-bert")},
}


def build(name: str, seq: int, untie: bool = False) -> tuple[nn.Module, str]:
    kind, kwargs, _, _ = SPECS[name]
    if kind == "gpt":
        kwargs = dict(kwargs, ctx=max(kwargs["ctx"], seq))
        return GPT(GPTConfig(**kwargs), tie=not untie), kind
    if kind == "hf":
        return HFGPT2(), "gpt"  # an LM like the others from here on
    if kind == "hf-cls":
        return HFBert(), "cls"  # one label per sequence, like the convnet's per image
    return ConvNet(**kwargs), kind


def make_batches(name: str, batch: int, seq: int, n: int, device: torch.device, seed: int = 0):
    """``n`` fixed synthetic (input, target) batches; the same for every mode."""
    kind, kwargs, _, _ = SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind in ("gpt", "hf"):
            tokens = torch.randint(0, kwargs["vocab"], (batch, seq + 1), generator=gen)
            x, y = tokens[:, :-1], tokens[:, 1:]
        elif kind == "hf-cls":
            x = torch.randint(0, kwargs["vocab"], (batch, seq), generator=gen)
            y = torch.randint(0, 2, (batch,), generator=gen)
        else:
            x = torch.randn(batch, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (batch,), generator=gen)
        out.append((x.contiguous().to(device), y.contiguous().to(device)))
    return out


def loss_input(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """What ``nn.CrossEntropyLoss`` gets: ``[B, vocab, T]`` for the LM (one loss per token), else the logits."""
    return logits.transpose(1, 2) if kind == "gpt" else logits
