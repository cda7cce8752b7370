"""Synthetic shapes: an image-classification dataset with a ground-truth object mask per image.

Each image shows one large *object* shape (its class is the label) on a textured,
cluttered background, optionally with a smaller *distractor* shape of another
class. Nothing is stored on disk: sample ``i`` is drawn on the fly from a
``torch.Generator`` seeded with ``(seed, split, i)``, so the same arguments always
give the same pixels, in any order, in any worker process, without touching the
global RNG.

A sample is a :class:`ShapeSample` ``(image, label, mask)``:

- ``image``: float tensor (3, H, W); pixel values in [0, 1], or normalised with
  ``(x - mean) / std`` when ``mean``/``std`` are given;
- ``label``: int, the object's class index into ``class_names``;
- ``mask``: bool tensor (H, W), True exactly on the object's visible pixels
  (not the distractor's, not the clutter's).

The default collate function turns a batch into ``ShapeSample(images (B, 3, H, W),
labels (B,), masks (B, H, W))``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import ImageDataModule, check_stats

#: Every shape the generator can draw, in the default class order.
SHAPE_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring", "star")

# Object and distractor sizes: circumradius as a fraction of the image side.
# Distractors are always smaller than the object, so the label is never ambiguous.
_OBJECT_RADIUS = (0.2, 0.32)
_DISTRACTOR_RADIUS = (0.08, 0.13)
_CLUTTER_RADIUS = (0.015, 0.035)
_MIN_CONTRAST = 0.35  # per-channel distance between object colour and background base colour


class ShapeSample(NamedTuple):
    """One sample (or, after collation, one batch) of the shapes dataset."""

    image: Tensor
    label: int | Tensor
    mask: Tensor


def shape_mask(name: str, u: Tensor, v: Tensor) -> Tensor:
    """Boolean mask of shape ``name`` in local coordinates where its circumradius is 1.

    ``u`` and ``v`` are the (rotated, scaled) coordinates of every pixel relative to
    the shape's centre; the result has their shape.
    """
    rho = torch.sqrt(u * u + v * v)
    if name == "disc":
        return rho <= 1.0
    if name == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= 1.0 / math.sqrt(2.0)
    if name == "triangle":  # equilateral, inscribed in the unit circle: edges at distance 1/2
        edges = [u * math.cos(a) + v * math.sin(a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return torch.stack(edges).amax(0) <= 0.5
    if name == "cross":
        arm, length = 0.3, 0.95
        return ((u.abs() <= arm) & (v.abs() <= length)) | ((v.abs() <= arm) & (u.abs() <= length))
    if name == "star":  # five points: the radius swings between 0.4 and 1 with the angle
        theta = torch.atan2(v, u)
        return rho <= 0.4 + 0.6 * ((1 + torch.cos(5 * theta)) / 2) ** 2
    raise ValueError(f"Unknown shape {name!r}; valid shapes are {list(SHAPE_NAMES)}.")


def sample_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit generator seed unique to ``(seed, split, index)`` (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a choice of shape classes (default: all of :data:`SHAPE_NAMES`)."""
    if classes is None:
        return SHAPE_NAMES
    if isinstance(classes, str):
        raise TypeError(f"classes must be a list of shape names, got the string {classes!r}.")
    names = tuple(classes)
    unknown = [name for name in names if name not in SHAPE_NAMES]
    if unknown:
        raise ValueError(f"Unknown shape class(es) {unknown}; valid shapes are {list(SHAPE_NAMES)}.")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"classes must name at least 2 different shapes, each once; got {list(names)}.")
    return names


