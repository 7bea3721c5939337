"""nn.RNN, nn.GRU and nn.LSTM samplers against a loop over examples, directly and through every mode."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _samples import assert_samples

from dpkit.errors import UnsupportedLayerError
from dpkit.layers import recurrent

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def make(cell: str, *, bias: bool = True, size: tuple[int, int] = (3, 4), **kwargs) -> nn.Module:
    torch.manual_seed(0)
    layer = CELLS[cell](*size, bias=bias, **kwargs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # not the default init's small range, which would hide a wrong gate formula
    return layer


def loop_reference(layer, x, hx, grads, K):
    """Each example's gradient of Σ ⟨output leaf, its gradient⟩ over its K rows, one example at a time."""
    bdim = 0 if layer.batch_first else 1
    params = [p for p in layer.parameters() if p.requires_grad]
    rows = x.shape[bdim]
    out = []
    for b in range(rows // K):
        pick = slice(b * K, (b + 1) * K)
        xb = x[pick] if bdim == 0 else x[:, pick]
        hb = None if hx is None else tuple(h[:, pick] for h in hx) if isinstance(hx, tuple) else hx[:, pick]
        leaves = layer(xb, hb)
        leaves = [leaves[0], *leaves[1]] if isinstance(leaves[1], tuple) else list(leaves)
        picked = [None if g is None else (g[pick] if i == 0 and bdim == 0 else g[:, pick]) for i, g in enumerate(grads)]
        loss = sum((t * g).sum() for t, g in zip(leaves, picked) if g is not None)
        out.append(torch.autograd.grad(loss, params, allow_unused=True))
    return {p: torch.stack([g[i] if g[i] is not None else torch.zeros_like(p) for g in out]) if out
            else p.new_zeros(0, *p.shape) for i, p in enumerate(params)}


def as_captured(layer, x, hx, grads):
    """The activations and backprops dpkit's capture hands a sampler: every tensor of a sequence-first call with its
    first two dimensions swapped (input, a tensor hx, the output's gradient); a tuple hx and h_n, c_n as they are."""
    if layer.batch_first:
        return [x, hx], grads
    swap = lambda t: t.transpose(0, 1) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [swap(x), swap(hx)], [swap(grads[0]), *grads[1:]]


def draw(layer, rows, T=5, *, hx=False, which=(0, 1, 2), strided=False):
    x = torch.randn(T, rows, layer.input_size, dtype=torch.double)
    x = x if not layer.batch_first else x.transpose(0, 1)  # non-contiguous for batch_first layers
    if strided:
        x = x.flip(-1)
    with torch.no_grad():
        out, state = layer(x)
    h_n = state if isinstance(state, torch.Tensor) else state[0]
    h0 = torch.randn_like(h_n) if hx else None
    if hx and isinstance(layer, nn.LSTM):
        h0 = (h0, torch.randn_like(state[1]))
    leaves = [out, *(state if isinstance(state, tuple) else (state,))]
    grads = [torch.randn_like(t) if i in which else None for i, t in enumerate(leaves)]
    return x, h0, grads


def check(layer, x, hx, grads, K, backprops_as_tuple=True):
    expected = loop_reference(layer, x, hx, grads, K)
    acts, bps = as_captured(layer, x, hx, grads)
    got = recurrent.grad_sampler(layer, acts, bps if backprops_as_tuple else bps[0], K=K)
    norms = recurrent.norm_sampler(layer, acts, bps if backprops_as_tuple else bps[0], K=K)
    assert_samples(layer, got, norms, expected)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True)],
                         ids=["seq-first", "2-layer-bidirectional", "batch-first"])
def test_every_output_gradient(cell, shape, K):
    layer = make(cell, **shape)
    check(layer, *draw(layer, 3 * K, hx=True), K)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("which", [(0,), (1,), (2,)], ids=["output", "h_n", "c_n"])
def test_one_output_gradient(cell, which):
    layer = make(cell, num_layers=2, bidirectional=True, batch_first=True)
    if which == (2,) and cell != "lstm":
        pytest.skip("only an LSTM has c_n")
    check(layer, *draw(layer, 4, which=which), K=2)


