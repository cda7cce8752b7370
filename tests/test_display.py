"""The picture functions of :mod:`sp_lightning.display`, without a Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from callback_support import one_thread  # noqa: F401  (fixture)
from sp_lightning.display import colour, layout
from sp_lightning.display.panels import Frame, PanelStyle, heat_tiles, render_panels
from sp_lightning.probe.explain import Explanations

pytestmark = pytest.mark.usefixtures("one_thread")


def saturation(rgb: torch.Tensor) -> torch.Tensor:
    """HSV saturation of ``(3, H, W)`` colours."""
    top, bottom = rgb.amax(dim=0), rgb.amin(dim=0)
    return torch.where(top > 0, (top - bottom) / top.clamp_min(1e-12), torch.zeros_like(top))


# ------------------------------------------------------------------ colour


def test_robust_scale_is_a_high_percentile_of_the_magnitude() -> None:
    ramp = torch.linspace(-1.0, 1.0, 10_000).view(100, 100)
    outlier = ramp.clone()
    outlier[0, 0] = 1000.0
    scales = colour.robust_scale(torch.stack([ramp, outlier]), percentile=99.0)
    expected = torch.quantile(ramp.abs().flatten(), 0.99)
    assert torch.allclose(scales[0], expected) and float(scales[1]) < 2.0  # one outlier does not set the scale
    assert torch.equal(colour.robust_scale(outlier, percentile=100.0), torch.tensor(1000.0))


def test_robust_scale_of_sparse_empty_and_broken_maps() -> None:
    sparse = torch.zeros(50, 50)
    sparse[3, 4] = -0.5
    broken = torch.ones(50, 50)
    broken[1, 1] = float("nan")
    infinite = torch.ones(50, 50)
    infinite[2, 2] = float("inf")
    scales = colour.robust_scale(torch.stack([sparse, torch.zeros(50, 50), broken, infinite]))
    assert float(scales[0]) == 0.5  # percentile 0: falls back to the maximum
    assert float(scales[1]) == 1.0  # all zero: drawn white
    assert math.isnan(float(scales[2])) and math.isnan(float(scales[3]))
    for bad in (0.0, 101.0):
        with pytest.raises(ValueError, match="percentile"):
            colour.robust_scale(sparse, percentile=bad)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        colour.robust_scale(torch.zeros(4))


def test_scale_maps_fixed_and_per_map_clip_to_one() -> None:
    maps = torch.tensor([[[0.5, -0.25], [3.0, -3.0]], [[1.0, 2.0], [-4.0, 0.0]]])
    assert torch.equal(colour.scale_maps(maps[:1], 1.0), torch.tensor([[[0.5, -0.25], [1.0, -1.0]]]))
    per_map = colour.scale_maps(maps, torch.tensor([1.0, 4.0]))
    assert torch.equal(per_map[1], torch.tensor([[0.25, 0.5], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="scale must be > 0"):
        colour.scale_maps(maps, 0.0)


def test_seismic_colours() -> None:
    colours = colour.seismic(torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]]))  # (H=1, W=5) -> (3, 1, 5)
    assert colours.shape == (3, 1, 5)
    rgb = colours[:, 0].T
    assert torch.allclose(rgb[0], torch.tensor([0.0, 0.0, 0.3]))
    assert torch.allclose(rgb[1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(rgb[2], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(rgb[3], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(rgb[4], torch.tensor([0.5, 0.0, 0.0]))
    assert torch.allclose(colour.seismic(torch.tensor([[0.25]]))[:, 0, 0], torch.tensor([1.0, 0.5, 0.5]))
    assert torch.equal(colour.seismic(torch.tensor([[7.0]])), colour.seismic(torch.tensor([[1.0]])))
    assert torch.equal(colour.seismic(torch.tensor([[float("nan")]])), torch.ones(3, 1, 1))  # no IndexError


def test_to_rgb_and_grey() -> None:
    one = torch.rand(2, 1, 4, 4)
    assert torch.equal(colour.to_rgb(one), one.expand(2, 3, 4, 4))
    four = torch.rand(4, 5, 5)
    assert torch.allclose(colour.to_rgb(four)[0], four.mean(0))
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    assert torch.allclose(colour.grey(red), torch.full((3, 2, 2), 0.299))


def test_heatmap_is_colour_over_a_faint_input() -> None:
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    maps = torch.zeros(4, 4)
    maps[0, 0], maps[3, 3], maps[1, 2] = 2.0, -2.0, 0.5
    out = colour.heatmap(maps, image, scale=2.0, opacity=0.8)
    faint = 1.0 - 0.2 * (1.0 - colour.grey(image))
    assert torch.allclose(out[:, 1, 1], faint[:, 1, 1])  # zero: a light copy of the input
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.5, 0.0, 0.0]) * faint[:, 0, 0])  # full red, darkened a little
    assert torch.allclose(out[:, 3, 3], torch.tensor([0.0, 0.0, 0.3]) * faint[:, 3, 3])
    assert torch.allclose(saturation(out)[1, 2], saturation(colour.heatmap(maps, scale=2.0))[1, 2])  # hue kept
    assert torch.equal(colour.heatmap(maps, image, scale=2.0, opacity=1.0), colour.heatmap(maps, scale=2.0))
    assert torch.allclose(colour.heatmap(maps)[:, 1, 1], torch.ones(3))  # on white without an image
    with pytest.raises(ValueError, match="opacity"):
        colour.heatmap(maps, image, opacity=1.5)


def test_robust_heatmap_colours_most_of_a_heavy_tailed_map() -> None:
    """Issue 11: a few strong pixels must not leave the rest of the map white."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(160, 160, generator=generator) * 0.01
    maps[80, 80] = 5.0  # one hot pixel, 500 standard deviations out
    maximum = colour.robust_scale(maps, percentile=100.0)
    tinted = (saturation(colour.heatmap(maps)) > 0.15).float().mean()
    by_maximum = (saturation(colour.heatmap(maps, scale=maximum)) > 0.15).float().mean()
    assert float(maximum) == 5.0
    assert float(tinted) > 0.5 > 0.01 > float(by_maximum)


