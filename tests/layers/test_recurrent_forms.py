"""LSTM, GRU and Elman layers as their F.linear calls (dpkit/layers/_recurrent_forms.py): the forms against torch's
own functions, and bk/auto taking the gates from the real forward (no replay) against a loop over examples."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpkit.layers import _recurrent_forms as forms
from dpkit.layers import recurrent
from test_recurrent import CELLS, Classifier, assert_step_matches_loop, plugins, seq  # noqa: F401 (a fixture)

_VF = torch._C._VariableFunctions


def run(layer: nn.Module, x: torch.Tensor, hx=None):
    """The layer's forward with torch's function swapped for dpkit's form (F.linear for every product)."""
    calls = []

    class Swap(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in forms.FORMS:
                calls.append(func)
                return forms.FORMS[func](F.linear, func, *args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Swap():
        out = layer(x, hx)
    assert calls, "the form never ran"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "rnn-relu"])
@pytest.mark.parametrize("shape", [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True),
                                   dict(bias=False, num_layers=3)], ids=["plain", "2-bi", "batch-first", "no-bias"])
def test_the_forms_equal_torch(cell, shape, dtype):
    """To 1e-6 in float32 (LSTM and GRU, whose values stay within ±1; an Elman network's grow through its levels,
    and so do their rounding errors: 1e-5 relative), to 1e-12 in float64: the same arithmetic."""
    torch.manual_seed(0)
    kind = CELLS[cell.split("-")[0]]
    extra = {"nonlinearity": "relu"} if cell == "rnn-relu" else {}
    layer = kind(5, 6, **shape, **extra).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(7, 4, 5, requires_grad=True, dtype=dtype)  # [T, N] or [N, T]
    D = 2 if layer.bidirectional else 1
    h0 = torch.randn(layer.num_layers * D, 7 if shape.get("batch_first") else 4, 6, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6 if cell in ("lstm", "gru") else 1e-5
    hx = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    want, got = layer(x, hx), run(layer, x, hx)
    flat = lambda o: [o[0], *(o[1] if isinstance(o[1], tuple) else (o[1],))]  # noqa: E731
    for w, g in zip(flat(want), flat(got)):
        assert (w - g).abs().max() <= tol * max(1.0, w.abs().max().item())
    # and the backward through them: the same gradients to float rounding
    seed = [torch.randn_like(t) for t in flat(want)]
    grads = [torch.autograd.grad(sum((t * s).sum() for t, s in zip(flat(o), seed)), [x, *layer.parameters()])
             for o in (want, got)]
    for w, g in zip(*grads):
        torch.testing.assert_close(g, w, rtol=100 * tol, atol=100 * tol)


@pytest.mark.parametrize("args", [
    dict(proj_size=2), dict(num_layers=2, dropout=0.5)], ids=["projection", "dropout"])
def test_layouts_the_forms_leave_to_torch(args):
    layer = nn.LSTM(3, 4, **args).train()
    x = torch.randn(5, 2, 3)
    h0 = torch.zeros(layer.num_layers, 2, args.get("proj_size", 4))
    call = (x, (h0, torch.zeros(layer.num_layers, 2, 4)), layer._flat_weights, True, layer.num_layers,
            layer.dropout, True, False, False)
    sentinel = object()
    assert forms.lstm(F.linear, lambda *a: sentinel, *call) is sentinel


def test_autocast_is_left_to_torch():
    layer = nn.GRU(3, 4)
    call = (torch.randn(5, 2, 3), torch.zeros(1, 2, 4), layer._flat_weights, True, 1, 0.0, True, False, False)
    sentinel = object()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert forms.gru(F.linear, lambda *a: sentinel, *call) is sentinel
    assert forms.gru(F.linear, lambda *a: sentinel, *call) is not sentinel


def test_a_sequence_first_output_is_contiguous_as_torchs():
    layer = nn.LSTM(3, 4, bidirectional=True)
    out, (h, c) = run(layer, torch.randn(5, 2, 3))
    assert out.is_contiguous() and h.is_contiguous() and out.shape == (5, 2, 8)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_an_lstm_hands_its_calls_dz_batch_first(bidirectional):
    """Each direction's two calls (input and hidden shares) get one ``dz``, contiguous ``[N, T, 4H]``, and it is
    the gates' gradient: the calls' blocks need no copy, and ``Σ_t dz_t x_tᵀ`` is the input weight's gradient."""
    torch.manual_seed(0)
    layer = nn.LSTM(3, 4, batch_first=True, bidirectional=bidirectional).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    calls = []

    def linear(a, w, b=None):
        out = F.linear(a, w, b)
        calls.append((a, w, out))
        out.register_hook(lambda g, i=len(calls) - 1: calls.__setitem__(i, (*calls[i], g)))
        return out

    def swap(func, *args):
        return forms.lstm(linear, func, *args)

    out, _ = layer(x)  # torch's gradients, for the check below
    seed = torch.randn_like(out)
    want = torch.autograd.grad((out * seed).sum(), layer._flat_weights[0])[0]

    class Swap(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return swap(func, *args) if func in forms.FORMS else func(*args, **(kwargs or {}))

    with Swap():
        got, _ = layer(x)
    (got * seed).sum().backward()
    D = 2 if bidirectional else 1
    assert len(calls) == 2 * D  # the input shares, then the hidden shares
    for d in range(D):
        g_ih, g_hh = calls[d][3], calls[D + d][3]
        assert g_ih.data_ptr() == g_hh.data_ptr() and g_ih.is_contiguous() and g_ih.shape == (2, 5, 16)
    a, _, _, g = calls[0]
    torch.testing.assert_close(torch.einsum("ntp,ntd->pd", g, a), want)


@pytest.fixture
def no_replay(monkeypatch):
    """Fails a test if the sampler replays the layer (``recurrent._groups``)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the recurrent sampler replayed the layer")

    monkeypatch.setattr(recurrent, "_groups", refuse)


@pytest.mark.parametrize("K,reduction", [(1, "sum"), (3, "mean")])
@pytest.mark.parametrize("mode", ["bk", "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bk_and_auto_take_the_real_gates(plugins, no_replay, cell, mode, K, reduction):  # noqa: F811
    torch.manual_seed(0)
    model = Classifier(cell, num_layers=2, bidirectional=True).double()
    assert_step_matches_loop(model, *seq(4 * K), mode=mode, K=K, reduction=reduction)


@pytest.mark.parametrize("mode", ["bk", "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_final_states_and_sequence_first_without_replay(plugins, no_replay, cell, mode):  # noqa: F811
    torch.manual_seed(0)
    model = Classifier(cell, state=True, batch_first=False, bidirectional=True).double()
    assert_step_matches_loop(model, *seq(6), mode=mode, K=3, reduction="sum")


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_a_projection_is_replayed_exactly(plugins, mode):  # noqa: F811
    torch.manual_seed(0)
    model = Classifier("lstm", proj_size=2)
    model.fc = nn.Linear(2, 3)
    assert_step_matches_loop(model.double(), *seq(6), mode=mode, K=2, reduction="mean")


@pytest.mark.parametrize("mode", ["bk", "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_empty_batch_moves_nothing(plugins, cell, mode):  # noqa: F811
    from test_recurrent import private_step

    torch.manual_seed(0)
    update = private_step(Classifier(cell, num_layers=2).double(), *seq(0), mode=mode, K=1, C=1.0, reduction="sum")
    assert all(torch.count_nonzero(t) == 0 for t in update)


def test_an_initial_state_that_needs_a_gradient_is_left_to_torch():
    layer = nn.LSTM(3, 4)
    h0 = torch.zeros(1, 2, 4, requires_grad=True)
    call = (torch.randn(5, 2, 3), (h0, torch.zeros(1, 2, 4)), layer._flat_weights, True, 1, 0.0, True, False, False)
    sentinel = object()
    assert forms.lstm(F.linear, lambda *a: sentinel, *call) is sentinel


class Twice(nn.Module):
    """One recurrent layer called on two inputs: two records, whose parts the step sums."""

    def __init__(self, cell):
        super().__init__()
        self.rnn = CELLS[cell](3, 4, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a, _ = self.rnn(x)
        b, _ = self.rnn(x.flip(1) * 0.5)
        return self.fc(a[:, -1] + b[:, 0])


@pytest.mark.parametrize("mode", ["bk", "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_layer_called_twice(plugins, no_replay, cell, mode):  # noqa: F811
    torch.manual_seed(0)
    assert_step_matches_loop(Twice(cell).double(), *seq(6), mode=mode, K=2, reduction="mean")


@pytest.mark.parametrize("mode", ["bk", "auto"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layers_without_biases_without_replay(plugins, no_replay, cell, mode):  # noqa: F811
    """No bias to carry the calls' need of a gradient: the capture's weight leaf does (``forms._anchored``)."""
    torch.manual_seed(0)
    model = Classifier(cell, num_layers=2, bidirectional=True, bias=False).double()
    assert_step_matches_loop(model, *seq(6), mode=mode, K=2, reduction="mean")


def test_a_call_that_needs_no_gradient_reads_its_bias_through_a_view_that_does():
    b, w = torch.zeros(4), torch.zeros(4, 3)
    view = forms._anchored(torch.zeros(2, 3), w, b)
    assert view.requires_grad and view.is_leaf and view._base is b and not b.requires_grad
    assert forms._anchored(torch.zeros(2, 3, requires_grad=True), w, b) is b
    assert forms._anchored(torch.zeros(2, 3), w, None) is None
