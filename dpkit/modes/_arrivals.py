"""The backward half of the capture: output gradients arriving, each record processed, the end of the pass.

:class:`Arrivals` is a base of :class:`~dpkit.modes._capture.Capturer` (the forward half): the two halves share
the records of the passes in flight, and each reads at once. What a complete record becomes is the capture's
:class:`~dpkit.modes._records.Arrival` policy.
"""
from __future__ import annotations

import collections
import contextlib
import sys
from functools import partial
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from dpkit.errors import PrivacyUsageError
from dpkit.modes import _parts, _trace
from dpkit.modes._records import Capture, _dense, eager


class Arrivals:
    """Records of the backward pass in flight; the attributes are set by ``Capturer.__init__``."""

    # The engine's: whether a non-finite gradient of the pass in flight is the GradScaler's overflow (amp.py).
    guard_overflow: Callable[[], bool] = staticmethod(lambda: False)
    overflowed: Tensor | None = None  # the rows whose gradient the loss scale overflowed, in the pass in flight
    grad_scaler: object = None  # make_private's grad_scaler, which alone may scale the loss

    compiled_autograd = False  # whether the pass in flight runs under compiled autograd (never ends: pass_died)

    @property
    def pass_died(self) -> bool:
        """Whether a backward pass stopped with an error before its end: its end-of-pass callback never ran, so
        it was neither clipped whole nor refused, and what it streamed may sit in the step's buffers."""
        return self._queued and torch._C._current_graph_task_id() == -1

    def drop_dead_pass(self) -> None:
        """Forget a backward pass that stopped with an error; forward passes not yet back-propagated stay."""
        self._queued = False
        self.completed.clear()
        self.grad_samples.clear()
        self.used_params.clear()
        self._pass_batches.clear()
        self.batch_rows, self._calls = None, None
        self.captures = [c for c in self.captures if not c.done]

    def check_loss_and_end_loop_trace(self, loss: Tensor) -> None:
        """For a loss dpkit back-propagates itself (ghost's two passes): the loop trace's check of how the loss
        was formed, then the trace goes (ghost differentiates to the parameters' stand-ins on purpose)."""
        if self._loss_trace is not None and not self._loss_trace.finished:
            self._loss_trace.check_loss(loss)
        self.end_loop_trace()

    def end_loop_trace(self) -> None:
        """The step is released (or dpkit detached): the traces of the loop (the outputs on their way to the loss,
        a batch drawn and never trained on) go."""
        if self._loss_trace is not None:
            _trace.remove(self._loss_trace)
            self._loss_trace = None
        _trace.drop_loop_traces()

    def reset(self) -> None:
        """Forget records of forward passes that no backward pass used (called after each step)."""
        self.captures.clear()
        self.completed.clear()
        self.grad_samples.clear()
        self.used_params.clear()
        self._pass_batches.clear()
        self.stand_ins.clear()
        self.batch_rows, self._calls, self.overflowed = None, None, None

    def live_outputs(self) -> list[Tensor] | None:
        """Outputs of the calls whose gradients have not arrived yet (ghost's norm pass differentiates to them).

        ``None`` if one was modified in place after the layer (``ReLU(inplace=True)``): differentiating to
        it would stop at the in-place op, above the layer, so the norm pass must go down to the parameters.
        """
        live = [cap for cap in self.captures if not cap.done]
        if any(t._version != v for cap in live for t, v in zip(cap.outputs, cap.versions)):
            return None
        return [t for cap in live for t in cap.outputs]

    def _take_parts(self, cap: Capture) -> None:
        """The recorded calls as the record's Linear blocks, or nothing: then the sampler computes the record."""
        parts, cap.parts = cap.parts, None
        if parts is None or not cap.rows:
            return
        row = cap.row
        own = [p for p in dict.fromkeys(row.params.values()) if p.requires_grad]

        def assemble(layer: nn.Module, activations: list, backprops: list, K: int) -> dict:
            return _parts.blocks(parts, row.sampler.linear_calls, own, layer, activations, backprops)

        assemble.all_outputs = True
        with self.quiet():
            cap.blocks = row.call(assemble, cap.args, cap.grads, self.K, cap.bdim == 0) or None

    def _watch(self, gathered: Tensor, p: nn.Parameter) -> None:
        """FSDP2 gathers ``p`` into one persistent unsharded parameter: a gradient reaching it is an outside use."""
        self._watched.add(id(gathered))
        self._handles.append(gathered.register_hook(partial(self._on_param_grad, p)))

    # -- backward --------------------------------------------------------------------
    @eager
    def _on_param_grad(self, p: nn.Parameter, grad: Tensor) -> None:
        if self.enabled and not self.computing:
            self.used_params.add(p)
            self._queue_end()

    def _refuse(self, err: BaseException) -> None:
        """A backward pass was refused: forget it whole, and let the engine refuse the step until it is discarded."""
        self.reset()
        self._queued = False
        self.on_refusal(err)

    @eager
    def _on_output_grad(self, cap: Capture, index: int, grad: Tensor) -> Tensor | None:
        if not self.enabled or self.computing:
            return None
        try:
            if torch.is_grad_enabled():  # backward(create_graph=True): the engine runs the hooks in grad mode
                raise PrivacyUsageError(
                    f"a backward pass with create_graph=True reached {cap.row.name!r} (a gradient penalty, or "
                    "torch.autograd.grad(..., create_graph=True) through the model): the term that differentiates a "
                    "gradient has per-example gradients dpkit does not compute, so nothing is released. Train "
                    "without the penalty, or compute it under private.disable() on public data.")
            return self._take_output_grad(cap, index, grad)
        except Exception as err:
            _hint_out_of_memory(err, cap.row.mode)
            self._refuse(err)
            raise

    def _take_output_grad(self, cap: Capture, index: int, grad: Tensor) -> Tensor | None:
        if cap.done:
            raise PrivacyUsageError(
                f"backward() ran a second time through one forward pass of {cap.row.name!r} "
                f"({cap.row.type_name}). Each backward() must follow its own forward pass: run the "
                "forward again, or sum the losses and call backward() once."
            )
        # An F.linear call inside a parts unit (``_attach_parts``, index < 0) keeps the layout autograd gave it.
        relaid = grad if index < 0 else _dense(grad)
        if self.guard_overflow():
            relaid = self._zero_overflowed(relaid, cap.bdim or 0)
        if index < 0:
            cap.parts.calls[-1 - index].grad = relaid
        else:
            cap.grads[index] = relaid
        cap.pending.discard(index)
        self._queue_end()
        if not cap.pending:
            self._process(cap)
        return relaid if relaid is not grad else None

    def _zero_overflowed(self, grad: Tensor, bdim: int) -> Tensor:
        """The rows of ``grad`` the loss scale overflowed, zeroed, so that autograd carries zeros to the layers
        below and every record stays finite; the rows are remembered, and the engine gives their examples clip
        factor 0. Which rows overflow depends on each row's example alone (rows are independent)."""
        rows = grad.movedim(bdim, 0).reshape(grad.shape[bdim], -1)
        bad = ~torch.isfinite(rows).all(1)
        self.overflowed = bad if self.overflowed is None else self.overflowed | bad
        return grad.masked_fill(bad.view(*[-1 if d == bdim else 1 for d in range(grad.dim())]), 0)

    def _queue_end(self) -> None:
        if not self._queued:
            self._queued = True
            compiled = sys.modules.get("torch._dynamo.compiled_autograd")
            self.compiled_autograd = compiled is not None and bool(
                compiled.compiled_autograd_enabled or compiled.in_compiled_autograd_region)
            Variable._execution_engine.queue_callback(self._backward_end)

    def _process(self, cap: Capture) -> None:
        cap.done = True
        self._pass_batches.add(cap.batch)
        cap.outputs, cap.versions = [], []
        if any(v is not None and a._version != v for a, v in zip(cap.args, cap.input_versions)):
            # Autograd would catch this only if it had saved the input, and with detached parameters it has not.
            raise PrivacyUsageError(
                f"an input of {cap.row.name!r} ({cap.row.type_name}) was modified in place after the layer read "
                "it (e.g. `x += layer(x)`), so its per-example gradients would be computed from the changed "
                "values. Use an out-of-place operation there (`x = x + layer(x)`)."
            )
        if self.batch_rows is None:
            self.batch_rows = cap.rows
        elif cap.rows != self.batch_rows:
            raise PrivacyUsageError(
                f"{cap.row.name!r} ({cap.row.type_name}) saw {cap.rows} rows in this backward pass, "
                f"other layers saw {self.batch_rows}. Every layer must see the batch along dim "
                f"{cap.bdim} (batch_first={self.batch_first}); per-example gradients are undefined otherwise."
            )
        if cap.rows % self.K:
            raise PrivacyUsageError(
                f"{cap.row.name!r} saw {cap.rows} rows, not a multiple of augmentation_multiplicity "
                f"K={self.K}. Feed the K augmented copies of each example as adjacent rows "
                "(dpkit.data.Multiplicity does this)."
            )
        if cap.row.mode == "ew":
            return
        self._take_parts(cap)
        if self.arrival.keeps_records:
            # The norm modes apply the "mean" rescale to the norms and the clip weights (two scalars per
            # example) instead of to every output gradient.
            if self.arrival.ghost and cap.row.norm_sampler is not None and not self._shared(cap):
                # Ghost needs only norms from this pass: take them now and free the record.
                with self.quiet():
                    norms = cap.row.call(cap.row.norm_sampler, cap.args, cap.grads, self.K, cap.bdim == 0)
                cap.squares = {p: n.to(torch.promote_types(n.dtype, torch.float32)).square() for p, n in norms.items()}
                cap.release()
            elif self.arrival.form is not None and self.arrival.form(cap) and not self._shared(cap):
                # Per-example gradients no bigger than the record: form them now and free the record.
                cap.formed = self.compute(cap)
                cap.release()
            stream = self.arrival.stream
            if stream is not None and cap.squares is None and not self._shared(cap) and stream(cap):
                cap.release()  # clipped and summed already: no record outlives its layer's backward
                return
            self.completed.append(cap)
            return
        scale = cap.rows if self.rescale else 1
        if scale != 1:
            cap.grads = [g * scale if g is not None else None for g in cap.grads]
        for p, gs in self.compute(cap).items():
            self._add(p, gs)
        cap.release()

    def _shared(self, cap: Capture) -> bool:
        """Whether another call of this backward pass may use one of the call's parameters.

        True for a unit with a parameter of another unit (tied), whether or not that one ran, and for a unit
        called twice; counted once per pass, so deciding costs O(1) per record rather than a scan of them all.
        """
        if self._calls is None:  # no forward runs during a backward pass: the captures are all there
            self._calls = collections.Counter(id(c.row) for c in (*self.captures, *self.completed))
        return id(cap.row) in self._tied_rows or self._calls[id(cap.row)] > 1

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Switch capture off while units are recomputed (their hooks would fire again)."""
        self.computing = True
        try:
            yield
        finally:
            self.computing = False

    def compute(self, cap: Capture) -> dict[nn.Parameter, Tensor]:
        """Per-example gradients ``[B, *p.shape]`` (K-summed) of one call."""
        if cap.blocks is not None:
            return _parts.per_example(cap.blocks, self.K)
        with self.quiet():
            batch_first = self.batch_first if not cap.row.uses_activations else cap.bdim == 0
            return cap.row.compute(cap.args, cap.kwargs, cap.grads, cap.rows, self.K, batch_first, cap.unbatched)

    def _add(self, p: nn.Parameter, grad_sample: Tensor) -> None:
        self.grad_samples[p] = self.grad_samples[p] + grad_sample if p in self.grad_samples else grad_sample

    @eager
    def _backward_end(self) -> None:
        self._queued = False
        try:
            self._end_pass()
        except Exception as err:
            _hint_out_of_memory(err, next((row.mode for row in self.plan), "?"))
            self._refuse(err)
            raise

    def _end_pass(self) -> None:
        for cap in self.captures:
            if not cap.done and any(g is not None for g in cap.grads):
                self._process(cap)  # a multi-output call some of whose outputs got no gradient
        self.captures = [c for c in self.captures if not c.done]
        self._collect_expanded_weights()
        if self.used_params:  # units run on stand-ins: the parameter itself was used outside its unit
            names = {n for row in self.plan for n, q in row.params.items() if q in self.used_params}
            raise PrivacyUsageError(
                f"parameter(s) {sorted(names)} received gradients from a use outside their module's forward "
                "(e.g. F.linear(h, emb.weight) or x @ layer.weight), which dpkit cannot clip per example, so "
                "this backward pass is refused. Call the module itself (tie weights by sharing the Parameter "
                "between modules), or use grad_sample_mode='functorch' if the use is inside the model's forward."
            )
        rows = self.batch_rows
        self.last_pass_batches, self._pass_batches = self._pass_batches - {None}, set()
        result = self.completed if self.arrival.keeps_records else self.grad_samples
        self.grad_samples, self.completed, self.batch_rows, self.used_params = {}, [], None, set()
        self._calls = None
        if rows is not None:
            self.on_backward_end(result, rows)

    def _collect_expanded_weights(self) -> None:
        for row in self.plan:
            if row.mode != "ew":
                continue
            for p in row.local_params.values():
                gs = getattr(p, "grad_sample", None)
                if gs is None:
                    continue
                del p.grad_sample
                if isinstance(row.module, nn.Embedding) and row.module.padding_idx is not None:
                    gs[:, row.module.padding_idx] = 0  # ExpandedWeights ignores padding_idx; its gradient is 0
                rows = gs.shape[0]
                scale = rows if self.rescale else 1
                self._add(p, (gs * scale).reshape(rows // self.K, self.K, *p.shape).sum(1))
                if self.batch_rows is None:
                    self.batch_rows = rows


def _hint_out_of_memory(err: BaseException, mode: str) -> None:
    """Add dpkit's way out to torch's out-of-memory error (same type, so a caller's ``except`` still catches it)."""
    text = str(err)
    if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text):
        return
    err.add_note(
        f"dpkit: out of memory in grad_sample_mode={mode!r} while computing per-example gradients. 'hooks', "
        "'functorch' and 'ew' hold a [batch, *parameter.shape] gradient for every parameter; 'auto' (the default) "
        "and 'bk' clip from per-example norms without most of them, and dpkit.BatchMemoryManager(private, "
        "max_physical_batch_size=...) splits each sampled batch into pieces that fit "
        "(docs/modes.md).")
