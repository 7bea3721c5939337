"""nn.RNN, nn.GRU and nn.LSTM fed a PackedSequence, against a loop over examples each run alone, unpacked, at its own
length: the sampler directly, and one clipped step through every mode (flat and per-layer clipping, K = 1 and 3)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from _samples import assert_samples

import dpkit
from dpkit.errors import UnsupportedLayerError
from dpkit.layers import recurrent

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
SHAPES = {"seq-first": dict(), "2-layer-bidirectional": dict(num_layers=2, bidirectional=True, batch_first=True),
          "3-layer-bidirectional-seq-first": dict(num_layers=3, bidirectional=True)}


def make(cell: str, size: tuple[int, int] = (3, 4), **kwargs) -> nn.Module:
    torch.manual_seed(0)
    layer = CELLS[cell](*size, **kwargs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # not the default init's small range, which would hide a wrong gate formula
    return layer


def lengths_for(rows: int, T: int, *, sorted_: bool) -> torch.Tensor:
    """Lengths from 1 to T, the longest not first unless ``sorted_`` (enforce_sorted=True needs them descending)."""
    lengths = torch.tensor([T - (3 * i + 1) % T for i in range(rows)], dtype=torch.long)
    lengths[rows // 2:rows // 2 + 1] = T
    return lengths.sort(descending=True).values if sorted_ else lengths


def pack(layer, x, lengths, enforce_sorted):
    """``x`` batch-first ``[N, T, ·]``, packed as the layer reads it (a sequence-first layer packs ``[T, N, ·]``)."""
    return pack_padded_sequence(x if layer.batch_first else x.transpose(0, 1), lengths,
                                batch_first=layer.batch_first, enforce_sorted=enforce_sorted)


def alone(layer, x, L, hx):
    """One example of ``x`` ``[T, ·]``, unpacked, at its own length ``L``: (output ``[L, ·]``, h_n, c_n or None)."""
    xb = x[:L][None] if layer.batch_first else x[:L][:, None]
    out, state = layer(xb, hx)
    h, c = state if isinstance(state, tuple) else (state, None)
    return (out[0] if layer.batch_first else out[:, 0]), h, c


def loop_reference(layer, x, lengths, hx, grads, K):
    """Each example's gradient of Σ ⟨output, its gradient⟩ (+ h_n's, c_n's) summed over its K rows, each row run
    alone. ``x`` and the output's gradient batch-first and padded; ``hx`` and h_n, c_n's gradients ``[L·D, N, ·]``."""
    params = [p for p in layer.parameters() if p.requires_grad]
    g_out, g_h, g_c = grads
    out = []
    for b in range(x.shape[0] // K):
        total = [torch.zeros_like(p) for p in params]
        for r in range(b * K, (b + 1) * K):
            L = int(lengths[r])
            h = None if hx is None else tuple(t[:, r:r + 1] for t in hx) if isinstance(hx, tuple) else hx[:, r:r + 1]
            o, hn, cn = alone(layer, x[r], L, h)
            loss = (o * g_out[r, :L]).sum() if g_out is not None else 0
            loss = loss + ((hn * g_h[:, r:r + 1]).sum() if g_h is not None else 0)
            loss = loss + ((cn * g_c[:, r:r + 1]).sum() if g_c is not None else 0)
            total = [t + g for t, g in zip(total, torch.autograd.grad(loss, params))]
        out.append(total)
    return {p: torch.stack([g[i] for g in out]) for i, p in enumerate(params)}


def as_captured(layer, packed, hx, grads):
    """What the capture hands the sampler: the PackedSequence and ``hx`` (a tensor ``hx`` of a sequence-first layer
    with its first two dimensions swapped), and the gradients of the output's tensor leaves ``(data, batch_sizes,
    [sorted_indices, unsorted_indices,] h_n[, c_n])``, data's swapped under a sequence-first layer."""
    g_out, g_h, g_c = grads
    data = pack(layer, g_out, packed_lengths(packed), packed.sorted_indices is None).data if g_out is not None else None
    indices = [None, None] if packed.sorted_indices is not None else []  # enforce_sorted=False
    state = [g_h, g_c] if isinstance(layer, nn.LSTM) else [g_h]
    if layer.batch_first:
        return [packed, hx], [data, None, *indices, *state]
    swap = lambda t: t.transpose(0, 1) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [packed, swap(hx)], [swap(data), None, *indices, *state]


