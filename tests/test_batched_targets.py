"""T targets per input in one batched backward pass equal T separate calls (issue 15).

``attribute(x, targets)`` with targets (B, T) runs one forward and one backward
batched across the T targets (``torch.autograd.grad(..., is_grads_batched=True)``).
Checked on CPU against T separate single-target calls, for zoo models with
BatchNorm, attention in two forms and hardswish/hardsigmoid, with the soft rules
and with the plain gradient; and the per-target loop (``batch_targets = False``, the
CPU's default) that a model whose backward vmap cannot batch falls back to.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from test_zoo import ZOO, with_nonzero_heads

from sp_lightning import DoublePullback, Gradient, SmoothPullback, SoftPullback
from sp_lightning.explainers.base import Explainer

#: BatchNorm + max-pooling (ResNet), attention as softmax @ v with LayerNorm + GELU (ViT) and in
#: another form (EfficientViT), hardswish/hardsigmoid with BatchNorm (MobileNetV3).
MODELS = ("tv_resnet18", "timm_vit_tiny", "timm_efficientvit_m0", "tv_mobilenet_v3_small")


def separately(explainer: Explainer, x: Tensor, targets: Tensor) -> Tensor:
    """T single-target calls, stacked as (B, T, ...)."""
    return torch.stack([explainer.attribute(x, targets[:, t]) for t in range(targets.shape[1])], dim=1)


def without_warnings(explainer: Explainer, x: Tensor, targets: Tensor) -> Tensor:
    """``attribute`` with the batched backward (the CPU's default is per target), failing on any warning
    (so a fallback from the batched pass cannot hide)."""
    explainer.batch_targets = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return explainer.attribute(x, targets)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", [SoftPullback, Gradient])
def test_batched_targets_equal_separate_calls(name: str, method: type[Explainer]) -> None:
    build, size, _ = ZOO[name]
    torch.manual_seed(0)
    model = with_nonzero_heads(build()).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[3, 1, 3], [0, 9, 5]])  # a repeated target too
    explainer = method(model)
    batched = without_warnings(explainer, x, targets)
    assert batched.shape == (2, 3, 3, size, size) and batched.is_contiguous()
    scale = float(batched.abs().max())
    assert scale > 0 and not torch.equal(batched[:, 0], batched[:, 1])
    torch.testing.assert_close(batched, separately(explainer, x, targets), rtol=1e-4, atol=1e-5 * scale)


class Pool(nn.Module):
    """A convolution, one max-pool and a head."""

    def __init__(self, kernel: int, stride: int, ceil_mode: bool) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
        self.window, self.ceil_mode = (kernel, stride), ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        pooled = nn.functional.max_pool2d(self.conv(x), *self.window, ceil_mode=self.ceil_mode)
        return self.head(pooled.mean((2, 3)))


@pytest.mark.parametrize(
    ("window", "ceil_mode", "size"),
    [((2, 2), True, (13, 11)), ((3, 3), True, (13, 11)), ((2, 2), False, (14, 12)), ((3, 3), False, (14, 11))],
)
def test_max_pool_windows_batch_their_targets(window: tuple[int, int], ceil_mode: bool, size: tuple[int, int]) -> None:
    """The max-pool's routings have out-of-place forms for the batched pass (no fallback): windows
    that overhang the input (ceil_mode) take the general routing, windows that tile it (VGG's) their own."""
    torch.manual_seed(0)
    model = Pool(*window, ceil_mode).eval()
    x, targets = torch.randn(2, 3, *size), torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    explainer = SoftPullback(model)
    batched = without_warnings(explainer, x, targets)
    torch.testing.assert_close(batched, separately(explainer, x, targets), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", [DoublePullback, SmoothPullback])
def test_derived_explainers_batch_their_targets(method: type[Explainer]) -> None:
    """DoublePullback's first step and SmoothPullback's noisy copies pull back T targets at once too."""
    build, size, _ = ZOO["tv_resnet18"]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 4, 8], [2, 2, 6]])
    explainer = method(model, n=3, noise_batch=2) if method is SmoothPullback else method(model)
    batched = without_warnings(explainer, x, targets)
    scale = float(batched.abs().max())
    torch.testing.assert_close(batched, separately(explainer, x, targets), rtol=1e-4, atol=1e-5 * scale)


class _InPlaceBackward(torch.autograd.Function):
    """Doubles its input; the backward writes the cotangent into a saved tensor, which vmap refuses."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)  # type: ignore[attr-defined]
        return 2 * x

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.full_like(x, 2.0).mul_(grad)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.relu(_InPlaceBackward.apply(x)))


def test_backward_vmap_cannot_run_falls_back_with_a_warning() -> None:
    """A model whose own backward vmap cannot batch still gets its T pullbacks, one pass each, and a warning."""
    torch.manual_seed(0)
    model = _Custom()
    x, targets = torch.randn(3, 6), torch.tensor([[0, 1], [2, 3], [1, 1]])
    explainer = SoftPullback(model)
    explainer.batch_targets = True
    with pytest.warns(RuntimeWarning, match="batched backward over 2 targets failed.*batch_targets = False"):
        result = explainer.attribute(x, targets)
    torch.testing.assert_close(result, separately(explainer, x, targets))
    explainer.batch_targets = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(explainer.attribute(x, targets), result)