def test_output_gradient_alone_as_a_tensor():
    """The sampler called as today's capture calls it: the output's gradient only."""
    layer = make("lstm", num_layers=2)
    check(layer, *draw(layer, 4, which=(0,)), K=1, backprops_as_tuple=False)


@pytest.mark.parametrize("cell", CELLS)
def test_variants(cell):
    """No bias, three levels, relu, a projection (LSTM), non-contiguous inputs, float32 within 1e-5."""
    extra = {"lstm": dict(proj_size=2), "rnn": dict(nonlinearity="relu"), "gru": {}}[cell]
    layer = make(cell, bias=False, num_layers=3, bidirectional=True, **extra)
    check(layer, *draw(layer, 3, hx=True, strided=True), K=1)
    layer = make(cell, num_layers=2, **extra)
    x, _, grads = draw(layer, 4)
    expected = loop_reference(layer, x, None, grads, 2)
    layer.float()
    got = recurrent.norm_sampler(layer, *as_captured(layer, x.float(), None, [g.float() for g in grads]), K=2)
    for name, p in layer.named_parameters():
        assert got[p].dtype == torch.float32
        torch.testing.assert_close(got[p].double(), expected[p].flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_frozen_parameters_are_left_out(cell):
    """Also a frozen member of a group that shares dz (an LSTM's or RNN's weights and biases)."""
    layer = make(cell, num_layers=2)
    layer.weight_hh_l0.requires_grad_(False)
    layer.bias_ih_l1.requires_grad_(False)
    layer.weight_ih_l1.requires_grad_(False)
    x, hx, grads = draw(layer, 3)
    check(layer, x, hx, grads, K=1)
    assert layer.weight_hh_l0 not in recurrent.grad_sampler(layer, *as_captured(layer, x, hx, grads))


@pytest.mark.parametrize("cell", CELLS)
def test_ghost_norms(cell):
    """Widths over a short sequence make the ghost norm the cheaper (T·(p+d) < p·d for every weight), so the Gram
    matrix of dz, shared by the weights that read it, is what the norms come from."""
    extra = dict(proj_size=8) if cell == "lstm" else {}
    layer = make(cell, size=(16, 16), bidirectional=True, batch_first=True, **extra)
    T = 4
    assert all(T * (w.shape[0] + w.shape[1]) < w.numel() for n, w in layer.named_parameters() if "weight" in n)
    check(layer, *draw(layer, 3, T=T, hx=True), K=1)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_all_rows_one_example(cell, batch_first):
    """K equal to the rows (how bk asks for a weighted sum): the rows are folded in the memory's own order."""
    layer = make(cell, num_layers=2, bidirectional=True, batch_first=batch_first)
    check(layer, *draw(layer, 4, hx=True), K=4)


@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch(cell):
    layer = make(cell, bidirectional=True, batch_first=True)
    x, _, grads = draw(layer, 0)
    for sampler in (recurrent.grad_sampler, recurrent.norm_sampler):
        out = sampler(layer, [x, None], grads, K=3)
        assert out.keys() == set(layer.parameters()) and all(t.shape[0] == 0 for t in out.values())


def test_refusals_name_the_layer():
    layer = make("lstm", num_layers=2, dropout=0.5, batch_first=True)
    x, _, grads = draw(layer, 2)
    with pytest.raises(UnsupportedLayerError, match="dropout"):
        recurrent.grad_sampler(layer, [x, None], grads)
    layer.eval()  # no dropout in eval mode
    recurrent.grad_sampler(layer, [x, None], grads)
    with pytest.raises(UnsupportedLayerError, match="LSTM.*unbatched"):
        recurrent.norm_sampler(layer, [x[0], None], grads)


# --- through the engine: one clipped step without noise equals a loop over examples -----------------------------

MODES = ("hooks", "ghost", "bk", "auto")


@pytest.fixture
def plugins(fresh_registry):
    """The recurrent and attention samplers registered (under their own names, as the built-ins would be)."""
    from dpkit.layers import attention

    for module in (recurrent, attention):
        fresh_registry.register_plugin(module, name=module.__name__)
    return fresh_registry


def loop_step(model, x, y, K, C, reduction):
    """The clipped sum of per-example gradients (each the mean over its K rows), divided by B under "mean"."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for b in range(x.shape[0] // K):
        pick = slice(b * K, (b + 1) * K)
        loss = nn.functional.cross_entropy(model(x[pick]), y[pick])
        grads.append(torch.autograd.grad(loss, params))
    total = [torch.zeros_like(p) for p in params]
    for g in grads:
        f = min(1.0, C / (torch.sqrt(sum((t ** 2).sum() for t in g)).item() + 1e-6))
        total = [s + f * t for s, t in zip(total, g)]
    return [t / max(len(grads), 1) if reduction == "mean" else t for t in total], grads


def private_step(model, x, y, *, mode, K, C, reduction):
    """The update of one dpkit step (SGD, lr=1, no noise)."""
    import warnings

    import dpkit

    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = dpkit.make_private(module=model, optimizer=opt, data_loader=None, sample_rate=0.5,
                                     noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
                                     augmentation_multiplicity=K, loss_reduction=reduction,
                                     criterion=nn.CrossEntropyLoss(),
                                     expected_batch_size=max(y.shape[0] // K, 1))
    before = [p.detach().clone() for p in model.parameters()]
    with private.micro_batches():
        private.criterion(model(x), y).backward()
    opt.step()
    private.detach()
    return [b - a.detach() for b, a in zip(before, model.parameters())]


def assert_step_matches_loop(model, x, y, *, mode, K, reduction):
    _, grads = loop_step(model, x, y, K, 1.0, "sum")
    norms = sorted(torch.sqrt(sum((t ** 2).sum() for t in g)).item() for g in grads)
    C = (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2  # half the examples are clipped
    expected, _ = loop_step(model, x, y, K, C, reduction)
    got = private_step(model, x, y, mode=mode, K=K, C=C, reduction=reduction)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9, msg=lambda m: f"{mode}, {name}: {m}")


class Classifier(nn.Module):
    """A recurrent layer read through its output (the last step) and, with ``state``, its final h_n (and c_n)."""

    def __init__(self, cell, state=False, batch_first=True, **kwargs):
        super().__init__()
        self.rnn = CELLS[cell](3, 4, batch_first=batch_first, **kwargs)
        self.fc = nn.Linear(4 * (2 if self.rnn.bidirectional else 1), 3)
        self.state, self.batch_first = state, batch_first

    def forward(self, x):
        out, hidden = self.rnn(x if self.batch_first else x.transpose(0, 1))
        last = out[:, -1] if self.batch_first else out[-1]
        if self.state:
            h, c = hidden if isinstance(hidden, tuple) else (hidden, None)
            last = last + h[-2:].transpose(0, 1).flatten(1) * (2 if c is None else c[-1].repeat(1, last.shape[1] // 4))
        return self.fc(last)


def seq(rows, T=4):
    x = torch.randn(3, T, rows, dtype=torch.double).permute(2, 1, 0)  # non-contiguous
    return x, torch.randint(0, 3, (rows,))


@pytest.mark.parametrize("K,reduction", [(1, "sum"), (3, "mean")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_modes_match_the_loop(plugins, cell, mode, K, reduction):
    torch.manual_seed(0)
    model = Classifier(cell, num_layers=2, bidirectional=True).double()
    assert_step_matches_loop(model, *seq(4 * K), mode=mode, K=K, reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_first_and_empty_batch(plugins, mode):
    torch.manual_seed(0)
    model = Classifier("lstm", batch_first=False, proj_size=2)
    model.fc = nn.Linear(2, 3)
    model.double()
    assert_step_matches_loop(model, *seq(6), mode=mode, K=2, reduction="mean")
    update = private_step(model, *seq(0), mode=mode, K=1, C=1.0, reduction="mean")
    assert all(torch.count_nonzero(t) == 0 for t in update)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_final_state_read_too(plugins, cell, mode):
    torch.manual_seed(0)
    model = Classifier(cell, state=True, bidirectional=True).double()
    assert_step_matches_loop(model, *seq(6), mode=mode, K=3, reduction="sum")
