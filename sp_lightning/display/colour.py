"""Colours of explanations: scaling, the seismic map, heatmaps and difference images (pure tensor functions).

Images are float ``(..., C, H, W)`` in [0, 1]; maps are float ``(..., H, W)``. Nothing
here draws text: a map that holds NaN or infinite values comes back as a flat grey tile
and :func:`finite` says which ones, so the layout can stamp "NaN" on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Anchor colours of the diverging map at -1, -0.5, 0, 0.5, 1 (dark blue .. white .. dark red).
_SEISMIC_ANCHORS = ((0.0, 0.0, 0.3), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0))
_LUMA = (0.299, 0.587, 0.114)
#: The grey a tile with non-finite values is drawn in.
FLAG_GREY = 0.6
#: Default percentile of |map| that is drawn in full colour (see :func:`robust_scale`).
DEFAULT_PERCENTILE = 99.0


def finite(maps: Tensor) -> Tensor:
    """``(...)`` bool: which maps (or images) of ``(..., H, W)`` hold only finite values."""
    return torch.isfinite(maps).flatten(-2).all(dim=-1)


def robust_scale(maps: Tensor, percentile: float = DEFAULT_PERCENTILE) -> Tensor:
    """The value drawn in full colour for each map of ``(..., H, W)``: a high percentile of |map|.

    Attributions are heavy-tailed: a few pixels (borders, the object's edge) are ten times
    larger than the rest, so dividing by the maximum leaves almost every pixel near white.
    The 99th percentile lets 1% of the pixels saturate (clipped, still readable as "strongest")
    and spreads the colour range over the other 99%, whatever the image size: on 160x160
    tiles 256 pixels reach full colour. ``percentile=100`` is the maximum of |map|. A map
    whose percentile is 0 (at most 1% non-zero) falls back to its maximum, an all-zero map
    to 1 (drawn white). Non-finite maps get NaN.

    Args:
        maps: ``(..., H, W)`` raw maps.
        percentile: in (0, 100].
    Returns:
        ``(...)`` positive scales (NaN for maps holding NaN or infinite values).
    """
    if maps.dim() < 2:
        raise ValueError(f"maps must be shaped (..., H, W), got {tuple(maps.shape)}.")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}.")
    magnitude = maps.detach().float().abs().flatten(-2)
    ok = torch.isfinite(magnitude).all(dim=-1)
    magnitude = torch.where(ok[..., None], magnitude, torch.zeros_like(magnitude))
    peak = magnitude.amax(dim=-1)
    scale = torch.quantile(magnitude, percentile / 100.0, dim=-1) if percentile < 100.0 else peak
    scale = torch.where(scale > 0, scale, torch.where(peak > 0, peak, torch.ones_like(peak)))
    return torch.where(ok, scale, torch.full_like(scale, float("nan")))


def scale_maps(maps: Tensor, scale: Tensor | float) -> Tensor:
    """``maps / scale`` clipped to [-1, 1]; ``scale`` is one number or one per map (shape ``maps.shape[:-2]``)."""
    if not isinstance(scale, Tensor):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        return (maps / scale).clamp(-1.0, 1.0)
    return (maps / scale[..., None, None]).clamp(-1.0, 1.0)


def seismic(values: Tensor) -> Tensor:
    """Diverging colours for values in [-1, 1]: ``(..., H, W)`` -> ``(..., 3, H, W)``.

    Piecewise-linear between dark blue (-1), blue, white (0), red and dark red (+1); values
    outside are clipped, NaN is drawn white.
    """
    anchors = torch.tensor(_SEISMIC_ANCHORS, dtype=values.dtype, device=values.device)
    segments = anchors.shape[0] - 1
    position = (values.nan_to_num(0.0).clamp(-1.0, 1.0) + 1.0) * (segments / 2.0)
    low = position.floor().clamp(max=segments - 1).long()
    frac = (position - low).unsqueeze(-1)
    rgb = anchors[low] * (1.0 - frac) + anchors[low + 1] * frac
    return rgb.movedim(-1, -3)


def to_rgb(images: Tensor) -> Tensor:
    """``(..., C, H, W)`` -> ``(..., 3, H, W)``: RGB as is, one channel repeated, other counts averaged to grey."""
    channels = images.shape[-3]
    if channels == 3:
        return images
    grey_ = images if channels == 1 else images.mean(dim=-3, keepdim=True)
    return grey_.expand(*images.shape[:-3], 3, *images.shape[-2:])


def grey(images: Tensor) -> Tensor:
    """Luminance of display images ``(..., C, H, W)`` as ``(..., 3, H, W)`` grey."""
    rgb = to_rgb(images)
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(dim=-3, keepdim=True).expand_as(rgb)


def flag_non_finite(images: Tensor) -> Tensor:
    """Display images ``(..., 3, H, W)`` with every image that holds NaN or infinity replaced by flat grey."""
    bad = ~torch.isfinite(images).flatten(-3).all(dim=-1)
    return torch.where(bad[..., None, None, None], torch.full_like(images, FLAG_GREY), images)


def heatmap(
    maps: Tensor, image: Tensor | None = None, scale: Tensor | float | None = None, opacity: float = 0.8
) -> Tensor:
    """Coloured explanation ``(..., 3, H, W)`` for raw maps ``(..., H, W)``: seismic on white, over a faint input.

    The colour is multiplied onto a light grey copy of ``image`` (like ink on paper): zero
    shows the faint input, and every non-zero value keeps its hue and saturation whatever
    the image underneath, so the map reads at a glance. Maps holding NaN or infinity come
    back flat grey (see :func:`finite`).

    Args:
        maps: raw maps ``(..., H, W)``.
        image: display image ``(C, H, W)`` or ``(..., C, H, W)`` in [0, 1], or ``None`` (plain map on white).
        scale: the value drawn in full colour: one number for every map (comparable across
            images and steps), one per map, or ``None`` for :func:`robust_scale`.
        opacity: how much the colour covers the input, in [0, 1]: 1 hides it (plain map on
            white), 0.8 leaves a faint grey copy with 20% of its contrast.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}.")
    maps = maps.float()
    colour = seismic(scale_maps(maps, robust_scale(maps) if scale is None else scale))
    if image is not None:
        colour = colour * (1.0 - (1.0 - opacity) * (1.0 - grey(image.float().clamp(0.0, 1.0))))
    ok = finite(maps)[..., None, None, None]
    return torch.where(ok, colour, torch.full_like(colour, FLAG_GREY))


def difference_image(delta: Tensor) -> Tensor:
    """Show a change ``(..., C, H, W)`` as grey-centred RGB: grey 0.5 means no change.

    Scaled per image like the heatmaps (:func:`robust_scale` over all of its values), so a
    counterfactual's few strongest pixels do not leave the rest of the change invisible.
    """
    scale = robust_scale(delta.flatten(-3)[..., None])
    scaled = (delta / scale.view(*scale.shape, 1, 1, 1)).clamp(-1.0, 1.0)
    return flag_non_finite(to_rgb(0.5 + 0.5 * scaled).clamp(0.0, 1.0))
