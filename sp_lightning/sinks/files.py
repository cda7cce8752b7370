"""PNG files in a directory: the sink for loggers that cannot show images, and for no logger at all."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from ..display.layout import save_png
from .base import ImageSink, check_images


def png_path(directory: str, tag: str, step: int) -> str:
    """The file of one picture: ``<directory>/<tag parts>/step_00000120.png``.

    Args:
        directory: the sink's root directory.
        tag: ``'/'``-separated tag such as ``'semantic_pullback/probe_00'``.
        step: global step, zero-padded to eight digits so files sort by step.

    Raises:
        ValueError: if the tag would leave ``directory`` or has an empty part.
    """
    parts = tag.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in tag:
        raise ValueError(f"Image tag {tag!r} must be '/'-separated names without empty, '.' or '..' parts.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return os.path.join(directory, *parts, f"step_{step:08d}.png")


class PngSink(ImageSink):
    """Writes each picture as a PNG file below one directory (see :func:`png_path`).

    Args:
        directory: where the files go; created on the first write.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)

    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        check_images(images)
        for tag, image in images.items():
            save_png(image, png_path(self.directory, tag, step))

    def __repr__(self) -> str:
        return f"PngSink({self.directory!r})"
