"""Per-example gradients of any module with ``torch.func``: ``vmap`` over examples of a ``vjp``.

Serves two modes: ``functorch`` (the whole model is one unit) and the per-layer
fallback of ``auto`` (a layer no plugin covers, e.g. ``nn.LSTM`` or
``nn.MultiheadAttention``). The unit's forward is recomputed once per example
(its K copies together), from the inputs and output gradients captured on the
real pass, so no plugin is needed. The recomputation cannot replay random
draws, so a unit that draws them (active dropout) is refused at its first
backward pass (vmap's ``randomness="error"``). Units vmap cannot batch (it has
no rule for an op) fall back to a loop over examples, with a warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from dpkit.errors import PrivacyUsageError, UnsupportedLayerError


def batch_dims(unit: nn.Module, batch_first: bool) -> tuple[int, dict[str, int]]:
    """The batch dimension of the unit's positional tensor inputs, and overrides by argument name."""
    if isinstance(unit, nn.RNNBase):
        return (0 if unit.batch_first else 1), {"hx": 1}
    if isinstance(unit, nn.MultiheadAttention):
        return (0 if unit.batch_first else 1), {"key_padding_mask": 0}
    return (0 if batch_first else 1), {}


def output_batch_dims(unit: nn.Module, batch_first: bool, leaves: Sequence[Tensor | None]) -> list[int]:
    """The batch dimension of each tensor leaf of the unit's output.

    Sequence-first layouts (``batch_first=False``) put the batch at dim 1 of ``[T, B, ...]``
    tensors; a 2-D output (``[B, d]``, after pooling) has it at dim 0.
    """
    n = len(leaves)
    if isinstance(unit, nn.RNNBase):  # output, then h_n (and c_n), whose batch dim is 1
        return [0 if unit.batch_first else 1] + [1] * (n - 1)
    if isinstance(unit, nn.MultiheadAttention):  # attn_output, then attn_weights [B, T, S]
        return [0 if unit.batch_first else 1] + [0] * (n - 1)
    return [0 if batch_first or (t is not None and t.dim() < 3) else 1 for t in leaves]


def fill_defaults(unit: nn.Module, args: list, rows: int) -> list:
    """Make implicit batched state explicit: vmap cannot write a batched value into an unbatched zero state."""
    if isinstance(unit, nn.RNNBase) and (len(args) < 2 or args[1] is None):
        x = args[0]
        dirs = 2 if unit.bidirectional else 1
        hidden = unit.proj_size if getattr(unit, "proj_size", 0) else unit.hidden_size
        h0 = x.new_zeros(unit.num_layers * dirs, rows, hidden)
        if isinstance(unit, nn.LSTM):
            h0 = (h0, x.new_zeros(unit.num_layers * dirs, rows, unit.hidden_size))
        args = [args[0], h0, *args[2:]]
    return args


def _packed_hint(unit: nn.Module) -> str:
    """For a unit with recurrent layers: a PackedSequence (passed in, or packed in ``forward`` from the examples'
    lengths) has the steps of every example as its rows, which torch.func cannot split into examples."""
    names = [repr(n or "<root>") for n, m in unit.named_modules() if isinstance(m, nn.RNNBase)]
    if not names:
        return ""
    return (f" If {', '.join(names)} read a PackedSequence: torch.func cannot split one into examples; "
            "grad_sample_mode='auto', 'bk', 'hooks' and 'ghost' read it with the RNN, GRU and LSTM samplers (the "
            "recurrent layer its own unit: a parent layer with parameters of its own needs a sampler too).")


