"""The model zoo of issue 2, random init, small inputs.

For each model: forward bit-identical under soft_backward, every gated op that ran
has a soft rule (coverage report clean, and the dispatch-level oracle counts the
same gated ops), the Soft Pullback differs from the gradient, and the model is
exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn

from _oracle import mismatch
from _support import assert_same, mode_stack_depth, snapshot

from sp_lightning import Gradient, SoftPullback, coverage_report, soft_backward

ZOO: dict[str, tuple[Callable[[], nn.Module], int, set[str]]] = {
    # name: (builder, input size, rules that must have fired)
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32, {"relu", "maxpool"}),
    "tv_vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), 32, {"relu", "maxpool"}),
    "tv_densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 32, {"relu", "maxpool"}),
    "tv_convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 32, {"gelu", "layernorm"}),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32, {"silu"}),
    "tv_mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32, {"relu", "hardswish", "hardsigmoid"}),
    "tv_vit_b_16": (
        lambda: torchvision.models.vit_b_16(image_size=32, num_classes=10), 32, {"attention", "gelu", "layernorm"}),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 32, {"relu", "maxpool"}),
    "timm_vit_tiny": (
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32), 32,
        {"attention", "gelu", "layernorm"}),
    "timm_deit_tiny": (
        lambda: timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32), 32,
        {"attention", "gelu", "layernorm"}),
    "timm_pvt_v2_b0": (lambda: timm.create_model("pvt_v2_b0", num_classes=10), 32, {"attention", "gelu", "layernorm"}),
    "timm_swin_tiny": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=112, window_size=7), 112,
        {"attention", "gelu", "layernorm"}),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), 32, {"gelu", "layernorm"}),
    # attention in other forms than softmax(...) @ v: transposed, factorised, separable
    "timm_efficientvit_m0": (lambda: timm.create_model("efficientvit_m0", num_classes=10), 64, {"attention", "relu"}),
    "timm_coat_lite_tiny": (
        lambda: timm.create_model("coat_lite_tiny", num_classes=10, img_size=64), 64, {"attention", "gelu"}),
    "timm_mobilevitv2_050": (
        lambda: timm.create_model("mobilevitv2_050", num_classes=10), 64, {"attention", "silu", "groupnorm"}),
}


def with_nonzero_heads(model: nn.Module) -> nn.Module:
    """Some models (torchvision ViT) start with an all-zero head, whose input gradient is exactly 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    return model


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name: str) -> None:
    build, size, expected_rules = ZOO[name]
    torch.manual_seed(0)
    model = with_nonzero_heads(build()).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)

    leaf = x.clone().requires_grad_(True)
    with torch.no_grad():
        plain_no_grad = model(x)
    plain_with_grad = model(leaf)  # may take another kernel path than no_grad (e.g. MultiheadAttention)
    with soft_backward(model):
        with torch.no_grad():
            soft_no_grad = model(x)
        soft_with_grad = model(leaf)
    assert torch.equal(plain_no_grad, soft_no_grad)
    assert torch.equal(plain_with_grad, soft_with_grad)

    report = coverage_report(model, x)
    assert report.clean, str(report)
    assert expected_rules <= set(report.softened), str(report)
    assert not mismatch(model, x, report), str(report)  # the dispatch-level oracle saw no other gated op

    sp, grad = SoftPullback(model).attribute(x, 3), Gradient(model).attribute(x, 3)
    assert torch.isfinite(sp).all() and sp.abs().sum() > 0
    assert (sp - grad).norm() > 1e-3 * grad.norm()  # relative: random-init gradients can be tiny

    assert_same(before, snapshot(model))
    assert mode_stack_depth() == 0


def test_densenet_inline_relu_is_softened() -> None:
    """DenseNet applies F.relu inline after the last norm: it must be softened like the ReLU modules."""
    model = torchvision.models.densenet121(num_classes=10).eval()
    modules = sum(isinstance(m, nn.ReLU) for m in model.modules())
    report = coverage_report(model, torch.randn(1, 3, 32, 32))
    assert report.softened["relu"] == modules + 1


def test_timm_fused_and_hand_written_attention_agree() -> None:
    """timm ViT with fused SDPA and with its hand-written softmax path give the same Soft Pullback."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = SoftPullback(model, {"attention": 0.5}).attribute(x, 1)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    report = coverage_report(model, x)
    assert report.softened["attention"] == 12 and report.clean
    torch.testing.assert_close(SoftPullback(model, {"attention": 0.5}).attribute(x, 1), fused, rtol=1e-4, atol=1e-6)
