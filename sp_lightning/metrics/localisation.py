"""Localisation metrics: is the relevance where the evidence is? (docs/method.md section 6).

No model calls: these score attributions against known positions, either the
quadrants of 2x2 mosaics (:class:`Focus`, with :func:`make_mosaics`) or ground-truth
masks (:class:`PointingGame`, :class:`RelevanceMass`), so they cost next to nothing.

``relevance`` picks what is scored: ``"attribution"`` as given, or
``"input_x_attribution"`` (``inputs * attributions``, the paper's relevance for Focus).
The model is still passed in so that every metric is built the same way.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explainers.base import TargetLike
from .base import ExplanationMetric, _wide

Relevance = Literal["attribution", "input_x_attribution"]


class Mosaics(NamedTuple):
    """A batch of 2x2 mosaics and what each quadrant holds (order: top-left, top-right, bottom-left, bottom-right)."""

    images: Tensor  # (M, C, 2 * tile_h, 2 * tile_w)
    target: Tensor  # (M,) the class shown twice
    tile_labels: Tensor  # (M, 4) class of each quadrant
    sources: Tensor  # (M, 4) index of each quadrant's image in the input batch


def make_mosaics(
    images: Tensor,
    labels: Tensor,
    count: int | None = None,
    tile_size: tuple[int, int] | None = None,
    generator: torch.Generator | int = 0,
) -> Mosaics:
    """Build 2x2 mosaics for :class:`Focus`: the target class in two random quadrants, other classes in the rest.

    For each mosaic a first image is drawn uniformly; its class is the target, a second
    image of that class is drawn (a different one when the class has several), and two
    distractors are drawn from the images of other classes (different ones when there
    are several). The four tiles are placed in a random order. Every image is resized
    (bilinear, antialiased) to ``tile_size``, by default half its height and width, so a
    mosaic has the size of one input (the paper: 112x112 tiles, 224x224 mosaics).

    Args:
        images: (N, C, H, W) images of at least two classes.
        labels: (N,) integer class labels.
        count: number of mosaics (default N).
        tile_size: (height, width) of one tile.
        generator: a ``torch.Generator`` or a seed for a new one (the global RNG is not used).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError("images must be a floating-point tensor (N, C, H, W).")
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},).")
    labels = labels.to(images.device)
    if labels.unique().numel() < 2:
        raise ValueError("Mosaics need images of at least two classes (two quadrants show other classes).")
    count = images.shape[0] if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}.")
    if isinstance(generator, int):
        generator = torch.Generator(device=images.device).manual_seed(generator)
    tile_h, tile_w = tile_size or (images.shape[2] // 2, images.shape[3] // 2)
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"tile_size must be positive, got {(tile_h, tile_w)}.")

    rows = torch.arange(count, device=images.device)

    def draw(weights: Tensor, taken: Tensor | None = None) -> Tensor:
        """One image index per row, in proportion to ``weights``; avoids ``taken`` when the row allows."""
        if taken is not None:
            fewer = weights.clone()
            fewer[rows, taken] = 0.0
            weights = torch.where(fewer.sum(dim=1, keepdim=True) > 0, fewer, weights)
        return torch.multinomial(weights, 1, generator=generator)[:, 0]

    first = draw(torch.ones(count, images.shape[0], device=images.device))
    target = labels[first]
    same = (labels[None] == target[:, None]).float()
    second = draw(same, first)
    third = draw(1.0 - same)
    fourth = draw(1.0 - same, third)
    sources = torch.stack([first, second, third, fourth], dim=1)
    order = torch.argsort(torch.rand(count, 4, generator=generator, device=images.device), dim=1)
    sources = sources.gather(1, order)
    tiles = F.interpolate(images, size=(tile_h, tile_w), mode="bilinear", antialias=True, align_corners=False)
    grid = tiles[sources].view(count, 2, 2, images.shape[1], tile_h, tile_w)
    mosaics = grid.permute(0, 3, 1, 4, 2, 5).reshape(count, images.shape[1], 2 * tile_h, 2 * tile_w)
    return Mosaics(mosaics, target, labels[sources], sources)