def test_non_finite_maps_and_images_become_grey_tiles() -> None:
    maps = torch.randn(2, 6, 6)
    maps[1, 2, 3] = float("nan")
    out = colour.heatmap(maps, torch.rand(3, 6, 6))
    assert torch.equal(colour.finite(maps), torch.tensor([True, False]))
    assert torch.equal(out[1], torch.full((3, 6, 6), colour.FLAG_GREY))
    assert torch.isfinite(out).all()
    images = torch.rand(2, 3, 4, 4)
    images[0, 1, 1, 1] = float("inf")
    flagged = colour.flag_non_finite(images)
    assert torch.equal(flagged[0], torch.full((3, 4, 4), colour.FLAG_GREY)) and torch.equal(flagged[1], images[1])


def test_difference_image_is_grey_centred_and_scaled_per_image() -> None:
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, 0, 0, 0] = 0.1
    delta[1, 2, 1, 1] = -4.0
    out = colour.difference_image(delta)
    assert torch.allclose(out[0, :, 1, 1], torch.full((3,), 0.5))
    assert out[0, 0, 0, 0] == 1.0 and out[1, 2, 1, 1] == 0.0
    assert torch.equal(colour.difference_image(torch.zeros(3, 2, 2)), torch.full((3, 2, 2), 0.5))
    assert torch.equal(colour.difference_image(torch.full((3, 2, 2), float("nan"))),
                       torch.full((3, 2, 2), colour.FLAG_GREY))


# ------------------------------------------------------------------ layout



def test_difference_image_shows_a_change_next_to_one_outlier() -> None:
    delta = torch.full((3, 20, 20), 0.01)
    delta[:, 0, 0] = 10.0  # one pixel changed a thousand times more than the rest
    out = colour.difference_image(delta)
    assert float(out[:, 0, 0].min()) == 1.0  # the outlier saturates
    assert float((out[:, 1:, :] - 0.5).abs().min()) > 0.4  # and every other pixel still shows its change

def test_display_sizes_are_readable() -> None:
    assert layout.display_size(16, 16) == (128, 128)
    assert layout.display_size(28, 20) == (140, 100)  # integer factor 5 on the longer side
    assert layout.display_size(200, 150) == (200, 150)
    assert layout.display_size(512, 256) == (256, 128)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        layout.display_size(8, 8, min_size=300, max_size=200)


def test_resize_for_display_keeps_pixels_crisp_when_enlarging() -> None:
    small = torch.rand(3, 4, 4)
    big = layout.resize_for_display(small, min_size=32)
    assert big.shape == (3, 32, 32)
    assert torch.equal(big[:, :8, :8], small[:, :1, :1].expand(3, 8, 8))
    shrunk = layout.resize_for_display(torch.rand(2, 3, 64, 32), min_size=8, max_size=16)
    assert shrunk.shape == (2, 3, 16, 8)
    assert 0.0 <= float(shrunk.min()) and float(shrunk.max()) <= 1.0


