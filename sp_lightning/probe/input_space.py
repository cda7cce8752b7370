"""The model's input space as a person sees it: valid bounds, de-normalisation and class names.

:func:`resolve_input_space` reads them from the user's options, else the datamodule's
``mean``/``std`` and ``class_names``/``classes`` attributes, else the probe images
themselves, and returns a frozen :class:`InputSpace`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

Bound = float | Sequence[float]


@dataclass(frozen=True)
class InputSpace:
    """Per-channel valid range ``[low, high]`` (each ``(C,)``), optional display function and class names."""

    low: Tensor
    high: Tensor
    denormalize: Callable[[Tensor], Tensor] | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def bounds(self) -> tuple[Tensor, Tensor]:
        return self.low, self.high

    @property
    def width(self) -> float:
        """Mean width of the valid range over channels (what the ascent's step is scaled by)."""
        return float((self.high - self.low).mean())

    def to_display(self, images: Tensor) -> Tensor:
        """Model inputs ``(..., C, H, W)`` -> display images in [0, 1]."""
        if self.denormalize is not None:
            return self.denormalize(images).float().clamp(0.0, 1.0)
        low, high = (b.view(-1, 1, 1) for b in self.bounds)
        return ((images - low) / (high - low)).clamp(0.0, 1.0)


def per_channel(value: Any, channels: int, name: str) -> Tensor:
    """One float per channel from a number or a per-channel sequence."""
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() not in (1, channels):
        raise ValueError(
            f"{name} has {values.numel()} values but the probe images have {channels} channels "
            "(give one value, or one per channel)."
        )
    return values.expand(channels).clone()


def resolve_input_space(
    images: Tensor,
    datamodule: Any = None,
    *,
    mean: Bound | None = None,
    std: Bound | None = None,
    input_bounds: tuple[Bound, Bound] | None = None,
    denormalize: Callable[[Tensor], Tensor] | None = None,
    class_names: Sequence[str] | None = None,
) -> InputSpace:
    """Bounds, display and names for probe ``images`` (N, C, H, W).

    Bounds come from ``input_bounds``, else ``(-mean/std, (1-mean)/std)`` (the user's or the
    datamodule's ``mean``/``std``), else [0, 1] when the images lie in it, else the images'
    own per-channel range (with a warning).
    """
    channels = images.shape[1]
    names = class_names
    for attribute in ("class_names", "classes"):
        if names is None and datamodule is not None:
            names = getattr(datamodule, attribute, None)
    if mean is None and datamodule is not None and getattr(datamodule, "mean", None) is not None:
        mean, std = datamodule.mean, getattr(datamodule, "std", None)
        if std is None:
            raise ValueError(f"{type(datamodule).__name__} has a `mean` attribute but no `std`; give it both.")
    if input_bounds is not None:
        low, high = (per_channel(b, channels, "input_bounds") for b in input_bounds)
    elif mean is not None:
        mean_t, std_t = per_channel(mean, channels, "mean"), per_channel(std, channels, "std")
        low, high = (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t
    elif images.min() >= 0 and images.max() <= 1:
        low, high = torch.zeros(channels), torch.ones(channels)
    else:
        low, high = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
        rank_zero_warn(
            "SemanticPullbackCallback: the probe images are not in [0, 1] and no normalisation is known, so "
            "images are shown and counterfactuals clipped using the probe set's own range. Pass mean/std "
            "(or input_bounds / denormalize), or give the datamodule `mean` and `std` attributes."
        )
    if bool((high <= low).any()):
        raise ValueError(f"The valid input range is empty in some channel: low={low.tolist()}, high={high.tolist()}.")
    return InputSpace(
        low.contiguous(), high.contiguous(), denormalize,
        None if names is None else tuple(str(n) for n in names),
    )
