"""Hook specifications: every extension point of dpkit.

Each spec returns a *table*; the registry merges the tables of all plugins,
oldest first, so the newest registration of a key wins (built-ins, then
installed packages, then user decorators). Plugins are plain modules of
``@dpkit.hookimpl`` functions.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from torch import Tensor, nn

    from dpkit.events import ClipEvent, DpEvent

hookspec = pluggy.HookspecMarker("dpkit")
hookimpl = pluggy.HookimplMarker("dpkit")


class GradSampler(Protocol):
    """Per-example gradients of one layer call.

    ``activations`` are the layer's inputs (positional order of ``forward``) and
    ``backprops`` the gradient of the per-example-summed loss with respect to the
    output, both with ``B*K`` rows, an example's K copies adjacent. Returns, for
    each trainable parameter, a ``[B, *param.shape]`` tensor summed over the K
    copies and over positions; the engine divides by K.

    A sampler that recomputes its layer (an LSTM, attention) may also carry
    ``blocks(layer, activations, backprops)``, yielding each trainable parameter
    with its gradient as Linear blocks ``[(a, g), ...]``: ``Σ_t g_t a_tᵀ`` per row
    (``Σ_t g_t`` where ``a`` is ``None``), ``[B*K, positions, ·]``, stacked along
    the parameter's first dimension. ``bk`` then takes the norms and the clipped
    sum from one recomputation instead of calling the samplers twice.

    A sampler whose layer's forward applies each trainable parameter only through
    ``F.linear`` on it or on blocks of its whole rows (``nn.MultiheadAttention``)
    may carry ``linear_calls(layer, activations, backprops, x, g)``: given one such
    call's input ``x`` and output gradient ``g`` as the forward made them, it
    returns them batch-first as a block ``(a, g)``, or ``None`` for a call it does
    not recognise. ``bk`` and ``auto`` then take the blocks from the real forward
    and backward, with no recomputation; a call it refuses, a parameter whose rows
    the calls do not tile exactly, or one read other than as whole rows leaves
    that layer call to the sampler.

    A sampler with ``linear_calls`` may also carry ``linear_forms``,
    ``{torch function: form}``, for a layer whose forward calls a fused kernel
    (``torch.lstm``): while the layer runs in ``bk`` or ``auto``, a call of that
    function runs ``form(linear, function, *args)`` instead, which computes the
    same outputs with every product by a parameter a call of ``linear`` (or
    returns ``function(*args)`` for a layout it does not cover). Calls that read
    the same rows (a recurrent weight, once per step) have their blocks joined
    along positions.
    """

    def __call__(
        self, layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
    ) -> dict[nn.Parameter, Tensor]: ...


class NormSampler(Protocol):
    """Per-example gradient norms: same arguments as :class:`GradSampler`, values ``[B]``.

    The norm is that of the K-summed gradient (the engine divides by K).
    """

    def __call__(
        self, layer: nn.Module, activations: list[Tensor], backprops: Tensor, K: int = 1
    ) -> dict[nn.Parameter, Tensor]: ...


class Clipper(Protocol):
    """Turns per-example norms into clip factors; may learn from the data and spend privacy (adaptive).

    ``dpkit.clipping.ClipperBase`` gives no-op defaults for everything but ``factors``.

    A per-layer clipper whose row's factor depends on that row alone may also define
    ``layer_factors(norms, total)``: the factors of some rows of the ``[total, B]`` table. Then ``bk`` and
    ``auto`` clip and sum each layer the moment its output gradient arrives (streaming), so no layer's record
    outlives its part of the backward pass.
    """

    per_layer: bool  # True: factors() gets [P, B] norms, one row per trainable parameter
    max_grad_norm: float

    def factors(self, norms: Tensor) -> Tensor:
        """``norms`` is ``[B]`` (flat) or ``[P, B]`` (per layer); returns factors of the same shape."""

    def sensitivity(self) -> float:
        """The L2 bound of one example's clipped contribution: the noise std is σ times this."""

    def dp_event(self, sample_rate: float) -> DpEvent:
        """The privacy this clipper spends per step (``NoOpEvent`` unless it learns from data)."""

    def observe(self, norms: Tensor) -> None:
        """Sees each backward pass's norms (as passed to ``factors``)."""

    def end_step(self, noise: NoiseMechanism, expected_batch_size: float | None = None) -> None:
        """Called once per optimizer step, after the noise; draws from ``noise``'s generator if it must."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoiseMechanism(Protocol):
    """Privatizes the clipped sum; owns its random generator.

    ``add`` gets a flat temporary that the engine owns (all parameters of one device and dtype) and may
    write the noise into it in place; it returns the noisy tensor. Each buffer gets one ``add`` per step, in
    the same order every step, so a mechanism with memory across steps (``"bandmf"``) keeps it per buffer;
    ``dp_event`` is called once per released step, after its ``add`` calls.

    A mechanism whose privacy is not DP-SGD's may also define ``check_loader(loader)``, which raises unless
    the data loader samples as its accounting assumes, and
    ``calibrate(*, target_epsilon, target_delta, steps, accountant)``, the noise multiplier for a target ε
    (see docs/correlated-noise.md). ``add`` may refuse a step that breaks its accounting's assumptions, before
    writing anything (``"tree"``: one step per loader batch). ``dp_event`` is not called when the noise
    multiplier is 0.
    """

    def add(self, clipped_sum: Tensor, *, std: float) -> Tensor: ...

    def dp_event(self, noise_multiplier: float, sample_rate: float) -> DpEvent: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Accountant(Protocol):
    """Composes privacy events and answers ``epsilon(delta)``; never under-reports."""

    def supports(self, event: DpEvent) -> bool: ...

    def compose(self, event: DpEvent, count: int = 1) -> Accountant: ...

    def epsilon(self, delta: float) -> float: ...


ClipperFactory = Callable[..., Clipper]
NoiseFactory = Callable[..., NoiseMechanism]
AccountantFactory = Callable[[], Accountant]


@hookspec
def dpkit_grad_samplers() -> Mapping[type[nn.Module], GradSampler]:
    """Per-example gradient functions, keyed by exact layer type.

    Called once, when the registry table is built. Used by ``hooks`` mode and,
    for layers without a norm sampler, by ``ghost``, ``bk`` and ``auto``.

    Example::

        @dpkit.hookimpl
        def dpkit_grad_samplers():
            return {MyLayer: my_grad_sampler}

    .. warning:: Sum over an example's K adjacent copies and over its positions;
       the engine divides by K. Keys match exact types: a subclass is not covered.
    """


@hookspec
def dpkit_norm_samplers() -> Mapping[type[nn.Module], NormSampler]:
    """Per-example gradient-norm functions (ghost norms), keyed by exact layer type.

    Called once, when the registry table is built. Used by ``ghost``, ``bk`` and
    ``auto`` to clip without materialising per-example gradients.

    Example::

        @dpkit.hookimpl
        def dpkit_norm_samplers():
            return {MyLayer: my_norm_sampler}
    """


@hookspec
def dpkit_clippers() -> Mapping[str, ClipperFactory]:
    """Clipping strategies by the name users pass as ``clipping=``.

    A factory is called as ``factory(max_grad_norm=C, **clipping_kwargs)`` once
    per ``make_private`` and returns a :class:`Clipper`.

    Example::

        @dpkit.hookimpl
        def dpkit_clippers():
            return {"flat": FlatClipper}
    """


@hookspec
def dpkit_noise_mechanisms() -> Mapping[str, NoiseFactory]:
    """Noise mechanisms by the name users pass as ``noise=``.

    A factory is called as ``factory(seed=..., secure_mode=...)`` once per
    ``make_private`` and returns a :class:`NoiseMechanism`.

    Example::

        @dpkit.hookimpl
        def dpkit_noise_mechanisms():
            return {"gaussian": GaussianNoise}
    """


@hookspec
def dpkit_accountants() -> Mapping[str, AccountantFactory]:
    """Privacy accountants by the name users pass as ``accountant=``.

    A factory takes no arguments and returns a fresh :class:`Accountant`; dpkit
    replays the privacy ledger into it whenever epsilon is asked for.

    Example::

        @dpkit.hookimpl
        def dpkit_accountants():
            return {"rdp": RDPAccountant}
    """


@hookspec
def dpkit_on_clip(event: ClipEvent) -> None:
    """Observe one backward pass's clipping: per-example norms, clip factors, the gradient before and after.

    Called once per backward pass (a step split into micro-batches has several), after clipping and before
    noise, only when
    some plugin implements it (nobody pays for the statistics otherwise).
    Return values are ignored.

    Example::

        @dpkit.hookimpl
        def dpkit_on_clip(event):
            print(event.norms.max(), event.factors.mean())
    """


SPEC_NAMES = (
    "dpkit_grad_samplers",
    "dpkit_norm_samplers",
    "dpkit_clippers",
    "dpkit_noise_mechanisms",
    "dpkit_accountants",
    "dpkit_on_clip",
)
