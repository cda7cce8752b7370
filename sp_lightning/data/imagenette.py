"""Imagenette (10 easy ImageNet classes) as a DataModule, read as an image folder.

Layout under ``data_dir`` (what the official archive extracts to)::

    imagenette2-160/train/n01440764/*.JPEG ... (10 class folders named by WordNet ID)
    imagenette2-160/val/n01440764/*.JPEG ...

(``imagenette2-320`` or ``imagenette2`` for the other sizes). Any image format
torchvision's ``ImageFolder`` reads (JPEG, PNG, ...) works. ``download=True``
fetches and checksums the official archive with torchvision's ``Imagenette``.
Imagenette has no test split: ``test`` uses the validation images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder, Imagenette
from torchvision.transforms import v2

from .base import ImageDataModule

#: WordNet IDs (the folder names) in label order, with readable class names.
IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FOLDERS = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}

Size = Literal["full", "320px", "160px"]


class ImagenetteDataModule(ImageDataModule):
    """Imagenette's train and val splits, cropped to ``image_size`` squares.

    Args:
        data_dir: folder holding (or receiving) ``imagenette2-160/`` (or the folder for ``size``).
        size: which release: ``"160px"``, ``"320px"`` or ``"full"`` (shorter side of the stored images).
        download: fetch the official archive when the folder is missing (needs internet).
        image_size: side of the square crops the model sees.
        augment: random resized crop and horizontal flip for training (otherwise resize + centre crop).
        batch_size, num_workers, seed, mean, std: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        data_dir: str = "data",
        size: Size = "160px",
        download: bool = False,
        image_size: int = 128,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(list(IMAGENETTE_CLASSES.values()), mean, std, batch_size, num_workers, seed)
        if size not in _FOLDERS:
            raise ValueError(f"size must be one of {list(_FOLDERS)}, got {size!r}.")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}.")
        self.save_hyperparameters()
        self.data_dir, self.size, self.download = Path(data_dir), size, bool(download)
        self.image_size, self.augment = int(image_size), bool(augment)

    @property
    def folder(self) -> Path:
        """The extracted release folder (holding ``train/`` and ``val/``)."""
        return self.data_dir / _FOLDERS[self.size]

    def prepare_data(self) -> None:
        """Download and extract the official archive when asked to and the folder is missing (rank zero only)."""
        if self.download and not self.folder.is_dir():
            Imagenette(str(self.data_dir), split="train", size=self.size, download=True)

    def transform(self, train: bool) -> Callable[[Any], Tensor]:
        """PIL image -> normalised float tensor (3, image_size, image_size)."""
        if train and self.augment:
            steps = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps = [v2.Resize(round(self.image_size / 0.875), antialias=True), v2.CenterCrop(self.image_size)]
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        return v2.Compose(steps)

    def _split(self, split: str, train: bool) -> ImageFolder:
        root = self.folder / split
        if not root.is_dir():
            raise FileNotFoundError(
                f"Imagenette folder {root} is missing. Pass download=True to fetch the dataset (needs internet), "
                f"or set data_dir to the folder that contains {_FOLDERS[self.size]}/{split}/."
            )
        dataset = ImageFolder(str(root), transform=self.transform(train))
        if dataset.classes != list(IMAGENETTE_CLASSES):
            raise ValueError(
                f"{root} must hold one folder per Imagenette class named by WordNet ID {list(IMAGENETTE_CLASSES)}; "
                f"found {dataset.classes}."
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._split("train", train=True)
        self.val_set = self.test_set = self._split("val", train=False)