def test_type_grows_with_the_tiles_and_labels_are_short() -> None:
    sizes = [layout.font_size(width) for width in (16, 128, 160, 256, 2000)]
    assert sizes == sorted(sizes) and sizes[0] == 11 and sizes[-1] == 32 and sizes[1] < sizes[2]
    assert layout.compact(0.42) == "0.42" and layout.compact(3.2e-3) == "3.2e-3" and layout.compact(15000.0) == "1.5e+4"
    assert layout.compact(float("nan")) == "nan"
    face = layout.font(20)
    assert layout.fit("short", 500, face) == "short"
    cut = layout.fit("a rather long caption " * 4, 100, face)
    assert cut.endswith("…") and face.getlength(cut) <= 100


def _ink(region: torch.Tensor) -> bool:
    return float(region.min()) < 0.5


def test_tile_grid_places_tiles_under_captions_and_legends_under_heatmaps() -> None:
    width, height, pad = 40, 30, 4  # tile values on the 8-bit grid: the grid is drawn in 8 bits
    tiles = [layout.Tile(torch.zeros(3, height, width), ("input",)),
             layout.Tile(torch.full((3, height, width), 128 / 255), ("SP: cat", "true"), legend=3.2e-3),
             layout.Tile(torch.full((3, height, width), 64 / 255), ("x" * 200,), stamp="NaN")]
    out = layout.tile_grid(tiles, ncol=2, title=["step 5 · epoch 1"], pad=pad)
    line = layout.line_height(layout.font(layout.font_size(width)))
    title_h, caption_h, legend_h = line + pad, 2 * line, line
    cell_h = caption_h + height + legend_h + pad
    assert out.shape == (3, title_h + pad + 2 * cell_h, pad + 2 * (width + pad))
    top = title_h + pad + caption_h
    assert torch.equal(out[:, top : top + height, pad : pad + width], tiles[0].image)
    assert torch.equal(out[:, top : top + height, 2 * pad + width : 2 * pad + 2 * width], tiles[1].image)
    assert _ink(out[:, :title_h])  # the title
    assert _ink(out[:, title_h + pad : top, pad : pad + width])  # caption of tile 0
    legend_rows = slice(top + height, top + height + legend_h)
    assert float(saturation(out[:, legend_rows, 2 * pad + width :]).max()) > 0.9  # seismic bar under the heatmap
    assert torch.equal(out[:, legend_rows, pad : pad + width], torch.ones(3, legend_h, width))  # none under input
    second = top + cell_h
    stamped = out[:, second : second + height, pad : pad + width]
    assert _ink(stamped) and float(stamped.max()) == pytest.approx(64 / 255)  # "NaN" written across the third tile
    with pytest.raises(ValueError, match="like tile 0"):
        layout.tile_grid([tiles[0], layout.Tile(torch.zeros(3, 5, 5))], ncol=2)
    with pytest.raises(ValueError, match="at least one"):
        layout.tile_grid([], ncol=1)


def test_grid_pads_and_places_cells() -> None:
    images = [torch.zeros(3, 10, 12), torch.zeros(3, 10, 12), torch.zeros(3, 6, 5)]
    out = layout.grid(images, ncol=2, pad=4, fill=1.0)
    assert out.shape == (3, 4 + 2 * (10 + 4), 4 + 2 * (12 + 4))
    assert torch.equal(out[:, :4], torch.ones(3, 4, out.shape[-1]))  # top padding
    assert torch.equal(out[:, 4:14, 4:16], torch.zeros(3, 10, 12))
    assert torch.equal(out[:, 18:24, 4:9], torch.zeros(3, 6, 5))  # small image at its cell's top left
    assert torch.equal(out[:, 24:28, 4:9], torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="at least one"):
        layout.grid([], ncol=1)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        layout.grid([torch.zeros(1, 4, 4)], ncol=1)