def packed_lengths(packed):
    sizes = packed.batch_sizes
    lengths = (sizes[None, :] > torch.arange(int(sizes[0]))[:, None]).sum(1)
    return lengths if packed.unsorted_indices is None else lengths[packed.unsorted_indices]


def draw(layer, rows, T, *, sorted_, hx=True, which=(0, 1, 2)):
    dirs, out = 2 if layer.bidirectional else 1, getattr(layer, "proj_size", 0) or layer.hidden_size
    lengths = lengths_for(rows, T, sorted_=sorted_)
    x = torch.randn(rows, T, layer.input_size, dtype=torch.double)
    h0 = torch.randn(layer.num_layers * dirs, rows, out, dtype=torch.double) if hx else None
    if hx and isinstance(layer, nn.LSTM):
        h0 = (h0, torch.randn(layer.num_layers * dirs, rows, layer.hidden_size, dtype=torch.double))
    grads = [torch.randn(rows, T, dirs * out, dtype=torch.double),
             torch.randn(layer.num_layers * dirs, rows, out, dtype=torch.double),
             torch.randn(layer.num_layers * dirs, rows, layer.hidden_size, dtype=torch.double)
             if isinstance(layer, nn.LSTM) else None]
    return x, lengths, h0, [g if i in which else None for i, g in enumerate(grads)]


def check(layer, x, lengths, hx, grads, K, enforce_sorted):
    expected = loop_reference(layer, x, lengths, hx, grads, K)
    acts, bps = as_captured(layer, pack(layer, x, lengths, enforce_sorted), hx, grads)
    got = recurrent.grad_sampler(layer, acts, bps, K=K)
    norms = recurrent.norm_sampler(layer, acts, bps, K=K)
    assert_samples(layer, got, norms, expected)
    blocks = dict(recurrent.blocks(layer, acts, bps))  # bk's: Σ_t g_t a_tᵀ per row, summed over the K rows
    for p, want in expected.items():
        (a, g), = blocks[p]
        row = (g.transpose(1, 2) @ a) if a is not None else g.sum(1)
        torch.testing.assert_close(row.unflatten(0, (-1, K)).sum(1), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cell", CELLS)
def test_sampler_matches_the_loop(cell, shape, K, enforce_sorted):
    layer = make(cell, **SHAPES[shape])
    check(layer, *draw(layer, 3 * K, T=5, sorted_=enforce_sorted), K, enforce_sorted)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("which", [(0,), (1,), (2,)], ids=["output", "h_n", "c_n"])
def test_one_output_gradient(cell, which):
    """A final state's gradient alone: it enters at each example's own last step, in each direction."""
    if which == (2,) and cell != "lstm":
        pytest.skip("only an LSTM has c_n")
    layer = make(cell, num_layers=2, bidirectional=True, batch_first=True)
    check(layer, *draw(layer, 4, T=6, sorted_=False, hx=False, which=which), 2, False)


@pytest.mark.parametrize("cell", CELLS)
def test_variants(cell):
    """No bias, relu, a projection (LSTM), all lengths equal to T (the packed path then equals the padded one)."""
    extra = {"lstm": dict(proj_size=2), "rnn": dict(nonlinearity="relu"), "gru": {}}[cell]
    layer = make(cell, bias=False, num_layers=2, bidirectional=True, **extra)
    check(layer, *draw(layer, 4, T=5, sorted_=False), 1, False)
    x, _, hx, grads = draw(layer, 3, T=4, sorted_=True)
    check(layer, x, torch.full((3,), 4), hx, grads, 1, True)


def test_narrower_data_is_widened():
    """Under autocast a packed call's data and its output's gradients can differ in dtype (the capture widens
    tensors, not a PackedSequence's data): the sampler computes in the widest dtype."""
    layer = make("lstm", num_layers=2, bidirectional=True, batch_first=True)
    x, lengths, hx, grads = draw(layer, 3, T=4, sorted_=False)
    x = x.float().double()  # the values float32 holds
    expected = loop_reference(layer, x, lengths, hx, grads, 1)
    acts, bps = as_captured(layer, pack(layer, x.float(), lengths, False), hx, grads)
    assert_samples(layer, recurrent.grad_sampler(layer, acts, bps), recurrent.norm_sampler(layer, acts, bps), expected)


def test_refusals_name_the_layer():
    layer = make("gru", num_layers=2, dropout=0.5, batch_first=True)
    x, lengths, _, grads = draw(layer, 2, T=4, sorted_=False)
    acts, bps = as_captured(layer, pack(layer, x, lengths, False), None, grads)
    with pytest.raises(UnsupportedLayerError, match="GRU.*dropout"):
        recurrent.grad_sampler(layer, acts, bps)
    with pytest.raises(UnsupportedLayerError, match="GRU.*list input"):
        recurrent.norm_sampler(layer, [[x], None], bps)


# --- through the engine: one clipped step without noise equals a loop over examples run alone at their lengths ----

MODES = ("hooks", "ghost", "bk", "auto")


@pytest.fixture
def plugins(fresh_registry):
    """The recurrent sampler registered (under its own name, as the built-in would be)."""
    fresh_registry.register_plugin(recurrent, name=recurrent.__name__)
    return fresh_registry


class Tagger(nn.Module):
    """Packs a padded batch by its lengths and reads the packed output (summed over each example's steps) and the
    final hidden state. Without lengths it runs the batch as it is: how the loop runs one example, and how an empty
    batch, which torch cannot pack, still gets its forward and backward pass (docs/modes.md)."""

    def __init__(self, cell, *, batch_first=True, enforce_sorted=False, **kwargs):
        super().__init__()
        self.rnn = CELLS[cell](3, 4, batch_first=batch_first, **kwargs)
        dirs = 2 if self.rnn.bidirectional else 1
        self.fc = nn.Linear(4 * dirs + 4, 3)
        self.enforce_sorted = enforce_sorted

    def forward(self, x, lengths=None):
        first, seq = self.rnn.batch_first, x
        if not isinstance(x, PackedSequence):  # a PackedSequence comes packed by the data pipeline
            seq = x if first else x.transpose(0, 1)
        if lengths is not None and len(lengths):  # torch packs no empty batch (Poisson sampling draws some)
            seq = pack_padded_sequence(seq, lengths, batch_first=first, enforce_sorted=self.enforce_sorted)
        out, hidden = self.rnn(seq)
        if isinstance(out, PackedSequence):
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=first)[0]
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.fc(torch.cat([out.sum(1 if first else 0), h[-1]], 1))


