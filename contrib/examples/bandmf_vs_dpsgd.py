"""BandMF and tree aggregation against DP-SGD at the same ε, δ, step count and expected batch size, over seeds.

Two tasks on scikit-learn's digits, with digits.py's model and optimizer (SGD, momentum 0.9, automatic clipping):

* ``demo``: digits.py's run (expected batch 256, 30 epochs: 180 steps), BandMF with 4 bands;
* ``many``: a many-step run (expected batch 16, 25 epochs: 2,250 steps), BandMF with 16 bands.

DP-SGD samples Poisson batches at q = B/N over the whole data; BandMF samples cyclically (``b`` groups, one per
step, each at b·q) as its amplified accounting requires; the tree (DP-FTRL, ``noise="tree"``) takes fixed batches
of B from one shuffled pass per epoch (⌊N/B⌋ steps an epoch, so the same step count is a few more epochs) and has
no amplification. Each mechanism's σ is calibrated for the same ε over the same steps (DP-SGD: T events at q;
BandMF: ⌈T/b⌉ at b·q; tree: L = ⌊log2(N/B)⌋ + 1 Gaussians per epoch). The learning rate is digits.py's for all,
not tuned per mechanism. Prints mean ± std of test accuracy over the seeds and a ``summary:`` line.

    python contrib/examples/bandmf_vs_dpsgd.py --seeds 8            # both tasks, 8 seeds each
    python contrib/examples/bandmf_vs_dpsgd.py --mechanisms dpsgd,tree --tasks demo
    python contrib/examples/bandmf_vs_dpsgd.py --quick              # a few steps: a smoke test, not a result
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import attrs
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import dpkit  # noqa: E402
from digits import DELTA, Digits, SmallConvNet, accuracy, load  # noqa: E402
from dpkit.accounting import get_noise_multiplier  # noqa: E402
from dpkit.data import CyclicPoissonLoader, DPDataLoader, ShuffledBatchLoader  # noqa: E402
from dpkit.noise.bandmf import BandMF, check_loader  # noqa: E402
from dpkit.noise.tree import noise_multiplier_for  # noqa: E402


@attrs.frozen
class Task:
    batch_size: int
    epochs: int
    bands: int
    lr: float


TASKS = {"demo": Task(batch_size=256, epochs=30, bands=4, lr=0.3),
         "many": Task(batch_size=16, epochs=25, bands=16, lr=0.05)}


def train(data: Digits, task: Task, mechanism: str, epsilon: float, seed: int, steps: int | None = None
          ) -> tuple[float, float, float]:
    """One run; returns (test accuracy, ε spent, σ)."""
    torch.manual_seed(seed)
    dataset = TensorDataset(data.standardize(data.train_x), data.train_y)
    n = len(dataset)
    generator = torch.Generator().manual_seed(seed)
    model = SmallConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=0.9)
    if mechanism == "dpsgd":
        loader = DPDataLoader(dataset, task.batch_size / n, generator=generator)
        steps = steps or task.epochs * len(loader)
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=loader.sample_rate,
                                     steps=steps)
        noise = "gaussian"
    elif mechanism == "tree":
        loader = ShuffledBatchLoader(dataset, task.batch_size, generator=generator)
        steps = steps or task.epochs * max(1, round(n / task.batch_size))  # DP-SGD's steps, not its epochs
        sigma = noise_multiplier_for(target_epsilon=epsilon, target_delta=DELTA, steps=steps,
                                     epoch_length=len(loader))
        noise = "tree"
    else:
        loader = CyclicPoissonLoader.from_batch_size(dataset, task.batch_size, task.bands, generator=generator)
        steps = steps or task.epochs * len(loader)
        calibrator = BandMF(bands=task.bands)
        check_loader(loader, calibrator)
        sigma = calibrator.calibrate(target_epsilon=epsilon, target_delta=DELTA, steps=steps)
        noise = f"bandmf-{task.bands}"
    private = dpkit.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                                 max_grad_norm=1.0, clipping="automatic", noise=noise, noise_seed=seed)
    while private.steps < steps:
        for x, y in private.data_loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if private.steps == steps:
                break
    return accuracy(model, data.test_x, data.test_y), private.epsilon(DELTA), sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tasks", default="demo,many")
    parser.add_argument("--mechanisms", default="dpsgd,bandmf,tree", help="a comma list of dpsgd, bandmf, tree")
    parser.add_argument("--quick", action="store_true", help="20 steps, 2 seeds, the demo task")
    args = parser.parse_args()
    mechanisms = args.mechanisms.split(",")
    if not set(mechanisms) <= {"dpsgd", "bandmf", "tree"}:
        parser.error(f"--mechanisms takes dpsgd, bandmf and tree, got {args.mechanisms!r}")
    torch.set_num_threads(1)
    data = load()
    tasks = ["demo"] if args.quick else args.tasks.split(",")
    seeds = range(2 if args.quick else args.seeds)
    spent = 0.0
    results = {}
    for name in tasks:
        task = TASKS[name]
        for mechanism in mechanisms:
            start = time.perf_counter()
            runs = [train(data, task, mechanism, args.epsilon, seed, steps=20 if args.quick else None)
                    for seed in seeds]
            accs = [100 * acc for acc, _, _ in runs]
            spent = max(spent, *(eps for _, eps, _ in runs))
            results[f"{name}_{mechanism}"] = statistics.mean(accs)
            shape = {"bandmf": f"b={task.bands}", "tree": f"L={(len(data.train_y) // task.batch_size).bit_length()}"}
            print(f"{name:<5} {mechanism:<7} ({shape.get(mechanism, 'b=1')}, sigma={runs[0][2]:.3f}) "
                  f"test accuracy {statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}% over {len(accs)} "
                  f"seeds; ε ≤ {max(eps for _, eps, _ in runs):.3f}; "
                  f"{(time.perf_counter() - start) / len(accs):.1f}s/run", flush=True)
    print("summary: " + " ".join([f"epsilon={spent:.3f}", f"delta={DELTA:g}"]
                                 + [f"{k}={v / 100:.4f}" for k, v in results.items()]))


if __name__ == "__main__":
    main()
