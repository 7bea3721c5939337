"""Whole-step checks (:func:`check_sensitivity`, :func:`check_noise`): see :mod:`dpkit.testing`."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from dpkit.engine import PrivateTraining

Setup = Callable[[], "PrivateTraining"]
Step = Callable[["PrivateTraining", Any], Any]

_MAX_EXAMPLES = 16  # neighbours tried by default: each is one more run of the step


@attrs.frozen
class SensitivityReport:
    """What :func:`check_sensitivity` measured, in units of the clipped sum (the released gradient times the
    denominator dpkit divided by)."""

    bound: float  # the clipper's sensitivity C: how far one example may move the clipped sum
    sensitivity: float  # the largest distance measured between the batch's release and a neighbour's
    tolerance: float  # allowed excess over the bound: rtol * bound plus floating-point rounding of the sums
    worst_example: int | None  # the example whose removal moved the release most (None: no example tried)
    examples: tuple[int, ...]  # the examples removed, one neighbour each
    distances: tuple[float, ...]  # ||release(batch) - release(batch without example)||_2, per example tried
    steps: int  # optimizer steps that applied a gradient in each run (virtual steps aside)
    uncounted_steps: int  # of those, summed over all runs, the steps dpkit's ledger did not count
    ok: bool

    def __str__(self) -> str:
        where = f" (example {self.worst_example})" if self.worst_example is not None else ""
        verdict = "within" if self.sensitivity <= self.bound + self.tolerance else "EXCEEDS"
        text = (f"measured sensitivity {self.sensitivity:.6g}{where} {verdict} the bound {self.bound:.6g} "
                f"(tolerance {self.tolerance:.2g}) over {len(self.examples)} neighbour(s); "
                f"{self.steps} step(s) per run")
        if self.uncounted_steps:
            text += f"; {self.uncounted_steps} applied step(s) that dpkit did not count (not accounted for)"
        return text


@attrs.frozen
class NoiseReport:
    """What :func:`check_noise` measured: two runs of the same step that differ only in the noise drawn."""

    expected_std: float  # noise_multiplier * the clipper's sensitivity, per coordinate of the clipped sum
    measured_std: float  # estimated from the difference of the two releases (which has twice the variance)
    coordinates: int  # released coordinates compared
    unnoised: int  # coordinates that came out identical in both runs
    rtol: float  # allowed relative deviation of measured_std: rtol_param + 5 standard errors of the estimate
    ok: bool

    def __str__(self) -> str:
        return (f"noise std {self.measured_std:.6g} measured over {self.coordinates} coordinates, expected "
                f"{self.expected_std:.6g} (rtol {self.rtol:.2g}); {self.unnoised} coordinate(s) without noise")


def check_sensitivity(
    setup: Setup,
    step: Step,
    batch: Any,
    *,
    examples: Sequence[int] | None = None,
    rtol: float = 1e-6,
    raise_on_failure: bool = True,
    seed: int = 0,
) -> SensitivityReport:
    """Measure how far removing one example moves what your training step releases, against the clipping bound.

    Runs ``step`` with the noise off on ``batch`` and on each neighbour (``batch`` without one example), each
    time on a fresh controller from ``setup`` with torch seeded alike, so that the runs differ only in that
    example. What is compared is the gradient the optimizer applies at its first non-virtual step (read after
    every optimizer hook, so a hook that adds or rescales anything is seen), times the denominator dpkit
    divided by: the clipped sum, which one example must move by at most the clipper's ``sensitivity()``.
    Later steps are not compared: the parameters they start from already differ.

    Args:
        setup: ``() -> PrivateTraining``: your ``make_private`` call, building a fresh model and optimizer.
        step: ``(private, batch) -> Any``: your training step (zero_grad, forward, loss, backward,
            ``optimizer.step()``; micro-batches and virtual steps allowed).
        batch: a pytree (tensor, tuple, dict) of tensors with rows along dim 0; an example is ``private.K``
            adjacent rows.
        examples: the examples to remove, one neighbour each; default: all, or 16 spread over the batch.
        rtol: allowed relative excess over the bound, besides the floating-point rounding of the sums.
        raise_on_failure: raise :class:`AssertionError` when the bound is exceeded or a step went uncounted.
        seed: torch's seed before every ``setup()``; the caller's RNG state is restored afterwards.

    Randomness that depends on the batch's shape (dropout masks, augmentation drawn per batch) differs between
    a batch and its neighbours and shows as sensitivity: switch it off in ``setup`` for this check.
    """
    full = _run(setup, step, batch, seed, noise=False)
    n = _rows(batch) // full.K
    chosen = tuple(examples) if examples is not None else _spread(n, _MAX_EXAMPLES)
    for i in chosen:
        if not (isinstance(i, int) and 0 <= i < n):
            raise ValueError(f"examples must be indices of the batch's {n} examples, got {i!r}")
    distances, slack, uncounted = [], 0.0, full.uncounted
    for i in chosen:
        neighbour = _run(setup, step, _without(batch, i, full.K), seed, noise=False)
        uncounted += neighbour.uncounted
        if neighbour.steps != full.steps:
            raise AssertionError(f"the step applied {full.steps} optimizer step(s) on the batch but {neighbour.steps} "
                                 f"without example {i}: the number of steps itself reveals the example")
        distances.append((full.release - neighbour.release).norm().item())
        slack = max(slack, full.rounding + neighbour.rounding)
    worst = max(range(len(chosen)), key=distances.__getitem__) if chosen else None
    sensitivity = distances[worst] if worst is not None else 0.0
    tolerance = rtol * full.bound + slack
    report = SensitivityReport(
        bound=full.bound, sensitivity=sensitivity, tolerance=tolerance,
        worst_example=chosen[worst] if worst is not None else None, examples=chosen, distances=tuple(distances),
        steps=full.steps, uncounted_steps=uncounted, ok=sensitivity <= full.bound + tolerance and not uncounted)
    if raise_on_failure and not report.ok:
        raise AssertionError(f"check_sensitivity: {report}")
    return report


def check_noise(
    setup: Setup,
    step: Step,
    batch: Any,
    *,
    rtol: float = 0.05,
    raise_on_failure: bool = True,
    seed: int = 0,
) -> NoiseReport:
    """Check that your step's release carries noise of standard deviation ``noise_multiplier × C`` everywhere.

    Runs ``step`` twice on ``batch`` with the noise as ``setup`` configures it, from the same torch seed but
    different noise draws (a noise mechanism with a ``seed`` attribute gets a different one in the second run),
    so the releases (scaled to the clipped sum as in :func:`check_sensitivity`) differ by noise alone. Fails when
    a coordinate is equal in both runs (it got no noise) or the measured std is off by more than ``rtol`` plus
    five standard errors of the estimate (which shrinks as 1/sqrt(2·coordinates)).
    """
    first = _run(setup, step, batch, seed, noise=True)
    second = _run(setup, step, batch, seed, noise=True, avoid_seed=first.noise_seed)
    diff = first.release - second.release
    coordinates = diff.numel()
    measured = diff.square().mean().div(2).sqrt().item() if coordinates else 0.0
    tol = rtol + 5 / math.sqrt(2 * max(coordinates, 1))
    unnoised = int((diff == 0).sum())
    ok = unnoised == 0 and coordinates > 0 and abs(measured - first.noise_std) <= tol * first.noise_std
    report = NoiseReport(expected_std=first.noise_std, measured_std=measured, coordinates=coordinates,
                         unnoised=unnoised, rtol=tol, ok=ok)
    if raise_on_failure and not report.ok:
        raise AssertionError(f"check_noise: {report}")
    return report


@attrs.frozen
class _Release:
    """One run of the step: its first applied gradient (as the clipped sum, float64) and its bookkeeping."""

    release: Tensor
    rounding: float  # an estimate of the floating-point error of ``release``: 4 · rows · eps · its norm
    bound: float
    noise_std: float
    noise_seed: Any
    K: int
    steps: int
    uncounted: int


class _Recorder:
    """An optimizer post-hook added after ``make_private``: the gradient each step applied, after every pre-hook."""

    def __init__(self, private: PrivateTraining):
        self.params = [p for group in private.optimizer.param_groups for p in group["params"]]
        self.denominator = float(private.expected_batch_size) if private.loss_reduction == "mean" else 1.0
        self.first: tuple[Tensor, float] | None = None
        self.steps = 0
        self.handle = private.optimizer.register_step_post_hook(self._after)

    def _after(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return  # a virtual step: dpkit withheld every gradient, nothing was applied
        self.steps += 1
        if self.first is not None:
            return
        flat = torch.cat([g.detach().reshape(-1).to("cpu", torch.float64) if g is not None
                          else torch.zeros(p.numel(), dtype=torch.float64) for g, p in zip(grads, self.params)])
        eps = max((torch.finfo(g.dtype).eps for g in grads if g is not None and g.is_floating_point()), default=0.0)
        self.first = (flat * self.denominator, eps)


def _run(setup: Setup, step: Step, batch: Any, seed: int, *, noise: bool, avoid_seed: Any = None) -> _Release:
    from dpkit.engine import PrivateTraining

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_multiplier=0")
        torch.manual_seed(seed)
        private = setup()
        if not isinstance(private, PrivateTraining):
            raise TypeError(f"setup() must return make_private's controller, got {type(private).__name__}")
        recorder = None
        try:
            if not noise:
                private.noise_multiplier = 0.0
            noise_seed = getattr(private.noise, "seed", None)
            if avoid_seed is not None and noise_seed == avoid_seed:
                private.noise.seed = noise_seed = noise_seed + 1
            bound = float(private.clipper.sensitivity())  # before the step: an adaptive clipper moves it after
            noise_std = private.noise_multiplier * bound
            if _rows(batch) % private.K:
                raise ValueError(f"the batch has {_rows(batch)} rows, not a multiple of augmentation_multiplicity "
                                 f"K={private.K}: an example is K adjacent rows")
            recorder = _Recorder(private)
            before = private.steps
            step(private, batch)
            counted = private.steps - before
        finally:
            if recorder is not None:
                recorder.handle.remove()
            private.detach()
    if recorder.first is None:
        raise ValueError("the step applied no gradient: it must call optimizer.step() at least once, not only "
                         "virtual steps")
    release, eps = recorder.first
    rows = max(_rows(batch), 1)
    return _Release(release=release, rounding=4 * rows * eps * release.norm().item(), bound=bound,
                    noise_std=noise_std, noise_seed=noise_seed, K=private.K, steps=recorder.steps,
                    uncounted=max(recorder.steps - counted, 0))


def _rows(batch: Any) -> int:
    sizes = {t.shape[0] for t in pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"the batch's tensors must have the same number of rows along dim 0, got {sorted(sizes)}")
    return sizes.pop()


def _without(batch: Any, i: int, K: int) -> Any:
    """The neighbouring batch: rows ``i*K .. i*K+K-1`` (example ``i`` with its K copies) removed."""
    def drop(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t
        return torch.cat([t[: i * K], t[(i + 1) * K:]])

    return pytree.tree_map(drop, batch)


def _spread(n: int, most: int) -> tuple[int, ...]:
    """All of ``range(n)``, or ``most`` indices spread evenly over it."""
    if n <= most:
        return tuple(range(n))
    return tuple(sorted({round(j * (n - 1) / (most - 1)) for j in range(most)}))
