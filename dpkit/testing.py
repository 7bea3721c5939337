"""Checks you run on your own code: a layer plugin's samplers, and a whole training step.

A sampler is easy to get subtly wrong: a forgotten sum over an example's K augmented copies, a transposed
weight, a padding convention, a ``view`` that breaks on non-contiguous input, an empty Poisson batch. These
checks draw random batches shaped like your example input, run your layer, and compare your sampler's output
with per-example gradients that ``torch.func.grad`` computes through ``functional_call``, one example at a
time. They need no pytest fixture, so any plugin package's tests can call them::

    import torch
    from dpkit.testing import check_grad_sampler, check_norm_sampler

    from my_plugin import MyLayer, my_grad_sampler, my_norm_sampler

    def test_my_layer():
        layer = MyLayer(8, 6)
        check_grad_sampler(layer, torch.randn(5, 7, 8), K=2, sampler=my_grad_sampler)
        check_norm_sampler(layer, torch.randn(5, 7, 8), K=2, sampler=my_norm_sampler)

Leave ``sampler`` out to check whatever the registry resolves for ``type(layer)`` (your plugin, once installed).
A check returns ``None`` when the sampler agrees and raises :class:`AssertionError` naming the parameter, the
example, the largest difference and the shapes when it does not.

A training loop can leak too, around a correct sampler: a hook that adds an unclipped term to ``p.grad``, a
second loss backpropagated with dpkit paused, a rescaling after the noise. :func:`check_sensitivity` runs *your*
step with the noise off on a batch and on its neighbours (one example removed) and measures how far one example
moves what the optimizer applies; :func:`check_noise` runs it twice with the noise on and checks that every
coordinate got noise of the promised size.
"""
from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import attrs
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from dpkit.errors import UnsupportedLayerError

if TYPE_CHECKING:
    from dpkit.engine import PrivateTraining

__all__ = [
    "NoiseReport", "SensitivityReport", "check_grad_sampler", "check_noise", "check_norm_sampler",
    "check_sensitivity", "forward_activations",
]

ExampleInput = Union[Tensor, Sequence[Union[Tensor, None]], Callable[[int], Any]]
"""A tensor, a tuple of positional inputs (``None`` allowed), or ``rows -> tensor | tuple`` for inputs whose
dim 0 is not the batch (an ``EmbeddingBag``'s flat indices and offsets)."""

_TOLERANCES = {  # (atol, rtol), applied as max|got - ref| <= atol + rtol * max|ref| per parameter
    torch.float64: (1e-12, 1e-7),
    torch.float32: (1e-6, 1e-4),
    torch.float16: (1e-3, 5e-2),
    torch.bfloat16: (1e-3, 5e-2),
}


