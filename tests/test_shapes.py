"""The synthetic shapes dataset: deterministic, mask-carrying, and validated."""

from __future__ import annotations

import math

import pytest
import torch

from sp_lightning.data import SHAPE_NAMES, ShapeSample, ShapesDataset
from sp_lightning.data.shapes import shape_mask


def _mask_at(name: str, points: list[tuple[float, float]]) -> list[bool]:
    u = torch.tensor([p[0] for p in points])
    v = torch.tensor([p[1] for p in points])
    return shape_mask(name, u, v).tolist()


def test_shape_geometry_in_local_coordinates() -> None:
    # (u, v) points inside / outside each shape of circumradius 1.
    assert _mask_at("disc", [(0.0, 0.0), (0.99, 0.0), (1.01, 0.0), (0.75, 0.75)]) == [True, True, False, False]
    assert _mask_at("ring", [(0.0, 0.0), (0.8, 0.0), (0.0, -0.95), (1.05, 0.0)]) == [False, True, True, False]
    assert _mask_at("square", [(0.7, 0.7), (-0.7, 0.0), (0.72, 0.0), (0.0, 0.0)]) == [True, True, False, True]
    assert _mask_at("triangle", [(0.0, 0.9), (0.0, -0.45), (0.0, -0.55), (0.8, 0.5)]) == [True, True, False, False]
    assert _mask_at("cross", [(0.0, 0.9), (0.9, 0.0), (0.6, 0.6), (0.0, 0.0)]) == [True, True, False, True]
    point, notch = (math.cos(0.0), math.sin(0.0)), (math.cos(math.pi / 5), math.sin(math.pi / 5))
    star = [(0.95 * point[0], 0.95 * point[1]), (0.6 * notch[0], 0.6 * notch[1]), (0.3 * notch[0], 0.3 * notch[1])]
    assert _mask_at("star", star) == [True, False, True]
    with pytest.raises(ValueError, match="valid shapes"):
        shape_mask("hexagon", torch.zeros(1), torch.zeros(1))


def test_samples_are_deterministic_and_leave_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first = ShapesDataset(20, image_size=32, seed=3)
    second = ShapesDataset(20, image_size=32, seed=3)
    batch = first.__getitems__([7, 2, 11])
    singles = [second[i] for i in (7, 2, 11)]
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(batch, singles):
        assert isinstance(a, ShapeSample)
        assert torch.equal(a.image, b.image) and a.label == b.label and torch.equal(a.mask, b.mask)
    assert torch.equal(first[-1].image, first[19].image)


def test_seed_split_and_index_each_change_the_image() -> None:
    base = ShapesDataset(4, image_size=32, seed=0, split="train")[1].image
    assert not torch.equal(base, ShapesDataset(4, image_size=32, seed=1, split="train")[1].image)
    assert not torch.equal(base, ShapesDataset(4, image_size=32, seed=0, split="val")[1].image)
    assert not torch.equal(base, ShapesDataset(8, image_size=32, seed=0, split="train")[7].image)


def test_sample_layout_labels_and_value_range() -> None:
    data = ShapesDataset(12, image_size=40)
    assert data.class_names == list(SHAPE_NAMES)
    labels = []
    for sample in data.__getitems__(range(12)):
        assert sample.image.shape == (3, 40, 40) and sample.image.dtype == torch.float32
        assert sample.mask.shape == (40, 40) and sample.mask.dtype == torch.bool
        assert 0.0 <= float(sample.image.min()) and float(sample.image.max()) <= 1.0
        labels.append(sample.label)
    assert sorted(labels) == sorted(list(range(len(SHAPE_NAMES))) * 2)  # every class equally often


def test_mask_covers_exactly_the_object_painted_in_one_colour() -> None:
    # Without noise the object is one flat colour: the mask must select exactly those pixels
    # of a clutter-free, texture-free image that carry it, and nothing else has that colour.
    data = ShapesDataset(30, image_size=48, distractor_prob=1.0, texture=0.0, clutter=0, noise=0.0)
    for sample in data.__getitems__(range(30)):
        pixels = sample.image.flatten(1).T  # (H*W, 3)
        inside = pixels[sample.mask.flatten()]
        assert inside.shape[0] > 0.02 * pixels.shape[0]
        colour = inside[0]
        assert torch.equal(inside, colour.expand_as(inside))
        same_colour = (pixels == colour).all(dim=1).reshape(sample.mask.shape)
        assert torch.equal(same_colour, sample.mask)


def test_distractor_probability_controls_a_second_shape() -> None:
    def colours_outside_mask(prob: float) -> list[int]:
        data = ShapesDataset(24, image_size=48, distractor_prob=prob, texture=0.0, clutter=0, noise=0.0)
        counts = []
        for sample in data.__getitems__(range(24)):
            outside = sample.image.flatten(1).T[~sample.mask.flatten()]
            counts.append(torch.unique(outside, dim=0).shape[0])
        return counts

    assert set(colours_outside_mask(0.0)) == {1}  # flat background only
    with_distractor = colours_outside_mask(1.0)
    assert max(with_distractor) == 2 and sum(c == 2 for c in with_distractor) >= 20  # rarely hidden by the object


def test_class_subset_and_normalisation() -> None:
    raw = ShapesDataset(6, image_size=32, classes=["ring", "cross"])
    assert raw.class_names == ["ring", "cross"] and {raw[i].label for i in range(6)} == {0, 1}
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 2.0)
    normed = ShapesDataset(6, image_size=32, classes=["ring", "cross"], mean=mean, std=std)
    expected = (raw[3].image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(normed[3].image, expected)
    assert torch.equal(normed[3].mask, raw[3].mask)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"classes": ["disc", "blob"]}, ValueError, "valid shapes"),
        ({"classes": ["disc"]}, ValueError, "at least 2"),
        ({"classes": "disc"}, TypeError, "list of shape names"),
        ({"image_size": 8}, ValueError, "at least 16"),
        ({"distractor_prob": 1.5}, ValueError, r"\[0, 1\]"),
        ({"clutter": -1}, ValueError, ">= 0"),
        ({"mean": (0.5, 0.5, 0.5)}, ValueError, "both mean and std"),
        ({"mean": (0.5,), "std": (0.5,)}, ValueError, "3 values"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShapesDataset(4, **kwargs)


def test_index_out_of_range() -> None:
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(4, image_size=32)[4]