class _LocalisationMetric(ExplanationMetric):
    """Shared set-up: the relevance choice and its computation."""

    def __init__(self, model: nn.Module, relevance: Relevance, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if relevance not in ("attribution", "input_x_attribution"):
            raise ValueError(f"relevance must be 'attribution' or 'input_x_attribution', got {relevance!r}.")
        self.relevance = relevance

    def _relevance(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> tuple[Tensor, Tensor]:
        """Relevance (B, C or 1, H, W), and the targets (B,); one-channel attributions stay one channel."""
        x, a, targets = self._prepare(inputs, attributions, target, expand=False)
        self._require_images(x)
        return (x * a if self.relevance == "input_x_attribution" else a), targets


class Focus(_LocalisationMetric):
    """Focus (Arias-Duart et al.) on 2x2 mosaics, higher is better; chance level is 0.5.

    Only positive relevance counts (by default ``inputs * attributions``, the paper's);
    the score is the share of it inside the quadrants whose tile shows the target class:
    ``sum(relevance+ in target quadrants) / (sum(relevance+) + 1e-9)``. Quadrants split
    the image at ``H // 2`` and ``W // 2``. Same as ``quantus.Focus`` given
    ``a_batch = relevance`` and ``custom_batch = positions``. Build mosaics with
    :func:`make_mosaics`; the scale of the inputs does not matter.

    Args:
        relevance: ``"input_x_attribution"`` (paper) or ``"attribution"``.
        **kwargs: ``seed`` etc. (see :class:`ExplanationMetric`), torchmetrics options.
    """

    higher_is_better = True

    def __init__(self, model: nn.Module, relevance: Relevance = "input_x_attribution", **kwargs: Any) -> None:
        super().__init__(model, relevance, **kwargs)

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike, tile_labels: Tensor) -> None:
        """Score mosaics (B, C, H, W) explained toward ``target``; ``tile_labels`` (B, 4) as from :func:`make_mosaics`."""
        relevance, targets = self._relevance(inputs, attributions, target)
        relevance = _wide(relevance).clamp_min(0)
        batch, _, height, width = relevance.shape
        if not isinstance(tile_labels, Tensor) or tile_labels.shape != (batch, 4) or tile_labels.is_floating_point():
            raise ValueError(f"tile_labels must be an integer tensor (B, 4) = ({batch}, 4): the class in each quadrant.")
        positions = tile_labels.to(targets.device) == targets[:, None]
        rows = (torch.arange(height, device=relevance.device) >= height // 2).long()
        cols = (torch.arange(width, device=relevance.device) >= width // 2).long()
        quadrant = rows[:, None] * 2 + cols[None, :]  # 0 TL, 1 TR, 2 BL, 3 BR
        inside = positions[:, quadrant].unsqueeze(1)  # (B, 1, H, W)
        total = relevance.flatten(1).sum(dim=1)
        self._record((relevance * inside).flatten(1).sum(dim=1) / (total + 1e-9))


class _MaskMetric(_LocalisationMetric):
    """Scores relevance against ground-truth masks; empty masks score NaN."""

    def __init__(self, model: nn.Module, relevance: Relevance = "attribution", **kwargs: Any) -> None:
        super().__init__(model, relevance, **kwargs)

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike, masks: Tensor) -> None:
        """Score a batch (B, C, H, W) against ground-truth ``masks`` (B, H, W), (B, 1, H, W) or (B, C, H, W).

        ``target`` is only checked against the batch: the mask already belongs to the explained class.
        """
        relevance, inside = torch.broadcast_tensors(self._relevance(inputs, attributions, target)[0], self._masks(masks, inputs))
        relevance, inside = relevance.flatten(1), inside.flatten(1)
        self._record(torch.where(inside.any(dim=1), self._score(relevance, inside), torch.nan))

    def _score(self, relevance: Tensor, inside: Tensor) -> Tensor:
        """Per-sample score of flat relevance (B, N) against a flat boolean mask (B, N)."""
        raise NotImplementedError

    @staticmethod
    def _masks(masks: Tensor, like: Tensor) -> Tensor:
        """Boolean masks (B, 1 or C, H, W) checked against the inputs; a one-channel mask covers all channels."""
        if not isinstance(masks, Tensor) or masks.is_complex():
            raise TypeError("masks must be a tensor of 0/1 or bool values.")
        if masks.dim() == like.dim() - 1:
            masks = masks.unsqueeze(1)
        if masks.shape[0] != like.shape[0] or masks.shape[2:] != like.shape[2:] or masks.shape[1] not in (1, like.shape[1]):
            raise ValueError(
                f"masks must be (B, H, W), (B, 1, H, W) or (B, C, H, W) matching inputs {tuple(like.shape)}, "
                f"got {tuple(masks.shape)}."
            )
        if masks.dtype != torch.bool and not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must hold only 0 and 1 (or booleans).")
        return masks.to(device=like.device, dtype=torch.bool)


class PointingGame(_MaskMetric):
    """Pointing game (Zhang et al.), higher is better: 1 when the maximal relevance lies in the mask, else 0.

    Ties count as a hit when any maximal element is inside. A one-channel mask covers
    every channel. Samples with an empty mask score NaN (left out of the mean with a
    warning); Quantus 0.6.0 writes NaN into a boolean array there, which reads as a hit.
    Same as ``quantus.PointingGame`` otherwise.

    Args:
        relevance: ``"attribution"`` (as Quantus scores ``a_batch``) or ``"input_x_attribution"``.
        **kwargs: see :class:`ExplanationMetric`, torchmetrics options.
    """

    higher_is_better = True

    def _score(self, relevance: Tensor, inside: Tensor) -> Tensor:
        peak = relevance == relevance.amax(dim=1, keepdim=True)
        return (peak & inside).any(dim=1).to(relevance.dtype)


class RelevanceMass(_MaskMetric):
    """Relevance mass accuracy (Arras et al.), higher is better: the share of the relevance inside the mask.

    ``sum(relevance in mask) / sum(relevance)`` with signed relevance, as Quantus 0.6.0
    computes it (pass ``attributions.clamp_min(0)`` or ``.abs()`` for the positive-only
    or absolute variants). A one-channel mask covers every channel; empty masks score NaN.

    Args:
        relevance: ``"attribution"`` (as Quantus scores ``a_batch``) or ``"input_x_attribution"``.
        **kwargs: see :class:`ExplanationMetric`, torchmetrics options.
    """

    higher_is_better = True

    def _score(self, relevance: Tensor, inside: Tensor) -> Tensor:
        relevance = _wide(relevance)
        return (relevance * inside).sum(dim=1) / relevance.sum(dim=1)
