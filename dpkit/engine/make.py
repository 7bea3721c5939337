"""``make_private``: check the arguments, decide the sampling, calibrate σ, then build the controller.

The order is the point: the sample rate comes from the loader, σ is calibrated on it (by the mechanism's own
accounting where it has one), and only then is the controller built, so that every check at make (the noise's
range, the σ = 0 warning, the ranks agreeing) sees the σ the run will use.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpkit import registry
from dpkit.engine import guards, sampling, topology
from dpkit.engine.controller import ATTACHED, PrivateTraining
from dpkit.errors import PrivacyUsageError

# Names other libraries (Opacus first) use for make_private's arguments, with dpkit's.
OTHER_NAMES = {
    "delta": "target_delta", "epsilon": "target_epsilon", "sigma": "noise_multiplier",
    "noise_generator": "noise_seed", "max_per_sample_grad_norm": "max_grad_norm", "clip_norm": "max_grad_norm",
    "batch_size": "the data loader's batch_size", "sample_size": "the data loader's dataset",
    "n_accumulation_steps": "dpkit.BatchMemoryManager", "K": "augmentation_multiplicity",
    "module_wrapper": "nothing (dpkit never wraps the model)",
}


def _refuse_unknown(function: str, unknown: dict) -> None:
    if not unknown:
        return
    name = next(iter(unknown))
    hint = f"; did you mean {OTHER_NAMES[name]}?" if name in OTHER_NAMES else ""
    raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint} "
                    "(docs/migrating-from-opacus.md lists every name that differs)")


def make_private(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader | None = None,
                 noise_multiplier: float | None = None, max_grad_norm: float,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 epochs: float | None = None, steps: int | None = None, grad_sample_mode: str = "auto",
                 clipping: str = "flat", clipping_kwargs: dict | None = None, noise: str = "gaussian",
                 noise_kwargs: dict | None = None, accountant: str = "prv", augmentation_multiplicity: int = 1,
                 poisson_sampling: bool | str = True, loss_reduction: str = "mean", batch_first: bool = True,
                 criterion: nn.Module | None = None, secure_mode: bool = False, noise_seed: int | None = None,
                 sample_rate: float | None = None, expected_batch_size: float | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, public_buffers: list[str] | tuple = (),
                 **unknown) -> PrivateTraining:
    """Make ``module``'s training with ``optimizer`` differentially private with DP-SGD; returns the controller.

    Nothing is wrapped: hooks go on the model and the optimizer, and ``private`` unpacks to ``(module, optimizer,
    data_loader, criterion)`` when ``criterion=`` is given and to ``(module, optimizer, data_loader)`` without.
    Give ``noise_multiplier``, or ``target_epsilon`` with ``target_delta`` and ``epochs`` (or ``steps``) to
    have it calibrated. The contract is docs/design.md.

    Arguments (keyword only):
        module, optimizer: the model (or its ``DistributedDataParallel``/``fully_shard`` wrapper) and an optimizer
            over its parameters.
        data_loader: a ``DataLoader`` (replaced by its Poisson twin; ``batch_size`` is the expected batch size, per
            rank under torch.distributed), a ``dpkit.DPDataLoader``, or None with ``sample_rate=``.
        noise_multiplier: σ; the noise std on the clipped sum is σ·C. ``max_grad_norm``: C.
        target_epsilon, target_delta, epochs, steps: calibrate σ instead (``make_private_with_epsilon``).
        grad_sample_mode: "auto" (default), "bk", "ghost", "hooks", "functorch" or "ew" (docs/modes.md).
        clipping, clipping_kwargs: "flat" (default), "per_layer", "automatic", "adaptive" or a plugin's, and
            its factory's arguments.
        noise, noise_kwargs: "gaussian" (default), "bandmf-<b>" or a plugin's, and its factory's arguments.
        accountant: "prv" (default), "rdp", "gdp" or a plugin's.
        augmentation_multiplicity: K augmented copies of each example, adjacent rows, averaged before clipping.
        poisson_sampling: keep True. False is refused; ``"unproven"`` keeps the loader's fixed-size batches, accounts
            for them as Poisson samples (not a proven bound) and warns (docs/privacy.md).
        loss_reduction: "mean" (divide by the expected batch size) or "sum".
        batch_first: whether layers see the batch along dim 0 (else dim 1).
        criterion: a torch loss with ``reduction``; returned wrapped, one loss per example (ghost needs it).
        secure_mode: sampling and noise from the OS's CSPRNG, no noise state. ``noise_seed``: an int for a
            reproducible noise stream.
        sample_rate, expected_batch_size: with ``data_loader=None``, the loop's own sampling rate and the
            "mean" divisor.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 loop (docs/mixed-precision.md).
        public_buffers: names of buffers (as ``module.named_buffers()`` gives them) that change during training
            independently of the data, such as a step counter; every other buffer must not change in a step.
    """
    _refuse_unknown("make_private", unknown)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give noise_multiplier=, or target_epsilon= with target_delta= and epochs= (or steps=)")
    elif target_epsilon is not None:
        raise ValueError("give either noise_multiplier= or target_epsilon=, not both")
    elif epochs is not None or steps is not None or target_delta is not None:
        given = [n for n, v in (("epochs", epochs), ("steps", steps), ("target_delta", target_delta)) if v is not None]
        raise ValueError(f"{', '.join(given)} only serve to calibrate noise_multiplier from target_epsilon; with "
                         "noise_multiplier= they would do nothing. Drop them, or give target_epsilon= instead of "
                         "noise_multiplier=.")
    K = augmentation_multiplicity
    guards.check_objects(module, optimizer, noise_seed, ATTACHED)
    sigma, clip = guards.check_args(1.0 if noise_multiplier is None else noise_multiplier, max_grad_norm, K,
                                    loss_reduction, grad_sample_mode)
    secure_mode = guards.flag(secure_mode, "secure_mode")
    poisson_sampling = guards.sampling_flag(poisson_sampling)
    where = topology.of(module, grad_sample_mode)
    where.check_call({"data_loader": type(data_loader).__name__, "noise_multiplier": noise_multiplier,
                      "max_grad_norm": max_grad_norm, "target_epsilon": target_epsilon, "target_delta": target_delta,
                      "epochs": epochs, "steps": steps, "grad_sample_mode": grad_sample_mode, "clipping": clipping,
                      "noise": noise, "accountant": accountant, "augmentation_multiplicity": K,
                      "poisson_sampling": poisson_sampling, "loss_reduction": loss_reduction,
                      "secure_mode": secure_mode, "noise_seed given": noise_seed is not None,
                      "sample_rate": sample_rate, "expected_batch_size": expected_batch_size,
                      "grad_scaler": grad_scaler is not None})
    registry.lookup("dpkit_accountants", accountant, "accountant")
    clipper = registry.lookup("dpkit_clippers", clipping, "clipping").value(
        max_grad_norm=clip, **(clipping_kwargs or {}))
    mechanism = registry.lookup("dpkit_noise_mechanisms", noise, "noise").value(
        seed=where.noise_seed(noise_seed, secure_mode), secure_mode=secure_mode, **(noise_kwargs or {}))
    batches = sampling.resolve(data_loader, poisson=poisson_sampling, sample_rate=sample_rate,
                               expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                               secure_mode=secure_mode, world_size=where.world_size, noise_seed=noise_seed)
    guards.check_mechanism_sampling(mechanism, noise, clipper, clipping, batches.loader, batches.sample_rate)
    guards.check_truncation(batches.truncation, batches.sample_rate, clipper, clipping, accountant)
    guards.check_dataset_multiplicity(batches.loader, K)
    guards.check_mode_clipper(grad_sample_mode, clipper, clipping)
    if noise_multiplier is None:
        sigma, steps = _calibrate(mechanism, clipper, batches, noise, accountant, target_epsilon=target_epsilon,
                                  target_delta=target_delta, epochs=epochs, steps=steps)
    guards.warn_no_noise(sigma)
    if sigma == 0 and callable(getattr(mechanism, "check_loader", None)):
        raise PrivacyUsageError(f"noise={noise!r} needs noise_multiplier > 0: its position in the run is a count "
                                "of noised steps. Debug with noise='gaussian' instead.")
    guards.check_optimizer(module, optimizer)
    if grad_scaler is not None and optimizer.defaults.get("fused"):
        raise PrivacyUsageError(
            f"{type(optimizer).__name__}(fused=True) unscales gradients inside its fused kernel, which dpkit "
            "cannot combine with the gradient it releases. Use the optimizer without fused=True under a GradScaler.")
    public = frozenset(public_buffers)
    unknown_buffers = sorted(public - {n for n, _ in module.named_buffers()})
    if unknown_buffers:
        raise ValueError(f"public_buffers names {unknown_buffers}, which are not buffers of the model "
                         "(see model.named_buffers()).")
    private = PrivateTraining(module=module, optimizer=optimizer, sampling=batches, topology=where, noise=mechanism,
                              noise_name=noise, clipper=clipper, clipping=clipping, accountant=accountant,
                              noise_multiplier=sigma, max_grad_norm=clip, mode=grad_sample_mode, K=K,
                              loss_reduction=loss_reduction, batch_first=batch_first, criterion=criterion,
                              secure_mode=secure_mode, grad_scaler=grad_scaler, public_buffers=public)
    if noise_multiplier is None:
        private.calibrated_for = (target_epsilon, target_delta, steps)
    return private


def _calibrate(mechanism, clipper, batches: sampling.Sampling, noise: str, accountant: str, *, target_epsilon,
               target_delta, epochs, steps) -> tuple[float, int]:
    """The smallest σ whose ε after ``epochs`` (or ``steps``) is at most the target, and that number of steps."""
    from dpkit.accounting import get_noise_multiplier

    if target_delta is None:
        raise ValueError("target_delta= is required with target_epsilon= (e.g. 1e-5, below 1/N)")
    if steps is None and epochs is not None and batches.loader is not None:
        # An epoch is as many steps as the loader yields (round(1/q) for Poisson), not 1/q.
        steps, epochs = math.ceil(epochs * len(batches.loader)), None
    calibrate = getattr(mechanism, "calibrate", None)  # a mechanism with its own accounting (BandMF)
    if batches.truncation is not None:  # truncated Poisson steps: calibrated on the events the ledger will hold
        from dpkit.accounting import _noise_multiplier_for

        sigma = _noise_multiplier_for(
            lambda s: batches.event(mechanism.dp_event(s, batches.sample_rate)), target_epsilon=target_epsilon,
            target_delta=target_delta, steps=steps, accountant=accountant)
    elif calibrate is not None:
        if steps is None:
            raise ValueError(f"noise={noise!r} calibrates over a number of steps: give steps=, or "
                             "epochs= with a data loader")
        sigma = calibrate(target_epsilon=target_epsilon, target_delta=target_delta, steps=steps,
                          accountant=accountant)
    else:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                     sample_rate=batches.sample_rate, epochs=epochs, steps=steps,
                                     accountant=accountant)
    # A clipper that spends privacy (adaptive's noisy count) shares the budget: the gradient gets what is left.
    split = getattr(clipper, "gradient_noise_multiplier", None)
    if steps is None:  # epochs over data_loader=None: as many steps as get_noise_multiplier counted
        steps = math.ceil(epochs / batches.sample_rate)
    return (split(sigma) if split is not None else sigma), steps


def make_private_with_epsilon(*, target_epsilon: float, target_delta: float | None, **kwargs) -> PrivateTraining:
    """``make_private`` with the smallest noise multiplier whose ε after ``epochs`` (or ``steps``) ≤ target."""
    if "noise_multiplier" in kwargs:
        raise TypeError("make_private_with_epsilon() calibrates noise_multiplier from target_epsilon; give one or "
                        "the other (make_private(noise_multiplier=...) for a fixed one).")
    return make_private(target_epsilon=target_epsilon, target_delta=target_delta, **kwargs)


def detach(module: nn.Module) -> int:
    """Detach every dpkit controller attached to ``module`` (or to a part of it); returns how many."""
    owned = set(module.parameters())
    found = [c for c in list(ATTACHED) if c.module is module or not owned.isdisjoint(c.module.parameters())]
    for c in found:
        c.detach()
    return len(found)


def _shown(fn) -> inspect.Signature:
    """``fn``'s signature without its catch-all for misspelt names, for ``help()``."""
    sig = inspect.signature(fn)
    return sig.replace(parameters=[p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD])


make_private.__signature__ = _shown(make_private)
make_private_with_epsilon.__signature__ = inspect.Signature(
    [p for n, p in _shown(make_private).parameters.items() if n != "noise_multiplier"],
    return_annotation=PrivateTraining)
