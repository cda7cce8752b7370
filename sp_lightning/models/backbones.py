"""Build a classification network by name: ``small_cnn``, ``timm:<name>`` or ``torchvision:<name>``.

Every backbone is returned with a head of ``num_classes`` outputs. Weights are
random unless ``pretrained=True``; when pretrained weights cannot be fetched
(no internet, nothing cached) the error says so and how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

SMALL_CNN = "small_cnn"


class SmallCNN(nn.Module):
    """A fast CNN for small images: stages of conv3x3-BN-ReLU-maxpool, global average pool, linear head.

    Args:
        num_classes: outputs of the head.
        in_chans: input channels.
        widths: channels of each stage (each stage halves the resolution).
        dropout: dropout before the head.
    """

    def __init__(
        self, num_classes: int, in_chans: int = 3, widths: Sequence[int] = (16, 32, 48, 64), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive channel counts, got {list(widths)}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        layers: list[nn.Module] = []
        channels = int(in_chans)
        for width in widths:
            layers += [
                nn.Conv2d(channels, int(width), 3, padding=1, bias=False),
                nn.BatchNorm2d(int(width)),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = int(width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))


def _offline_error(spec: str, exc: BaseException) -> RuntimeError:
    return RuntimeError(
        f"Could not load pretrained weights for {spec!r}: {type(exc).__name__}: {exc}. "
        "This machine cannot reach the weights (no internet access and no cached copy). Fix: run once with "
        "internet access so the weights are cached (TORCH_HOME / HF_HOME), copy a cache from another machine, "
        "or set pretrained=False to start from random weights."
    )


def _replace_head(model: nn.Module, spec: str, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` (the classification head) for one with ``num_classes`` outputs."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"Cannot find a linear classification head in {spec!r} to resize to {num_classes} classes; "
            "use pretrained=False or a model whose head is an nn.Linear."
        )
    name, old = linears[-1]
    parent = model.get_submodule(name.rpartition(".")[0])
    setattr(parent, name.rpartition(".")[2], nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _torchvision(name: str, num_classes: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(
            f"Unknown torchvision model {name!r}; see torchvision.models.list_models() for valid names."
        )
    spec = f"torchvision:{name}"
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    except OSError as exc:  # URLError, connection and file errors all derive from OSError
        raise _offline_error(spec, exc) from exc
    _replace_head(model, spec, num_classes)
    return model


def _timm(name: str, num_classes: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"Unknown timm model {name!r}; see timm.list_models('*pattern*') for valid names.")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except OSError as exc:  # Hugging Face hub and URL download errors derive from OSError
        if not pretrained:
            raise
        raise _offline_error(f"timm:{name}", exc) from exc


def adapt_small_input(model: nn.Module, spec: str) -> None:
    """Give a ResNet-style stem (``conv1`` + ``maxpool``) stride 1 and a 3x3 kernel for small (e.g. 32x32) inputs."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"small_input=True adapts ResNet-style stems (a conv1 Conv2d and a maxpool), and {spec!r} has none. "
            "For ViT-style models set the input size instead, e.g. backbone_kwargs: {img_size: 32, patch_size: 4}."
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    model.maxpool = nn.Identity()


def build_backbone(
    spec: str,
    num_classes: int,
    pretrained: bool = False,
    small_input: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Create the network named ``spec`` with a ``num_classes``-way head.

    Args:
        spec: ``"small_cnn"``, ``"timm:<model name>"`` or ``"torchvision:<model name>"``.
        num_classes: outputs of the classification head.
        pretrained: load the library's default pretrained weights (needs them cached or internet).
        small_input: adapt a ResNet-style stem to small images (see :func:`adapt_small_input`).
        kwargs: extra constructor arguments for the model (e.g. ``img_size`` for timm ViTs).
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    options = dict(kwargs or {})
    library, _, name = spec.partition(":")
    if spec == SMALL_CNN:
        if pretrained:
            raise ValueError("small_cnn has no pretrained weights: set pretrained=False.")
        model = SmallCNN(int(num_classes), **options)
    elif library == "timm" and name:
        model = _timm(name, int(num_classes), pretrained, options)
    elif library == "torchvision" and name:
        model = _torchvision(name, int(num_classes), pretrained, options)
    else:
        raise ValueError(
            f"Unknown backbone {spec!r}: use 'small_cnn', 'timm:<name>' (e.g. 'timm:resnet18') "
            "or 'torchvision:<name>' (e.g. 'torchvision:resnet18')."
        )
    if small_input:
        adapt_small_input(model, spec)
    return model