def clip(grads, C, per_layer):
    """Each example's gradients clipped: flat to C, or each parameter to C/√P."""
    if per_layer:
        bound = C / len(grads) ** 0.5
        return [t * min(1.0, bound / (t.norm().item() + 1e-6)) for t in grads]
    f = min(1.0, C / (torch.sqrt(sum((t ** 2).sum() for t in grads)).item() + 1e-6))
    return [t * f for t in grads]


def loop_grads(model, x, lengths, y, K):
    """Each example's gradient: the mean over its K rows, each row run alone, unpacked, at its own length."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for b in range(x.shape[0] // K):
        rows = [torch.autograd.grad(nn.functional.cross_entropy(model(x[r:r + 1, :int(lengths[r])]), y[r:r + 1]),
                                    params) for r in range(b * K, (b + 1) * K)]
        out.append([sum(g) / K for g in zip(*rows)])
    return out


def private_step(model, x, lengths, y, *, mode, K, C, clipping, reduction, packed_input=False):
    """The update of one dpkit step (SGD, lr=1, no noise); ``packed_input``: the model is fed the PackedSequence."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                     noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
                                     augmentation_multiplicity=K, loss_reduction=reduction, clipping=clipping,
                                     criterion=nn.CrossEntropyLoss(), expected_batch_size=max(y.shape[0] // K, 1))
    before = [p.detach().clone() for p in model.parameters()]
    with private.micro_batches():
        rnn = next(m for m in model.modules() if isinstance(m, nn.RNNBase))
        inputs = (pack(rnn, x, lengths, getattr(model, "enforce_sorted", False)),) if packed_input else (x, lengths)
        private.criterion(model(*inputs), y).backward()
    opt.step()
    private.detach()
    return [b - a.detach() for b, a in zip(before, model.parameters())]


def assert_step_matches_loop(model, x, lengths, y, *, mode, K, clipping="flat", reduction="sum", packed_input=False):
    grads = loop_grads(model, x, lengths, y, K)
    norms = sorted(torch.sqrt(sum((t ** 2).sum() for t in g)).item() for g in grads)
    C = (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2  # about half the examples are clipped
    clipped = [clip(g, C, clipping == "per_layer") for g in grads]
    expected = [sum(ts) / (len(grads) if reduction == "mean" else 1) for ts in zip(*clipped)]
    assert any(not torch.equal(c, g) for cs, gs in zip(clipped, grads) for c, g in zip(cs, gs))  # some clipped
    got = private_step(model, x, lengths, y, mode=mode, K=K, C=C, clipping=clipping, reduction=reduction,
                       packed_input=packed_input)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9, msg=lambda m: f"{mode}, {name}: {m}")


def batch(rows, T=5, *, sorted_=False):
    torch.manual_seed(1)
    x = torch.randn(rows, T, 3, dtype=torch.double)
    return x, lengths_for(rows, T, sorted_=sorted_), torch.randint(0, 3, (rows,))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("K,reduction", [(1, "sum"), (3, "mean")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_modes_match_the_loop(plugins, cell, mode, K, reduction, clipping):
    if mode == "ghost" and clipping == "per_layer":
        pytest.skip("ghost refuses per-layer clipping")
    torch.manual_seed(0)
    model = Tagger(cell, num_layers=2, bidirectional=True).double()
    assert_step_matches_loop(model, *batch(4 * K), mode=mode, K=K, clipping=clipping, reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
def test_sorted_sequence_first(plugins, mode):
    """enforce_sorted=True on a sequence-first layer with a projection: the data's gradient arrives swapped."""
    torch.manual_seed(0)
    model = Tagger("lstm", batch_first=False, enforce_sorted=True, proj_size=2).double()
    model.fc = nn.Linear(2 + 2, 3).double()
    assert_step_matches_loop(model, *batch(6, sorted_=True), mode=mode, K=2, reduction="mean")


@pytest.mark.parametrize("mode", MODES)
def test_model_fed_the_packed_sequence(plugins, mode):
    """Packed by the data pipeline, not in the model's forward: the model's input is the PackedSequence."""
    torch.manual_seed(0)
    model = Tagger("gru", bidirectional=True).double()
    assert_step_matches_loop(model, *batch(6), mode=mode, K=3, reduction="mean", packed_input=True)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(plugins, mode):
    """torch refuses to pack an empty batch; run unpacked, as the docs say, its step is a zero update."""
    model = Tagger("lstm", bidirectional=True).double()
    x, lengths, y = batch(0)
    with pytest.raises(RuntimeError, match="empty"):
        pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    update = private_step(model, x, lengths, y, mode=mode, K=1, C=1.0, clipping="flat", reduction="mean")
    assert all(torch.count_nonzero(t) == 0 for t in update)


class Scaled(nn.Module):
    """A parent with a parameter of its own and no sampler: auto recomputes it, RNN included, with torch.func."""

    def __init__(self):
        super().__init__()
        self.tagger, self.scale = Tagger("gru"), nn.Parameter(torch.ones(()))

    def forward(self, x, lengths=None):
        return self.tagger(x, lengths) * self.scale


@pytest.mark.parametrize("mode,make_model,packed_input", [("functorch", lambda: Tagger("lstm"), False),
                                                          ("functorch", lambda: Tagger("lstm"), True),
                                                          ("auto", Scaled, True)],
                         ids=["functorch-packs-in-forward", "functorch-fed-packed", "auto-parent-unit"])
def test_torch_func_refuses_naming_the_layer(plugins, mode, make_model, packed_input):
    """torch.func cannot split a PackedSequence into examples: refused, naming the recurrent layer and the modes."""
    x, lengths, y = batch(4)
    with pytest.raises(UnsupportedLayerError, match=r"'(tagger\.)?rnn' read a PackedSequence.*'auto', 'bk', 'hooks'"):
        private_step(make_model().double(), x, lengths, y, mode=mode, K=1, C=1.0, clipping="flat", reduction="sum",
                     packed_input=packed_input)
