"""Pictures into a Comet experiment (its Graphics tab, with a step slider)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import CometLogger
from torch import Tensor

from ..display.layout import to_pil
from .base import ImageSink, check_images


class CometSink(ImageSink):
    """Logs each picture with ``experiment.log_image(image, name=tag, step=step)``, the caption as its metadata.

    A time-lapse becomes the asset ``<tag>/<file name>``, overwritten each time.

    Args:
        logger: the run's Comet logger; its experiment is taken now, on the main thread.
    """

    def __init__(self, logger: CometLogger) -> None:
        self._experiment: Any = logger.experiment

    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        check_images(images)
        for tag, image in images.items():
            self._experiment.log_image(to_pil(image), name=tag, step=step, metadata={"caption": caption})

    def log_animation(self, tag: str, path: str, step: int) -> None:
        name = f"{tag}/{os.path.basename(path)}"
        self._experiment.log_asset(path, file_name=name, overwrite=True, step=step)