def check_grad_sampler(
    layer: nn.Module,
    example_input: ExampleInput,
    K: int = 1,
    *,
    sampler: Callable | None = None,
    batch_sizes: Sequence[int] = (0, 1, 3),
    dtype: torch.dtype | None = torch.float64,
    atol: float | None = None,
    rtol: float | None = None,
    non_contiguous: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> None:
    """Assert that a grad sampler gives ``torch.func``'s per-example gradients on ``layer``.

    Args:
        layer: the layer to check (a deep copy is used; ``layer`` itself is not modified).
        example_input: what the layer takes, with the batch in dim 0: a tensor, a tuple of positional inputs
            (``None`` allowed), or a callable ``rows -> tensor | tuple`` that makes inputs for ``rows`` rows.
            Only dtypes and trailing shapes are used: floating inputs are redrawn from a standard normal,
            integer inputs (indices) uniformly between the example's minimum and maximum.
        K: augmentation multiplicity; every batch has ``B*K`` rows, an example's K copies adjacent.
        sampler: the function to check; by default the one the registry table resolves for ``type(layer)``.
        batch_sizes: numbers of examples B to try; ``0`` checks the empty batch.
        dtype: floating dtype to run the layer and the sampler in (``None``: keep the layer's). The reference
            is always computed in float64 from the same values.
        atol, rtol: the check is ``max|got - ref| <= atol + rtol * max|ref|`` per parameter; defaults by dtype.
        non_contiguous: also run the largest batch with non-contiguous inputs and backprops (same values,
            memory order reversed), which catches a ``view`` where a ``reshape`` is needed.
        forward_kwargs: keyword arguments for every forward call (not batched).
        seed: the data is drawn under ``torch.random.fork_rng``, so the caller's RNG is untouched.

    Raises:
        AssertionError: the sampler disagrees, returns a wrong shape, misses or adds a parameter, or modifies
            its activations in place.
        UnsupportedLayerError: no sampler was given and no plugin provides one for ``type(layer)``.
    """
    _check("dpkit_grad_samplers", layer, example_input, K, sampler, batch_sizes, dtype, (atol, rtol),
           non_contiguous, forward_kwargs, seed)  # fmt: skip


def check_norm_sampler(
    layer: nn.Module,
    example_input: ExampleInput,
    K: int = 1,
    *,
    sampler: Callable | None = None,
    batch_sizes: Sequence[int] = (0, 1, 3),
    dtype: torch.dtype | None = torch.float64,
    atol: float | None = None,
    rtol: float | None = None,
    non_contiguous: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> None:
    """Assert that a norm sampler gives the L2 norms of ``torch.func``'s per-example gradients.

    Same arguments as :func:`check_grad_sampler`. The sampler must return ``[B]`` per trainable parameter: the
    norm of that parameter's gradient summed over the example's K copies. Pass ``dtype=torch.bfloat16`` (with
    the looser default tolerance) to check that norms survive low-precision inputs.
    """
    _check("dpkit_norm_samplers", layer, example_input, K, sampler, batch_sizes, dtype, (atol, rtol),
           non_contiguous, forward_kwargs, seed)  # fmt: skip


def forward_activations(layer: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> list[Any]:
    """The ``activations`` a sampler receives: forward's arguments in signature order, defaults filled, detached."""
    bound = inspect.signature(layer.forward).bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    values: list[Any] = []
    for name, param in inspect.signature(layer.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            values.extend(bound.arguments.get(name, ()))
        elif param.kind is not inspect.Parameter.VAR_KEYWORD:
            values.append(bound.arguments[name])
    return [v.detach() if isinstance(v, Tensor) else v for v in values]


def _check(
    hook: str,
    layer: nn.Module,
    example_input: ExampleInput,
    K: int,
    sampler: Callable | None,
    batch_sizes: Sequence[int],
    dtype: torch.dtype | None,
    tolerances: tuple[float | None, float | None],
    non_contiguous: bool,
    forward_kwargs: dict[str, Any] | None,
    seed: int,
) -> None:
    layer = copy.deepcopy(layer)
    if dtype is not None:
        layer = layer.to(dtype)
    run_dtype = dtype or next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float32)
    default_atol, default_rtol = _TOLERANCES.get(run_dtype, _TOLERANCES[torch.float32])
    atol, rtol = tolerances
    tol = (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    sampler = sampler if sampler is not None else _registered(hook, layer)
    what = f"{hook[6:-1].replace('_', ' ')} {_name(sampler)} on {layer!r}"
    device = next((p.device for p in layer.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        runs = [(B, False) for B in batch_sizes] + [(max(batch_sizes), True)] * non_contiguous
        for B, strided in runs:
            args = _draw(example_input, B * K, run_dtype, device)
            where = f"{what}, B={B}, K={K}, {'non-contiguous' if strided else 'contiguous'} inputs"
            _compare(hook, layer, sampler, args, B, K, forward_kwargs or {}, strided, tol, where)


def _name(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _registered(hook: str, layer: nn.Module) -> Callable:
    from dpkit import registry

    entry = registry.table(hook).get(type(layer))
    if entry is None:
        kind = "register_grad_sampler" if "grad" in hook else "register_norm_sampler"
        raise UnsupportedLayerError(
            f"no plugin provides {hook} for {type(layer).__qualname__} (exact type); pass sampler=..., "
            f"or register one with @dpkit.{kind}({type(layer).__qualname__}) or an installed plugin"
        )
    return entry.value


def _draw(example_input: ExampleInput, rows: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """Fresh inputs with ``rows`` rows, shaped and typed like the example."""
    if callable(example_input) and not isinstance(example_input, Tensor):
        made = example_input(rows)
        made = made if isinstance(made, tuple) else (made,)
        return tuple(_as(x, dtype, device) for x in made)
    parts = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    out = []
    for x in parts:
        if not isinstance(x, Tensor):
            out.append(x)
        elif x.is_floating_point():
            out.append(torch.randn(rows, *x.shape[1:], dtype=dtype, device=device))
        elif x.dtype == torch.bool:
            out.append(torch.rand(rows, *x.shape[1:], device=device) < 0.5)
        else:
            low, high = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            out.append(torch.randint(low, high + 1, (rows, *x.shape[1:]), dtype=x.dtype, device=device))
    return tuple(out)


def _as(x: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if not isinstance(x, Tensor):
        return x
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


def _strided(x: Any) -> Any:
    """The same values in a non-contiguous layout: memory order reversed (a ``view`` that folds rows fails)."""
    if not isinstance(x, Tensor) or x.dim() == 0:
        return x
    if x.dim() == 1:
        return torch.stack([x, x], dim=1)[:, 0]
    dims = list(reversed(range(x.dim())))
    return x.permute(dims).contiguous().permute(dims)


def _first(out: Any) -> Any:
    """A layer's first output (an LSTM's ``output``, attention's ``attn_output``): the one the checks differentiate."""
    return out[0] if isinstance(out, tuple) else out


def _compare(hook, layer, sampler, args, B, K, kwargs, strided, tol, where) -> None:
    if strided:
        args = tuple(_strided(x) for x in args)
    try:
        out = _first(layer(*args, **kwargs))
    except Exception as err:
        hint = "; leave 0 out of batch_sizes if the layer cannot take an empty batch" if B == 0 else ""
        raise RuntimeError(f"{where}: the layer's own forward failed: {err}{hint}") from err
    if not isinstance(out, Tensor) or out.shape[:1] != (B * K,):
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise AssertionError(f"{where}: the layer's output is {got}; the checks need a tensor with {B * K} rows")
    backprops = torch.randn_like(out, memory_format=torch.contiguous_format)
    activations = forward_activations(layer, args, kwargs)
    saved = [x.clone() if isinstance(x, Tensor) else x for x in activations]
    try:
        result = sampler(layer, activations, _strided(backprops) if strided else backprops, K=K)
    except Exception as err:
        raise AssertionError(f"{where}: the sampler raised {type(err).__name__}: {err}") from err
    for i, (x, y) in enumerate(zip(activations, saved)):
        if isinstance(x, Tensor) and not torch.equal(x, y):
            raise AssertionError(f"{where}: the sampler modified activations[{i}] in place")
    if not isinstance(result, dict):
        raise AssertionError(f"{where}: the sampler returned a {type(result).__name__}, not a dict keyed by parameter")
    reference = _reference(layer, args, kwargs, backprops, B, K)
    names = {p: n for n, p in layer.named_parameters()}
    _check_keys(result, reference, names, where)
    for p, ref in reference.items():
        if "norm" in hook:
            ref = ref.reshape(B, ref[0].numel() if B else 0).norm(dim=1)
        _assert_close(result[p], ref, f"{where}: parameter {names[p]!r}", tol)


def _check_keys(result: dict, reference: dict, names: dict, where: str) -> None:
    """The sampler must cover exactly the trainable parameters, keyed by the layer's own Parameter objects."""
    got = [names.get(p, f"<a {type(p).__name__} that is not one of the layer's parameters>") for p in result]
    missing = [n for p, n in names.items() if p in reference and p not in result]
    extra = [n for p, n in zip(result, got) if p not in reference]
    if missing or extra:
        raise AssertionError(
            f"{where}: the sampler returned {got}, but the trainable parameters are "
            f"{[names[p] for p in reference]} (missing {missing}, unexpected {extra})"
        )


def _reference(layer, args, kwargs, backprops, B, K) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of ``Σ out·backprops`` over each example's K rows, by ``torch.func.grad`` in float64."""
    ref_layer = copy.deepcopy(layer).to(torch.float64)
    pairs = zip(ref_layer.named_parameters(), layer.named_parameters())
    trainable = {n: p for (n, p), (_, q) in pairs if q.requires_grad}
    frozen = {n: p for n, p in ref_layer.named_parameters() if n not in trainable}
    state = {**frozen, **dict(ref_layer.named_buffers())}
    args = tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in args)
    bp = backprops.double()

    def loss(params: dict[str, Tensor], rows: slice) -> Tensor:
        return (_first(functional_call(ref_layer, {**params, **state}, args, kwargs))[rows] * bp[rows]).sum()

    params = {n: p.detach() for n, p in trainable.items()}
    grads = [torch.func.grad(loss)(params, slice(b * K, (b + 1) * K)) for b in range(B)]
    by_name = dict(layer.named_parameters())
    return {
        by_name[n]: torch.stack([g[n] for g in grads]) if B else p.new_zeros(0, *p.shape) for n, p in params.items()
    }


def _assert_close(got: Tensor, ref: Tensor, what: str, tol: tuple[float, float]) -> None:
    if not isinstance(got, Tensor) or got.shape != ref.shape:
        shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise AssertionError(f"{what}: the sampler gave shape {shape}, expected {list(ref.shape)}")
    diff = (got.double() - ref).abs().reshape(ref.shape[0], ref[0].numel() if ref.shape[0] else 0)
    bound = tol[0] + tol[1] * ref.abs().max().item() if ref.numel() else 0.0
    if ref.numel() and not (diff.max() <= bound):  # `not <=` also catches NaN
        worst = diff.nan_to_num(float("inf")).amax(dim=1).argmax().item()
        raise AssertionError(
            f"{what}, example {worst}: max abs diff {diff[worst].max().item():.3g} exceeds "
            f"{bound:.3g} (atol {tol[0]:g} + rtol {tol[1]:g} * max|reference| {ref.abs().max().item():.3g}); "
            f"sampler {list(got.shape)} {got.dtype}, reference {list(ref.shape)}"
        )


# --- a whole training step -----------------------------------------------------------------------------------------

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
