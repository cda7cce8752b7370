"""Layout of pictures: tile sizes, text, labelled tile grids, padded grids, PIL/PNG conversion.

Panels are read in TensorBoard cards about 350 pixels wide, so a panel is a compact grid
of tiles whose type grows with the tiles (:func:`font_size`): shrunk to the card, the
captions stay readable. All text of a grid is drawn in one PIL pass.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .colour import seismic

_INK = (0, 0, 0)
_PAPER = (255, 255, 255)
#: Type size as a share of the tile width: 160-pixel tiles get 24-pixel type, about 10 pixels
#: once a five-tile-wide panel is shrunk to a 350-pixel TensorBoard card.
_TYPE_PER_TILE = 0.15


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


def font_size(tile_width: int) -> int:
    """Type size for tiles ``tile_width`` pixels wide (11 to 32 pixels)."""
    return int(min(32, max(11, round(_TYPE_PER_TILE * tile_width))))


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` pixels (its fixed small bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def line_height(face: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Pixels per line of text in ``face`` (ascender to descender plus a little air)."""
    return int(face.getbbox("Ag|")[3] + 2)


def fit(text: str, width: int, face: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def compact(value: float) -> str:
    """A short label for a colour scale: ``0.42``, ``3.2e-3``, ``1.5e+4``, ``nan``."""
    if not math.isfinite(value) or value == 0 or 1e-2 <= abs(value) < 1e3:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


@dataclass(frozen=True)
class Tile:
    """One cell of a :func:`tile_grid`.

    Args:
        image: ``(3, h, w)`` float image in [0, 1] (every tile of a grid has the same size).
        caption: lines drawn above the tile.
        legend: for heatmaps, the value drawn in full colour: a seismic bar and "±value" go below the tile.
        stamp: a word written large across the tile (e.g. ``"NaN"`` for a map that cannot be drawn).
    """

    image: Tensor
    caption: tuple[str, ...] = ()
    legend: float | None = None
    stamp: str = ""


def tile_grid(tiles: Sequence[Tile], ncol: int, title: Sequence[str] = (), pad: int = 4) -> Tensor:
    """Tiles row by row, ``ncol`` per row, captions above each, legends below heatmaps, title lines on top.

    Args:
        tiles: the cells, all of one size.
        ncol: cells per row.
        title: lines across the top of the grid.
        pad: pixels around every cell.
    Returns:
        ``(3, H, W)`` float image in [0, 1].
    """
    if not tiles:
        raise ValueError("tile_grid needs at least one tile.")
    if ncol < 1 or pad < 0:
        raise ValueError(f"need ncol >= 1 and pad >= 0, got ncol={ncol}, pad={pad}.")
    height, width = tiles[0].image.shape[-2:]
    for index, tile in enumerate(tiles):
        if tile.image.dim() != 3 or tile.image.shape != (3, height, width):
            raise ValueError(f"tile {index} must be (3, {height}, {width}) like tile 0, got {tuple(tile.image.shape)}.")
    face = font(font_size(width))
    line = line_height(face)
    ncol = min(ncol, len(tiles))
    caption_h = line * max(len(tile.caption) for tile in tiles)
    cell_h = _cell_height(tiles, line, pad)
    title_h = line * len(title) + (pad if title else 0)
    total_w, total_h = _grid_size(tiles, ncol, len(title), pad)
    canvas = Image.new("RGB", (total_w, total_h), _PAPER)
    draw = ImageDraw.Draw(canvas)
    for row, text in enumerate(title):
        draw.text((pad, pad + row * line), fit(text, total_w - 2 * pad, face), fill=_INK, font=face)
    stamp_face = font(max(11, width // 4))
    for index, tile in enumerate(tiles):
        left = pad + (index % ncol) * (width + pad)
        top = title_h + pad + (index // ncol) * cell_h
        for row, text in enumerate(tile.caption):
            draw.text((left, top + row * line), fit(text, width, face), fill=_INK, font=face)
        canvas.paste(to_pil(tile.image), (left, top + caption_h))
        if tile.stamp:
            draw.text((left + width // 2, top + caption_h + height // 2), tile.stamp, fill=_INK, font=stamp_face,
                      anchor="mm")
        if tile.legend is not None:
            _draw_legend(canvas, draw, face, tile.legend, (left, top + caption_h + height), width, line)
    return _to_tensor(canvas)


def _cell_height(tiles: Sequence[Tile], line: int, pad: int) -> int:
    """Height of a grid row: captions, tile, legend (when any tile has one) and padding."""
    legend_h = line if any(tile.legend is not None for tile in tiles) else 0
    return line * max(len(tile.caption) for tile in tiles) + tiles[0].image.shape[-2] + legend_h + pad


def _grid_size(tiles: Sequence[Tile], ncol: int, title_lines: int, pad: int) -> tuple[int, int]:
    """(width, height) of :func:`tile_grid` with ``ncol`` columns."""
    width = tiles[0].image.shape[-1]
    line = line_height(font(font_size(width)))
    title_h = line * title_lines + (pad if title_lines else 0)
    nrow = math.ceil(len(tiles) / ncol)
    return pad + ncol * (width + pad), title_h + pad + nrow * _cell_height(tiles, line, pad)


def columns_to_fit(tiles: Sequence[Tile], box: tuple[int, int], title_lines: int = 1, pad: int = 4) -> int:
    """The column count whose :func:`tile_grid` is shown largest when shrunk to fit ``box`` (width, height)."""
    if not tiles or min(box) < 1:
        raise ValueError(f"need tiles and a box of positive size, got {len(tiles)} tiles and box {box}.")

    def shown_scale(ncol: int) -> float:
        width, height = _grid_size(tiles, ncol, title_lines, pad)
        return min(box[0] / width, box[1] / height)

    return max(range(1, len(tiles) + 1), key=shown_scale)


def _draw_legend(canvas: Image.Image, draw: ImageDraw.ImageDraw, face: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                 value: float, corner: tuple[int, int], width: int, line: int) -> None:
    """A small seismic bar (-1 .. +1) and "±value" under a heatmap: what full colour means."""
    left, top = corner
    bar_w, bar_h = max(8, width // 4), max(4, line // 2)
    bar = seismic(torch.linspace(-1.0, 1.0, bar_w).expand(bar_h, bar_w))
    canvas.paste(to_pil(bar), (left, top + (line - bar_h) // 2))
    draw.text((left + bar_w + 3, top), fit(f"±{compact(value)}", width - bar_w - 3, face), fill=_INK, font=face)


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


def _to_tensor(canvas: Image.Image) -> Tensor:
    """An RGB PIL image as a float ``(3, H, W)`` tensor in [0, 1]."""
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(canvas.height, canvas.width, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def to_pil(image: Tensor) -> Image.Image:
    """A ``(3, H, W)`` float image in [0, 1] as an 8-bit PIL image (NaN is drawn black)."""
    pixels = image.detach().float().nan_to_num(0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    pixels = pixels.permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), pixels.cpu().numpy().tobytes())


def save_png(image: Tensor, path: str) -> None:
    """Write a ``(3, H, W)`` float image in [0, 1] to ``path`` (parent folders are created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    to_pil(image).save(path, format="PNG", compress_level=1)  # fast: panels are mostly flat colour
