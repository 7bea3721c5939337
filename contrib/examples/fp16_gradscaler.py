"""fp16 autocast with torch.amp.GradScaler: the private steps equal those of the same run without a scaler.

dpkit divides the loss scale out of the records before any per-example norm (``make_private(grad_scaler=)``),
so clipping sees the true gradients whatever the scale. A forced overflow shows what an overflow does: each
overflowed example counts as zero, every step is still released and counted, and the scaler never backs off on
private data (docs/mixed-precision.md).
"""
import argparse
import warnings

import torch
from torch import nn

import dpkit


def train(steps: int, scaler: torch.amp.GradScaler | None, overflow_at: int | None, device: str) -> tuple:
    torch.manual_seed(0)
    x, y = torch.randn(512, 20), torch.randint(0, 4, (512,))
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling="unproven": fixed batches, so that the runs compare
        private = dpkit.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64),
            poisson_sampling="unproven", noise_multiplier=1.0, max_grad_norm=1.0, criterion=nn.CrossEntropyLoss(),
            noise_seed=0, grad_scaler=scaler)
    model, optimizer, loader, criterion = private
    batches = iter(loader)
    for step in range(steps):
        xb, yb = next(batches)
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = criterion(model(xb.to(device)).float(), yb.to(device))
        if scaler is None:
            loss.backward()
            optimizer.step()
            continue
        if step == overflow_at:
            scaler.update(2.0 ** 40)  # fp16 overflows at this scale
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return private, torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, plain = train(args.steps, None, None, args.device)
    scaled_run, scaled = train(args.steps, torch.amp.GradScaler(args.device, init_scale=2.0 ** 12), None,
                               args.device)
    scaler = torch.amp.GradScaler(args.device, init_scale=2.0 ** 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forced overflow warns
        overflow_run, _ = train(args.steps, scaler, 2, args.device)
    print(f"max |difference| of the parameters, with and without the scaler: {(scaled - plain).abs().max():.2e}")
    print(f"forced overflow: {overflow_run.overflowed_examples} examples counted as zero, {overflow_run.steps} of "
          f"{args.steps} steps released and counted, scale now {scaler.get_scale():g} (no back-off)")
    print(f"summary: epsilon={overflow_run.epsilon(1e-5):.3f} delta=1e-05 steps={overflow_run.steps} "
          f"overflowed={overflow_run.overflowed_examples} max_diff={(scaled - plain).abs().max():.2e}")


if __name__ == "__main__":
    main()
