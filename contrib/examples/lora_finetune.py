"""LoRA fine-tuning with DP-SGD: only low-rank adapters train, the pretrained weights stay frozen and untouched.

Demonstrates DP fine-tuning of a parameter subset. ``LoRALinear`` (written here) wraps a frozen
``nn.Linear`` and adds ``B(A(x)) * alpha / rank`` with ``A`` and ``B`` plain ``nn.Linear(bias=False)`` submodules,
so dpkit's built-in Linear samplers cover the adapters and nothing needs registering. dpkit clips, noises and
steps exactly the parameters that require grad; the frozen ones get no gradient and no noise.

The task is a transfer on scikit-learn's bundled 8x8 digits: an MLP is first trained *non-privately* on the
"public" classes 0-4, then every linear layer gets a rank-``--rank`` adapter and only the adapters are trained with
DP-SGD on the "private" classes 5-9 (before fine-tuning the model never predicts them). The script checks, and
prints, that the optimizer holds only adapter parameters, that every adapter moved and that every frozen
parameter is bit-for-bit unchanged.

Measured on the 2-core CPU this was written on (one torch thread), with the defaults (rank 4, epsilon=3,
delta=1e-5, 30 epochs = 180 steps of expected batch 128; ``python contrib/examples/lora_finetune.py``): 2,344
adapter parameters train, 26,122 stay frozen; private-class test accuracy 0.000 before and 0.878 after (seeds
1 and 2: 0.906, 0.950) at epsilon 2.995, in 6 s (1 s of DP fine-tuning). The adapters take the model over, so
with them it no longer recognises classes 0-4 it was never fine-tuned on (0.000); switched off, the untouched
base model still gets 0.989 on them.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import dpkit


class LoRALinear(nn.Module):
    """``base(x) + B(A(x)) * alpha / rank`` with ``base`` frozen; ``B`` starts at zero, so training starts at base.

    ``active = False`` switches the adapter off (the frozen base model alone).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank
        self.active = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each of its ``nn.Linear`` layers in a ``LoRALinear``, in place."""
    model.requires_grad_(False)
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, LoRALinear(child, rank, alpha))
        else:
            add_lora(child, rank, alpha)
    return model


def load_split(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Digits as 64 standardised features, split into public (classes 0-4) and private (5-9) train/test sets."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    out = {}
    for part, mask in (("public", y < 5), ("private", y >= 5)):
        xs, ys = x[mask], y[mask]
        cut = int(0.8 * len(ys))
        out[f"{part}_train"], out[f"{part}_test"] = (xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])
    return out


def set_adapters(model: nn.Module, active: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.active = active


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item()


def pretrain(model: nn.Module, data: tuple[Tensor, Tensor], epochs: int, batch_size: int = 64) -> None:
    """Ordinary (non-private) training on the public data.

    Label smoothing keeps the logits of the classes it never sees from running off to -inf, so that small
    adapters can bring them back.
    """
    x, y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1).backward()
            optimizer.step()
    optimizer.zero_grad()  # no gradients left behind: afterwards the frozen weights must never get one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=30, help="DP fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mode", default="auto", help="grad_sample_mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: a smoke test, not a result")
    args = parser.parse_args()
    if args.quick:
        args.pretrain_epochs, args.epochs, args.threads = 10, 20, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_split(args.seed)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    pretrain(model, data["public_train"], args.pretrain_epochs)
    print(f"pretrained on classes 0-4 (not private): public test accuracy {accuracy(model, data['public_test']):.3f}")

    add_lora(model, args.rank, args.alpha)
    adapters = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a.weight, m.lora_b.weight)]
    adapters_before = [p.detach().clone() for p in adapters]
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    print(f"LoRA rank {args.rank}: {sum(p.numel() for p in adapters)} trainable adapter parameters, "
          f"{sum(p.numel() for p in frozen.values())} frozen")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    acc_before = accuracy(model, data["private_test"])

    train = TensorDataset(*data["private_train"])
    loader = dpkit.DPDataLoader(train, sample_rate=args.batch_size / len(train),
                                generator=torch.Generator().manual_seed(args.seed))
    private = dpkit.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=args.max_grad_norm,
        target_epsilon=args.epsilon, target_delta=args.delta, steps=args.epochs * len(loader),
        grad_sample_mode=args.mode, criterion=nn.CrossEntropyLoss(), noise_seed=args.seed)
    model, optimizer, loader, criterion = private
    print(f"DP fine-tuning on classes 5-9: {len(train)} examples, noise multiplier {private.noise_multiplier:.3f}, "
          f"sample rate {private.sample_rate:.4f}, {args.epochs * len(loader)} steps")
    start = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    epsilon = private.epsilon(args.delta)
    private.detach()

    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    only_adapters = optimized == {id(p) for p in adapters}
    frozen_untouched = all(torch.equal(p, frozen[name]) and p.grad is None  # no update, and no noise either
                           for name, p in model.named_parameters() if not p.requires_grad)
    adapters_moved = all(not torch.equal(p, before) for p, before in zip(adapters, adapters_before))
    acc_after = accuracy(model, data["private_test"])
    print(f"optimizer holds only adapters: {only_adapters}; every adapter updated: {adapters_moved}; "
          f"frozen parameters unchanged: {frozen_untouched}")
    print(f"private test accuracy {acc_before:.3f} before, {acc_after:.3f} after DP fine-tuning "
          f"(epsilon {epsilon:.2f}, delta {args.delta:g}, {seconds:.0f} s)")
    public_with = accuracy(model, data["public_test"])
    set_adapters(model, False)
    print(f"public test accuracy {public_with:.3f} with the adapters (they never saw classes 0-4), "
          f"{accuracy(model, data['public_test']):.3f} without them (the frozen base model)")
    print(f"summary: epsilon={epsilon:.2f} delta={args.delta:g} accuracy_before={acc_before:.3f} "
          f"accuracy_after={acc_after:.3f} only_adapters={only_adapters} adapters_updated={adapters_moved} "
          f"frozen_unchanged={frozen_untouched}")


if __name__ == "__main__":
    main()
