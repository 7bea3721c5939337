"""Shared pieces of the fail-closed suite: a tiny model and data, a make_private wrapper, and measurements.

Every loop must end in a correct DP-SGD step or in a clear error raised before anything is released. The
helpers here measure the first (sensitivity, noise, ledger) and snapshot what must not move for the second.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpkit

MODES = ("hooks", "ghost", "bk", "functorch", "ew", "auto")
C = 1.0  # max_grad_norm used throughout


def net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples whose gradients are large (norm far above C), so clipping is active."""
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def dataset(n: int = 32, seed: int = 0) -> TensorDataset:
    return TensorDataset(*batch(n, seed))


def loader(n: int = 32, batch_size: int = 8, **kw) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, **kw)


def make(model: nn.Module | None = None, mode: str = "hooks", *, optimizer=None, lr: float = 1.0,
         quiet: bool = True, **kw) -> dpkit.PrivateTraining:
    """make_private with a plain SGD, CrossEntropy and C=1; no loader by default (q=0.25, expected batch 8)."""
    model = model if model is not None else net()
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=lr)
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("noise_seed", 0)
    kw.setdefault("criterion", nn.CrossEntropyLoss())
    kw.setdefault("max_grad_norm", C)
    if "data_loader" not in kw:
        kw["data_loader"] = None
        kw.setdefault("sample_rate", 0.25)
        kw.setdefault("expected_batch_size", 8)
    ctx = warnings.catch_warnings() if quiet else contextlib.nullcontext()
    with ctx:
        if quiet:
            warnings.simplefilter("ignore")
        return dpkit.make_private(module=model, optimizer=optimizer, grad_sample_mode=mode, **kw)


def loss_backward(p: dpkit.PrivateTraining, x, y) -> None:
    p.criterion(p.module(x), y).backward()


def train_step(p: dpkit.PrivateTraining, x, y) -> None:
    p.optimizer.zero_grad()
    loss_backward(p, x, y)
    p.optimizer.step()


def assert_counted(p: dpkit.PrivateTraining, n: int) -> None:
    """``n`` real steps: in private.steps and in the ledger (a step without noise goes to the unbounded count,
    and makes epsilon infinite)."""
    assert p.steps == n, f"private.steps is {p.steps}, expected {n}"
    if p.noise_multiplier > 0:
        assert p.ledger.steps == n, f"ledger has {p.ledger.steps} steps, expected {n}"
    else:
        assert p.ledger.steps == 0 and p.unbounded_steps == n and p.epsilon(1e-5) == float("inf")


# -- what must not move on a refusal -------------------------------------------------------------------------------
class Frozen:
    """A snapshot of the model's parameters and the controller's counts; ``check()`` asserts nothing moved."""

    def __init__(self, p: dpkit.PrivateTraining):
        self.p = p
        self.params = {n: q.detach().clone() for n, q in p.module.named_parameters()}
        self.steps, self.ledger = p.steps, p.ledger.steps

    def check(self) -> None:
        now = dict(self.p.module.named_parameters())
        for n, before in self.params.items():
            assert n in now and torch.equal(now[n].detach(), before), f"parameter {n} moved"
        assert self.p.steps == self.steps, f"steps {self.steps} -> {self.p.steps}"
        assert self.p.ledger.steps == self.ledger, f"ledger {self.ledger} -> {self.p.ledger.steps}"


# -- what a step releases ------------------------------------------------------------------------------------------
class Capture:
    """The gradients the optimizer applies at each non-virtual step, times dpkit's denominator (the clipped sum
    plus noise). Registered after make_private, so dpkit's own step pre-hook has run when it reads them."""

    def __init__(self, p: dpkit.PrivateTraining):
        self.p = p
        self.releases: list[dict[str, torch.Tensor]] = []
        names = {id(q): n for n, q in p.module.named_parameters()}
        self.params = [(names.get(id(q), f"<foreign {i}>"), q)
                       for i, q in enumerate(q for g in p.optimizer.param_groups for q in g["params"])]
        self.handle = p.optimizer.register_step_pre_hook(self._read)

    def _read(self, optimizer, args, kwargs) -> None:
        if all(q.grad is None for _, q in self.params):
            return  # a virtual step
        d = float(self.p.expected_batch_size) if self.p.loss_reduction == "mean" else 1.0
        self.releases.append({n: (q.grad.detach().to(torch.float64) * d if q.grad is not None else None)
                              for n, q in self.params})

    @property
    def first(self) -> dict[str, torch.Tensor]:
        assert self.releases, "no step was released"
        return self.releases[0]


def flat(release: dict[str, torch.Tensor], names=None) -> torch.Tensor:
    names = names if names is not None else [n for n, g in release.items() if g is not None]
    return torch.cat([release[n].reshape(-1) for n in names])


def release(build: Callable[[], dpkit.PrivateTraining], loop: Callable, x, y, seed: int = 0):
    """Build a fresh controller (torch seeded alike), run ``loop(p, x, y)``, return (p, the first release)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        p = build()
        cap = Capture(p)
        loop(p, x, y)
    p.detach()
    return p, cap.first


def sensitivity(build: Callable[[], dpkit.PrivateTraining], x, y, loop: Callable = train_step,
                examples=None) -> float:
    """max over removed examples i of ||release(batch) - release(batch without i)||, with the noise off.

    ``build`` must make a controller with noise_multiplier=0.
    """
    _, full = release(build, loop, x, y)
    names = [n for n, g in full.items() if g is not None]
    worst = 0.0
    for i in (examples if examples is not None else range(len(x))):
        keep = torch.arange(len(x)) != i
        _, nb = release(build, loop, x[keep], y[keep])
        assert [n for n, g in nb.items() if g is not None] == names
        worst = max(worst, (flat(full, names) - flat(nb, names)).norm().item())
    return worst


def assert_sensitivity(build, x, y, loop: Callable = train_step, bound: float = C, examples=None) -> float:
    s = sensitivity(build, x, y, loop, examples)
    assert s <= bound * (1 + 1e-5) + 1e-6, f"sensitivity {s} exceeds the bound {bound}"
    assert s > 0.5 * bound, f"sensitivity {s}: the measurement saw no example's contribution"  # a live test
    return s


def noise_difference(build_with_seed: Callable[[int], dpkit.PrivateTraining], x, y,
                     loop: Callable = train_step) -> dict[str, torch.Tensor]:
    """Per parameter, release(noise_seed=1) - release(noise_seed=2): nonzero wherever noise was added."""
    _, a = release(lambda: build_with_seed(1), loop, x, y)
    _, b = release(lambda: build_with_seed(2), loop, x, y)
    return {n: (a[n] - b[n]) if a[n] is not None else None for n in a}


def assert_noise_everywhere(diff: dict[str, torch.Tensor], names) -> None:
    for n in names:
        assert diff[n] is not None, f"{n} released no gradient"
        assert bool((diff[n] != 0).all()), f"{n}: {(diff[n] == 0).sum().item()} coordinate(s) got no noise"
