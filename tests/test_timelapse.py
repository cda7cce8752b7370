"""Time-lapse GIFs: one frame per log, padded to the largest frame, a valid file after every add."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageSequence

from sp_lightning.display.timelapse import TimeLapse


def _frames(path: str) -> list[Image.Image]:
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]


def _flat(value: float, height: int, width: int) -> torch.Tensor:
    return torch.full((3, height, width), value)


def test_every_add_appends_one_frame_and_leaves_a_valid_file(tmp_path) -> None:
    timelapse = TimeLapse(str(tmp_path / "tl"))
    shades = [0.0, 0.25, 0.5, 0.75, 1.0]
    for count, shade in enumerate(shades, start=1):
        written = timelapse.add({"sp/probe_00": _flat(shade, 12, 20), "sp/overview": _flat(1 - shade, 8, 8)},
                                step=10 * count)
        assert written == {"sp/probe_00": str(tmp_path / "tl" / "probe_00.gif"),
                           "sp/overview": str(tmp_path / "tl" / "overview.gif")}
        frames = _frames(written["sp/probe_00"])
        assert len(frames) == count and all(frame.size == (20, 12) for frame in frames)
        assert len(_frames(written["sp/overview"])) == count
        assert sorted(os.listdir(tmp_path / "tl")) == ["overview.gif", "probe_00.gif"]  # no partial file left
    for frame, shade in zip(_frames(str(tmp_path / "tl" / "probe_00.gif")), shades):
        assert frame.getpixel((5, 5)) == pytest.approx((round(255 * shade),) * 3, abs=2)
    assert timelapse.steps("sp/probe_00") == [10, 20, 30, 40, 50]
    with Image.open(tmp_path / "tl" / "probe_00.gif") as gif:
        gif.seek(2)
        assert gif.info["comment"] == b"step 30" and gif.info["duration"] > 0 and gif.info["loop"] == 0


def test_frames_of_different_sizes_are_padded_to_the_largest(tmp_path) -> None:
    timelapse = TimeLapse(str(tmp_path))
    sizes = [(10, 16), (14, 12), (6, 6)]  # (height, width): grows in height, then shrinks
    for step, (height, width) in enumerate(sizes):
        path = timelapse.add({"probe_00": _flat(0.0, height, width)}, step)["probe_00"]
        largest = (max(w for _, w in sizes[: step + 1]), max(h for h, _ in sizes[: step + 1]))
        frames = _frames(path)
        assert len(frames) == step + 1 and all(frame.size == largest for frame in frames)
    first, second, third = _frames(path)
    assert first.getpixel((15, 9)) == pytest.approx((0, 0, 0), abs=2)  # the first frame kept its pixels ...
    assert first.getpixel((5, 12)) == pytest.approx((255, 255, 255), abs=2)  # ... padded white below
    assert second.getpixel((14, 5)) == pytest.approx((255, 255, 255), abs=2)  # narrower frame padded on the right
    assert third.getpixel((3, 3)) == pytest.approx((0, 0, 0), abs=2) and third.getpixel((8, 8)) != (0, 0, 0)
    assert timelapse.steps("probe_00") == [0, 1, 2]


def test_tags_that_would_share_a_file_are_refused(tmp_path) -> None:
    timelapse = TimeLapse(str(tmp_path))
    timelapse.add({"a/probe_00": _flat(0.5, 4, 4)}, step=0)
    with pytest.raises(ValueError, match="share the time-lapse file probe_00.gif"):
        timelapse.add({"b/probe_00": _flat(0.5, 4, 4)}, step=1)
