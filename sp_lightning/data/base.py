"""What every sp-lightning image DataModule shares: class names, normalisation, seeded loaders.

Explanation callbacks read ``class_names`` to label images, ``mean``/``std`` to
de-normalise inputs for display, and ``input_bounds`` for the valid input range
(e.g. to clip counterfactuals). Every loader has its own ``torch.Generator`` seeded
from ``seed``: shuffling is reproducible and creating a loader iterator never
draws from the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate per-channel normalisation statistics and return them as float tuples."""
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != len(std_t) or not mean_t:
        raise ValueError(f"mean and std need one value per channel each, got {list(mean_t)} and {list(std_t)}.")
    if not all(s > 0 for s in std_t):
        raise ValueError(f"std values must all be > 0, got {list(std_t)}.")
    return mean_t, std_t


class ImageDataModule(LightningDataModule):
    """Base class: subclasses set ``train_set``/``val_set``/``test_set`` in ``setup``.

    Args:
        class_names: one readable name per class, in label order.
        mean, std: per-channel statistics the images are normalised with: ``(x - mean) / std``.
        batch_size: samples per batch for every split.
        num_workers: loader worker processes (0 loads in the main process).
        seed: seeds the loaders' generators (shuffle order, worker seeds).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.class_names: list[str] = [str(name) for name in class_names]
        self.mean, self.std = check_stats(mean, std)
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (what a model's head must output)."""
        return len(self.class_names)

    @property
    def input_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (low, high) of normalised inputs: where pixel values 0 and 1 land."""
        low = tuple((0.0 - m) / s for m, s in zip(self.mean, self.std))
        high = tuple((1.0 - m) / s for m, s in zip(self.mean, self.std))
        return low, high

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std shaped to broadcast over channel dim -3 of ``like`` (C, H, W) or (B, C, H, W)."""
        if like.dim() < 3 or like.shape[-3] != len(self.mean):
            raise ValueError(
                f"Expected images shaped (..., {len(self.mean)}, H, W), got {tuple(like.shape)}."
            )
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, images: Tensor) -> Tensor:
        """Pixel values in [0, 1] -> model inputs."""
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalize(self, images: Tensor) -> Tensor:
        """Model inputs -> pixel values (in [0, 1] for real images), e.g. to display them."""
        mean, std = self._stats(images)
        return images * std + mean

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"The {split} split is not set up: call datamodule.setup() first (the Trainer does this for you)."
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)