def _split(x, dim: int | None, rows: int, K: int, unbatched: frozenset[int] = frozenset()):
    """[.., B*K, ..] at ``dim`` → [.., B, K, ..] so that vmap over ``dim`` sees one example's K rows."""
    if dim is None or not isinstance(x, Tensor) or x.dim() <= dim or x.shape[dim] != rows or id(x) in unbatched:
        return x, None
    return x.unflatten(dim, (rows // K, K)), dim


def per_example_grads(
    unit: nn.Module,
    params: dict[str, nn.Parameter],
    args: Sequence,
    kwargs: dict,
    out_grads: Sequence[Tensor | None],
    rows: int,
    K: int,
    batch_first: bool = True,
    unbatched: frozenset[int] = frozenset(),
) -> dict[nn.Parameter, Tensor]:
    """``[B, *p.shape]`` gradients of Σ(output·out_grads) for each example (its K rows summed).

    ``args``/``kwargs`` are the unit's captured inputs, ``out_grads`` the gradients of the
    tensor leaves of its output (``None`` where a leaf got none), all with ``rows`` = B*K rows.
    Inputs whose id is in ``unbatched`` are shared by every example (an attention mask), whatever their shape.
    """
    names = list(params)
    if not names:
        return {}
    if any(isinstance(v, nn.utils.rnn.PackedSequence) for v in (*args, *kwargs.values())):
        raise UnsupportedLayerError(f"torch.func cannot recompute {type(unit).__name__} one example at a time: it "
                                    f"is fed a PackedSequence, whose rows are steps, not examples.{_packed_hint(unit)}")
    if rows == 0:
        return {p: p.new_zeros((0, *p.shape)) for p in params.values()}
    arg_dim, named_dims = batch_dims(unit, batch_first)
    args = fill_defaults(unit, list(args), rows)
    split_args, arg_dims = [], []
    for i, a in enumerate(args):
        dim = named_dims.get("hx", arg_dim) if (i == 1 and isinstance(unit, nn.RNNBase)) else arg_dim
        pieces = [_split(t, dim, rows, K, unbatched) for t in pytree.tree_leaves(a)]
        spec = pytree.tree_structure(a)
        split_args.append(pytree.tree_unflatten([p[0] for p in pieces], spec))
        arg_dims.append(pytree.tree_unflatten([p[1] for p in pieces], spec))
    split_kwargs, kwarg_dims = {}, {}
    for key, value in kwargs.items():
        split_kwargs[key], kwarg_dims[key] = _split(value, named_dims.get(key, arg_dim), rows, K, unbatched)
    out_dims = output_batch_dims(unit, batch_first, out_grads)
    grads, grad_dims = [], []
    for g, d in zip(out_grads, out_dims):
        g, d = _split(g, d, rows, K) if g is not None else (None, None)
        grads.append(g)
        grad_dims.append(d)

    def one_example(flat_params, ex_args, ex_kwargs, ex_grads):
        def forward(*ps):
            out = functional_call(unit, dict(zip(names, ps)), tuple(ex_args), ex_kwargs)
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
            return tuple(leaf for leaf, g in zip(leaves, ex_grads) if g is not None)

        outs, pullback = vjp(forward, *flat_params)
        # Under autocast the real pass may have produced gradients in another dtype than the recomputation.
        return pullback(tuple(g.to(o.dtype) for g, o in zip((g for g in ex_grads if g is not None), outs)))

    flat = tuple(params[n].detach() for n in names)
    # oneDNN/cuDNN recurrent kernels have no batching rule (and oneDNN's backward breaks under torch.func);
    # the recomputation uses the native kernels, the same function.
    with torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None), \
            torch.backends.cudnn.flags(enabled=False, benchmark=None, benchmark_limit=None, deterministic=None,
                                       allow_tf32=None, fp32_precision=None, depthwise_kernel=None):
        return _batched(unit, one_example, flat, names, params, (split_args, split_kwargs, grads),
                        (arg_dims, kwarg_dims, grad_dims), rows // K)


def _batched(unit: nn.Module, one_example: Callable, flat: tuple[Tensor, ...], names: list[str],
             params: dict[str, nn.Parameter], values: tuple, dims: tuple, batch: int) -> dict[nn.Parameter, Tensor]:
    """``vmap`` of ``one_example`` over the examples; a loop for unit types vmap cannot batch."""
    if type(unit) not in _UNBATCHABLE:
        try:
            batched = vmap(one_example, in_dims=(None, *dims), randomness="error")(flat, *values)
            return {params[n]: g for n, g in zip(names, batched)}
        except (RuntimeError, ValueError) as err:
            if "randomness" in str(err):
                raise PrivacyUsageError(
                    f"{type(unit).__name__} draws random numbers in training mode (dropout); recomputing it per "
                    "example cannot replay the draws, so its per-example gradients would be wrong. Set its "
                    "dropout to 0, register a sampler for it, or use grad_sample_mode='hooks'."
                ) from err
            _UNBATCHABLE.add(type(unit))
            warnings.warn(f"torch.func.vmap cannot batch {type(unit).__name__} ({str(err).splitlines()[0][:200]}); "
                          "dpkit computes its per-example gradients with a loop over examples instead: exact, "
                          "but slower. Registering a sampler for it makes it fast.", stacklevel=2)
    try:
        per_example = [one_example(flat, *_select(values, dims, b)) for b in range(batch)]
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise UnsupportedLayerError(
            f"torch.func cannot recompute {type(unit).__name__} one example at a time: "
            f"{str(err).splitlines()[0][:300]}. Custom autograd.Functions without setup_context, activation "
            "checkpointing (saved-tensor hooks) and inputs whose rows are not the examples (EmbeddingBag with "
            "offsets) are beyond it; with grad_sample_mode='functorch' the whole model is one unit, so use "
            f"grad_sample_mode='auto' or 'hooks', which recompute only the layers no plugin covers.{_packed_hint(unit)}"
        ) from err
    return {params[n]: torch.stack([g[i] for g in per_example]) for i, n in enumerate(names)}


_UNBATCHABLE: set[type] = set()  # unit types vmap failed on: loop over examples, warn once


def _select(values, dims, b: int):
    """Example ``b`` of every value with a batch dim (as vmap would pass it)."""
    def pick(value, dim):
        return value.select(dim, b) if dim is not None else value
    return pytree.tree_map(pick, values, dims, is_leaf=lambda x: x is None or isinstance(x, Tensor))

def trainable_params(unit: nn.Module, recurse: bool = True) -> dict[str, nn.Parameter]:
    """The unit's trainable parameters by name, each once (tied parameters under their first name)."""
    return {n: p for n, p in unit.named_parameters(recurse=recurse) if p.requires_grad}

