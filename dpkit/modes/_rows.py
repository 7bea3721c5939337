"""Rows stay independent (issue 21, invariant 2): the rule table the batch trace applies to every torch call.

Loss row *i* may depend only on example *i* (its K augmented copies included) and on the parameters; otherwise
clipping row *i*'s gradient does not bound example *i*'s influence on the step. The batch trace (``_trace.py``)
gives each tensor derived from the batch a state (``_row_rules.py``): the dim that holds the examples, ``Summed``
(reduced over them: a loss), or ``Mixed``. A call whose output requires grad and mixes rows, or takes a mixed
input, raises ``RowMixingError`` naming the operation and the user's line. Without grad (metrics) mixing is only
recorded, and refused where a mixed tensor later feeds a grad-requiring op, the model, or the loss.

A function dpkit cannot read but that is row-wise (each output row depends only on its own example) is declared
with ``rowwise(fn)``: its inside is not checked, its outputs keep its inputs' batch dimension.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dpkit.amp import calling_scaler
from dpkit.errors import RowMixingError
from dpkit.modes import _row_rules as R
from dpkit.modes import _row_shapes as S
from dpkit.modes._row_rules import FREE, TRUSTED, Mixed, One, Summed, _arg, _first_out, mix, op_name

__all__ = ["FREE", "TRUSTED", "Mixed", "One", "Summed", "refusal", "state_of"]


# -- layers that are one torch call ------------------------------------------------------------------------------
def rnn(tr, func, args, kwargs, out, found):
    """torch.lstm / gru / rnn_tanh / rnn_relu: the recurrence runs along the time dim, so the batch must be the
    other one (dim 0 with batch_first, else 1); the hidden states hold the batch at dim 1."""
    x, sx = args[0], tr.state(args[0])
    if isinstance(args[1], Tensor) and args[1].dim() == 1 and not args[1].is_floating_point():
        # A PackedSequence: its rows are time steps of several examples, which the recurrence keeps apart (each
        # example's steps use its own hidden state). Row-wise, but its layout is not one the trace follows, so
        # its outputs are no longer tracked (docs/design.md says so).
        return [FREE] * len(out)
    want = (0 if args[8] else 1) if len(args) > 8 and x.dim() == 3 else None
    hx = args[1] if isinstance(args[1], (tuple, list)) else [args[1]]
    g = sx[1] if sx is not None else next((tr.state(h)[1] for h in hx if tr.state(h) is not None), 1)
    if (sx is not None and sx[0] != want) or any(tr.state(h) not in (None, (1, g)) for h in hx):
        return mix(func, "runs its recurrence along the batch dimension (check batch_first)")
    if len(found) > sum(1 for t in [x, *hx] if tr.state(t) is not None):
        return mix(func, "has batched weights")
    return [(want, g)] + [(1, g)] * (len(out) - 1)


def mha(tr, func, args, kwargs, out, found):
    """F.multi_head_attention_forward on ``[L, N, E]``: attention along L per example of N; a key padding mask
    ``[N, S]``, and a 3-d attn_mask ``[N*heads, L, S]``."""
    heads = _arg(args, kwargs, 4, "num_heads", 1)
    states = {id(t): s for t, s in found}
    g = None
    for pos, name, want, ndim, per in ((0, "query", 1, 3, 1), (1, "key", 1, 3, 1), (2, "value", 1, 3, 1),
                                       (14, "key_padding_mask", 0, 2, 1), (16, "attn_mask", 0, 3, heads)):
        t = _arg(args, kwargs, pos, name)
        s = states.pop(id(t), None) if isinstance(t, Tensor) else None
        if s is None:
            continue
        if s[0] != want or t.dim() != ndim or (g is not None and s[1] != g * per):
            return mix(func, f"attends across the batch dimension ({name} holds it along dim {s[0]}; check "
                             "batch_first)")
        g = s[1] // per if g is None else g
    if states:
        return mix(func, "has batched weights")
    return [(1, g), (0, g)]


def embedding_bag(tr, func, args, kwargs, out, found):
    """F.embedding_bag: with offsets, flat indices are grouped into bags, and each bag is one example (dpkit's
    EmbeddingBag samplers take the bags as the rows); without, rows of a 2-d input are bags."""
    x = args[0]
    if x.dim() == 1 and _arg(args, kwargs, 2, "offsets") is not None:
        return (0, 1)
    return R.generic(tr, func, args, kwargs, out, found)


_LOSS_POS = {"cross_entropy": 6, "nll_loss": 6, "mse_loss": 4, "l1_loss": 4, "smooth_l1_loss": 4,
             "binary_cross_entropy": 5, "binary_cross_entropy_with_logits": 5, "kl_div": 4}


def loss(tr, func, args, kwargs, out, found):
    """F.*_loss: per row with reduction='none'; 'sum' and 'mean' over a count fixed by shapes are a ``Summed``
    loss. cross_entropy / nll_loss's 'mean' divides by the labelled (or weighted) targets of the whole batch."""
    name = func.__name__
    x, target = args[0], _arg(args, kwargs, 1, "target")
    reduction = _arg(args, kwargs, _LOSS_POS.get(name), "reduction", "mean")
    legacy = [kwargs.get(k) for k in ("size_average", "reduce")]
    if any(v is not None for v in legacy):
        reduction = torch.nn._reduction.legacy_get_string(*legacy)
    if name in ("cross_entropy", "nll_loss"):
        rows = _class_rows(tr, func, x, target, found)
    elif name == "ctc_loss":  # log_probs [T, N, C], targets [N, S]: one loss per N
        g = found[0][1][1]
        rows = (0, g) if tr.state(x) in (None, (1, g)) and tr.state(target) in (None, (0, g)) else \
            mix(func, "takes the batch along the wrong dim (log_probs are [T, N, C])")
    elif reduction == "none":
        rows = (R.pointwise if name in _LOSS_POS else R.generic)(tr, func, args, kwargs, out, found)
    else:
        rows = R.agree(func, found)
    if reduction == "none" or not isinstance(rows, tuple):
        return rows
    if name in ("cross_entropy", "nll_loss") and reduction == "mean" and tr.state(target) is not None:
        ignore = _arg(args, kwargs, 4, "ignore_index", -100)
        weight = _arg(args, kwargs, 2, "weight")
        if weight is not None or (not target.is_floating_point() and bool((target == ignore).any())):
            return mix(func, "with reduction='mean' divides by the number (or weight) of the labelled targets in "
                             "the whole batch, which other examples change. Use reduction='none', average each "
                             "example's tokens by its own count, then sum or mean over examples "
                             "(private.criterion does)")
    n = x.shape[rows[0]] if x.dim() > rows[0] and not (name in ("cross_entropy", "nll_loss") and rows[0]) else None
    weight = 1.0 if reduction == "sum" else 1 / n if n and reduction == "mean" else None
    return Summed(f"{op_name(func)}(reduction={reduction!r}){R.where()}", weight, n)


