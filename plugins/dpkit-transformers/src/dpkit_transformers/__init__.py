"""dpkit plugins for Hugging Face transformers layers, and a private ``Trainer``: one module per layer family.

Found through the entry point ``[project.entry-points.dpkit] transformers = "dpkit_transformers"``. The tables
name the layer classes (``"package.module.Class"``) instead of importing them, so loading this plugin imports
neither transformers nor peft: a name matches its class once a model that uses it has imported it. The Trainer
integration (``DPTrainer``, ``PrivacyArguments``) imports transformers, on first use only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import dpkit
from dpkit_transformers import conv1d, rms_norm

if TYPE_CHECKING:
    from dpkit_transformers.trainer import DPTrainer, PrivacyArguments

__version__ = "0.1.0"
__all__ = ["DPTrainer", "PrivacyArguments"]

CONV1D = "transformers.pytorch_utils.Conv1D"  # GPT-2's linear layer, weight stored transposed
RMS_NORMS = ("transformers.models.llama.modeling_llama.LlamaRMSNorm", "transformers.models.t5.modeling_t5.T5LayerNorm")


def __getattr__(name: str) -> object:
    """``DPTrainer`` and ``PrivacyArguments`` import transformers: load them when first asked for."""
    if name in __all__:
        from dpkit_transformers import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dpkit.hookimpl
def dpkit_grad_samplers():
    return {CONV1D: conv1d.grad_sampler, **dict.fromkeys(RMS_NORMS, rms_norm.grad_sampler)}


@dpkit.hookimpl
def dpkit_norm_samplers():
    return {CONV1D: conv1d.norm_sampler, **dict.fromkeys(RMS_NORMS, rms_norm.norm_sampler)}
