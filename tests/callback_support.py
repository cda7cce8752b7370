"""Tiny model and data for the callback's tests: fast on CPU, with dropout and BatchNorm, deterministic.

Also used by the DDP script and the LightningCLI recipe test (by import path
``callback_support.TinyClassifier`` / ``callback_support.BlobData``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.3]
CLASS_NAMES = ["north", "east", "south", "west"]


class TinyCNN(nn.Module):
    """Conv-BN-ReLU-pool, conv-ReLU, global pool, dropout, linear."""

    def __init__(self, num_classes: int = 4, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class TinyClassifier(pl.LightningModule):
    """A LightningModule whose forward maps images to logits."""

    def __init__(self, num_classes: int = 4, channels: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        self.model = TinyCNN(num_classes, channels)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def blob_images(count: int, size: int = 16, seed: int = 0, num_classes: int = 4) -> tuple[Tensor, Tensor]:
    """Normalised images with a bright square whose position encodes the class, plus noise; labels cycle."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    raw = 0.3 * torch.rand(count, 3, size, size, generator=generator)
    half, quarter = size // 2, size // 4
    corners = [(0, quarter), (quarter, half), (half, quarter), (quarter, 0)]
    for i, label in enumerate(labels.tolist()):
        top, left = corners[label % len(corners)]
        raw[i, :, top : top + half, left : left + half] += 0.6
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (raw.clamp(0, 1) - mean) / std, labels


class BlobData(pl.LightningDataModule):
    """Generated train/val data with ``mean``, ``std`` and ``class_names`` attributes (what the callback reads)."""

    def __init__(self, train: int = 64, val: int = 32, batch_size: int = 16, size: int = 16) -> None:
        super().__init__()
        self.train_size, self.val_size, self.batch_size, self.size = train, val, batch_size, size
        self.mean, self.std, self.class_names = MEAN, STD, CLASS_NAMES

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*blob_images(self.train_size, self.size, 1)), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*blob_images(self.val_size, self.size, 2)), self.batch_size)


class DictDataset(Dataset):
    """Samples as dicts ``{"image": ..., label_key: ...}``."""

    def __init__(self, images: Tensor, labels: Tensor, label_key: str = "label") -> None:
        self.images, self.labels, self.label_key = images, labels, label_key

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], self.label_key: self.labels[index]}


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Quiet, CPU-only, small Trainer settings for tests."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=False,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def one_thread() -> Any:
    """Run a test on one intra-op thread: tiny tensors are faster that way on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def swapped_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """A ``batch_fn`` for the YAML test: reads ``(images, labels)`` from a tuple (by import path)."""
    images, labels = batch
    return images, labels


def first_output(output: Any) -> Tensor:
    """A ``logits_fn`` for the YAML test (by import path)."""
    return output
