"""The pictures of one log, as a pure function of an immutable :class:`Frame`.

:func:`render_panels` turns a frame into ``{tag: (3, H, W) image}``: one labelled panel
per probe image and an overview of all of them. The frame is a snapshot (the callback
builds it on the training thread and hands it to the drawing thread), so nothing here
reads live state.

Every panel is a compact grid: a probe panel takes the column count that shows it largest
in a TIME SERIES image card (which fits images into about 375x215 pixels; two rows for the
default ten tiles, one row for five), the overview two probe images per row, so both read at TensorBoard's default card
width (about 350 pixels in IMAGES) with type that grows with the tiles. Titles carry the step and the epoch,
and every heatmap says which value is drawn in full colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..probe.explain import Explanations
from .colour import DEFAULT_PERCENTILE, difference_image, finite, flag_non_finite, heatmap, robust_scale, to_rgb
from .layout import Tile, columns_to_fit, resize_for_display, tile_grid

#: Probe images side by side in a row of the overview (it is read in the IMAGES cards, 350 pixels wide).
OVERVIEW_PROBES_PER_ROW = 2
#: The box (width, height) TensorBoard's TIME SERIES dashboard fits an image into at its default card width.
TIME_SERIES_CARD = (375, 215)


@dataclass(frozen=True)
class PanelStyle:
    """How heatmaps and tiles are drawn.

    Args:
        color_scale: fixed heatmap scale (values at +-color_scale are full colour, the same in every
            image and at every step); ``None``: per map, the ``percentile`` of |map|.
        overlay: draw heatmaps over a faint grey copy of the input (else on white).
        opacity: how much a heatmap's colour covers the input (1: not at all visible; 0.8: a faint copy).
        min_image_size: tiles smaller than this are enlarged (integer factor).
        max_image_size: tiles larger than this are shrunk.
        percentile: with ``color_scale=None``, the percentile of |map| drawn in full colour (see
            :func:`~sp_lightning.display.colour.robust_scale`); 100 is the maximum.
    """

    color_scale: float | None = None
    overlay: bool = True
    opacity: float = 0.8
    min_image_size: int = 128
    max_image_size: int = 256
    percentile: float = DEFAULT_PERCENTILE


@dataclass(frozen=True)
class Frame:
    """Everything one log's pictures show.

    Args:
        tag: prefix of every image tag.
        step: the trainer's global step of this log.
        epoch: the trainer's epoch of this log.
        images: probe images in display space, ``(N, C, H, W)`` in [0, 1].
        labels: class indices ``(N,)``, or ``None``.
        class_names: a name per class index, or ``None`` ("class 3").
        explanations: the log's explanations, counterfactuals already in display space.
        style: how tiles are drawn.
        explainer_names: a caption per map of ``explanations.explainer_maps`` (the callback's ``explainers=``).
    """

    tag: str
    step: int
    epoch: int
    images: Tensor
    labels: Tensor | None
    class_names: tuple[str, ...] | None
    explanations: Explanations
    style: PanelStyle
    explainer_names: tuple[str, ...] = ()

    def name(self, index: int) -> str:
        return self.class_names[index] if self.class_names is not None else f"class {index}"

    @property
    def when(self) -> str:
        """``'step 120 · epoch 3'``: the label of every picture of this frame."""
        return f"step {self.step} · epoch {self.epoch}"


def heat_tiles(maps: Tensor, image: Tensor, captions: Sequence[Sequence[str]], style: PanelStyle) -> list[Tile]:
    """One heatmap tile per map of ``(M, H, W)`` over ``image`` (display space), each with its full-colour legend.

    Maps holding NaN or infinity become grey tiles stamped "NaN" (a diverged model), never an error.
    """
    maps = maps.float()
    scales = robust_scale(maps, style.percentile) if style.color_scale is None else None
    scale = style.color_scale if scales is None else scales
    shown = resize(heatmap(maps, image if style.overlay else None, scale, style.opacity), style)
    ok = finite(maps)
    return [
        Tile(shown[m], tuple(captions[m]), legend=float(scale if scales is None else scales[m]) if ok[m] else None,
             stamp="" if ok[m] else "NaN")
        for m in range(maps.shape[0])
    ]


def image_tiles(images: Tensor, captions: Sequence[Sequence[str]], style: PanelStyle) -> list[Tile]:
    """Display images ``(K, C, H, W)`` as tiles; any holding NaN or infinity is grey and stamped "NaN"."""
    rgb = to_rgb(images.float())
    ok = torch.isfinite(rgb).flatten(1).all(dim=1)
    shown = resize(flag_non_finite(rgb.clamp(0.0, 1.0)), style)
    return [Tile(shown[k], tuple(captions[k]), stamp="" if ok[k] else "NaN") for k in range(images.shape[0])]


def resize(images: Tensor, style: PanelStyle) -> Tensor:
    """``(K, 3, H, W)`` at the tile size of ``style``."""
    return resize_for_display(images, style.min_image_size, style.max_image_size)


def render_panels(frame: Frame) -> dict[str, Tensor]:
    """A labelled panel per probe image and a compact overview, keyed by tag.

    A probe panel shows the input, the Soft Pullback toward each target, the
    gradient, the maps of any extra explainers, and each counterfactual beside its difference to the input. The overview shows,
    for every probe image, the input, the Soft Pullback toward the first target (the true
    label) and the counterfactual toward it.
    """
    result, labels, name, style = frame.explanations, frame.labels, frame.name, frame.style
    panels: dict[str, Tensor] = {}
    summaries: list[Tile] = []
    for i, shown in enumerate(frame.images.float()):
        probs, targets = result.probabilities[i], result.targets[i]
        predicted = int(probs.argmax())
        truth = f"true {name(int(labels[i]))}, " if labels is not None else ""
        verdict = f"predicted {name(predicted)} {float(probs[predicted]):.2f}"
        if labels is not None:
            ranks = ["true", *[f"rival {t}" for t in range(1, len(targets))]]
        else:
            ranks = [f"top {t + 1}" for t in range(len(targets))]
        captions = [[f"SP: {name(int(c))}", f"{r} p={float(probs[c]):.2f}"] for c, r in zip(targets, ranks)]
        maps = result.soft_maps[i]
        if result.gradient_maps is not None:
            maps = torch.cat([maps, result.gradient_maps[i][None]])
            captions.append([f"grad: {name(int(targets[0]))}", captions[0][1]])
        if result.explainer_maps is not None:  # the callback's explainers=, toward the first target
            maps = torch.cat([maps, result.explainer_maps[i]])
            captions += [[f"{label}: {name(int(targets[0]))}", captions[0][1]] for label in frame.explainer_names]
        heat = heat_tiles(maps, shown, captions, style)
        source = image_tiles(shown[None], [["input", f"true {name(int(labels[i]))}" if labels is not None
                                            else "no label"]], style)
        tiles = [*source, *heat]
        overview_caption = [f"{i}: true {name(int(labels[i]))}" if labels is not None else f"probe {i}",
                            f"pred {name(predicted)} {float(probs[predicted]):.2f}"]
        summary = [image_tiles(shown[None], [overview_caption], style)[0], heat[0]]
        if result.counterfactuals is not None:
            counterfactuals = result.counterfactuals[i].float()
            cf_captions = [[f"PA: {name(int(c))}", f"logit {float(g):+.2f}"]
                           for c, g in zip(result.counterfactual_targets[i], result.logit_gain[i])]
            differences = difference_image(to_rgb(counterfactuals) - to_rgb(shown))
            moved = image_tiles(counterfactuals, cf_captions, style)
            changes = image_tiles(differences, [["PA - input", "grey: same"]] * len(moved), style)
            tiles += [tile for pair in zip(moved, changes) for tile in pair]
            summary.append(moved[0])
        title = [f"{frame.when} · probe {i}: {truth}{verdict}"]
        ncol = columns_to_fit(tiles, TIME_SERIES_CARD)
        panels[f"{frame.tag}/probe_{i:02d}"] = tile_grid(tiles, ncol=ncol, title=title)
        summaries += summary
    per_probe = len(summaries) // max(1, len(frame.images))
    overview_title = [f"{frame.when} · input | SP toward the " + ("true" if labels is not None else "top")
                      + " class" + (" | its counterfactual" if result.counterfactuals is not None else "")]
    panels[f"{frame.tag}/overview"] = tile_grid(summaries, ncol=per_probe * OVERVIEW_PROBES_PER_ROW,
                                                title=overview_title)
    return panels
