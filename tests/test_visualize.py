"""The picture functions, without a Trainer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from callback_support import one_thread  # noqa: F401  (fixture)
from sp_lightning import visualize as viz

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reduce_channels_each_reduction() -> None:
    attribution = torch.tensor([[[[1.0, -2.0]], [[3.0, 2.0]]]])  # (1, C=2, H=1, W=2)
    assert torch.equal(viz.reduce_channels(attribution, "mean"), torch.tensor([[[2.0, 0.0]]]))
    assert torch.equal(viz.reduce_channels(attribution, "sum"), torch.tensor([[[4.0, 0.0]]]))
    assert torch.equal(viz.reduce_channels(attribution, "abs_mean"), torch.tensor([[[2.0, 2.0]]]))
    assert torch.allclose(viz.reduce_channels(attribution, "l2"), torch.tensor([[[10.0**0.5, 8.0**0.5]]]))
    assert viz.reduce_channels(torch.zeros(2, 5, 3, 4, 6)).shape == (2, 5, 4, 6)
    with pytest.raises(ValueError, match="reduction must be one of"):
        viz.reduce_channels(attribution, "max")
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\)"):
        viz.reduce_channels(torch.zeros(4, 4))


def test_normalize_by_negative_scales_each_sign_and_each_image_separately() -> None:
    maps = torch.tensor([[[4.0, 2.0], [-1.0, 0.0]], [[0.5, -8.0], [-2.0, 0.0]]])
    out = viz.normalize_by_negative(maps)
    assert torch.equal(out[0], torch.tensor([[1.0, 0.5], [-1.0, 0.0]]))
    assert torch.equal(out[1], torch.tensor([[1.0, -1.0], [-0.25, 0.0]]))


def test_normalize_by_negative_handles_one_signed_and_empty_maps() -> None:
    out = viz.normalize_by_negative(torch.stack([torch.zeros(3, 3), torch.full((3, 3), -2.0)]))
    assert torch.equal(out[0], torch.zeros(3, 3))
    assert torch.equal(out[1], torch.full((3, 3), -1.0))


def test_fixed_scale_is_shared_and_clipped() -> None:
    maps = torch.tensor([[[0.5, -0.25], [3.0, -3.0]]])
    assert torch.equal(viz.normalize_by_negative(maps, scale=1.0), torch.tensor([[[0.5, -0.25], [1.0, -1.0]]]))
    with pytest.raises(ValueError, match="scale must be > 0"):
        viz.normalize_by_negative(maps, scale=0.0)


def test_seismic_colours() -> None:
    colours = viz.seismic(torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]]))  # (H=1, W=5) -> (3, 1, 5)
    assert colours.shape == (3, 1, 5)
    rgb = colours[:, 0].T
    assert torch.allclose(rgb[0], torch.tensor([0.0, 0.0, 0.3]))
    assert torch.allclose(rgb[1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(rgb[2], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(rgb[3], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(rgb[4], torch.tensor([0.5, 0.0, 0.0]))
    between = viz.seismic(torch.tensor([[0.25]]))[:, 0, 0]
    assert torch.allclose(between, torch.tensor([1.0, 0.5, 0.5]))
    assert torch.equal(viz.seismic(torch.tensor([[7.0]])), viz.seismic(torch.tensor([[1.0]])))


def test_to_rgb_and_grey() -> None:
    one = torch.rand(2, 1, 4, 4)
    assert torch.equal(viz.to_rgb(one), one.expand(2, 3, 4, 4))
    four = torch.rand(4, 5, 5)
    assert torch.allclose(viz.to_rgb(four)[0], four.mean(0))
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    assert torch.allclose(viz.grey(red), torch.full((3, 2, 2), 0.299))


def test_heatmap_overlay_shows_image_at_zero_and_colour_where_strong() -> None:
    image = torch.rand(3, 4, 4)
    maps = torch.zeros(4, 4)
    maps[0, 0], maps[3, 3] = 2.0, -2.0
    out = viz.heatmap(maps, image, opacity=1.0)
    assert torch.allclose(out[:, 1, 1], viz.grey(image)[:, 1, 1])
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.5, 0.0, 0.0]))  # +1 -> dark red at full opacity
    assert torch.allclose(out[:, 3, 3], torch.tensor([0.0, 0.0, 0.3]))
    half = viz.heatmap(maps, image, opacity=0.5)[:, 0, 0]
    assert torch.allclose(half, 0.5 * viz.grey(image)[:, 0, 0] + 0.5 * torch.tensor([0.5, 0.0, 0.0]))
    plain = viz.heatmap(maps)
    assert torch.allclose(plain[:, 1, 1], torch.ones(3))
    with pytest.raises(ValueError, match="opacity"):
        viz.heatmap(maps, image, opacity=1.5)


def test_difference_image_is_grey_centred_and_scaled_per_image() -> None:
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, 0, 0, 0] = 0.1
    delta[1, 2, 1, 1] = -4.0
    out = viz.difference_image(delta)
    assert torch.allclose(out[0, :, 1, 1], torch.full((3,), 0.5))
    assert out[0, 0, 0, 0] == 1.0 and out[1, 2, 1, 1] == 0.0
    assert torch.equal(viz.difference_image(torch.zeros(3, 2, 2)), torch.full((3, 2, 2), 0.5))


def test_display_sizes_are_readable() -> None:
    assert viz.display_size(16, 16) == (128, 128)
    assert viz.display_size(28, 20) == (140, 100)  # integer factor 5 on the longer side
    assert viz.display_size(200, 150) == (200, 150)
    assert viz.display_size(512, 256) == (256, 128)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        viz.display_size(8, 8, min_size=300, max_size=200)


def test_resize_for_display_keeps_pixels_crisp_when_enlarging() -> None:
    small = torch.rand(3, 4, 4)
    big = viz.resize_for_display(small, min_size=32)
    assert big.shape == (3, 32, 32)
    assert torch.equal(big[:, :8, :8], small[:, :1, :1].expand(3, 8, 8))
    shrunk = viz.resize_for_display(torch.rand(2, 3, 64, 32), min_size=8, max_size=16)
    assert shrunk.shape == (2, 3, 16, 8)
    assert 0.0 <= float(shrunk.min()) and float(shrunk.max()) <= 1.0


def test_labelled_row_places_tiles_under_their_captions() -> None:
    tiles = torch.stack([torch.zeros(3, 10, 20), torch.full((3, 10, 20), 0.5)])
    row = viz.labelled_row(tiles, [["SP: cat", "true"], ["x" * 200]], title="probe 0", pad=4)
    text = 14 + 4 + 2 * 14  # title, pad, two caption lines
    assert row.shape == (3, text + 10 + 4, 4 + 2 * (20 + 4))
    assert torch.equal(row[:, text : text + 10, 4:24], tiles[0])
    assert torch.equal(row[:, text : text + 10, 28:48], tiles[1])
    assert torch.equal(row[:, text : text + 10, 24:28], torch.ones(3, 10, 4))  # padding between tiles
    assert float(row[:, :14].min()) < 0.5  # the title was drawn
    assert float(row[:, 18:32, 4:24].min()) < 0.5  # the first caption line of tile 0
    assert torch.equal(row[:, 32:46, 28:], torch.ones(3, 14, 24))  # tile 1 has one caption line
    assert not torch.equal(
        viz.labelled_row(tiles, [["cat"], ["dog"]])[:, :18, 4:24], viz.labelled_row(tiles, [["cow"], ["dog"]])[:, :18, 4:24]
    )
    with pytest.raises(ValueError, match="captions for 2 tiles"):
        viz.labelled_row(tiles, [["a"]])
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        viz.labelled_row(torch.zeros(2, 1, 4, 4), [["a"], ["b"]])


def test_grid_pads_and_places_cells() -> None:
    images = [torch.zeros(3, 10, 12), torch.zeros(3, 10, 12), torch.zeros(3, 6, 5)]
    out = viz.grid(images, ncol=2, pad=4, fill=1.0)
    assert out.shape == (3, 4 + 2 * (10 + 4), 4 + 2 * (12 + 4))
    assert torch.equal(out[:, :4], torch.ones(3, 4, out.shape[-1]))  # top padding
    assert torch.equal(out[:, 4:14, 4:16], torch.zeros(3, 10, 12))
    assert torch.equal(out[:, 18:24, 4:9], torch.zeros(3, 6, 5))  # small image at its cell's top left
    assert torch.equal(out[:, 24:28, 4:9], torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="at least one"):
        viz.grid([], ncol=1)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        viz.grid([torch.zeros(1, 4, 4)], ncol=1)


def _panel(**overrides: object) -> torch.Tensor:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = torch.zeros(2, 16, 16)
    maps[0, :8] = 1.0  # top half positive
    maps[1, :, 8:] = -1.0  # right half negative
    args: dict = dict(
        image=image,
        maps=maps,
        map_captions=[["SP: cat", "true"], ["SP: dog", "rival 1"]],
        counterfactuals=(image + 0.1).clamp(0, 1)[None],
        counterfactual_captions=[["PA: cat", "logit +1.00"]],
        title="probe 0",
        min_size=64,
        max_size=128,
        pad=4,
    )
    args.update(overrides)
    return viz.explanation_panel(**args)


def test_explanation_panel_layout_and_content() -> None:
    panel = _panel()
    tiles = 1 + 2 + 2  # input | 2 heatmaps | counterfactual, difference
    caption, title = 2 * 14, 14
    assert panel.shape == (3, title + 4 + caption + 64 + 4, 4 + tiles * (64 + 4))
    top = title + 4 + caption
    heat_cat = panel[:, top : top + 64, 4 + 68 : 4 + 68 + 64]
    assert (heat_cat[0, :32] > heat_cat[2, :32] + 0.2).all()  # positive half reddish
    assert torch.allclose(heat_cat[:, 32:], heat_cat[:, 32:].mean(0, keepdim=True).expand(3, 32, 64))  # grey
    heat_dog = panel[:, top : top + 64, 4 + 2 * 68 : 4 + 2 * 68 + 64]
    assert (heat_dog[2, :, 32:] > heat_dog[0, :, 32:] + 0.2).all()  # negative half bluish
    difference = panel[:, top : top + 64, 4 + 4 * 68 : 4 + 4 * 68 + 64]
    assert float(difference.mean()) > 0.5  # the counterfactual is brighter
    assert float(panel[:, :title].min()) < 0.5  # the title was drawn


def test_explanation_panel_without_differences() -> None:
    panel = _panel(differences=False)
    assert panel.shape[-1] == 4 + 4 * (64 + 4)  # input | 2 heatmaps | counterfactual
    assert torch.equal(panel[:, -68:-4, -68:-4], _panel()[:, -68:-4, -136:-72])  # the same counterfactual tile


def test_explanation_panel_captions_name_the_classes() -> None:
    a = _panel()
    b = _panel(map_captions=[["SP: tiger", "true"], ["SP: dog", "rival 1"]])
    caption_rows = slice(14 + 4, 14 + 4 + 28)
    assert not torch.equal(a[:, caption_rows, 72:136], b[:, caption_rows, 72:136])
    assert torch.equal(a[:, caption_rows, 140:204], b[:, caption_rows, 140:204])  # other captions unchanged


def test_explanation_panel_fixed_scale_keeps_brightness_comparable() -> None:
    image = torch.full((3, 8, 8), 0.5)
    weak, strong = torch.full((1, 8, 8), 0.1), torch.full((1, 8, 8), 1.0)
    per_image = [viz.explanation_panel(image, m, [["SP"]], min_size=8) for m in (weak, strong)]
    assert torch.equal(per_image[0], per_image[1])  # normalised per image: same colour
    fixed = [viz.explanation_panel(image, m, [["SP"]], scale=1.0, min_size=8) for m in (weak, strong)]
    assert not torch.equal(fixed[0], fixed[1])


def test_explanation_panel_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="map captions"):
        _panel(map_captions=[["SP: cat"]])
    with pytest.raises(ValueError, match="counterfactual captions"):
        _panel(counterfactual_captions=[])
    with pytest.raises(ValueError, match="same H, W"):
        _panel(maps=torch.zeros(2, 8, 8))


def test_save_png_round_trip(tmp_path) -> None:
    image = torch.rand(3, 5, 7)
    path = tmp_path / "a" / "b.png"
    viz.save_png(image, str(path))
    loaded = Image.open(path)
    assert loaded.size == (7, 5)
    pixels = torch.frombuffer(bytearray(loaded.convert("RGB").tobytes()), dtype=torch.uint8).view(5, 7, 3)
    pixels = pixels.permute(2, 0, 1)
    assert torch.equal(pixels, (image * 255).round().to(torch.uint8))
