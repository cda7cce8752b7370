"""The probe set: a fixed, deterministic, class-balanced handful of images to explain during training.

Selection never touches the global random generators (it uses its own seeded
``torch.Generator`` and runs with every global RNG state saved and restored),
so training is bit-identical with or without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate

#: Maps one batch to (images (B, C, H, W), labels (B,) or None).
BatchFn = Callable[[Any], tuple[Tensor, Tensor | None]]

IMAGE_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


@dataclass
class ProbeSet:
    """Images (N, C, H, W) float32 on CPU, labels (N,) long or ``None``, and their dataset indices if known."""

    images: Tensor
    labels: Tensor | None
    indices: list[int] | None = None


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Save torch (CPU and initialised CUDA), Python and NumPy RNG states; restore them on exit, also after errors."""
    python_state = random.getstate()
    try:
        import numpy
    except ImportError:  # numpy is optional for torch
        numpy = None
    numpy_state = numpy.random.get_state() if numpy is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def _is_label_tensor(value: Any, batch: int) -> bool:
    return (
        isinstance(value, Tensor)
        and value.dim() == 1
        and value.shape[0] == batch
        and not value.dtype.is_floating_point
        and value.dtype != torch.bool
        and not value.is_complex()
    )


def default_batch_fn(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(images, labels) from a tensor, a tuple/list (first element; second if it holds class indices) or a dict.

    Dicts are read by key: images from one of ``IMAGE_KEYS``, labels from one of ``LABEL_KEYS``.
    """
    labels: Any = None
    if isinstance(batch, Tensor):
        images = batch
    elif isinstance(batch, Mapping):
        image_key = next((k for k in IMAGE_KEYS if k in batch), None)
        if image_key is None:
            raise KeyError(
                f"Cannot find images in a batch dict with keys {sorted(map(str, batch))}; expected one of {IMAGE_KEYS}. "
                "Pass batch_fn=... mapping a batch to (images, labels)."
            )
        images = batch[image_key]
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        labels = batch[label_key] if label_key is not None else None
        if labels is not None and not _is_label_tensor(labels, len(images)):
            raise ValueError(
                f"batch[{label_key!r}] is not a (B,) tensor of class indices; pass batch_fn=... to read labels."
            )
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        if len(batch) > 1 and _is_label_tensor(batch[1], len(images) if isinstance(images, Tensor) else -1):
            labels = batch[1]
    else:
        raise TypeError(
            f"Cannot read images from a batch of type {type(batch).__name__}. "
            "Pass batch_fn=... mapping a batch to (images, labels)."
        )
    return images, labels


def validate_probe(images: Any, labels: Any) -> None:
    """Raise a clear error unless ``images`` is (N, C, H, W) floating point and ``labels`` is ``None`` or (N,) integers."""
    if not isinstance(images, Tensor):
        raise TypeError(f"Probe images must be a tensor, got {type(images).__name__}.")
    if images.dim() != 4 or images.shape[0] < 1 or min(images.shape[1:]) < 1:
        raise ValueError(
            f"Probe images must be a non-empty batch of images shaped (N, C, H, W), got shape {tuple(images.shape)}. "
            "The callback explains image classifiers; use batch_fn=... if the images sit elsewhere in the batch."
        )
    if not images.is_floating_point():
        raise TypeError(
            f"Probe images must be floating point (what the model takes), got dtype {images.dtype}. "
            "Convert them (e.g. uint8 / 255) in the dataset or in batch_fn."
        )
    if not torch.isfinite(images).all():
        raise ValueError("Probe images contain NaN or infinite values.")
    if labels is not None and not _is_label_tensor(labels, images.shape[0]):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Probe labels must be a ({images.shape[0]},) tensor of class indices, got {shape}.")


def balanced_pick(labels: Sequence[int] | None, count: int) -> list[int]:
    """Positions of ``count`` candidates, taking one from each class in turn (classes in order of first appearance)."""
    if labels is None:
        return list(range(count))
    buckets: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        buckets.setdefault(label, []).append(position)
    queues = [iter(bucket) for bucket in buckets.values()]
    picked: list[int] = []
    while len(picked) < count:
        for queue in queues:
            position = next(queue, None)
            if position is not None and len(picked) < count:
                picked.append(position)
    return picked


def _candidates(num_images: int) -> int:
    """How many random candidates are looked at to balance classes."""
    return max(8 * num_images, 64)


def _split(batch: Any, batch_fn: BatchFn) -> list[tuple[Tensor, int | None]]:
    images, labels = batch_fn(batch)
    validate_probe(images, labels)
    if labels is None:
        return [(img, None) for img in images]
    return [(img, int(label)) for img, label in zip(images, labels)]


def select_probe(loader: Any, num_images: int, seed: int, batch_fn: BatchFn | None = None) -> ProbeSet:
    """Pick ``num_images`` images from a dataloader, the same ones for the same data and seed.

    Map-style datasets are sampled directly (``loader.dataset[i]`` for a seeded random
    order of indices, collated with the loader's ``collate_fn``); other iterables are read
    from the start and the images seen are shuffled with the same seeded generator. Among
    the candidates, classes take turns so the set is balanced where labels exist.
    """
    batch_fn = batch_fn or default_batch_fn
    generator = torch.Generator().manual_seed(seed)
    want = _candidates(num_images)
    dataset = getattr(loader, "dataset", None)
    indices: list[int] | None = None
    with isolated_rng(), torch.inference_mode(False):
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            collate = loader.collate_fn if getattr(loader, "batch_size", 1) is not None else default_collate
            order = torch.randperm(len(dataset), generator=generator)[:want].tolist()
            pool = [_split(collate([dataset[i]]), batch_fn)[0] for i in order]
            indices = order
        else:
            pool = []
            for batch in loader:
                pool.extend(_split(batch, batch_fn))
                if len(pool) >= want:
                    break
            shuffle = torch.randperm(len(pool), generator=generator).tolist()
            pool = [pool[i] for i in shuffle]
    if len(pool) < num_images:
        raise ValueError(
            f"The validation data holds only {len(pool)} images but the probe set needs num_images={num_images}. "
            "Lower num_images or pass images=... to the callback."
        )
    labels = None if any(label is None for _, label in pool) else [label for _, label in pool]
    picked = balanced_pick(labels, num_images)
    images = torch.stack([pool[p][0] for p in picked]).detach().to("cpu", torch.float32).contiguous()
    return ProbeSet(
        images=images,
        labels=None if labels is None else torch.tensor([labels[p] for p in picked], dtype=torch.long),
        indices=None if indices is None else [indices[p] for p in picked],
    )