def _class_rows(tr, func, x: Tensor, target, found: list) -> object:
    """cross_entropy / nll_loss's rows: the input's without its class dim 1, which the target (class indices, or
    probabilities shaped like the input) must match."""
    sx, st = tr.state(x), tr.state(target) if isinstance(target, Tensor) else None
    rows = None
    if sx is not None:
        if x.dim() == 1 or sx[0] == 1:
            return mix(func, "takes its classes along the batch dimension")
        rows = (0 if sx[0] == 0 else sx[0] - 1, sx[1])
    if st is not None:
        probabilities = target.is_floating_point() and target.dim() == x.dim()
        as_rows = (0 if st[0] == 0 else st[0] - 1, st[1]) if probabilities and st[0] != 1 else \
            None if probabilities else st
        if as_rows is None or rows not in (None, as_rows):
            return mix(func, "pairs each input row with another example's target")
        rows = as_rows
    if len(found) > (sx is not None) + (st is not None):
        return mix(func, "has batched class weights")
    return rows


# -- a sum over the rows (the loss being formed) -----------------------------------------------------------------
_SUM_KEEP = frozenset({"neg", "__neg__", "__pos__", "clone", "to", "float", "double", "half", "bfloat16", "type",
                       "contiguous", "detach", "reshape", "view", "squeeze", "unsqueeze", "flatten", "sum", "mean",
                       "nansum", "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__",
                       "__isub__", "sub_", "rsub", "mul", "__mul__", "__rmul__", "__imul__", "mul_", "div",
                       "__truediv__", "__itruediv__", "div_", "true_divide", "__get__", "stack", "cat"})


