"""Plugins: overrides of built-in entries are never silent; malformed plugins fail at registration."""
from __future__ import annotations

import types
import warnings

import pytest
from torch import nn

import dpkit
from dpkit.errors import PluginError, PluginOverrideWarning
from dpkit.hookspecs import hookimpl

from ._setup import Frozen, assert_counted, batch, loss_backward, make, train_step


def overrides(**kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(quiet=False, **kw)
    return [str(w.message) for w in caught if issubclass(w.category, PluginOverrideWarning)]


def test_no_override_no_warning(fresh_registry):
    assert overrides() == []


def test_norm_sampler_for_linear_warns_naming_plugin_and_entry(fresh_registry):
    @dpkit.register_norm_sampler(nn.Linear)
    def my_norms(layer, activations, backprops, K=1):
        raise AssertionError("not called at make_private")

    (message,) = overrides(mode="bk")
    assert "my_norms" in message and "norm_samplers:Linear" in message
    assert "norm sampler 'torch.nn.modules.linear.Linear'" in message and "dpkit.layers.linear" in message


def test_grad_sampler_for_linear_warns(fresh_registry):
    @dpkit.register_grad_sampler(nn.Linear)
    def my_grads(layer, activations, backprops, K=1):
        raise AssertionError("not called at make_private")

    (message,) = overrides(mode="hooks")
    assert "my_grads" in message and "grad sampler 'torch.nn.modules.linear.Linear'" in message


class _Prv:
    def __init__(self, *a, **k):
        pass


@pytest.mark.parametrize("hook,key,kwargs", [
    ("dpkit_accountants", "prv", {}),
    ("dpkit_clippers", "flat", {}),
    ("dpkit_noise_mechanisms", "gaussian", {}),
])
def test_factory_override_warns_naming_plugin_and_entry(fresh_registry, hook, key, kwargs):
    from dpkit import registry

    builtin = registry.lookup(hook, key, "entry").value
    plugin = types.ModuleType("shady_plugin")
    setattr(plugin, hook, hookimpl(specname=hook)(lambda: {key: builtin}))
    registry.register_plugin(plugin, name="shady-plugin")
    (message,) = overrides(**kwargs)
    assert "'shady-plugin'" in message and f"'{key}'" in message


def test_override_of_a_layer_the_model_does_not_use_is_silent(fresh_registry):
    @dpkit.register_grad_sampler(nn.Conv2d)
    def conv_grads(layer, activations, backprops, K=1):
        raise AssertionError

    assert overrides() == []


def test_a_new_clipper_name_is_not_an_override(fresh_registry):
    from dpkit import registry

    flat = registry.lookup("dpkit_clippers", "flat", "clipping").value
    plugin = types.ModuleType("extra")
    plugin.dpkit_clippers = hookimpl(specname="dpkit_clippers")(lambda: {"my_flat": flat})
    registry.register_plugin(plugin, name="extra")
    assert overrides(clipping="my_flat") == []


def test_a_misnamed_hook_is_refused_at_registration(fresh_registry):
    from dpkit import registry

    plugin = types.ModuleType("typo")
    plugin.dpkit_grad_sampler = hookimpl(lambda: {})  # singular: no such hook
    with pytest.raises(PluginError, match="dpkit_grad_sampler"):
        registry.register_plugin(plugin, name="typo")


def test_a_sampler_with_a_wrong_signature_is_refused(fresh_registry):
    with pytest.raises((PluginError, TypeError), match="activations|signature|backprops|arguments"):
        @dpkit.register_grad_sampler(nn.Linear)
        def wrong(layer):
            return {}


def test_a_malformed_table_is_refused(fresh_registry):
    with pytest.raises((PluginError, TypeError)):
        dpkit.register_grad_sampler()(lambda layer, activations, backprops, K=1: {})


def test_an_observer_that_raises_releases_nothing(fresh_registry):
    class Boom:
        @dpkit.hookimpl
        def dpkit_on_clip(self, event):
            raise RuntimeError("observer failed")

    fresh_registry.register_plugin(Boom(), name="boom")
    p = make()
    x, y = batch()
    frozen = Frozen(p)
    with pytest.raises(RuntimeError, match="observer failed"):
        loss_backward(p, x, y)
    frozen.check()
    fresh_registry.unregister_plugin("boom")
    train_step(p, x, y)
    assert_counted(p, 1)


def test_an_overriding_sampler_that_inflates_gradients_is_still_clipped(fresh_registry):
    """An override is trusted for per-example gradients, but the clipping after it still bounds each example."""
    from dpkit.layers import linear

    builtin = linear.dpkit_grad_samplers()[nn.Linear]

    @dpkit.register_grad_sampler(nn.Linear)
    def inflating(layer, activations, backprops, K=1):
        return {p: 1000 * g for p, g in builtin(layer, activations, backprops, K=K).items()}

    from ._setup import assert_sensitivity
    assert make(mode="hooks").plan[0].provider.startswith("user:")  # the override is the one in use
    assert_sensitivity(lambda: make(mode="hooks", noise_multiplier=0.0), *batch(), examples=[0, 3])
