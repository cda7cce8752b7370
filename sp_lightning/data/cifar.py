"""CIFAR-10 as a DataModule, read from the official "python version" batch files.

Layout under ``data_dir`` (what the official archive extracts to)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch

Each batch file is a pickled dict with ``data`` (N, 3072) uint8 rows (1024 red,
then green, then blue values of a 32x32 image) and ``labels`` (N ints).
``download=True`` fetches and checksums the official archive with torchvision's
downloader; the batch files are then read here, so any folder in this layout
works (e.g. a local copy or a subset).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

from .base import ImageDataModule

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TRAIN_FILES = tuple(name for name, _ in CIFAR10.train_list)
TEST_FILES = tuple(name for name, _ in CIFAR10.test_list)


def read_cifar_batches(folder: Path, names: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from CIFAR-10 batch files in ``folder``."""
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 batch file {path} is missing. Pass download=True to fetch the dataset (needs internet), "
                f"or set data_dir to the folder that contains {CIFAR10.base_folder}/."
            )
        with path.open("rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        data, batch_labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
        if data is None or batch_labels is None or len(data) != len(batch_labels):
            raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with matching 'data' and 'labels'.")
        batch_labels = torch.as_tensor(batch_labels, dtype=torch.long)
        if batch_labels.numel() and not 0 <= int(batch_labels.min()) <= int(batch_labels.max()) < len(CIFAR10_CLASSES):
            raise ValueError(f"{path} holds labels outside 0..{len(CIFAR10_CLASSES) - 1}: not a CIFAR-10 batch.")
        images.append(torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """In-memory uint8 images (N, C, H, W) with labels, passed through ``transform`` on access."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor]) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50,000 training images (``val_size`` of them held out for validation) and 10,000 test images.

    Args:
        data_dir: folder holding (or receiving) ``cifar-10-batches-py/``.
        download: fetch the official archive when the files are missing (needs internet).
        val_size: training images held out for validation (a fixed, seeded split).
        augment: random crop (padding 4) and horizontal flip on training images.
        image_size: resize images to this side (e.g. for models that need larger inputs); ``None`` keeps 32.
        batch_size, num_workers, seed, mean, std: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_size: int = 5000,
        augment: bool = True,
        image_size: int | None = None,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
    ) -> None:
        super().__init__(CIFAR10_CLASSES, mean, std, batch_size, num_workers, seed)
        if int(val_size) < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}.")
        if image_size is not None and int(image_size) < 8:
            raise ValueError(f"image_size must be >= 8 or None (keep 32), got {image_size}.")
        self.save_hyperparameters()
        self.data_dir, self.download, self.val_size = Path(data_dir), bool(download), int(val_size)
        self.augment, self.image_size = bool(augment), image_size

    @property
    def folder(self) -> Path:
        """Where the batch files live."""
        return self.data_dir / CIFAR10.base_folder

    def prepare_data(self) -> None:
        """Download and extract the official archive when asked to and the files are missing (rank zero only)."""
        missing = not all((self.folder / name).is_file() for name in TRAIN_FILES + TEST_FILES)
        if self.download and missing:
            download_and_extract_archive(
                CIFAR10.url, str(self.data_dir), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
            )

    def transform(self, train: bool) -> Callable[[Tensor], Tensor]:
        """uint8 image -> normalised float image (with augmentation for training when enabled)."""
        steps: list[Callable[[Tensor], Tensor]] = []
        if train and self.augment:
            steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        if self.image_size is not None:
            steps.append(v2.Resize((self.image_size, self.image_size), antialias=True))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        return v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        images, labels = read_cifar_batches(self.folder, TRAIN_FILES)
        if self.val_size >= images.shape[0]:
            raise ValueError(
                f"val_size={self.val_size} leaves no training images: the training files hold {images.shape[0]}."
            )
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size].tolist(), order[self.val_size :].tolist()
        self.train_set = Subset(TensorImageDataset(images, labels, self.transform(train=True)), train_idx)
        self.val_set = Subset(TensorImageDataset(images, labels, self.transform(train=False)), val_idx)
        test_images, test_labels = read_cifar_batches(self.folder, TEST_FILES)
        self.test_set = TensorImageDataset(test_images, test_labels, self.transform(train=False))
