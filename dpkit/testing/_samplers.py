"""Sampler checks (:func:`check_grad_sampler`, :func:`check_norm_sampler`): see :mod:`dpkit.testing`."""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dpkit.errors import UnsupportedLayerError

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