class ShapesDataset(Dataset[ShapeSample]):
    """``length`` shape images of ``image_size`` x ``image_size`` pixels, drawn on the fly.

    Args:
        length: number of samples.
        image_size: side of the square images in pixels (>= 16).
        seed: base seed; together with ``split`` and the index it fixes every pixel.
        split: a name that makes splits with the same seed independent ("train", "val", ...).
        classes: which shapes make up the classes (default all of ``SHAPE_NAMES``).
        distractor_prob: probability that a smaller shape of another class is also drawn.
        texture: amplitude of the background's colour gratings (0 gives a flat background).
        clutter: number of small blobs sprinkled over the background.
        noise: standard deviation of the per-pixel Gaussian noise.
        mean, std: per-channel normalisation applied to the image (both or neither).
    """

    def __init__(
        self,
        length: int,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        classes: Sequence[str] | None = None,
        distractor_prob: float = 0.5,
        texture: float = 0.15,
        clutter: int = 4,
        noise: float = 0.03,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if int(length) < 0:
            raise ValueError(f"length must be >= 0, got {length}.")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
        if not 0.0 <= distractor_prob <= 1.0:
            raise ValueError(f"distractor_prob must lie in [0, 1], got {distractor_prob}.")
        if not texture >= 0 or not noise >= 0 or int(clutter) < 0:
            raise ValueError(f"texture, noise and clutter must be >= 0, got {texture}, {noise}, {clutter}.")
        if (mean is None) != (std is None):
            raise ValueError("Pass both mean and std (per-channel normalisation) or neither.")
        self.class_names = list(check_classes(classes))
        self.length, self.image_size, self.seed, self.split = int(length), int(image_size), int(seed), str(split)
        self.distractor_prob, self.texture, self.clutter, self.noise = (
            float(distractor_prob),
            float(texture),
            int(clutter),
            float(noise),
        )
        self.mean = self.std = None
        if mean is not None and std is not None:
            mean_t, std_t = check_stats(mean, std)
            if len(mean_t) != 3:
                raise ValueError(f"Shapes images are RGB: mean and std need 3 values, got {len(mean_t)}.")
            self.mean, self.std = torch.tensor(mean_t).view(3, 1, 1), torch.tensor(std_t).view(3, 1, 1)
        centres = torch.arange(self.image_size, dtype=torch.float32) + 0.5
        self._y, self._x = torch.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapeSample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[ShapeSample]:
        """Draw several samples at once (the DataLoader calls this with a batch of indices).

        Only the random draws are per sample; the rendering is vectorised over the
        batch, which makes a batch about 3x cheaper per image than drawing its images
        one at a time (``benchmarks/bench_shapes.py``). The pixels are the same either way.
        """
        indices = [self._check_index(int(i)) for i in indices]
        if not indices:
            return []
        labels = torch.tensor([i % len(self.class_names) for i in indices])
        params, noise = [], []
        for index in indices:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.split, index))
            params.append(torch.rand(self._num_params, generator=gen))
            noise.append(torch.randn(3, self.image_size, self.image_size, generator=gen))
        images, masks = self.render(labels, torch.stack(params), torch.stack(noise))
        if self.mean is not None:
            images = (images - self.mean) / self.std
        return [ShapeSample(img, int(lab), m) for img, lab, m in zip(images, labels, masks)]

    def _check_index(self, index: int) -> int:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of {self.length} samples.")
        return index % self.length

    # ------------------------------------------------------------------ drawing

    @property
    def _num_params(self) -> int:
        """Uniform draws per sample: colours 6, texture 12, clutter 6 per blob, object 4, distractor 15."""
        return 6 + 12 + 6 * self.clutter + 4 + 15

    def _shapes(self, classes: Tensor, cx: Tensor, cy: Tensor, radius: Tensor, angle: Tensor) -> Tensor:
        """(B, H, W) masks: sample b shows class ``classes[b]`` centred at (cx, cy), circumradius and angle given."""
        dx = self._x - cx.view(-1, 1, 1)
        dy = self._y - cy.view(-1, 1, 1)
        cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
        u = (cos * dx + sin * dy) / radius.view(-1, 1, 1)
        v = (-sin * dx + cos * dy) / radius.view(-1, 1, 1)
        masks = torch.zeros(u.shape, dtype=torch.bool)
        for c in classes.unique().tolist():
            chosen = classes == c
            masks[chosen] = shape_mask(self.class_names[c], u[chosen], v[chosen])
        return masks

    def render(self, labels: Tensor, params: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [0, 1] and object masks (B, H, W) from per-sample uniforms and noise."""
        size, batch = self.image_size, labels.shape[0]
        columns = iter(params.T)

        def take(n: int, low: float | Tensor = 0.0, high: float | Tensor = 1.0) -> Tensor:
            """The next ``n`` uniform columns, scaled to [low, high): shape (B, n)."""
            return low + (high - low) * torch.stack([next(columns) for _ in range(n)], dim=1)

        def paint(image: Tensor, mask: Tensor, rgb: Tensor) -> Tensor:
            return torch.where(mask.unsqueeze(1), rgb.view(batch, 3, 1, 1), image)

        colour = take(3)
        base = torch.remainder(colour + _MIN_CONTRAST + (1 - 2 * _MIN_CONTRAST) * take(3), 1.0)

        # Background texture: two colour gratings of random frequency, orientation and phase.
        freq = take(2, 1.5, 4.0).view(batch, 2, 1, 1) * 2 * math.pi / size
        orient = take(2, 0.0, math.pi).view(batch, 2, 1, 1)
        phase = take(2, 0.0, 2 * math.pi).view(batch, 2, 1, 1)
        amp = take(6, -self.texture, self.texture).view(batch, 2, 3)
        waves = torch.sin(freq * (torch.cos(orient) * self._x + torch.sin(orient) * self._y) + phase)
        image = base.view(batch, 3, 1, 1) + torch.einsum("bgc,bghw->bchw", amp, waves)

        # Clutter: small blobs of random colour.
        for _ in range(self.clutter):
            bx, by = take(1, 0.0, size).view(batch, 1, 1), take(1, 0.0, size).view(batch, 1, 1)
            br = take(1, _CLUTTER_RADIUS[0] * size, _CLUTTER_RADIUS[1] * size).view(batch, 1, 1)
            image = paint(image, (self._x - bx) ** 2 + (self._y - by) ** 2 <= br**2, take(3))

        # The object: large and fully inside the image.
        radius = take(1, _OBJECT_RADIUS[0] * size, _OBJECT_RADIUS[1] * size)[:, 0]
        centre = radius.unsqueeze(1) + take(2) * (size - 2 * radius.unsqueeze(1))
        angle = take(1, 0.0, 2 * math.pi)[:, 0]

        # The distractor (painted first, so the object occludes it): another class,
        # smaller, at the farthest of four candidate spots from the object.
        present = take(1)[:, 0] < self.distractor_prob
        others = labels + 1 + (take(1)[:, 0] * (len(self.class_names) - 1)).long().clamp_max(len(self.class_names) - 2)
        d_radius = take(1, _DISTRACTOR_RADIUS[0] * size, _DISTRACTOR_RADIUS[1] * size)[:, 0]
        d_angle = take(1, 0.0, 2 * math.pi)[:, 0]
        d_colour = take(3)
        spots = d_radius.view(batch, 1, 1) + take(8).view(batch, 4, 2) * (size - 2 * d_radius.view(batch, 1, 1))
        farthest = (spots - centre.unsqueeze(1)).norm(dim=2).argmax(dim=1)
        spot = spots[torch.arange(batch), farthest]
        d_mask = self._shapes(others % len(self.class_names), spot[:, 0], spot[:, 1], d_radius, d_angle)
        image = paint(image, d_mask & present.view(batch, 1, 1), d_colour)

        mask = self._shapes(labels, centre[:, 0], centre[:, 1], radius, angle)
        image = paint(image, mask, colour) + self.noise * noise
        return image.clamp_(0.0, 1.0), mask


class ShapesDataModule(ImageDataModule):
    """Train/val/test splits of :class:`ShapesDataset`; batches are ``ShapeSample(images, labels, masks)``.

    Images are normalised with ``mean``/``std`` (the defaults are close to the
    generator's pixel statistics). The three splits use the same ``seed`` but
    different split names, so they never share an image.

    Args:
        image_size: side of the square images in pixels.
        train_size, val_size, test_size: samples per split.
        batch_size, num_workers, seed: loader settings (see :class:`ImageDataModule`).
        classes, distractor_prob, texture, clutter, noise: generator settings (see :class:`ShapesDataset`).
        mean, std: per-channel normalisation.
    """

    def __init__(
        self,
        image_size: int = 64,
        train_size: int = 4096,
        val_size: int = 512,
        test_size: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        classes: list[str] | None = None,
        distractor_prob: float = 0.5,
        texture: float = 0.15,
        clutter: int = 4,
        noise: float = 0.03,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.3, 0.3, 0.3),
    ) -> None:
        super().__init__(check_classes(classes), mean, std, batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.generator_options = dict(
            image_size=image_size,
            seed=seed,
            classes=self.class_names,
            distractor_prob=distractor_prob,
            texture=texture,
            clutter=clutter,
            noise=noise,
            mean=self.mean,
            std=self.std,
        )
        # Build one split now so that bad generator settings fail here, not inside the Trainer.
        self.dataset("val")

    def dataset(self, split: str) -> ShapesDataset:
        """The ``split`` ("train", "val" or "test") dataset."""
        if split not in self.sizes:
            raise ValueError(f"split must be one of {list(self.sizes)}, got {split!r}.")
        return ShapesDataset(self.sizes[split], split=split, **self.generator_options)

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set, self.test_set = (self.dataset(s) for s in ("train", "val", "test"))
