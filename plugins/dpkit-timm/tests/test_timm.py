"""timm's layers against torch.func, and small timm models (no downloads) trained with dpkit against a loop.

``LayerNorm2d``, timm's ``LayerNorm``/``GroupNorm`` subclasses and ``LayerScale`` resolve to this plugin; a ViT and
a ResNet with GroupNorm built by ``timm.create_model`` give one clipped step (no noise) equal to a loop over single
examples, in every mode that covers them. A ViT with a class token and a position embedding (parameters of the
model itself, used outside any layer) is one torch.func unit in ``auto`` and refused by the sampler modes.
"""
from __future__ import annotations

import pytest

try:  # first: without timm the module skips before importing torch
    import timm
except Exception as err:  # no timm, or a torchvision built for another torch (RuntimeError); see conftest.py
    pytest.skip(f"timm cannot be imported ({type(err).__name__}: {err})", allow_module_level=True)

import copy  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dpkit  # noqa: E402
from dpkit import registry  # noqa: E402
from dpkit.errors import UnsupportedLayerError  # noqa: E402
from dpkit.testing import check_grad_sampler, check_norm_sampler  # noqa: E402
from timm.layers import GroupNorm, GroupNorm1, LayerNorm, LayerNorm2d, LayerScale, LayerScale2d  # noqa: E402

C = 0.05  # small enough that every example is clipped


def randomized(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # ones and zeros (the inits) would hide a missing factor
    return layer


LAYERS = {
    "LayerNorm": (lambda: LayerNorm(6), (4, 5, 6)),
    "LayerNorm2d": (lambda: LayerNorm2d(6), (4, 6, 3, 5)),
    "GroupNorm": (lambda: GroupNorm(6, num_groups=3), (4, 6, 3, 3)),
    "GroupNorm1": (lambda: GroupNorm1(6), (4, 6, 5)),
    "LayerScale": (lambda: LayerScale(6), (4, 5, 6)),
    "LayerScale2d": (lambda: LayerScale2d(6), (4, 6, 3, 5)),
}


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_samplers_agree_with_torch_func(name, K):
    make, shape = LAYERS[name]
    layer = randomized(make())
    assert registry.table("dpkit_grad_samplers")[type(layer)].provider == "timm"
    check_grad_sampler(layer, torch.randn(shape), K=K)  # the samplers the registry resolves
    check_norm_sampler(layer, torch.randn(shape), K=K)
    check_norm_sampler(layer, torch.randn(shape), K=K, dtype=torch.bfloat16)


def test_loading_the_plugin_imports_no_timm():
    code = "import sys; from dpkit import registry; registry.table('dpkit_grad_samplers'); print('timm' in sys.modules)"
    env = {**os.environ, "DPKIT_LOAD_PLUGINS": "dpkit-timm"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def vit() -> nn.Module:
    """A ViT with LayerScale, a class token, a register token and a position embedding."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=12,
                             depth=1, num_heads=2, num_classes=3, init_values=0.5, reg_tokens=1)


def vit_layers_only() -> nn.Module:
    """The same ViT without tokens of its own: every parameter belongs to a layer."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=12,
                             depth=1, num_heads=2, num_classes=3, init_values=0.5, class_token=False,
                             pos_embed="none", global_pool="avg")


def vit_frozen_tokens() -> nn.Module:
    """The ViT with its tokens frozen: the trainable parameters all belong to layers."""
    model = vit()
    for p in model.parameters(recurse=False):
        p.requires_grad_(False)
    return model


def resnet() -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=3, channels=(8, 8, 8, 8),
                             norm_layer=functools.partial(GroupNorm, num_groups=4))


def build(factory) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = factory().double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm, LayerScale)):
                for p in module.parameters():
                    p.normal_(1.0, 0.5)
        for p in model.parameters(recurse=False):
            p.normal_()  # timm starts the tokens at zero or near it
    return model, torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])


def loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Σ_i clip(∇ loss_i), each example in its own forward and backward pass; no dpkit involved."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        factor = min(1.0, C / (torch.sqrt(sum((g ** 2).sum() for g in grads)).item() + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads)]
    return total


def make_private(model: nn.Module, mode: str):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0 warns that the step is not private
        private = dpkit.make_private(module=model, optimizer=optimizer, sample_rate=0.5, noise_multiplier=0.0,
                                     max_grad_norm=C, grad_sample_mode=mode, loss_reduction="sum",
                                     criterion=nn.CrossEntropyLoss())
    return private, optimizer


CASES = [(f, mode) for f in (vit_layers_only, resnet) for mode in ("auto", "hooks", "ghost", "bk")]
CASES += [(vit_frozen_tokens, "auto"), (vit_frozen_tokens, "hooks"), (vit, "auto")]


@pytest.mark.parametrize("factory, mode", CASES, ids=[f"{f.__name__}-{mode}" for f, mode in CASES])
def test_one_clipped_step_matches_the_loop(factory, mode):
    model, x, y = build(factory)
    expected = loop_reference(model, x, y)
    model = copy.deepcopy(model)
    private, optimizer = make_private(model, mode)
    if factory is vit:  # the model itself owns parameters: the whole ViT is recomputed per example by torch.func
        assert [(row.name, row.mode) for row in private.plan] == [("", "functorch")], private.plan
    else:  # timm's layers get this plugin's samplers, and no unit falls back to torch.func
        timm_rows = [r for r in private.plan if isinstance(r.module, (LayerNorm, GroupNorm, LayerScale))]
        assert timm_rows and {r.provider for r in timm_rows} == {"timm"}, private.plan
        assert all(r.mode != "functorch" for r in private.plan), private.plan
    private.criterion(model(x), y).backward()
    optimizer.step()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, p, want in zip(names, [p for p in model.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{mode} {n}: {m}")
    private.detach()


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_sampler_modes_refuse_the_vit_tokens_naming_the_model(mode):
    model, _, _ = build(vit)
    with pytest.raises(UnsupportedLayerError, match="VisionTransformer") as refused:
        make_private(model, mode)
    assert "LayerNorm" not in str(refused.value) and "LayerScale" not in str(refused.value)  # those are covered