def summed(tr, func, args, kwargs, out, found):
    """Linear maps of a sum over rows stay a sum over rows (a loss scaled, or two losses added). A sum combined
    with the rows, multiplied by another sum, or dividing something (``loss_sum / mask.sum()``) mixes."""
    name = func.__name__
    sums = [s for _, s in found if isinstance(s, Summed)]
    if any(isinstance(s, tuple) for _, s in found):
        return mix(func, f"combines the batch's rows with a quantity reduced over the whole batch "
                         f"({sums[0].what}), as h - h.mean(0) does")
    if name not in _SUM_KEEP:
        return mix(func, f"is applied to a quantity reduced over the whole batch ({sums[0].what}); the loss must be "
                         "a plain sum of per-example losses, or their mean over a fixed count")
    if name in ("mul", "__mul__", "__rmul__", "__imul__", "mul_") and len(found) > 1:
        return mix(func, "multiplies two quantities reduced over the batch")
    if name in ("div", "__truediv__", "__itruediv__", "div_", "true_divide") and tr.state(args[1]) is not None:
        return mix(func, f"divides by a quantity computed from the batch ({tr.state(args[1]).what}), such as the "
                         "labelled tokens of the whole batch: the loss must be a sum of per-example losses, or "
                         "their mean over a count that does not depend on the data")
    return _rescaled(tr, name, args, kwargs, sums)


def _rescaled(tr, name: str, args: tuple, kwargs: dict, sums: list[Summed]) -> Summed:
    """A linear map of sums over the rows, with each row's weight followed where a plain number scales it."""
    if name in _MUL or name in _DIV:
        operands = [a for a in args[:2] if not (isinstance(a, Tensor) and tr.state(a) is not None)]
        factor = _number(operands[0]) if len(operands) == 1 else None
        if name in _MUL and isinstance(operands[0] if operands else None, Tensor):  # as GradScaler.scale does
            tr.scaled_by = calling_scaler() or tr.scaled_by
        if factor is not None and name in _DIV:
            factor = 1 / factor if factor else None
        return sums[0].scaled(factor)
    if name in ("stack", "cat") or "alpha" in kwargs:
        return sums[0].scaled(None)
    if name in _ADD and len(sums) > 1:
        same = all(s.weight is not None and sums[0].weight is not None and math.isclose(s.weight, sums[0].weight)
                   for s in sums)
        return sums[0] if same else sums[0].scaled(None)
    return sums[0]


_MUL = frozenset({"mul", "__mul__", "__rmul__", "__imul__", "mul_"})
_DIV = frozenset({"div", "__truediv__", "__itruediv__", "div_", "true_divide"})


