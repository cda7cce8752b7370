"""The probe set: a fixed, deterministic, class-balanced handful of images to explain during training.

Where the images come from (the user's tensor or file, else the validation data),
how they are picked, and which set a resumed run keeps. Selection never touches
the global random generators (it uses its own seeded ``torch.Generator`` and runs
with every global RNG state saved and restored), so training is bit-identical with
or without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from lightning.pytorch.utilities import rank_zero_warn
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

    def shard(self, model: nn.Module, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor | None]:
        """Rank ``rank``'s share on ``model``'s device, images in its dtype: images ``rank::world_size``, padded.

        Every rank gets the same number of images, ``ceil(N / world_size)``: a short shard is
        padded by repeating one of the probe images, because under FSDP every forward and
        backward is a collective that all ranks must run together. :func:`shard_sizes` says
        how many of each rank's images are real (``merge_shards`` drops the rest).

        Example:
            >>> probe = ProbeSet(torch.arange(3.0).view(3, 1, 1, 1), torch.tensor([0, 1, 2]))
            >>> probe.shard(nn.Linear(1, 1), rank=1, world_size=2)[1]
            tensor([1, 1])
        """
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))
        count = len(self.images)
        indices = list(range(rank, count, world_size))
        if count:
            filler = indices[-1] if indices else rank % count
            indices += [filler] * (-(-count // world_size) - len(indices))
        images = self.images[indices].to(device=device, dtype=dtype)
        return images, None if self.labels is None else self.labels[indices].to(device)


def shard_sizes(count: int, world_size: int) -> list[int]:
    """How many real (unpadded) images of ``count`` each of ``world_size`` ranks explains (:meth:`ProbeSet.shard`)."""
    return [len(range(rank, count, world_size)) for rank in range(world_size)]


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


def as_class_indices(value: Any, batch: int) -> Tensor | None:
    """``value`` as (B,) long class indices, or ``None`` if it holds none.

    Reads integer indices, whole-number floats (``3.0``) and one-hot rows (B, K) with a
    single 1 each; soft labels (e.g. mixup) and anything else are not class indices.
    """
    if not isinstance(value, Tensor) or value.is_complex() or value.dtype == torch.bool:
        return None
    if value.dim() == 2 and value.shape[0] == batch and value.shape[1] > 1:
        one_hot = ((value == 0) | (value == 1)).all() and bool((value.sum(dim=1) == 1).all())
        return value.argmax(dim=1) if one_hot else None
    if value.dim() != 1 or value.shape[0] != batch:
        return None
    if value.dtype.is_floating_point:
        return value.long() if bool((value == value.round()).all()) else None
    return value.long()


def missing_labels(batch: Any) -> str | None:
    """Why :func:`default_batch_fn` finds no labels in ``batch`` where it might hold some (``None``: plainly unlabelled)."""
    if isinstance(batch, Mapping):
        return (
            f"the batch dict has no label key among {LABEL_KEYS} (its keys: {sorted(map(str, batch))})"
        )
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        second = batch[1]
        shape = f"shape {tuple(second.shape)}, dtype {second.dtype}" if isinstance(second, Tensor) else type(second).__name__
        return f"the batch's second element ({shape}) is not class indices (B,) or one-hot rows (B, K)"
    return None


def default_batch_fn(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(images, labels) from a tensor, a tuple/list (first element; second if it holds class indices) or a dict.

    Dicts are read by key: images from one of ``IMAGE_KEYS``, labels from one of ``LABEL_KEYS``.
    Labels are read as :func:`as_class_indices` says (indices, whole-number floats, one-hot).
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
        if label_key is not None:
            labels = as_class_indices(batch[label_key], len(images))
            if labels is None:
                raise ValueError(
                    f"batch[{label_key!r}] holds no class indices ((B,) integers or one-hot rows); "
                    "pass batch_fn=... to read labels."
                )
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        if len(batch) > 1:
            labels = as_class_indices(batch[1], len(images) if isinstance(images, Tensor) else -1)
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
    result = batch_fn(batch)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(
            f"batch_fn must return a pair (images, labels or None), got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
            + ". Return e.g. (batch['image'], batch['label']), or (images, None) without labels."
        )
    images, labels = result
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
            batches = [collate([dataset[i]]) for i in order]
            pool = [_split(batch, batch_fn)[0] for batch in batches]
            indices, first = order, batches[0] if batches else None
        else:
            pool, first = [], None
            for batch in loader:
                first = batch if first is None else first
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
    reason = missing_labels(first) if labels is None and batch_fn is default_batch_fn else None
    if reason is not None:
        rank_zero_warn(
            f"SemanticPullbackCallback: the probe set has no labels because {reason}, so explanations target the "
            "model's top classes. Pass batch_fn=... returning (images, labels) to explain the true classes."
        )
    picked = balanced_pick(labels, num_images)
    images = torch.stack([pool[p][0] for p in picked]).detach().to("cpu", torch.float32).contiguous()
    return ProbeSet(
        images=images,
        labels=None if labels is None else torch.tensor([labels[p] for p in picked], dtype=torch.long),
        indices=None if indices is None else [indices[p] for p in picked],
    )


def read_probe(images: Tensor | str | None, labels: Tensor | Sequence[int] | None) -> ProbeSet | None:
    """The user's probe set: a tensor (N, C, H, W), or a ``torch.save`` file holding one or a dict
    with ``"images"`` (and ``"labels"``); ``None`` when no images are given."""
    if images is None:
        if labels is not None:
            raise ValueError("labels were given without images; pass images=... too.")
        return None
    if isinstance(images, str):
        loaded = torch.load(images, map_location="cpu", weights_only=True)
        if isinstance(loaded, Mapping):
            if labels is not None and loaded.get("labels") is not None:
                raise ValueError(f"{images} already holds labels; do not pass labels=... as well.")
            labels = loaded.get("labels", labels)
            loaded = loaded.get("images")
        images = loaded
    if labels is not None and not isinstance(labels, Tensor):
        values = torch.as_tensor(labels, dtype=torch.float64)
        if not bool((values == values.round()).all()):
            raise ValueError(f"labels must be whole class indices, got {list(labels)}.")
        labels = values.long()
    validate_probe(images, labels)
    return ProbeSet(images.detach().to("cpu", torch.float32).clone(), None if labels is None else labels.cpu())


def validation_loader(trainer: Any) -> Any:
    """The first validation dataloader the trainer was given (loaders, datamodule or module hook).

    Read from where Lightning itself takes validation data, so it is found also when
    validation is switched off (``limit_val_batches=0``).
    """
    # the fit loop's record of where validation data comes from (set by trainer.fit)
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if source.instance is None or not source.is_defined():
        return None
    with isolated_rng():
        loaders = source.dataloader()
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def same_probe(a: ProbeSet, b: ProbeSet) -> bool:
    """Whether two probe sets hold the same images and labels."""
    if a.images.shape != b.images.shape or not torch.equal(a.images, b.images):
        return False
    if a.labels is None or b.labels is None:
        return a.labels is None and b.labels is None
    return torch.equal(a.labels, b.labels)


def resumed_probe(saved: ProbeSet | None, user: ProbeSet | None, num_images: int) -> tuple[ProbeSet | None, str | None]:
    """Which probe set a run starting with a checkpoint's ``saved`` set uses, and why it changed (or ``None``).

    The callback's arguments win: explicit ``images=`` that differ from the saved ones are
    used, and so is a new selection when ``num_images`` differs from the saved set's size
    (returned as ``None``: select again). Otherwise the saved images are kept, also when the
    validation data changed, so the time-lapse goes on with the same images.
    """
    if user is not None:
        if saved is not None and not same_probe(saved, user):
            return user, "the images=... given differ from the probe set saved in the checkpoint"
        return user, None
    if saved is not None and len(saved.images) != num_images:
        return None, f"num_images={num_images} differs from the {len(saved.images)} images saved in the checkpoint"
    return saved, None
