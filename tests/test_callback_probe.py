"""Probe-set selection: deterministic, own generator, class-balanced, any batch format (no Trainer)."""

from __future__ import annotations

import random
import warnings

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from callback_support import DictDataset, blob_images, one_thread  # noqa: F401  (fixture)
from sp_lightning.probe import default_batch_fn, select_probe
from sp_lightning.probe import ProbeSet
from sp_lightning.probe.selection import balanced_pick, isolated_rng, read_probe, resumed_probe, validate_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def _rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy()


def _assert_same_rng(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert numpy.array_equal(before[2], after[2])


class NoisyDataset(TensorDataset):
    """A dataset whose items draw from every global RNG (like random augmentations)."""

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        random.random()
        numpy.random.rand()
        return image + 0.0 * torch.rand(1), label


def test_selection_is_deterministic_seeded_and_leaves_global_rng_alone() -> None:
    images, labels = blob_images(40)
    loader = DataLoader(NoisyDataset(images, labels), batch_size=8, shuffle=True)
    before = _rng_states()
    first = select_probe(loader, 8, seed=3)
    _assert_same_rng(before, _rng_states())
    torch.manual_seed(1234)  # the global seed does not matter
    again = select_probe(loader, 8, seed=3)
    other = select_probe(loader, 8, seed=4)
    assert first.indices == again.indices and torch.equal(first.images, again.images)
    assert first.indices != other.indices
    assert torch.equal(first.images, images[first.indices])
    assert torch.equal(first.labels, labels[first.indices])
    assert first.images.dtype == torch.float32 and first.images.device.type == "cpu"


def test_selection_is_class_balanced_on_imbalanced_data() -> None:
    images = torch.rand(100, 3, 4, 4)
    labels = torch.tensor([0] * 70 + [1] * 10 + [2] * 10 + [3] * 10)
    probe = select_probe(DataLoader(TensorDataset(images, labels), batch_size=10), 8, seed=0)
    assert sorted(probe.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_balanced_pick_takes_classes_in_turn() -> None:
    assert balanced_pick([5, 5, 5, 7, 9, 7], 4) == [0, 3, 4, 1]
    assert balanced_pick([1, 1, 1], 2) == [0, 1]
    assert balanced_pick(None, 3) == [0, 1, 2]


def test_dict_batches_and_unlabelled_data() -> None:
    images, labels = blob_images(20)
    probe = select_probe(DataLoader(DictDataset(images, labels), batch_size=4), 4, seed=0)
    assert torch.equal(probe.images, images[probe.indices])
    assert torch.equal(probe.labels, labels[probe.indices])
    unlabelled = select_probe(DataLoader(TensorDataset(images), batch_size=4), 4, seed=0)
    assert unlabelled.labels is None and unlabelled.images.shape == (4, 3, 16, 16)


def test_user_batch_fn_reads_other_layouts() -> None:
    images, labels = blob_images(12)
    loader = DataLoader(TensorDataset(labels, images), batch_size=4)  # (labels, images): a layout only a hook can read
    probe = select_probe(loader, 4, seed=0, batch_fn=lambda batch: (batch[1], batch[0]))
    assert torch.equal(probe.images, images[probe.indices])
    assert torch.equal(probe.labels, labels[probe.indices])


class Stream(IterableDataset):
    """An iterable dataset: no indices, read from the start."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __iter__(self):
        return iter(zip(self.images, self.labels))


def test_iterable_datasets_are_read_in_order_and_shuffled_with_the_seed() -> None:
    images, labels = blob_images(30)
    loader = DataLoader(Stream(images, labels), batch_size=5)
    before = _rng_states()
    probe = select_probe(loader, 8, seed=0)
    _assert_same_rng(before, _rng_states())
    assert probe.indices is None
    assert sorted(probe.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(probe.images, select_probe(loader, 8, seed=0).images)
    matches = [(images == img).flatten(1).all(1).nonzero().item() for img in probe.images]
    assert torch.equal(labels[matches], probe.labels)


def test_too_few_images_is_a_clear_error() -> None:
    images, labels = blob_images(3)
    with pytest.raises(ValueError, match=r"only 3 images .* num_images=8"):
        select_probe(DataLoader(TensorDataset(images, labels)), 8, seed=0)


def test_default_batch_fn_formats() -> None:
    x, y = torch.rand(4, 3, 2, 2), torch.arange(4)
    assert default_batch_fn(x) == (x, None)
    assert default_batch_fn((x, y))[1] is y
    assert torch.equal(default_batch_fn([x, y.float()])[1], y)  # whole-number floats are class indices
    assert default_batch_fn([x, y.float() + 0.5])[1] is None  # fractions are not (e.g. regression targets)
    assert torch.equal(default_batch_fn((x, torch.eye(4)[y]))[1], y)  # one-hot rows
    assert default_batch_fn((x, torch.full((4, 4), 0.25)))[1] is None  # soft labels (mixup)
    assert torch.equal(default_batch_fn({"image": x, "label": torch.eye(4)[y].long()})[1], y)
    assert default_batch_fn({"pixel_values": x, "labels": y}) == (x, y)
    with pytest.raises(KeyError, match="batch_fn"):
        default_batch_fn({"foo": x})
    with pytest.raises(ValueError, match="batch_fn"):
        default_batch_fn({"image": x, "label": torch.rand(4, 3)})
    with pytest.raises(TypeError, match="batch_fn"):
        default_batch_fn(3)


@pytest.mark.parametrize(
    ("images", "labels", "error", "match"),
    [
        ([1.0], None, TypeError, "must be a tensor"),
        (torch.rand(4, 8, 8), None, ValueError, r"\(N, C, H, W\)"),
        (torch.rand(4, 10), None, ValueError, r"\(N, C, H, W\)"),
        (torch.zeros(0, 3, 8, 8), None, ValueError, "non-empty"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), None, TypeError, "floating point"),
        (torch.full((2, 3, 8, 8), float("nan")), None, ValueError, "NaN"),
        (torch.rand(2, 3, 8, 8), torch.zeros(3, dtype=torch.long), ValueError, r"\(2,\) tensor"),
        (torch.rand(2, 3, 8, 8), torch.zeros(2), ValueError, "class indices"),
    ],
)
def test_validate_probe_rejects_what_is_not_a_labelled_image_batch(images, labels, error, match) -> None:
    with pytest.raises(error, match=match):
        validate_probe(images, labels)


def test_isolated_rng_restores_after_errors() -> None:
    before = _rng_states()
    with pytest.raises(RuntimeError), isolated_rng():
        torch.rand(3), random.random(), numpy.random.rand()
        raise RuntimeError("boom")
    _assert_same_rng(before, _rng_states())


@pytest.mark.parametrize(
    ("dataset", "reason"),
    [
        (lambda x, y: DictDataset(x, y, label_key="cls"), r"no label key among .*its keys: \['cls', 'image'\]"),
        (lambda x, y: TensorDataset(x, y.float() / 2), r"second element \(shape \(1,\), dtype torch.float32\)"),
        (lambda x, y: TensorDataset(x, torch.rand(len(y), 4)), r"second element .*one-hot rows"),
    ],
)
def test_labels_the_default_batch_fn_cannot_read_are_reported(dataset, reason: str) -> None:
    images, labels = blob_images(12)
    loader = DataLoader(dataset(images, labels), batch_size=4)
    with pytest.warns(UserWarning, match="probe set has no labels because .*" + reason + ".*batch_fn"):
        probe = select_probe(loader, 4, seed=0)
    assert probe.labels is None


def test_plainly_unlabelled_data_selects_without_a_warning() -> None:
    images, _ = blob_images(12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_probe(DataLoader(TensorDataset(images), batch_size=4), 4, seed=0).labels is None


def test_a_batch_fn_returning_one_value_is_a_clear_error() -> None:
    images, labels = blob_images(12)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    with pytest.raises(TypeError, match=r"batch_fn must return a pair \(images, labels or None\), got Tensor"):
        select_probe(loader, 4, seed=0, batch_fn=lambda batch: batch[0])
    with pytest.raises(TypeError, match="got tuple of length 3"):
        select_probe(loader, 4, seed=0, batch_fn=lambda batch: (batch[0], batch[1], None))


def test_user_labels_must_be_whole_class_indices() -> None:
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"labels must be whole class indices, got \[0.6, 1.7\]"):
        read_probe(images, [0.6, 1.7])
    assert read_probe(images, [1.0, 3.0]).labels.tolist() == [1, 3]


def test_a_resumed_run_keeps_the_saved_probe_set_unless_the_arguments_changed() -> None:
    saved = ProbeSet(torch.rand(4, 3, 8, 8), torch.arange(4))
    assert resumed_probe(saved, None, 4) == (saved, None)
    assert resumed_probe(None, None, 4) == (None, None)
    probe, why = resumed_probe(saved, None, 6)
    assert probe is None and why == "num_images=6 differs from the 4 images saved in the checkpoint"
    user = ProbeSet(torch.rand(2, 3, 8, 8), None)
    probe, why = resumed_probe(saved, user, 4)
    assert probe is user and "images=... given differ" in why
    same = ProbeSet(saved.images.clone(), saved.labels.clone())
    assert resumed_probe(saved, same, 8) == (same, None)
