"""Built-in layer plugins, one module per layer family, and the reshapes they share.

Every sampler sees ``B*K`` rows (an example's K augmented copies adjacent) and sums over an example's copies and
positions; these helpers turn that into one reshape, so that K never needs a branch. Sizes are spelt out rather
than inferred with ``-1`` so that an empty batch (B = 0) reshapes too.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import opt_einsum
import torch
from torch import Tensor


@functools.lru_cache(maxsize=1024)
def _expression(equation: str, *shapes: tuple[int, ...]) -> opt_einsum.contract.ContractExpression:
    return opt_einsum.contract_expression(equation, *shapes)


def contract(equation: str, *operands: Tensor) -> Tensor:
    """``opt_einsum.contract`` with the contraction path planned once per equation and shapes, not per call.

    Planning costs more than a small contraction itself (about 0.1 ms a call); shapes repeat every step.
    """
    return _expression(equation, *(tuple(o.shape) for o in operands))(*operands)


def fold(x: Tensor, K: int) -> Tensor:
    """``[B*K, *positions, d]`` → ``[B, K*positions, d]``: an example's copies and positions become one axis."""
    if x.shape[0] % K:
        raise ValueError(f"{x.shape[0]} rows is not a multiple of augmentation_multiplicity K={K}")
    return x.reshape(x.shape[0] // K, K * math.prod(x.shape[1:-1]), x.shape[-1])


def examples(x: Tensor, K: int) -> Tensor:
    """``[B*K, ...]`` → ``[B, K, ...]``: group each example's K adjacent copies."""
    if x.shape[0] % K:
        raise ValueError(f"{x.shape[0]} rows is not a multiple of augmentation_multiplicity K={K}")
    return x.reshape(x.shape[0] // K, K, *x.shape[1:])


def sum_examples(x: Tensor, K: int, keep: int) -> Tensor:
    """``[B*K, *positions, *kept]`` → ``[B, *kept]``: sum each example's copies and positions.

    ``keep`` is the number of trailing dimensions kept (a parameter's shape, e.g. LayerNorm's normalized shape).
    """
    kept = x.shape[x.dim() - keep :]
    return fold(x.reshape(*x.shape[: x.dim() - keep], math.prod(kept)), K).sum(1).reshape(-1, *kept)


def block_grads(pairs: list[tuple[Tensor | None, Tensor]], K: int) -> Tensor:
    """Per-example gradients of a parameter given as Linear blocks ``[(a, g), ...]`` (``Σ_t g_t a_tᵀ``, or
    ``Σ_t g_t`` where ``a`` is ``None``) stacked along its first dimension: ``[B, rows, *rest]``, K-summed."""
    blocks = [fold(g, K).sum(1) if a is None else torch.bmm(fold(g, K).transpose(1, 2), fold(a, K))
              for a, g in pairs]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)


class RowSum:
    """A clipped sum given as the rows it adds to a table (an embedding's ``[V, d]`` weight: ``keys`` index rows of
    width ``rows.shape[1]``), so that the step's buffer takes it with one ``index_add_`` instead of a dense sum
    formed and then copied in (for a 5000 × 128 table, about 1 ms of a 10 ms step)."""

    __slots__ = ("shape", "keys", "rows")

    def __init__(self, shape: tuple[int, ...], keys: Tensor, rows: Tensor):
        self.shape, self.keys, self.rows = shape, keys, rows

    def into(self, out: Tensor, overwrite: bool) -> Tensor:
        """Add the rows into ``out`` (a contiguous tensor of ``shape``), zeroed first if ``overwrite``."""
        if overwrite:
            out.zero_()
        out.view(-1, self.rows.shape[1]).index_add_(0, self.keys, self.rows.to(out.dtype))
        return out

    def dense(self) -> Tensor:
        return self.into(self.rows.new_zeros(self.shape), overwrite=False)


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32: norms of bf16/fp16 gradients are accumulated without losing them to rounding."""
    return x if x.dtype in _WIDE else x.to(torch.promote_types(x.dtype, torch.float32))


_WIDE = (torch.float32, torch.float64)


_LAST_GRAM: contextvars.ContextVar[list | None] = contextvars.ContextVar("dpkit_last_gram", default=None)


@contextlib.contextmanager
def reused_grams() -> Iterator[None]:
    """Within the block, ``weight_sq_norms`` reuses the last Gram matrix it formed if the next layer reads the
    same input (separate q, k and v projections of one hidden state; a gate and an up projection).

    One matrix is kept at a time: such layers finish their backward passes one after another, and ``[N, T, T]``
    per layer would add up at long sequences.
    """
    token = _LAST_GRAM.set([None, None, None])
    try:
        yield
    finally:
        _LAST_GRAM.reset(token)


def _gram(x: Tensor, reuse: bool) -> Tensor:
    """``x xᵀ`` per row (``[N, T, d]`` → ``[N, T, T]``) in at least float32, reused for the same memory.

    The cache holds ``x`` itself, so its memory cannot be freed and handed to another tensor while cached.
    """
    last = _LAST_GRAM.get() if reuse else None
    key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device)
    if last is not None and last[0] == key:
        return last[1]
    wide = upcast(x)
    gram = torch.bmm(wide, wide.transpose(1, 2))  # bmm reads the transposed operand in place
    if last is not None:
        last[:] = [key, gram, x]
    return gram


def weight_sq_norms(a: Tensor, g: Tensor, shared_input: bool = False) -> Tensor:
    """Squared Frobenius norms of ``Σ_t g_t a_tᵀ`` for each row: ``[N, T, d]``, ``[N, T, p]`` → ``[N]``.

    The gradient of a linear map over T positions. Two ways to its norm, picked from the shapes alone so the
    choice costs nothing per step: the ghost norm ``Σ_{t,s} (g_t·g_s)(a_t·a_s)`` (~N·T²·(p+d) flops, two T×T
    Gram matrices) or the instantiated gradient (~N·T·p·d flops, one p×d matrix). Computed in at least float32,
    so that bf16/fp16 activations do not lose the norm to rounding. ``shared_input``: ``a`` is a layer input that
    other layers may read too, whose Gram matrix ``reused_grams`` may reuse.
    """
    T, d, p = a.shape[1], a.shape[2], g.shape[2]
    if T * (p + d) < p * d:
        g = upcast(g)
        return (_gram(a, shared_input) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)).clamp_min(0)
    return torch.bmm(upcast(g).transpose(1, 2), upcast(a)).square().sum((1, 2))
