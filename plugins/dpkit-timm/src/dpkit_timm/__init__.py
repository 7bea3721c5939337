"""dpkit plugins for timm's own layers: only hookimpls here, one module per layer family.

Found through the entry point ``[project.entry-points.dpkit] timm = "dpkit_timm"``. The tables name timm's classes
(``"package.module.Class"``) instead of importing them, so loading this plugin never imports timm (nor
torchvision, which timm imports): a name matches its class once a model built with timm has imported it.
"""
from __future__ import annotations

import dpkit
from dpkit_timm import layer_scale, norms

__version__ = "0.1.0"

# timm's subclasses of torch's norms whose forward computes the parent's function: the built-in samplers apply.
SAME_AS_TORCH = ("timm.layers.norm.LayerNorm", "timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1")
LAYER_NORM_2D = "timm.layers.norm.LayerNorm2d"  # LayerNorm over the channels of an NCHW input
LAYER_SCALES = ("timm.layers.layer_scale.LayerScale", "timm.layers.layer_scale.LayerScale2d")


@dpkit.hookimpl
def dpkit_grad_samplers():
    return {**dict.fromkeys(SAME_AS_TORCH, norms.grad_sampler), LAYER_NORM_2D: norms.grad_sampler_2d,
            **dict.fromkeys(LAYER_SCALES, layer_scale.grad_sampler)}


@dpkit.hookimpl
def dpkit_norm_samplers():
    return {**dict.fromkeys(SAME_AS_TORCH, norms.norm_sampler), LAYER_NORM_2D: norms.norm_sampler_2d,
            **dict.fromkeys(LAYER_SCALES, layer_scale.norm_sampler)}
