"""Pictures of explanations: pure functions of tensors (SPEC section 4).

Every function here takes and returns tensors (images are float ``(..., 3, H, W)``
in [0, 1]); nothing depends on a Trainer, so the panels the callback logs can be
built and tested on their own:

- :func:`reduce_channels` turns a (..., C, H, W) attribution into a (..., H, W) map;
- :func:`normalize_by_negative` scales each map to [-1, 1] (positives by the
  maximum, negatives by |minimum|), or by one fixed scale so brightness can be
  compared across training steps;
- :func:`seismic` is a diverging colormap (blue negative, white zero, red positive);
- :func:`heatmap` colours a map and blends it over the grey version of the input;
- :func:`explanation_panel` lays out input | heatmaps | counterfactual | difference
  with captions, and :func:`grid` pads panels into one overview image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Reduction = Literal["mean", "sum", "abs_mean", "l2"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "abs_mean", "l2")

#: Anchor colours of the diverging map at -1, -0.5, 0, 0.5, 1 (dark blue .. white .. dark red).
_SEISMIC_ANCHORS = ((0.0, 0.0, 0.3), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0))
_LUMA = (0.299, 0.587, 0.114)
_FONT_SIZE = 11
_LINE_HEIGHT = 14


def reduce_channels(attribution: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Collapse the channel dimension (-3) of ``(..., C, H, W)`` into a ``(..., H, W)`` map.

    ``mean`` and ``sum`` keep the sign (what pushes the logit up or down);
    ``abs_mean`` and ``l2`` give magnitudes only.
    """
    if attribution.dim() < 3:
        raise ValueError(f"attribution must be shaped (..., C, H, W), got {tuple(attribution.shape)}.")
    if reduction == "mean":
        return attribution.mean(dim=-3)
    if reduction == "sum":
        return attribution.sum(dim=-3)
    if reduction == "abs_mean":
        return attribution.abs().mean(dim=-3)
    if reduction == "l2":
        return attribution.norm(dim=-3)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def normalize_by_negative(maps: Tensor, scale: float | None = None) -> Tensor:
    """Scale each (H, W) map of ``(..., H, W)`` to [-1, 1].

    Without ``scale`` (per image): positives are divided by the map's maximum and
    negatives by |its minimum|, so both signs use the full colour range. With a
    fixed ``scale`` every map is divided by it and clipped, so the same value has
    the same colour in every image and at every step.
    """
    if maps.dim() < 2:
        raise ValueError(f"maps must be shaped (..., H, W), got {tuple(maps.shape)}.")
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        return (maps / scale).clamp(-1.0, 1.0)
    flat = maps.flatten(-2)
    tiny = torch.finfo(flat.dtype).tiny
    top = flat.clamp_min(0).amax(dim=-1, keepdim=True).clamp_min(tiny)
    bottom = (-flat).clamp_min(0).amax(dim=-1, keepdim=True).clamp_min(tiny)
    return torch.where(flat >= 0, flat / top, flat / bottom).view_as(maps)


def seismic(values: Tensor) -> Tensor:
    """Diverging colours for values in [-1, 1]: ``(..., H, W)`` -> ``(..., 3, H, W)``.

    Piecewise-linear between dark blue (-1), blue, white (0), red and dark red (+1).
    """
    anchors = torch.tensor(_SEISMIC_ANCHORS, dtype=values.dtype, device=values.device)
    segments = anchors.shape[0] - 1
    position = (values.clamp(-1.0, 1.0) + 1.0) * (segments / 2.0)
    low = position.floor().clamp(max=segments - 1).long()
    frac = (position - low).unsqueeze(-1)
    rgb = anchors[low] * (1.0 - frac) + anchors[low + 1] * frac
    return rgb.movedim(-1, -3)


def to_rgb(images: Tensor) -> Tensor:
    """``(..., C, H, W)`` -> ``(..., 3, H, W)``: RGB as is, one channel repeated, other counts averaged to grey."""
    channels = images.shape[-3]
    if channels == 3:
        return images
    grey = images if channels == 1 else images.mean(dim=-3, keepdim=True)
    return grey.expand(*images.shape[:-3], 3, *images.shape[-2:])


def grey(images: Tensor) -> Tensor:
    """Luminance of display images ``(..., C, H, W)`` as ``(..., 3, H, W)`` grey."""
    rgb = to_rgb(images)
    weights = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(dim=-3, keepdim=True).expand_as(rgb)