def _number(value: object) -> float | None:
    """A plain number, or a 0-d CPU tensor's value (reading a GPU tensor would wait for the device)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor) and value.dim() == 0 and value.device.type == "cpu" and not value.requires_grad:
        return float(value)
    return None


_ADD = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
                  "rsub", "sum"})


def one(tr, func, args, kwargs, out, found):
    """A per-example loop: one example's data stays that example's; the examples' results stacked (or
    concatenated) back in order are the batch again, and added up they are a sum over the rows."""
    states = [s for _, s in found]
    if all(s == states[0] for s in states):
        return states[0]
    name = func.__name__
    if name in ("stack", "cat") and all(type(s) is One for s in states):
        n = states[0].n
        if [s.i for s in states] == list(range(n)) and len(found) == len(args[0]):
            o = _first_out(out)
            dim = _arg(args, kwargs, 1, "dim", 0) % o.dim()
            return (dim, 1 if name == "stack" else o.shape[dim] // n)
        return mix(func, "puts examples' results together out of order or incomplete")
    if name in _ADD and all(type(s) in (One, Summed) for s in states):
        plain = all(type(s) is One or s.weight == 1.0 for s in states)
        n = next((s.n for s in states if type(s) is One), None)
        return Summed(f"{op_name(func)} of examples' terms{R.where()}", 1.0 if plain else None, n)
    return mix(func, "combines one example's data (x[i], a row of a loop over the batch) with other examples'")


def autograd_grad(tr, func, args, kwargs, out, found):
    """torch.autograd.grad of a loss: a batched input's gradient keeps its rows; a parameter's is a sum."""
    inputs = _arg(args, kwargs, 1, "inputs")
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    return [tr.state(t) if tr.state(t) is not None else Summed(op_name(func)) for t in inputs]


# -- the table: op name -> rule ----------------------------------------------------------------------------------
def _names(rule, *names: str) -> dict:
    return dict.fromkeys(names, rule)


_POINTWISE = """abs absolute acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and bitwise_not
bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip clone contiguous copy_ copysign cos cosh deg2rad detach
div divide double dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d elu empty_like eq erf
erfc erfinv exp exp2 expm1 expand expand_as broadcast_to fill_ fix float float_power floor floor_divide fmax fmin
fmod frac full_like ge gelu glu_ gt half hardshrink hardsigmoid hardswish hardtanh heaviside hypot bfloat16 int
isfinite isinf isnan le leaky_relu lerp lgamma log log10 log1p log2 log_sigmoid logical_and logical_not logical_or
logical_xor logit long lt masked_fill maximum minimum mish mul multiply nan_to_num ne neg negative ones_like pow
prelu rad2deg rand_like randint_like randn_like reciprocal relu relu6 remainder requires_grad_ round rrelu rsqrt
rsub selu sgn sigmoid sign signbit silu sin sinc sinh softplus softshrink softsign sqrt square sub subtract tan tanh
tanhshrink threshold to tril triu true_divide trunc type type_as where xlogy zero_ zeros_like bool byte char short
cpu cuda celu logaddexp logaddexp2 positive real imag conj resolve_conj resolve_neg view_as_real sigmoid_
tanh_""".split()
_DUNDERS = "add sub mul truediv floordiv mod pow and or xor lshift rshift".split()

RULES: dict[str, Callable] = {
    **_names(R.pointwise, *_POINTWISE, *(n + "_" for n in _POINTWISE if not n.endswith("_")),
             *(f"__{p}{n}__" for n in _DUNDERS for p in ("", "r", "i")),
             "__neg__", "__pos__", "__abs__", "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__",
             "__ge__", "__setstate__"),
    # reductions: over the batch a sum (or a mean over a count that shapes fix) forms the loss; others mix
    **_names(R.reduction(1, summed=True), "sum", "mean", "nansum"),
    **_names(R.reduction(1), "nanmean", "prod", "amax", "amin", "max", "min", "argmax", "argmin", "logsumexp",
             "all", "any", "std", "var", "std_mean", "var_mean", "median", "nanmedian", "mode", "count_nonzero",
             "aminmax"),
    **_names(R.reduction(2), "norm", "linalg_vector_norm", "linalg_norm", "quantile", "nanquantile", "kthvalue"),
    "linalg_matrix_norm": R.reduction(2, default=(-2, -1)),
    # along a dim: every output entry reads the whole line along it
    **_names(R.along(1), "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"),
    **_names(R.along(1, R._softmax_dim), "softmax", "log_softmax", "softmin"),
    **_names(R.along(1, -1), "sort", "argsort", "glu"),
    **_names(R.along(2, -1), "topk", "diff"),
    **_names(R.along(1, varargs=True), "flip"),
    "fliplr": R.along(None, 1), "flipud": R.along(None, 0), "msort": R.along(None, 0),
    "roll": R.along(2), "rot90": R.along(2, [0, 1]), "normalize": R.along(2, 1), "unique_consecutive": R.along(3),
    "renorm": R.across(2, 0),
    # normalisation layers
    **_names(R.last_dims, "layer_norm", "rms_norm"),
    **_names(R.leading(None), "group_norm", "instance_norm"),
    "batch_norm": R.batch_norm, "local_response_norm": R.local_response_norm,
    "cosine_similarity": R.paired(2, 1), "pairwise_distance": R.paired(None, -1),
    # products: the batch's letter must be kept and be the only batched one
    **_names(R.matmul, "matmul", "__matmul__", "__rmatmul__"),
    "mm": R.fixed("ik", "km", "im"), "bmm": R.fixed("Aik", "Akm", "Aim"), "mv": R.fixed("ik", "k", "i"),
    "dot": R.fixed("k", "k", ""), "vdot": R.fixed("k", "k", ""), "outer": R.fixed("i", "j", "ij"),
    "ger": R.fixed("i", "j", "ij"), "addmm": R.addmm_like("ik", "km", "im"), "addmv": R.addmm_like("ik", "k", "i"),
    "baddbmm": R.addmm_like("Aik", "Akm", "Aim"), "addbmm": R.addmm_like("Aik", "Akm", "im"),
    "addr": R.addmm_like("i", "j", "ij"), "linear": R.linear, "bilinear": R.bilinear, "cdist": R.cdist,
    "inner": R.inner, "tensordot": R.tensordot, "einsum": R.einsum, "scaled_dot_product_attention": R.attention,
    # indexing and shapes
    "__getitem__": S.getitem, "__setitem__": S.setitem,
    **_names(S.dim_op(1, keeps=False), "index_select", "gather", "scatter", "scatter_add", "scatter_reduce",
             "index_add", "index_copy", "index_fill", "index_reduce", "select", "unbind"),
    "take_along_dim": S.dim_op(2, keeps=False, default=None), "narrow": S.dim_op(1, keeps=True), "diagonal": S.diagonal,
    **_names(S.dim_op(2, keeps=True), "split", "chunk", "tensor_split", "split_with_sizes"),
    **_names(S.reshape, "reshape", "view", "flatten", "unflatten", "view_as", "reshape_as", "ravel"),
    **_names(S.transpose, "transpose", "swapaxes", "swapdims", "t"),
    **_names(S.permute, "permute"), **_names(S.movedim, "movedim", "moveaxis"),
    "unsqueeze": S.unsqueeze, "squeeze": S.squeeze, "stack": S.stack,
    **_names(S.repeat, "repeat", "tile"), "repeat_interleave": S.repeat_interleave,
    **_names(lambda tr, func, *a: mix(func, "flattens the batch with the other dims"), "take", "masked_select",
             "masked_scatter", "diag", "trace", "kron"),
    # layers that are one call
    **_names(R.leading(1), "conv1d", "conv_transpose1d"), **_names(R.leading(2), "conv2d", "conv_transpose2d"),
    **_names(R.leading(3), "conv3d", "conv_transpose3d"),
    **_names(rnn, "lstm", "gru", "rnn_tanh", "rnn_relu"), "multi_head_attention_forward": mha,
    "embedding_bag": embedding_bag,
    **_names(loss, "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
             "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss",
             "gaussian_nll_loss", "soft_margin_loss", "multilabel_soft_margin_loss", "margin_ranking_loss",
             "hinge_embedding_loss", "cosine_embedding_loss", "triplet_margin_loss", "multi_margin_loss",
             "multilabel_margin_loss", "ctc_loss"),
    "grad": autograd_grad,
}
RULES.update({f"fft_{n}": R.along(2, -1) for n in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")})
RULES.update({f"fft_{n}2": R.along(2, (-2, -1)) for n in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")})
RULES.update({f"fft_{n}n": R.along(2) for n in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")})
# an in-place variant (x.scatter_, x.transpose_) follows its op's rule: its output is its first argument
RULES.update({n + "_": r for n, r in list(RULES.items()) if not n.startswith("_") and n + "_" not in RULES})
_PROPERTIES = {"T": S.reverse_dims, "H": S.reverse_dims, "mT": S.reverse_dims, "mH": S.reverse_dims}
_CACHE: dict = {}  # func -> rule: one dict lookup per call once seen


def rule_for(func: Callable) -> Callable:
    rule = _CACHE.get(func)
    if rule is None:
        name = getattr(func, "__name__", "")
        if name == "__get__":
            rule = _PROPERTIES.get(getattr(getattr(func, "__self__", None), "__name__", ""), R.pointwise)
        else:
            rule = RULES.get(name, R.generic)
        _CACHE[func] = rule
    return rule


def state_of(tr, func: Callable, args: tuple, kwargs: dict, out, found: list, rule: Callable | None = None
             ) -> object:
    """The state of a call's output(s): one state, or a list with one per element of a tuple output. ``rule``
    replaces the table's (``rowwise``)."""
    if len(found) == 1 and type(found[0][1]) is tuple:  # the common case
        return (rule or _CACHE.get(func) or rule_for(func))(tr, func, args, kwargs, out, found)
    kinds = set()
    for _, s in found:
        if type(s) is Mixed:
            return s
        kinds.add(s if s is FREE or s is TRUSTED else type(s))
    if FREE in kinds or TRUSTED in kinds:  # an untracked input (one example, or inside rowwise): untracked
        return FREE if FREE in kinds else TRUSTED
    if any(type(s) is One for _, s in found):
        return one(tr, func, args, kwargs, out, found)
    if any(type(s) is Summed for _, s in found):
        return summed(tr, func, args, kwargs, out, found)
    return (rule or rule_for(func))(tr, func, args, kwargs, out, found)


def refusal(state: Mixed, func: Callable) -> RowMixingError:
    at = op_name(func)
    then = "" if state.why.startswith(at + " ") else f"; refused at {at}{R.where()}, which needs its gradient"
    return RowMixingError(
        f"{state.why}{then}. Row i of the loss must depend only on example i (and its augmented copies): "
        "otherwise clipping each example's gradient does not bound its influence on the step, and the privacy "
        "guarantee does not hold. Use per-example operations only (reductions, sorts, indexing and products "
        "along other dims than the batch's); if this is a custom operation that is row-wise, wrap it with "
        "dpkit.rowwise(fn).")