def test_save_png_round_trip(tmp_path) -> None:
    image = torch.rand(3, 5, 7)
    path = tmp_path / "a" / "b.png"
    layout.save_png(image, str(path))
    loaded = Image.open(path)
    assert loaded.size == (7, 5)
    pixels = torch.frombuffer(bytearray(loaded.convert("RGB").tobytes()), dtype=torch.uint8).view(5, 7, 3)
    assert torch.equal(pixels.permute(2, 0, 1), (image * 255).round().to(torch.uint8))
    assert layout.to_pil(torch.full((3, 2, 2), float("nan"))).getpixel((0, 0)) == (0, 0, 0)


# ------------------------------------------------------------------ panels


def _frame(step: int = 7, epoch: int = 2, labels: bool = True, full: bool = True, **changes: object) -> Frame:
    generator = torch.Generator().manual_seed(0)
    n, size, classes = 3, 16, 5
    fields: dict = dict(
        probabilities=torch.softmax(torch.randn(n, classes, generator=generator), dim=1),
        targets=torch.tensor([[0, 1, 2], [1, 0, 2], [2, 3, 4]]),
        soft_maps=torch.randn(n, 3, size, size, generator=generator),
    )
    if full:
        fields |= dict(
            gradient_maps=torch.randn(n, size, size, generator=generator),
            counterfactual_targets=torch.tensor([[0, 1], [1, 0], [2, 3]]),
            counterfactuals=torch.rand(n, 2, 3, size, size, generator=generator),
            logit_gain=torch.randn(n, 2, generator=generator),
        )
    fields |= changes
    return Frame(tag="sp", step=step, epoch=epoch, images=torch.rand(n, 3, size, size, generator=generator),
                 labels=torch.tensor([0, 1, 2]) if labels else None, class_names=("a", "b", "c", "d", "e"),
                 explanations=Explanations(**fields), style=PanelStyle())


def test_render_panels_gives_landscape_panels_per_probe_and_an_overview() -> None:
    for frame in (_frame(), _frame(labels=False), _frame(full=False)):
        panels = render_panels(frame)
        assert set(panels) == {"sp/probe_00", "sp/probe_01", "sp/probe_02", "sp/overview"}
        for image in panels.values():
            assert image.dim() == 3 and image.shape[0] == 3 and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
        probe = panels["sp/probe_00"]
        assert probe.shape[-2] < probe.shape[-1]  # landscape, like a TIME SERIES card


def test_every_panel_title_names_its_step_and_epoch() -> None:
    before, after, later = render_panels(_frame(step=7)), render_panels(_frame(step=8)), render_panels(_frame(epoch=3))
    title = layout.line_height(layout.font(layout.font_size(128))) + 4
    for tag in before:
        assert not torch.equal(before[tag][:, :title], after[tag][:, :title])
        assert not torch.equal(before[tag][:, :title], later[tag][:, :title])
        assert torch.equal(before[tag][:, title:], after[tag][:, title:])  # only the title changes


def test_heat_tiles_say_what_full_colour_means() -> None:
    image, maps = torch.rand(3, 8, 8), torch.randn(1, 8, 8)
    captions = [["SP"]]
    weak, strong = (heat_tiles(m, image, captions, PanelStyle(min_image_size=8))[0] for m in (0.1 * maps, maps))
    assert torch.allclose(weak.image, strong.image)  # scaled per map: the same picture ...
    assert weak.legend == pytest.approx(0.1 * strong.legend)  # ... whose legend tells the strength
    style = PanelStyle(color_scale=1.0, min_image_size=8)
    fixed = [heat_tiles(m, image, captions, style)[0] for m in (0.1 * maps, maps)]
    assert not torch.equal(fixed[0].image, fixed[1].image) and fixed[0].legend == fixed[1].legend == 1.0


def test_diverged_model_draws_flagged_tiles_instead_of_failing() -> None:
    nan = float("nan")
    frame = _frame(probabilities=torch.full((3, 5), nan), soft_maps=torch.full((3, 3, 16, 16), nan),
                   counterfactuals=torch.full((3, 2, 3, 16, 16), nan), logit_gain=torch.full((3, 2), nan))
    panels = render_panels(frame)
    probe = panels["sp/probe_00"]
    grey = (probe - colour.FLAG_GREY).abs().amax(dim=0) < 1 / 255
    tile = 128 * 128  # 16-pixel images are shown at 128 pixels
    assert float(grey.sum()) > 0.7 * 7 * tile  # 3 maps, 2 counterfactuals and 2 differences flagged grey
    heat = heat_tiles(frame.explanations.soft_maps[0], frame.images[0], [["a"]] * 3, frame.style)
    assert all(t.stamp == "NaN" and t.legend is None for t in heat)