def heatmap(
    maps: Tensor, image: Tensor | None = None, scale: float | None = None, opacity: float = 0.8
) -> Tensor:
    """Coloured explanation ``(..., 3, H, W)`` for raw maps ``(..., H, W)``.

    Maps are normalised with :func:`normalize_by_negative` (``scale`` as there).
    With an ``image`` (display space, [0, 1]) the colour is blended over its grey
    version with weight ``opacity * |value|``: zero shows the image, strong
    evidence shows full colour.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}.")
    values = normalize_by_negative(maps, scale)
    colour = seismic(values)
    if image is None:
        return colour
    weight = (opacity * values.abs()).unsqueeze(-3)
    return grey(image) * (1.0 - weight) + colour * weight


def difference_image(delta: Tensor) -> Tensor:
    """Show a change ``(..., C, H, W)`` as grey-centred RGB, scaled per image: grey 0.5 means no change."""
    peak = delta.flatten(-3).abs().amax(dim=-1).clamp_min(torch.finfo(delta.dtype).tiny)
    scaled = delta / peak.view(*peak.shape, 1, 1, 1)
    return to_rgb(0.5 + 0.5 * scaled).clamp(0.0, 1.0)


def display_size(height: int, width: int, min_size: int = 128, max_size: int = 256) -> tuple[int, int]:
    """Size a tile is shown at: small images grow by an integer factor to >= ``min_size``, big ones shrink to ``max_size``."""
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}.")
    longest = max(height, width)
    if longest < min_size:
        factor = math.ceil(min_size / longest)
        return height * factor, width * factor
    if longest > max_size:
        ratio = max_size / longest
        return max(1, round(height * ratio)), max(1, round(width * ratio))
    return height, width


def resize_for_display(images: Tensor, min_size: int = 128, max_size: int = 256) -> Tensor:
    """Resize ``(..., 3, H, W)`` to :func:`display_size`: nearest when enlarging (crisp pixels), antialiased when shrinking."""
    height, width = images.shape[-2:]
    size = display_size(height, width, min_size, max_size)
    if size == (height, width):
        return images
    batch = images.reshape(-1, *images.shape[-3:])
    if size[0] > height:
        out = F.interpolate(batch, size=size, mode="nearest")
    else:
        out = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*images.shape[:-2], *size).clamp(0.0, 1.0)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font (a scalable one where FreeType is present)."""
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _to_tensor(canvas: Image.Image) -> Tensor:
    """An RGB PIL image as a float ``(3, H, W)`` tensor in [0, 1]."""
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(canvas.height, canvas.width, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def grid(images: Sequence[Tensor], ncol: int, pad: int = 4, fill: float = 1.0) -> Tensor:
    """Tile ``(3, H_i, W_i)`` images row by row into one ``(3, H, W)`` image with ``pad`` pixels around each cell.

    Cells take the largest height and width; smaller images sit at the top left of their cell.
    """
    if not images:
        raise ValueError("grid needs at least one image.")
    if ncol < 1 or pad < 0:
        raise ValueError(f"need ncol >= 1 and pad >= 0, got ncol={ncol}, pad={pad}.")
    cell_h = max(img.shape[-2] for img in images)
    cell_w = max(img.shape[-1] for img in images)
    nrow = math.ceil(len(images) / ncol)
    ncol = min(ncol, len(images))
    first = images[0]
    out = torch.full(
        (3, pad + nrow * (cell_h + pad), pad + ncol * (cell_w + pad)), fill, dtype=first.dtype, device=first.device
    )
    for index, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"grid images must be (3, H, W), got {tuple(img.shape)} at position {index}.")
        top = pad + (index // ncol) * (cell_h + pad)
        left = pad + (index % ncol) * (cell_w + pad)
        out[:, top : top + img.shape[-2], left : left + img.shape[-1]] = img
    return out


def labelled_row(tiles: Tensor, captions: Sequence[Sequence[str]], title: str = "", pad: int = 4) -> Tensor:
    """Tiles ``(N, 3, h, w)`` side by side with ``pad`` pixels around each, caption lines above each, a title on top.

    All text is drawn in one PIL pass (lines that do not fit are cut with '...'), so
    a row costs a handful of tensor operations whatever its length.
    """
    if tiles.dim() != 4 or tiles.shape[1] != 3:
        raise ValueError(f"tiles must be (N, 3, h, w), got {tuple(tiles.shape)}.")
    if len(captions) != tiles.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {tiles.shape[0]} tiles.")
    count, _, height, width = tiles.shape
    title_height = _LINE_HEIGHT if title else 0
    text_height = title_height + pad + _LINE_HEIGHT * max((len(c) for c in captions), default=0)
    total_width = pad + count * (width + pad)
    canvas = Image.new("RGB", (total_width, text_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), _fit(title, total_width - 4, draw), fill=(0, 0, 0), font=_font())
    for index, lines in enumerate(captions):
        left = pad + index * (width + pad)
        for row, line in enumerate(lines):
            top = title_height + pad + row * _LINE_HEIGHT + 1
            draw.text((left, top), _fit(line, width, draw), fill=(0, 0, 0), font=_font())
    out = torch.ones(3, text_height + height + pad, total_width, dtype=tiles.dtype, device=tiles.device)
    out[:, :text_height] = _to_tensor(canvas).to(out)
    cells = out[:, text_height : text_height + height, pad:].unflatten(-1, (count, width + pad))
    cells[..., :width] = tiles.permute(1, 2, 0, 3)
    return out


def explanation_panel(
    image: Tensor,
    maps: Tensor,
    map_captions: Sequence[Sequence[str]],
    counterfactuals: Tensor | None = None,
    counterfactual_captions: Sequence[Sequence[str]] = (),
    title: str = "",
    input_caption: Sequence[str] = ("input",),
    scale: float | None = None,
    overlay: bool = True,
    opacity: float = 0.8,
    min_size: int = 128,
    max_size: int = 256,
    pad: int = 4,
    differences: bool = True,
) -> Tensor:
    """One labelled row: input | heatmap per map | (counterfactual | counterfactual - input) per counterfactual.

    Args:
        image: the input in display space, ``(C, H, W)`` in [0, 1].
        maps: raw explanation maps ``(M, H, W)`` (e.g. :func:`reduce_channels` of Soft Pullbacks).
        map_captions: caption lines for each map (same length as ``maps``).
        counterfactuals: ``(K, C, H, W)`` counterfactual images in display space, or ``None``.
        counterfactual_captions: caption lines for each counterfactual.
        title: a line above the whole row.
        scale: fixed colour scale for the maps (``None``: per-map "normalise by negative").
        overlay: blend heatmaps over the grey input (else plain colour).
        differences: show each counterfactual's difference to the input beside it.
    Returns:
        ``(3, H', W')`` float image in [0, 1].
    """
    if image.dim() != 3 or maps.dim() != 3 or maps.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"need image (C, H, W) and maps (M, H, W) of the same H, W; got {tuple(image.shape)} and {tuple(maps.shape)}."
        )
    if len(map_captions) != maps.shape[0]:
        raise ValueError(f"got {len(map_captions)} map captions for {maps.shape[0]} maps.")
    image = image.float().clamp(0.0, 1.0)
    tiles = [to_rgb(image)[None], heatmap(maps.float(), image if overlay else None, scale, opacity)]
    captions: list[Sequence[str]] = [input_caption, *map_captions]
    if counterfactuals is not None:
        if counterfactuals.dim() != 4 or counterfactuals.shape[1:] != image.shape:
            raise ValueError(
                f"counterfactuals must be (K, {', '.join(map(str, image.shape))}), got {tuple(counterfactuals.shape)}."
            )
        if len(counterfactual_captions) != counterfactuals.shape[0]:
            raise ValueError(
                f"got {len(counterfactual_captions)} counterfactual captions for {counterfactuals.shape[0]} images."
            )
        cfs = to_rgb(counterfactuals.float().clamp(0.0, 1.0))
        if differences:
            cfs = torch.stack([cfs, difference_image(cfs - to_rgb(image))], dim=1).flatten(0, 1)
        tiles.append(cfs)
        for lines in counterfactual_captions:
            captions.extend([lines, [f"{lines[0]} - input"]] if differences else [lines])
    shown = resize_for_display(torch.cat(tiles), min_size, max_size)
    return labelled_row(shown, captions, title, pad)


def to_pil(image: Tensor) -> Image.Image:
    """A ``(3, H, W)`` float image in [0, 1] as an 8-bit PIL image."""
    pixels = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), pixels.cpu().numpy().tobytes())


def save_png(image: Tensor, path: str) -> None:
    """Write a ``(3, H, W)`` float image in [0, 1] to ``path`` (parent folders are created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    to_pil(image).save(path, format="PNG", compress_level=1)  # fast: panels are mostly flat colour
