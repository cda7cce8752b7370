"""Shared pieces of the metric tests: a tiny CNN, a batch, and draw recording."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

SIDE = 32  # small images keep the suite fast; the paper's sizes scale to 16/8-pixel patches and 64-element steps
BATCH = 4


def tiny_cnn(classes: int = 10, seed: int = 0) -> nn.Module:
    """A random-init CNN with the gates the engine softens (ReLU, MaxPool), in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, classes),
    ).eval()


def batch(seed: int = 1, size: int = BATCH) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs in [-1, 1], targets, and exactly representable, tie-free attributions.

    Each attribution is +-k / 4096 with distinct integers k <= 4096 per sample and one
    k = 4096 (the maximum). Every float32 sum of them is exact and Quantus's
    divide-by-max normalisation changes nothing, so a comparison with Quantus measures
    semantics, not float32 rounding; no two |values| tie, so sort orders are unique.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 3, SIDE, SIDE, generator=g) * 2 - 1
    target = torch.randint(0, 10, (size,), generator=g)
    count = 3 * SIDE * SIDE
    magnitude = torch.stack([torch.randperm(4096, generator=g)[:count] + 1 for _ in range(size)]).float()
    magnitude[:, 0] = 4096.0
    sign = torch.randint(0, 2, (size, count), generator=g).float() * 2 - 1
    return x, target, (sign * magnitude / 4096.0).view(size, 3, SIDE, SIDE)


def record_draws(metric: Any, name: str = "_uniform") -> list[Tensor]:
    """Wrap the metric's draw method so every draw it makes is kept (in order) for replay in Quantus."""
    draws: list[Tensor] = []
    original: Callable[..., Tensor] = getattr(metric, name)

    def recording(*args: Any, **kwargs: Any) -> Tensor:
        value = original(*args, **kwargs)
        draws.append(value.clone())
        return value

    setattr(metric, name, recording)
    return draws


def cnn_with_train_layers(seed: int = 0) -> nn.Module:
    """A CNN whose output depends on train/eval mode (BatchNorm, Dropout); returned in train mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).train()


def all_metrics(model: nn.Module, seed: int = 0) -> dict[str, tuple[Any, tuple[Tensor, ...]]]:
    """Every metric, configured to be quick, with the extra update arguments it needs."""
    from sp_lightning import SoftPullback
    from sp_lightning.metrics import (
        FaithfulnessCorrelation,
        FaithfulnessEstimate,
        Focus,
        Infidelity,
        MaxSensitivity,
        MonotonicityCorrelation,
        PointingGame,
        RandomLogit,
        RelevanceMass,
    )

    g = torch.Generator().manual_seed(7)
    masks = torch.rand(BATCH, SIDE, SIDE, generator=g) > 0.5
    tiles = torch.randint(0, 10, (BATCH, 4), generator=g)
    return {
        "FaithfulnessEstimate": (FaithfulnessEstimate(model, seed=seed), ()),
        "FaithfulnessCorrelation": (FaithfulnessCorrelation(model, seed=seed), ()),
        "Infidelity": (Infidelity(model, repeats=1, seed=seed), ()),
        "MonotonicityCorrelation": (MonotonicityCorrelation(model, samples=1, seed=seed), ()),
        "MaxSensitivity": (MaxSensitivity(model, SoftPullback(model), samples=2, seed=seed), ()),
        "RandomLogit": (RandomLogit(model, SoftPullback(model), seed=seed), ()),
        "Focus": (Focus(model, seed=seed), (tiles,)),
        "PointingGame": (PointingGame(model, seed=seed), (masks,)),
        "RelevanceMass": (RelevanceMass(model, seed=seed), (masks,)),
    }


METRIC_NAMES = [
    "FaithfulnessEstimate",
    "FaithfulnessCorrelation",
    "Infidelity",
    "MonotonicityCorrelation",
    "MaxSensitivity",
    "RandomLogit",
    "Focus",
    "PointingGame",
    "RelevanceMass",
]
STOCHASTIC = ["Infidelity", "MonotonicityCorrelation", "MaxSensitivity", "RandomLogit"]
