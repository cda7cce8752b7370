"""Write small datasets to disk in the official CIFAR-10 and Imagenette layouts (no network needed)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from sp_lightning.data.cifar import TEST_FILES, TRAIN_FILES
from sp_lightning.data.imagenette import IMAGENETTE_CLASSES


def write_cifar10(root: Path, per_batch: int = 8, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py/`` with 5 training batches and a test batch of ``per_batch`` random images each.

    Returns file name -> (data (N, 3072) uint8, labels) as written.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in TRAIN_FILES + TEST_FILES:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as handle:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, handle)
        written[name] = (data, labels)
    return written


def write_imagenette(root: Path, per_class: int = 2, folder: str = "imagenette2-160") -> None:
    """``root/<folder>/{train,val}/<wnid>/`` with ``per_class`` small images per class: JPEGs and one PNG each."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in IMAGENETTE_CLASSES:
            target = root / folder / split / wnid
            target.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40 + 4 * i, 48, 3), dtype=np.uint8)
                suffix = "PNG" if i == 0 else "JPEG"
                Image.fromarray(pixels).save(target / f"{wnid}_{i}.{suffix}")
