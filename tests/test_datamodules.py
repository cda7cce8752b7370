"""DataModules: shapes, CIFAR-10 and Imagenette (the real ones read data the test writes to disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import write_cifar10, write_imagenette

from sp_lightning.data import (
    CIFAR10DataModule,
    ImagenetteDataModule,
    ShapeSample,
    ShapesDataModule,
)
from sp_lightning.data.cifar import CIFAR10_CLASSES
from sp_lightning.data.imagenette import IMAGENETTE_CLASSES


def _tiny_shapes(**kwargs: object) -> ShapesDataModule:
    options = dict(image_size=32, train_size=24, val_size=12, test_size=12, batch_size=8)
    options.update(kwargs)
    dm = ShapesDataModule(**options)
    dm.setup("fit")
    return dm


def test_shapes_datamodule_batches_carry_masks_and_normalised_images() -> None:
    dm = _tiny_shapes(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    assert dm.num_classes == len(dm.class_names) == 6
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, ShapeSample)
    assert batch.image.shape == (8, 3, 32, 32) and batch.label.shape == (8,) and batch.mask.shape == (8, 32, 32)
    pixels = dm.denormalize(batch.image)
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    torch.testing.assert_close(dm.normalize(pixels), batch.image)
    # input_bounds are where pixel values 0 and 1 land after normalisation
    low, high = dm.input_bounds
    torch.testing.assert_close(dm.denormalize(torch.tensor(low).view(3, 1, 1)), torch.zeros(3, 1, 1))
    torch.testing.assert_close(dm.denormalize(torch.tensor(high).view(3, 1, 1)), torch.ones(3, 1, 1))


def test_shapes_splits_never_share_images() -> None:
    dm = _tiny_shapes()
    images = {split: torch.stack([s.image for s in getattr(dm, f"{split}_set")]) for split in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        distance = torch.cdist(images[a].flatten(1), images[b].flatten(1))
        assert float(distance.min()) > 0


def test_loaders_are_reproducible_and_never_draw_from_the_global_rng() -> None:
    first, again, other = _tiny_shapes(seed=5), _tiny_shapes(seed=5), _tiny_shapes(seed=6)
    state = torch.random.get_rng_state()
    order = [b.label.tolist() + [float(b.image.sum())] for b in first.train_dataloader()]
    for loader in (first.val_dataloader(), first.test_dataloader()):
        list(loader)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert order == [b.label.tolist() + [float(b.image.sum())] for b in again.train_dataloader()]
    assert order != [b.label.tolist() + [float(b.image.sum())] for b in other.train_dataloader()]


def test_loaders_need_setup_and_settings_are_validated() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        ShapesDataModule(train_size=4).train_dataloader()
    with pytest.raises(ValueError, match="batch_size"):
        ShapesDataModule(batch_size=0)
    with pytest.raises(ValueError, match="std"):
        ShapesDataModule(std=(0.3, 0.0, 0.3))
    with pytest.raises(ValueError, match="valid shapes"):
        ShapesDataModule(classes=["disc", "oval"])
    with pytest.raises(ValueError, match="3 values"):
        ShapesDataModule(mean=(0.5, 0.5), std=(0.3, 0.3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        ShapesDataModule().normalize(torch.zeros(2, 4, 8, 8))


# ---------------------------------------------------------------------- CIFAR-10


def test_cifar10_reads_the_official_batch_layout(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, per_batch=8)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=4, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == list(CIFAR10_CLASSES)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 8)
    # Test images come back exactly as written: RGB planes in row order, normalised.
    data, labels = written["test_batch"]
    images, targets = next(iter(dm.test_dataloader()))
    expected = torch.from_numpy(data[:4].reshape(4, 3, 32, 32).astype(np.float32) / 255.0)
    torch.testing.assert_close(dm.denormalize(images), expected, atol=1e-5, rtol=0)
    assert targets.tolist() == labels[:4]
    # train and val are a partition of the 40 training images
    train_ids = set(dm.train_set.indices)
    assert not train_ids & set(dm.val_set.indices) and len(train_ids | set(dm.val_set.indices)) == 40


def test_cifar10_augmentation_and_resizing(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=4)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=4, batch_size=4, image_size=48)
    dm.setup("fit")
    train_images, _ = next(iter(dm.train_dataloader()))
    val_images, _ = next(iter(dm.val_dataloader()))
    assert train_images.shape == val_images.shape == (4, 3, 48, 48)
    assert [type(t).__name__ for t in dm.transform(train=True).transforms][:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert "RandomCrop" not in [type(t).__name__ for t in dm.transform(train=False).transforms]


def test_cifar10_missing_files_explain_the_fix(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    dm.prepare_data()  # download=False: nothing is fetched
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")
    write_cifar10(tmp_path, per_batch=4)
    with pytest.raises(ValueError, match="val_size"):
        CIFAR10DataModule(data_dir=str(tmp_path), val_size=20).setup("fit")


def test_cifar10_download_flag_fetches_the_official_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, download_root: str, filename: str, md5: str) -> None:
        calls.append((url, filename, md5))
        write_cifar10(Path(download_root), per_batch=4)

    monkeypatch.setattr("sp_lightning.data.cifar.download_and_extract_archive", fake_download)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True, val_size=4)
    dm.prepare_data()
    dm.prepare_data()  # files present now: no second download
    dm.setup("fit")
    assert len(calls) == 1 and calls[0][0].startswith("https://") and calls[0][1].endswith(".tar.gz") and calls[0][2]
    assert len(dm.test_set) == 4


# ---------------------------------------------------------------------- Imagenette


def test_imagenette_reads_the_image_folder_layout(tmp_path: Path) -> None:
    write_imagenette(tmp_path, per_class=2)
    dm = ImagenetteDataModule(data_dir=str(tmp_path), image_size=32, batch_size=5)
    dm.setup("fit")
    assert dm.class_names == list(IMAGENETTE_CLASSES.values()) and dm.num_classes == 10
    assert len(dm.train_set) == len(dm.val_set) == 20  # JPEG and PNG files both count
    assert dm.test_set is dm.val_set
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        images, labels = next(iter(loader))
        assert images.shape == (5, 3, 32, 32) and labels.dtype == torch.long
    # validation images are deterministic (resize + centre crop), labels follow the folders
    assert [label for _, label in dm.val_set.samples] == sorted(list(range(10)) * 2)
    again, _ = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(again, next(iter(dm.val_dataloader()))[0])


def test_imagenette_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True"):
        ImagenetteDataModule(data_dir=str(tmp_path)).setup("fit")
    (tmp_path / "imagenette2-160" / "train" / "cats").mkdir(parents=True)
    (tmp_path / "imagenette2-160" / "train" / "cats" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="WordNet ID"):
        ImagenetteDataModule(data_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="size"):
        ImagenetteDataModule(size="80px")


def test_imagenette_download_flag_fetches_the_requested_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = []

    def fake_download(url: str, download_root: str, md5: str) -> None:
        urls.append(url)
        write_imagenette(Path(download_root), per_class=2, folder="imagenette2-320")

    monkeypatch.setattr("torchvision.datasets.imagenette.download_and_extract_archive", fake_download)
    dm = ImagenetteDataModule(data_dir=str(tmp_path), size="320px", download=True, image_size=16)
    dm.prepare_data()
    dm.prepare_data()
    dm.setup("fit")
    assert len(urls) == 1 and Path(urls[0]).name.startswith("imagenette2-320")
    assert len(dm.train_set) == 20
