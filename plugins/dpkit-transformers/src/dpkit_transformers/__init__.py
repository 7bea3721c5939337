"""dpkit plugins for Hugging Face transformers layers: only hookimpls here, one module per layer family.

Found through the entry point ``[project.entry-points.dpkit] transformers = "dpkit_transformers"``. Importing
this package imports the layer classes (they are the table keys), so transformers loads only when dpkit's
registry is first used, never at ``import dpkit``.
"""
from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D

import dpkit
from dpkit_transformers import conv1d, rms_norm

__version__ = "0.1.0"


@dpkit.hookimpl
def dpkit_grad_samplers():
    return {Conv1D: conv1d.grad_sampler, LlamaRMSNorm: rms_norm.grad_sampler, T5LayerNorm: rms_norm.grad_sampler}


@dpkit.hookimpl
def dpkit_norm_samplers():
    return {Conv1D: conv1d.norm_sampler, LlamaRMSNorm: rms_norm.norm_sampler, T5LayerNorm: rms_norm.norm_sampler}
