"""The bundled audits behind ``dpkit audit``: a small MLP trained full batch with gradient canaries (the noise
mode), and :class:`~dpkit.audit.examples.CanaryNet` trained with example canaries (the clip mode).

The only module of :mod:`dpkit.audit` that trains: it imports the engine (``make_private``) when called, never at
import, so importing the audit imports no training code.
"""
from __future__ import annotations

import math

import torch

from dpkit import registry
from dpkit.audit import correlated, loops
from dpkit.audit.canary import AuditReport, CanaryAudit, refuse_correlated
from dpkit.audit.examples import ClipAuditReport, ExampleCanaries
from dpkit.audit.scoring import REFERENCES
from dpkit.errors import PrivacyUsageError

__all__ = ["bundled_audit", "bundled_clip_audit", "run_bundled_audit"]

_EXAMPLES, _FEATURES = 64, 24
CYCLE = 4  # the cyclic loader's cycle for BandMF and BLT (at least BandMF's bands)
TREE_EPOCH = 4  # the tree's steps per epoch (shuffled batches of 16 of the 64 examples): 3 Gaussians charged each


def bundled_audit(*, steps: int | None = None, canaries: int = 100_000, noise_multiplier: float = 10.0,
                  sample_rate: float = 1.0, delta: float = 1e-5, confidence: float = 0.95, noise: str = "gaussian",
                  accountant: str = "prv", seed: int = 0) -> AuditReport:
    """Train a small MLP on synthetic data with an audit attached and return the report.

    Full batch (``sample_rate=1``) by default: a Dirac canary's summed score is then the optimal test, so the
    lower bound gets closest to the accountant's epsilon. The hidden layer is as wide as the canaries need: one
    coordinate each, and up to 4096 more as references for the noise. The defaults (claimed ε 4.38 at δ 1e-5)
    prove noise at half the claimed std a violation (docs/auditing.md has the power table). ``noise`` names the
    noise plugin to audit: on BandMF and BLT the data and the canaries follow a cyclic loader of :data:`CYCLE`
    groups (or BandMF's bands, if more) (:mod:`dpkit.audit.correlated`). ``steps`` defaults to 100, and on
    BandMF to 100 per group, so that each canary joins 100 steps (claimed ε 4.38 at the defaults, BLT's 3.77). On
    the tree (:mod:`dpkit.audit.tree`) the data come in shuffled batches, :data:`TREE_EPOCH` steps per epoch, and
    ``steps`` defaults to 33 epochs (132 steps), whose ledger charges 99 Gaussians; ``sample_rate`` is then unused.
    """
    from dpkit.data import CyclicPoissonLoader, DPDataLoader, ShuffledBatchLoader  # the training code, imported when an audit trains (never with dpkit.audit)
    from dpkit.engine import make_private

    mechanism = registry.lookup("dpkit_noise_mechanisms", noise, "noise").value(seed=seed)
    correlated.refuse_unwhitenable(mechanism)  # before training
    tree = correlated.is_tree(mechanism)
    cycle = max(CYCLE, getattr(mechanism, "bands", 1)) if getattr(mechanism, "check_loader", None) else 1
    if steps is None:  # on the tree 33 epochs: 99 Gaussians charged, as many as 100 DP-SGD steps
        steps = 100 * cycle if hasattr(mechanism, "coefficients") else 33 * TREE_EPOCH if tree else 100
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(_EXAMPLES, _FEATURES, generator=gen)
    y = (x @ torch.randn(_FEATURES, generator=gen) > 0).long()
    width = max(96, math.ceil((canaries + REFERENCES) / (_FEATURES + 3)))  # d·h + h + 2h + 2 coordinates
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(_FEATURES, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    data, generator = torch.utils.data.TensorDataset(x, y), torch.Generator().manual_seed(seed)
    extra = {}
    if getattr(mechanism, "check_loader", None) is None:
        loader = DPDataLoader(data, sample_rate, generator=generator)
    elif tree:  # fixed batches, each example once per epoch; the canaries join one step per epoch too
        loader = ShuffledBatchLoader(data, _EXAMPLES // TREE_EPOCH, generator=generator)
    else:  # BandMF, BLT: a cyclic loader, whose groups the canaries follow too
        loader = CyclicPoissonLoader(data, sample_rate, cycle, generator=generator)
        extra = {"noise_kwargs": {"steps": steps}} if hasattr(mechanism, "resolved") else {}
    private = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                           data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                           criterion=torch.nn.CrossEntropyLoss(), noise=noise, accountant=accountant,
                           noise_seed=seed, grad_sample_mode="hooks", **extra)
    model, optimizer, loader, criterion = private
    audit = CanaryAudit.attach(private, canaries=canaries, seed=seed)
    try:
        done = 0
        while done < steps:
            for xb, yb in loader:
                optimizer.zero_grad()
                criterion(model(xb), yb).backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
        return audit.report(delta, confidence)
    finally:
        audit.detach()
        private.detach()


def run_bundled_audit(*, steps: int | None = None, canaries: int = 100_000, noise_multiplier: float = 10.0,
                      sample_rate: float = 1.0, delta: float = 1e-5, confidence: float = 0.95,
                      noise: str = "gaussian", accountant: str = "prv", seed: int = 0) -> str:
    """:func:`bundled_audit`'s report as text, for ``dpkit audit``."""
    return str(bundled_audit(steps=steps, canaries=canaries, noise_multiplier=noise_multiplier,
                             sample_rate=sample_rate, delta=delta, confidence=confidence, noise=noise,
                             accountant=accountant, seed=seed))


def bundled_clip_audit(*, steps: int = 100, canaries: int = 10_000, noise_multiplier: float = 2.0,
                       sample_rate: float = 0.05, delta: float = 1e-5, confidence: float = 0.95,
                       clipping: str = "flat", loop: str = "standard", sampler: str = "poisson",
                       noise: str = "gaussian", accountant: str = "prv", seed: int = 0) -> ClipAuditReport:
    """Train :class:`~dpkit.audit.examples.CanaryNet` with example canaries and return the clip audit's report.

    The canaries are examples: sampled by ``sampler``'s loader, clipped by the ``clipping`` plugin (in ``bk``
    mode), trained by ``loop`` (names in :mod:`dpkit.audit.loops`). The defaults (claimed ε 1.4 at δ 1e-5) prove a
    layer left unclipped a violation, and refute the premises that shuffled batches, accumulated batches or a
    release divided by its realised batch size break (docs/auditing.md).
    """
    from dpkit.engine import make_private  # the training code, imported when an audit trains

    refuse_correlated(registry.lookup("dpkit_noise_mechanisms", noise, "noise").value(seed=seed), "the clip mode")
    chosen, make_loader = loops.loop(loop), loops.sampler(sampler)
    audit = ExampleCanaries(canaries, seed=seed)
    loader, poisson = make_loader(audit.dataset, sample_rate, torch.Generator().manual_seed(seed))
    arguments = {"module": audit.model, "optimizer": torch.optim.SGD(audit.model.parameters(), lr=0.1),
                 "data_loader": loader, "noise_multiplier": noise_multiplier, "max_grad_norm": 1.0,
                 "criterion": torch.nn.L1Loss(), "clipping": clipping, "noise": noise, "accountant": accountant,
                 "noise_seed": seed, "grad_sample_mode": "bk", "poisson_sampling": poisson}
    private = make_private(**{**arguments, **chosen.make_kwargs(loader)})
    audit.watch(private)
    try:
        chosen.train(private, loader, steps)
        if len(audit.per_release) != steps:
            raise PrivacyUsageError(f"the audit loop {loop!r} released {len(audit.per_release)} steps, asked for "
                                    f"{steps}: a loop must release exactly the steps it is given.")
        return audit.report(delta, confidence)
    finally:
        audit.unwatch()
        private.detach()
